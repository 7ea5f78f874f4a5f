//! The HTTP side: listeners, TLS, the request path and the upstream client.
//!
//! - [`listener`]: accept loop, TLS handshake, hyper-util auto (h1/h2/h2c) connections.
//! - [`handler`]: route → pick → forward → answer, retries and error statuses.
//! - [`headers`]: hop-by-hop stripping, `X-Forwarded-*`, `Via` (pure).
//! - [`upstream`]: pooled keep-alive client to backends.
//! - [`upgrade`]: WebSocket/`Upgrade` pass-through.
//! - [`tls`]: SNI certificate selection.
//! - [`idle`]: idle-connection timeout.
//! - [`access_log`]: `combined` / `json` lines.
//! - [`body`]: streamed body types.

pub mod access_log;
pub mod body;
pub mod handler;
pub mod headers;
pub mod idle;
pub mod listener;
pub mod tls;
pub mod upgrade;
pub mod upstream;
