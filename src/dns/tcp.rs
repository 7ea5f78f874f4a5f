//! DNS over TCP (RFC 1035 §4.2.2, RFC 7766): the listener's accept loop (the one of
//! [`net::accept`](crate::net::accept)) with a cap on open connections, and each connection's
//! length-prefixed queries answered in order through the handler's slow path.
//!
//! - **Cap**: at most `dns.max_tcp_connections` connections are open (read from the live
//!   generation at every accept, so a reload moves it); one more is closed as soon as it is
//!   accepted and counted (`lockstep_dns_tcp_refused_total`).
//! - **Idle**: a client has `idle` to send each whole query (the 2-byte length and the message),
//!   counted from the connection's start or its last answer, and as long to take each answer;
//!   then the connection is closed. A client that sends nothing, or half a length prefix, or a
//!   query one byte at a time, holds its connection for `idle` at most.
//! - **Memory**: a connection holds a 4 KiB read buffer, one query (at most 64 KiB, the length
//!   prefix's limit) and one answer at a time.
//!
//! Answers are not rate limited: TCP's handshake proves the source address, which is what
//! response-rate limiting of UDP guards against.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, debug_span, Instrument};

use super::handler::DnsHandler;
use crate::net::accept::{accept_loop, Accepted};

/// Bytes read from a connection at a time.
const READ_BUFFER: usize = 4096;

/// Accepts DNS-over-TCP connections on `listener` and serves them until `stop`; then waits for
/// the connections, which end at `stop` too.
pub async fn serve(
    listener: TcpListener,
    handler: DnsHandler,
    idle: Duration,
    stop: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let open = Arc::new(AtomicUsize::new(0));
    accept_loop(&listener, "dns tcp", &stop, &tracker, |io, peer| {
        let Some(slot) = Open::take(&open, handler.max_tcp_connections()) else {
            handler.metrics().tcp_refused.inc();
            debug!(%peer, "dns tcp connection over max_tcp_connections; closed");
            return Accepted::refuse(io);
        };
        let (handler, stop) = (handler.clone(), stop.clone());
        Accepted::Serve(
            async move {
                let gauge = handler.metrics().tcp_connections.clone();
                gauge.inc();
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = connection(io, peer, &handler, idle) => {}
                }
                drop(slot);
                gauge.dec();
            }
            .instrument(debug_span!("dns_tcp", client.addr = %peer)),
        )
    })
    .await;
    tracker.close();
    tracker.wait().await;
}

/// One open connection counted against the cap; counted off when dropped.
struct Open(Arc<AtomicUsize>);

impl Open {
    /// Counts a connection in when fewer than `max` are open.
    fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Open> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Open(open.clone()))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers the queries of one connection in order until the client closes it, breaks the
/// framing, or stays silent (or does not read) for `idle`.
async fn connection<S>(io: S, peer: SocketAddr, handler: &DnsHandler, idle: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Buffered: a client's pipelined queries come in with one read, not two per query.
    let mut io = BufReader::with_capacity(READ_BUFFER, io);
    let mut query = Vec::new();
    let mut framed = Vec::new();
    loop {
        match tokio::time::timeout(idle, read_message(&mut io, &mut query)).await {
            Err(_) => {
                debug!(?idle, "dns tcp client idle; closed");
                return;
            }
            Ok(Err(error)) => {
                // EOF between queries is the usual end; anything else is the client's fault.
                debug!(%error, "dns tcp connection ended");
                return;
            }
            Ok(Ok(())) => {}
        }
        let Some(answer) = handler.answer_tcp(&query, peer).await else {
            continue;
        };
        let Ok(len) = u16::try_from(answer.len()) else {
            debug!(len = answer.len(), "dns answer over 65535 bytes; not sent");
            continue;
        };
        // Length and message in one write, so one segment (RFC 7766 §8).
        framed.clear();
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&answer);
        let write = io.write_all(&framed);
        match tokio::time::timeout(idle, write).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                debug!(%error, "cannot send a dns tcp answer; closed");
                return;
            }
            Err(_) => {
                debug!(?idle, "dns tcp client does not read its answers; closed");
                return;
            }
        }
    }
}

