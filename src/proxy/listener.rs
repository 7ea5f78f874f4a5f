//! A proxy listener: accepts connections on a bound socket, terminates TLS when configured,
//! and serves HTTP/1.1, h2 (ALPN) and h2c (prior knowledge) through hyper-util's auto builder.
//!
//! The listener's settings (certificates, timeouts, access log, trusted proxies) are read from
//! the live state at each accept, so a reload applies them to new connections while open ones
//! finish on what they started with.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, debug_span, warn, Instrument};

use super::handler::{self, ConnCtx};
use super::headers::{is_trusted, peer_value};
use super::idle::IdleIo;
use crate::config::Listener;
use crate::live::Shared;
use crate::metrics::{ListenerLabels, Metrics};

/// Largest request head (request line + headers) accepted; bigger ones get 431.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Accepts on `socket` until `shutdown`, spawning each connection on `tracker` (on the
/// runtime this runs on).
pub async fn serve(
    name: String,
    socket: std::net::TcpListener,
    live: Shared,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let socket = match TcpListener::from_std(socket) {
        Ok(s) => s,
        Err(e) => {
            warn!(listener = %name, error = %e, "cannot register the listening socket");
            return;
        }
    };
    let open = metrics
        .connections
        .get_or_create(&ListenerLabels {
            listener: name.clone(),
        })
        .clone();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = socket.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let generation = live.load();
        let Some((listener, acceptor)) = generation.listener(&name) else {
            // Removed by a reload: it stops taking new connections.
            debug!(listener = %name, "listener no longer configured; closing");
            break;
        };
        let ctx = Arc::new(ConnCtx {
            trusted: is_trusted(peer.ip(), &listener.trusted_proxies),
            peer_value: peer_value(peer.ip()),
            tls: acceptor.is_some(),
            listener,
            peer,
            live: live.clone(),
        });
        drop(generation);
        let shutdown = shutdown.clone();
        let open = open.clone();
        open.inc();
        tracker.spawn(
            async move {
                serve_connection(stream, acceptor, ctx, shutdown).await;
                open.dec();
            }
            .instrument(debug_span!("conn", client.addr = %peer, listener = %name)),
        );
    }
}

async fn serve_connection(
    stream: TcpStream,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    ctx: Arc<ConnCtx>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let listener: &Listener = &ctx.listener;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(listener.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(MAX_HEAD_BYTES as u32);
    let idle = listener.idle_timeout;
    let handshake_timeout = listener.header_read_timeout;
    let svc_ctx = ctx.clone();
    let svc = service_fn(move |req| handler::handle(svc_ctx.clone(), req));
    match acceptor {
        None => run(&builder, IdleIo::new(stream, idle), svc, &shutdown).await,
        Some(acceptor) => {
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!("TLS handshake timed out");
                    return;
                }
            };
            run(&builder, IdleIo::new(tls, idle), svc, &shutdown).await
        }
    }
}

/// Serves one connection with `builder` (h1/h2 auto, upgrades allowed) until it ends; at
/// `shutdown`, finishes the requests in flight and closes (the caller bounds how long). Shared
/// by the proxy, the sync API and the agent.
pub async fn serve_until_shutdown<I, S, B>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    svc: S,
    shutdown: &CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

async fn run<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    svc: S,
    shutdown: &CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<super::body::ResponseBody>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    if let Err(e) = serve_until_shutdown(builder, io, svc, shutdown).await {
        debug!(error = %e, "connection ended with an error");
    }
}

/// Binds `count` listening sockets on `addr` for `count` worker runtimes: one plain socket
/// when `count` is 1, else `SO_REUSEPORT` sockets (the kernel spreads connections over them);
/// with port 0 the later ones take the port the first one got. They are returned as
/// non-blocking std sockets so that each worker registers its own with its runtime.
pub fn bind_many(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let reuseport = count > 1;
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(count);
    let mut at = addr;
    for _ in 0..count.max(1) {
        let socket = if at.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        if reuseport {
            socket.set_reuseport(true)?;
        }
        socket.bind(at)?;
        let l = socket.listen(4096)?.into_std()?;
        at = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// Binds a listening socket with `SO_REUSEADDR` and a deep backlog.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let mut sockets = bind_many(addr, 1)?;
    let socket = sockets
        .pop()
        .ok_or_else(|| std::io::Error::other("no socket bound"))?;
    TcpListener::from_std(socket)
}
