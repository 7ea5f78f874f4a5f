//! The HTTP side: listeners and the request path (the sockets, TLS, bodies and the upstream
//! client are [`crate::net`]'s).
//!
//! - [`listener`]: each accepted connection's context, served by [`crate::net::server`].
//! - [`conn`]: what a connection knows (decided once at accept).
//! - [`handler`]: route → forward → count and log.
//! - [`forward`]: the upstream phases: prepare, choose, send (in-flight guard), respond.
//! - [`retry`]: what a failed attempt leads to; which requests may be replayed (pure).
//! - [`headers`]: hop-by-hop stripping, `X-Forwarded-*`, `Via` (pure).
//! - [`access_log`]: `combined` / `json` lines.

pub mod access_log;
pub mod conn;
pub mod forward;
pub mod handler;
pub mod headers;
pub mod listener;
pub mod retry;
