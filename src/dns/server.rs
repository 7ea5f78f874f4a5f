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
use tokio::runtime::Handle;
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

/// The UDP sockets and a TCP listener on the same address.
#[derive(Debug)]
pub struct Bound {
    /// The UDP sockets: one, or one per worker runtime with `SO_REUSEPORT` so the kernel
    /// spreads the datagrams over them. Non-blocking std sockets: each is registered with
    /// the runtime that serves it.
    pub udp: Vec<std::net::UdpSocket>,
    /// The TCP listener.
    pub tcp: TcpListener,
}

impl Bound {
    /// The address all of them are bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.udp.first().and_then(|s| s.local_addr().ok())
    }
}

/// Binds `udp_sockets` UDP sockets (`SO_REUSEPORT` when more than one) and TCP on `addr`.
/// With port 0, UDP picks the port and TCP takes the same one (retried with another port if
/// TCP's is taken). Must run inside a tokio runtime.
pub fn bind(addr: SocketAddr, udp_sockets: usize) -> Result<Bound, DnsError> {
    let count = udp_sockets.max(1);
    let reuseport = count > 1;
    let udp_err = |addr| {
        move |error| DnsError::Bind {
            addr,
            proto: "udp",
            error,
        }
    };
    let tries = if addr.port() == 0 { PORT_ZERO_TRIES } else { 1 };
    let mut last = None;
    for _ in 0..tries {
        let first = udp_socket(addr, reuseport).map_err(udp_err(addr))?;
        let udp_addr = first.local_addr().map_err(udp_err(addr))?;
        match std::net::TcpListener::bind(udp_addr) {
            Ok(tcp) => {
                let mut udp = vec![first];
                for _ in 1..count {
                    udp.push(udp_socket(udp_addr, true).map_err(udp_err(udp_addr))?);
                }
                tcp.set_nonblocking(true).map_err(|error| DnsError::Bind {
                    addr,
                    proto: "tcp",
                    error,
                })?;
                let tcp = TcpListener::from_std(tcp).map_err(|error| DnsError::Bind {
                    addr,
                    proto: "tcp",
                    error,
                })?;
                return Ok(Bound { udp, tcp });
            }
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

/// A non-blocking UDP socket bound to `addr`, with `SO_REUSEPORT` when `reuseport`.
fn udp_socket(addr: SocketAddr, reuseport: bool) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Largest UDP query read (a query is a question and an OPT; anything longer is cut here and
/// then fails to parse).
const UDP_RECV: usize = 4096;

/// Datagrams answered in a row before the loop lets the worker's other tasks run.
const UDP_BATCH: usize = 64;

/// Serves DNS on `bound` until `stop` is cancelled: TCP on the current runtime, UDP socket
/// `i` on runtime `workers[i]` (the current one when `workers` is empty).
pub async fn serve(
    bound: Bound,
    handler: DnsHandler,
    stop: CancellationToken,
    workers: Vec<Handle>,
) {
    let addr = bound.local_addr();
    let workers = if workers.is_empty() {
        vec![Handle::current()]
    } else {
        workers
    };
    let mut udp = Vec::new();
    for (socket, worker) in bound.udp.into_iter().zip(workers.iter().cycle()) {
        let (handler, stop) = (handler.clone(), stop.clone());
        udp.push(worker.spawn(async move {
            match UdpSocket::from_std(socket) {
                Ok(socket) => serve_udp(socket, handler, stop).await,
                Err(error) => warn!(%error, "cannot register a dns udp socket"),
            }
        }));
    }
    let udp = async {
        for task in udp {
            if let Err(error) = task.await {
                warn!(%error, "dns udp loop failed");
            }
        }
    };
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
    tokio::join!(tcp, udp);
}

/// The UDP receive loop of one socket: each datagram is answered on the fast path into a reused buffer, or
/// handed to the handler's slow path, in turn (the answers are computed from memory, so no
/// task per datagram).
async fn serve_udp(socket: UdpSocket, handler: DnsHandler, stop: CancellationToken) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; UDP_RECV];
    let mut out = vec![0u8; usize::from(super::handler::MAX_UDP_PAYLOAD)];
    let mut scratch = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = socket.readable() => if let Err(error) = r {
                warn!(%error, "dns udp socket failed; udp stopped");
                return;
            },
        }
        // Drain what is queued without going back to the runtime for each datagram, at
        // most a batch at a time so a busy socket cannot starve the worker's other tasks.
        let mut drained = false;
        for _ in 0..UDP_BATCH {
            let (n, src) = match socket.try_recv_from(&mut buf) {
                Ok(r) => r,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
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
                        send(&socket, answer, src).await;
                    }
                    handler.record_fast(&done, started);
                }
                None => handler.handle_udp(packet, src, &socket).await,
            }
        }
        if !drained {
            tokio::task::yield_now().await;
        }
    }
}

/// Sends `answer` to `dst`, waiting for the socket only when its buffer is full.
async fn send(socket: &UdpSocket, answer: &[u8], dst: SocketAddr) {
    let result = match socket.try_send_to(answer, dst) {
        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
            socket.send_to(answer, dst).await
        }
        r => r,
    };
    if let Err(error) = result {
        debug!(%error, %dst, "cannot send a DNS answer");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn several_udp_sockets_share_the_port_of_the_tcp_listener() {
        let b = bind("127.0.0.1:0".parse().unwrap(), 3).expect("bind");
        let addr = b.local_addr().expect("addr");
        assert_eq!(b.udp.len(), 3);
        for s in &b.udp {
            assert_eq!(s.local_addr().ok(), Some(addr));
        }
        assert_eq!(b.tcp.local_addr().ok(), Some(addr));
        // One socket: no SO_REUSEPORT, so a second bind of the port fails.
        let one = bind("127.0.0.1:0".parse().unwrap(), 1).expect("bind");
        let taken = one.local_addr().expect("addr");
        assert!(bind(taken, 1).is_err());
    }
}
