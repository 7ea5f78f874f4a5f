//! What a proxy connection knows while it serves requests: decided once at accept (listener
//! settings of that generation, the peer, whether it is a trusted proxy, TLS) and read by every
//! request on it.

use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderValue;

use crate::config::Listener;
use crate::live::Shared;
use prometheus_client::metrics::gauge::Gauge;

/// What a connection knows while it serves requests.
pub struct ConnCtx {
    /// The listener it arrived on.
    pub listener: Arc<Listener>,
    /// The client's address (the PROXY header's, from a trusted balancer).
    pub peer: SocketAddr,
    /// The address the client connected to (the PROXY header's), known when some pool
    /// sends the PROXY protocol.
    pub local: Option<SocketAddr>,
    /// Whether the peer is a trusted proxy (decided once per connection).
    pub trusted: bool,
    /// The peer's address as a header value, for `X-Forwarded-For`.
    pub peer_value: HeaderValue,
    /// Whether TLS terminated here.
    pub tls: bool,
    /// The live state.
    pub live: Shared,
    /// Upgraded tunnels open on this listener (a tunnel is its connection's task, so it
    /// keeps the connection's place under the cap and is drained like a request).
    pub tunnels: Gauge,
}
