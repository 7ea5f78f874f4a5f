//! The HTTP side: listeners and the request path (the sockets, TLS, bodies and the upstream
//! client are [`crate::net`]'s).
//!
//! - [`listener`]: each accepted connection's context, served by [`crate::net::server`].
//! - [`handler`]: route → pick → forward → answer, retries and error statuses.
//! - [`headers`]: hop-by-hop stripping, `X-Forwarded-*`, `Via` (pure).
//! - [`upgrade`]: WebSocket/`Upgrade` pass-through.
//! - [`access_log`]: `combined` / `json` lines.

pub mod access_log;
pub mod handler;
pub mod headers;
pub mod listener;
pub mod upgrade;
