//! The DNS sockets: binds UDP and TCP on one address, and serves them over a [`DnsHandler`]
//! until a [`CancellationToken`] fires: TCP with hickory's [`Server`], UDP with lockstep's own
//! receive loop, which answers the common query on the [fast path](super::fast) in place and
//! hands every other datagram to the handler's slow path (hickory's decoding and encoding).
//!
//! [`serve`] takes bound sockets, never an address, so tests bind `127.0.0.1:0` and read the
//! port back.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

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

/// Largest UDP query read (a query is a question and an OPT; anything longer is cut here and
/// then fails to parse).
const UDP_RECV: usize = 4096;

/// Serves DNS on `bound` until `stop` is cancelled.
pub async fn serve(bound: Bound, handler: DnsHandler, stop: CancellationToken) {
    let addr = bound.local_addr();
    let mut server = Server::new(handler.clone());
    server.register_listener(bound.tcp, TCP_IDLE, TCP_RESPONSE_QUEUE);
    let shown = addr.map_or_else(|| "?".to_string(), |a| a.to_string());
    info!(addr = %shown, "dns listening (udp and tcp)");
    let tcp = async {
        tokio::select! {
            _ = stop.cancelled() => {
                if let Err(error) = server.shutdown_gracefully().await {
                    warn!(%error, "dns server stopped with an error");
                }
            }
            r = server.block_until_done() => {
                // Only a socket failing for good ends the server on its own.
                if let Err(error) = r {
                    warn!(%error, "dns tcp server stopped");
                }
            }
        }
    };
    tokio::join!(tcp, serve_udp(bound.udp, handler, stop.clone()));
}

/// The UDP receive loop: each datagram is answered on the fast path into a reused buffer, or
/// handed to the handler's slow path, in turn (the answers are computed from memory, so no
/// task per datagram).
async fn serve_udp(socket: UdpSocket, handler: DnsHandler, stop: CancellationToken) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; UDP_RECV];
    let mut out = vec![0u8; usize::from(super::handler::MAX_UDP_PAYLOAD)];
    let mut scratch = Vec::new();
    loop {
        let (n, src) = tokio::select! {
            _ = stop.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(error) => {
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::NotConnected | std::io::ErrorKind::ConnectionAborted
                    ) {
                        warn!(%error, "dns udp socket failed; udp stopped");
                        return;
                    }
                    debug!(%error, "dns udp receive error");
                    continue;
                }
            },
        };
        if !answerable(src) {
            continue;
        }
        let Some(packet) = buf.get(..n) else {
            continue;
        };
        let started = Instant::now();
        match handler.answer_fast(packet, &mut scratch, &mut out, started) {
            Some(done) => {
                if let Some(answer) = out.get(..done.len) {
                    if let Err(error) = socket.send_to(answer, src).await {
                        debug!(%error, %src, "cannot send a DNS answer");
                    }
                }
                handler.record_fast(&done, started);
            }
            None => handler.handle_udp(packet, src, &socket).await,
        }
    }
}

/// Whether an answer can go back to `src` (as hickory's server checks: not port 0, not an
/// unspecified or broadcast address).
fn answerable(src: SocketAddr) -> bool {
    src.port() != 0
        && match src.ip() {
            IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_broadcast(),
            IpAddr::V6(v6) => !v6.is_unspecified(),
        }
}
