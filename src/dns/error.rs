//! How the DNS responder fails to start.

use std::net::SocketAddr;

/// Failures of the DNS responder.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// A socket could not be bound.
    #[error("cannot bind DNS {proto} on {addr}: {error} (is another DNS server running, or does port {} need privileges? CAP_NET_BIND_SERVICE lets lockstep bind port 53)", addr.port())]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// `udp` or `tcp`.
        proto: &'static str,
        /// The OS error (in the message, so it prints once).
        error: std::io::Error,
    },
}
