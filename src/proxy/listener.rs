//! A proxy listener: the accept loop of [`crate::net`] with the proxy's own per-connection
//! context, terminating TLS when configured and serving HTTP/1.1, h2 (ALPN) and h2c (prior
//! knowledge).
//!
//! The listener's settings (certificates, timeouts, access log, trusted proxies) are read from
//! the live state at each accept, so a reload applies them to new connections while open ones
//! finish on what they started with.

use std::sync::Arc;

use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, debug_span, warn, Instrument};

use super::conn::ConnCtx;
use super::handler;
use super::headers::{is_trusted, peer_value};
use crate::live::Shared;
use crate::metrics::{ListenerLabels, Metrics};
use crate::net::accept::{accept_loop, Accepted};
use crate::net::limit::ConnGate;
use crate::net::server::{serve_connection, ConnSettings};

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
        let ctx = Arc::new(ConnCtx {
            trusted: is_trusted(peer.ip(), &listener.trusted_proxies),
            peer_value: peer_value(peer.ip()),
            tls: acceptor.is_some(),
            listener,
            peer,
            live: live.clone(),
            tunnels: tunnels_open.clone(),
        });
        drop(generation);
        let svc = service_fn(move |req| handler::handle(ctx.clone(), req));
        // The permit is held until the connection ends, a tunnel it became included.
        Accepted::Serve(
            serve_connection(stream, acceptor, settings, svc, shutdown.clone(), permit)
                .instrument(debug_span!("conn", client.addr = %peer, listener = %name)),
        )
    })
    .await
}