/// Reads one length-prefixed message into `buf`.
async fn read_message<S: AsyncRead + Unpin>(io: &mut S, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let len = io.read_u16().await?;
    buf.clear();
    buf.resize(usize::from(len), 0);
    io.read_exact(buf).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Instant;

    use arc_swap::ArcSwap;
    use tokio::net::TcpStream;

    use super::*;
    use crate::dns::metrics::DnsMetrics;
    use crate::dns::view::View;
    use crate::metrics::Metrics;
    use crate::pools::table::Table;

    const WAIT: Duration = Duration::from_secs(5);

    #[test]
    fn the_cap_counts_connections_in_and_out() {
        let open = Arc::new(AtomicUsize::new(0));
        let a = Open::take(&open, 2).expect("first");
        let b = Open::take(&open, 2).expect("second");
        assert!(Open::take(&open, 2).is_none(), "third over the cap");
        assert_eq!(open.load(Ordering::Acquire), 2);
        drop(a);
        let c = Open::take(&open, 2).expect("room again");
        // A reload lowering the cap below what is open: nothing new until enough close.
        assert!(Open::take(&open, 1).is_none());
        drop((b, c));
        assert_eq!(open.load(Ordering::Acquire), 0);
        assert!(
            Open::take(&open, 0).is_none(),
            "no dns: section, no connection"
        );
    }

    /// Serves DNS over TCP on 127.0.0.1:0 with `idle` and `max` connections; the address, the
    /// metrics and the stop token.
    async fn start(idle: Duration, max: u32) -> (SocketAddr, DnsMetrics, CancellationToken) {
        let yaml = format!(
            "dns:\n  bind: \"127.0.0.1:0\"\n  max_tcp_connections: {max}\n  zones:\n    - name: farm.test\n      records:\n        - {{ name: lb, addresses: [\"192.0.2.1\"] }}\n"
        );
        let config = crate::config::parse(Path::new("t.yaml"), &yaml).expect("config");
        let metrics = Metrics::new();
        let table = Arc::new(Table::build(&config, None, 1, &metrics));
        let view = Arc::new(ArcSwap::from_pointee(View::build(&config, table, None, 1)));
        let dns_metrics = DnsMetrics::register(&metrics);
        let handler = DnsHandler::new(view, dns_metrics.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, handler, idle, stop.clone()));
        (addr, dns_metrics, stop)
    }

    /// `lb.farm.test A`, id 0xbeef, with its length prefix.
    fn framed_query() -> Vec<u8> {
        let mut q = vec![0xbe, 0xef, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x02lb\x04farm\x04test\x00\x00\x01\x00\x01");
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        framed
    }

    /// Reads one framed answer; its id and answer count.
    async fn read_answer(s: &mut TcpStream) -> (u16, u16) {
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, read_message(s, &mut buf))
            .await
            .expect("an answer in time")
            .expect("an answer");
        (
            u16::from_be_bytes([buf[0], buf[1]]),
            u16::from_be_bytes([buf[6], buf[7]]),
        )
    }

    /// Waits for the server to close `s`.
    async fn closed(s: &mut TcpStream) {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(WAIT, s.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(_)) => panic!("unexpected bytes"),
            Err(_) => panic!("not closed within {WAIT:?}"),
        }
    }

    #[tokio::test]
    async fn a_silent_client_and_half_a_length_prefix_are_closed_after_the_idle_time() {
        let idle = Duration::from_millis(300);
        let (addr, _, stop) = start(idle, 16).await;
        let t0 = Instant::now();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(&[0]).await.unwrap();
        // Half a query: its length and a few bytes of the message.
        let mut partial = TcpStream::connect(addr).await.unwrap();
        partial.write_all(&framed_query()[..6]).await.unwrap();
        for (what, s) in [
            ("silent", &mut silent),
            ("half a prefix", &mut half),
            ("half a query", &mut partial),
        ] {
            closed(s).await;
            // Not before its idle time (which started after `t0`).
            assert!(
                t0.elapsed() >= idle,
                "{what}: closed after {:?}",
                t0.elapsed()
            );
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn queries_are_answered_in_order_and_each_answer_restarts_the_idle_time() {
        let idle = Duration::from_millis(400);
        let (addr, _, stop) = start(idle, 16).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        // Two pipelined queries, then more, each within the idle time of the answer before.
        let two = [framed_query(), framed_query()].concat();
        s.write_all(&two).await.unwrap();
        assert_eq!(read_answer(&mut s).await, (0xbeef, 1));
        assert_eq!(read_answer(&mut s).await, (0xbeef, 1));
        let t = Instant::now();
        for _ in 0..4 {
            // Pacing, not synchronisation: the connection must outlive one idle time.
            tokio::time::sleep(idle / 2).await;
            s.write_all(&framed_query()).await.unwrap();
            assert_eq!(read_answer(&mut s).await, (0xbeef, 1));
        }
        assert!(
            t.elapsed() > idle,
            "kept open past one idle time by its queries"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_at_once_and_counted() {
        let (addr, metrics, stop) = start(Duration::from_secs(60), 2).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&framed_query()).await.unwrap();
            assert_eq!(read_answer(&mut s).await.0, 0xbeef, "admitted");
            held.push(s);
        }
        assert_eq!(metrics.tcp_connections.get(), 2);
        for _ in 0..3 {
            let mut extra = TcpStream::connect(addr).await.unwrap();
            // Closed at once: long before the 60 s idle time.
            closed(&mut extra).await;
        }
        assert_eq!(metrics.tcp_refused.get(), 3);
        // One closes: room for a new one.
        drop(held.pop());
        let deadline = Instant::now() + WAIT;
        while metrics.tcp_connections.get() != 1 {
            assert!(
                Instant::now() < deadline,
                "the closed connection was not counted off"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&framed_query()).await.unwrap();
        assert_eq!(read_answer(&mut s).await.0, 0xbeef);
        stop.cancel();
    }
}
