//! A proxy listener: the accept loop of [`crate::net`] with the proxy's own per-connection
//! context, terminating TLS when configured and serving HTTP/1.1, h2 (ALPN) and h2c (prior
//! knowledge).
//!
//! The listener's settings (certificates, timeouts, access log, trusted proxies) are read from
//! the live state at each accept, so a reload applies them to new connections while open ones
//! finish on what they started with. A connection from a balancer in `proxy_protocol.from`
//! first gives its PROXY header (v1 or v2), whose client address is then the connection's.

use std::sync::Arc;

use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, debug_span, warn, Instrument};

use super::conn::ConnCtx;
use super::handler;
use super::headers::{is_trusted, peer_value};
use crate::config::Listener;
use crate::live::Shared;
use crate::metrics::{ListenerLabels, Metrics};
use crate::net::accept::{accept_loop, Accepted};
use crate::net::limit::{ConnGate, Permit};
use crate::net::proxy_protocol::{read_header, Header};
use crate::net::server::{serve_connection, ConnSettings};
use prometheus_client::metrics::gauge::Gauge;
use std::net::SocketAddr;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;

/// Accepts on `socket` until `shutdown` or until a reload removes listener `name`, spawning
/// each connection on `tracker` (on the runtime this runs on).
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
    // One gate per listener name: every worker's socket of this listener counts together
    // (the metric families hand each the same gauge).
    let labels = ListenerLabels {
        listener: name.clone(),
    };
    let gate = ConnGate::new(
        metrics.connections.get_or_create(&labels).clone(),
        metrics.connections_refused.get_or_create(&labels).clone(),
    );
    let tunnels_open = metrics
        .tunnels
        .get_or_create(&ListenerLabels {
            listener: name.clone(),
        })
        .clone();
    accept_loop(&socket, &name, &shutdown, &tracker, |stream, peer| {
        let generation = live.load();
        let Some((listener, acceptor)) = generation.listener(&name) else {
            // Removed by a reload: it stops taking new connections.
            debug!(listener = %name, "listener no longer configured; closing");
            return Accepted::Stop;
        };
        let Some(permit) = gate.admit(listener.max_connections) else {
            return Accepted::refuse(stream);
        };
        let settings = ConnSettings {
            header_read_timeout: listener.header_read_timeout,
            idle_timeout: Some(listener.idle_timeout),
            http2_only: listener.http2_only,
            ..ConnSettings::default()
        };
        let local = generation
            .sends_proxy
            .then(|| stream.local_addr().ok())
            .flatten();
        drop(generation);
        let conn = Conn {
            live: live.clone(),
            tunnels: tunnels_open.clone(),
            shutdown: shutdown.clone(),
        };
        if is_trusted(peer.ip(), &listener.proxy_from) {
            // A trusted balancer's connection: its PROXY header says whose it is (boxed: the
            // rare path keeps the common one's future small).
            let span = debug_span!("conn", balancer.addr = %peer, listener = %name);
            let proxied = Box::pin(
                conn.proxied(stream, listener, peer, acceptor, settings, permit)
                    .instrument(span),
            );
            return Accepted::Serve(Either::Right(proxied));
        }
        let (ctx, shutdown) = conn.ctx(listener, peer, local, acceptor.is_some());
        let svc = service_fn(move |req| handler::handle(ctx.clone(), req));
        // The permit is held until the connection ends, a tunnel it became included.
        Accepted::Serve(Either::Left(
            serve_connection(stream, acceptor, settings, svc, shutdown, permit)
                .instrument(debug_span!("conn", client.addr = %peer, listener = %name)),
        ))
    })
    .await
}

/// What every connection of the listener shares.
struct Conn {
    live: Shared,
    tunnels: Gauge,
    shutdown: CancellationToken,
}

impl Conn {
    /// What a connection from `peer` to `local` knows, and the shutdown token it serves
    /// under (taken, not copied: one per accepted connection).
    fn ctx(
        self,
        listener: Arc<Listener>,
        peer: SocketAddr,
        local: Option<SocketAddr>,
        tls: bool,
    ) -> (Arc<ConnCtx>, CancellationToken) {
        let ctx = Arc::new(ConnCtx {
            trusted: is_trusted(peer.ip(), &listener.trusted_proxies),
            peer_value: peer_value(peer.ip()),
            tls,
            listener,
            peer,
            local,
            live: self.live,
            tunnels: self.tunnels,
        });
        (ctx, self.shutdown)
    }

    /// A connection from a trusted balancer: its PROXY header (v1 or v2, within the header
    /// read timeout) gives the client's address and the one it connected to; then it is
    /// served as that client's. A missing or malformed header closes the connection.
    async fn proxied(
        self,
        mut stream: TcpStream,
        listener: Arc<Listener>,
        balancer: SocketAddr,
        acceptor: Option<TlsAcceptor>,
        settings: ConnSettings,
        permit: Permit,
    ) {
        let (peer, local) = match read_header(&mut stream, settings.header_read_timeout).await {
            Ok(Header::Proxied {
                source,
                destination,
            }) => (source, Some(destination)),
            // The balancer's own connection (a health check): its addresses stand.
            Ok(Header::Local) => (balancer, stream.local_addr().ok()),
            Err(e) => {
                debug!(error = %e, "closing a connection from a trusted balancer without a valid PROXY header");
                return;
            }
        };
        let (ctx, shutdown) = self.ctx(listener, peer, local, acceptor.is_some());
        let svc = service_fn(move |req| handler::handle(ctx.clone(), req));
        serve_connection(stream, acceptor, settings, svc, shutdown, permit)
            .instrument(debug_span!("proxied", client.addr = %peer))
            .await
    }
}
