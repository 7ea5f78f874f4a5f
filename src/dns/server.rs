//! The DNS sockets: binds UDP and TCP on one address, and serves them over a [`DnsHandler`]
//! until a [`CancellationToken`] fires: TCP through [`tcp`](super::tcp) (the one accept loop,
//! a connection cap, the idle timeout), UDP with lockstep's own receive loop, which answers the
//! common query on the [fast path](super::fast) in place and hands every other datagram to the
//! handler's slow path (hickory's decoding and encoding).
//!
//! Every UDP query that would be answered is first metered by the loop's
//! [response-rate limiter](super::rrl) (one per socket, so no lock): over its prefix's rate it
//! is dropped, or answered truncated when it slips, before either path spends anything on it.
//!
//! The UDP loop works a batch at a time through [`udp_batch`](super::udp_batch): one
//! `recvmmsg` reads up to 64 queued datagrams, the fast answers go into per-slot buffers and
//! out with one `sendmmsg` (on Linux; elsewhere one syscall per datagram). A datagram for the
//! slow path is handled in its turn, after the fast answers before it were sent, so a client
//! gets its answers in the order it asked. After a full batch the loop yields, so a busy
//! socket cannot starve the worker's other tasks.
//!
//! [`serve`] takes bound sockets, never an address, so tests bind `127.0.0.1:0` and read the
//! port back.
#![allow(clippy::disallowed_methods)] // I/O shell: answer latency, the rate limiter's clock and hash seed

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::error::DnsError;
use super::handler::{DnsHandler, FastDone};
use super::rrl::{self, Limiter, Verdict};
use super::tcp;
use super::udp_batch::{Inbox, Outbox, SLOTS};

/// How long a TCP client may take to send each whole query (or to read each answer) before
/// its connection is closed (RFC 7766 §6.2.3 suggests tens of seconds; idle connections cost
/// a task and a slot of `dns.max_tcp_connections` each).
const TCP_IDLE: Duration = Duration::from_secs(10);

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
    let tcp_err = |error| DnsError::Bind {
        addr,
        proto: "tcp",
        error,
    };
    // Kept by systemd across a restart (net::bind): the queries sent meanwhile wait in them.
    if let Some((udp, tcp)) = crate::net::bind::claim_dns(addr) {
        for u in &udp {
            u.set_nonblocking(true).map_err(udp_err(addr))?;
        }
        tcp.set_nonblocking(true).map_err(tcp_err)?;
        let tcp = TcpListener::from_std(tcp).map_err(tcp_err)?;
        return Ok(Bound { udp, tcp });
    }
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
                tcp.set_nonblocking(true).map_err(tcp_err)?;
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

/// Hands `bound`'s sockets to systemd's store (see [`crate::net::bind::keep`]).
pub fn keep(bound: &Bound) {
    crate::net::bind::keep("dns-udp", &bound.udp);
    crate::net::bind::keep("dns-tcp", std::slice::from_ref(&bound.tcp));
}

