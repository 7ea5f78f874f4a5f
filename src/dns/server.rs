//! The DNS sockets: binds UDP and TCP on one address, and serves both with hickory's
//! [`Server`] over a [`DnsHandler`] until a [`CancellationToken`] fires.
//!
//! [`serve`] takes bound sockets, never an address, so tests bind `127.0.0.1:0` and read the
//! port back.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::handler::DnsHandler;
use super::DnsError;

/// How long a TCP client may stay silent between queries before its connection is closed
/// (RFC 7766 §6.2.3 suggests tens of seconds; idle connections cost a task each).
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Responses queued per TCP connection before its writer pushes back.
const TCP_RESPONSE_QUEUE: usize = 32;

/// How many times binding TCP on the port UDP got from port 0 is retried with a new port.
const PORT_ZERO_TRIES: usize = 16;

/// A UDP socket and a TCP listener on the same address.
#[derive(Debug)]
pub struct Bound {
    /// The UDP socket.
    pub udp: UdpSocket,
    /// The TCP listener.
    pub tcp: TcpListener,
}

impl Bound {
    /// The address both are bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.udp.local_addr().ok()
    }
}

/// Binds UDP and TCP on `addr`. With port 0, UDP picks the port and TCP takes the same one
/// (retried with another port if TCP's is taken). Must run inside a tokio runtime.
pub fn bind(addr: SocketAddr) -> Result<Bound, DnsError> {
    let tries = if addr.port() == 0 { PORT_ZERO_TRIES } else { 1 };
    let mut last = None;
    for _ in 0..tries {
        let udp = std::net::UdpSocket::bind(addr).map_err(|error| DnsError::Bind {
            addr,
            proto: "udp",
            error,
        })?;
        let udp_addr = udp.local_addr().map_err(|error| DnsError::Bind {
            addr,
            proto: "udp",
            error,
        })?;
        match std::net::TcpListener::bind(udp_addr) {
            Ok(tcp) => return into_tokio(udp, tcp, addr),
            Err(error) => {
                last = Some(DnsError::Bind {
                    addr: udp_addr,
                    proto: "tcp",
                    error,
                })
            }
        }
    }
    Err(last.unwrap_or(DnsError::Bind {
        addr,
        proto: "tcp",
        error: std::io::Error::other("no attempt made"),
    }))
}

fn into_tokio(
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
    addr: SocketAddr,
) -> Result<Bound, DnsError> {
    let err = |proto: &'static str| move |error| DnsError::Bind { addr, proto, error };
    udp.set_nonblocking(true).map_err(err("udp"))?;
    tcp.set_nonblocking(true).map_err(err("tcp"))?;
    Ok(Bound {
        udp: UdpSocket::from_std(udp).map_err(err("udp"))?,
        tcp: TcpListener::from_std(tcp).map_err(err("tcp"))?,
    })
}

/// Serves DNS on `bound` until `stop` is cancelled.
pub async fn serve(bound: Bound, handler: DnsHandler, stop: CancellationToken) {
    let addr = bound.local_addr();
    let mut server = Server::new(handler);
    server.register_socket(bound.udp);
    server.register_listener(bound.tcp, TCP_IDLE, TCP_RESPONSE_QUEUE);
    let shown = addr.map_or_else(|| "?".to_string(), |a| a.to_string());
    info!(addr = %shown, "dns listening (udp and tcp)");
    tokio::select! {
        _ = stop.cancelled() => {
            if let Err(error) = server.shutdown_gracefully().await {
                warn!(%error, "dns server stopped with an error");
            }
        }
        r = server.block_until_done() => {
            // Only a socket failing for good ends the server on its own.
            if let Err(error) = r {
                warn!(%error, "dns server stopped");
            }
        }
    }
}