/// Serves DNS on `bound` until `stop` is cancelled, TCP and every UDP socket on the current
/// runtime (one UDP socket measured faster than one per worker on 2 shared cores:
/// BENCHMARKS.md).
pub async fn serve(bound: Bound, handler: DnsHandler, stop: CancellationToken) {
    let addr = bound.local_addr();
    let mut udp = Vec::new();
    for socket in bound.udp {
        let (handler, stop) = (handler.clone(), stop.clone());
        udp.push(tokio::spawn(async move {
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
    let shown = addr.map_or_else(|| "?".to_string(), |a| a.to_string());
    info!(addr = %shown, "dns listening (udp and tcp)");
    let tcp = tcp::serve(bound.tcp, handler, TCP_IDLE, stop);
    tokio::join!(tcp, udp);
}

/// The UDP receive loop of one socket. Each wakeup reads up to a batch of datagrams at once
/// ([`Inbox`]); each query is metered by the socket's rate [`Limiter`] (dropped, or a
/// truncated reply queued, when over its prefix's rate), then answered on the fast path into
/// its own slot of the [`Outbox`], and the slots go out together (one `recvmmsg` and one
/// `sendmmsg` per batch on Linux). A datagram the fast path does not take goes to the
/// handler's slow path in turn, after the answers before it were sent, so each client gets
/// its answers in the order it asked. The answers are computed from memory, so there is no
/// task per datagram.
async fn serve_udp(socket: UdpSocket, handler: DnsHandler, stop: CancellationToken) {
    let socket = Arc::new(socket);
    let inbox = match socket.local_addr() {
        Ok(local) => Inbox::new(local),
        Err(error) => {
            warn!(%error, "dns udp socket has no address; udp stopped");
            return;
        }
    };
    let mut udp = UdpLoop {
        socket,
        handler,
        inbox,
        outbox: Outbox::default(),
        scratch: Vec::new(),
        limiter: Limiter::new(rand::random(), Instant::now()),
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = udp.socket.readable() => if let Err(error) = r {
                warn!(%error, "dns udp socket failed; udp stopped");
                return;
            },
        }
        let received = match udp.inbox.recv(&udp.socket) {
            Ok(n) => n,
            // Drained: readiness is cleared, the next `readable` waits.
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::NotConnected | std::io::ErrorKind::ConnectionAborted
                ) =>
            {
                warn!(%error, "dns udp socket failed; udp stopped");
                return;
            }
            Err(error) => {
                debug!(%error, "dns udp receive error");
                tokio::task::yield_now().await;
                continue;
            }
        };
        udp.answer_batch().await;
        // A full batch: more may be queued, but the worker's other tasks get a turn first.
        if received >= SLOTS {
            tokio::task::yield_now().await;
        }
    }
}

/// One UDP socket's loop state: the batch read last, the replies being gathered, and the
/// socket's rate limiter.
struct UdpLoop {
    socket: Arc<UdpSocket>,
    handler: DnsHandler,
    inbox: Inbox,
    outbox: Outbox<Option<FastDone>>,
    scratch: Vec<(std::net::IpAddr, bool)>,
    limiter: Limiter,
}

impl UdpLoop {
    /// Answers the batch in the inbox: each query metered, then answered on the fast path or,
    /// after the replies before it were sent, on the slow path.
    async fn answer_batch(&mut self) {
        let UdpLoop {
            socket,
            handler,
            inbox,
            outbox,
            scratch,
            limiter,
        } = self;
        let started = Instant::now();
        // Slipped replies carry no tag: they were counted when decided.
        let record = |done: Option<FastDone>| {
            if let Some(done) = done {
                handler.record_fast(&done, started);
            }
        };
        // Read once per batch: a reload applies from the next one.
        let limits = handler.udp_limits();
        for (packet, src) in inbox.datagrams() {
            if !answerable(src) {
                continue;
            }
            if outbox.is_full() {
                outbox.flush(socket, &record).await;
            }
            // Only what would be answered spends tokens: not junk shorter than a header, nor
            // responses (both get silence anyway).
            if limits.is_on() && is_query(packet) {
                let verdict = limiter.check(src.ip(), started, &limits);
                handler.record_rrl(verdict);
                match verdict {
                    Verdict::Answer => {}
                    Verdict::Drop => continue,
                    Verdict::Slip => {
                        outbox.queue(src, |out| Some((rrl::slip_reply(packet, out)?, None)));
                        continue;
                    }
                }
            }
            let fast = outbox.queue(src, |out| {
                let done = handler.answer_fast(packet, scratch, out, started)?;
                Some((done.len, Some(done)))
            });
            if !fast {
                outbox.flush(socket, &record).await;
                handler.handle_udp(packet, src, socket).await;
            }
        }
        outbox.flush(socket, &record).await;
    }
}

/// Whether `packet` is a DNS query: a whole header with QR clear.
fn is_query(packet: &[u8]) -> bool {
    packet.len() >= 12 && packet.get(2).is_some_and(|flags| flags & 0x80 == 0)
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
