//! The admin side: an HTTP listener (loopback by default) with `/metrics` (Prometheus text),
//! `/healthz` (the process is alive), `/ready` (listeners bound, not draining), the JSON
//! [`api`] under `/api/` and [`status`], the self-refreshing HTML page at `/status` that shows
//! it; and [`reload`], the unix socket `lockstep reload` talks to.

pub mod api;
pub mod history;
pub mod reload;
pub mod status;
pub mod view;

use std::sync::Arc;

use crate::net::body::ClientBody;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::net::limit::Cap;
use crate::net::respond;
use crate::net::server::HttpServer;

use crate::live::Shared;
use crate::metrics::Metrics;

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    /// The live state.
    pub live: Shared,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// Cancelled when the appliance drains.
    pub shutdown: CancellationToken,
    /// The sync hub, once started (when the config has `sync:`).
    pub hub: Arc<std::sync::OnceLock<Arc<crate::hub::Hub>>>,
    /// The status page's recent history.
    pub history: history::History,
}

/// Serves the admin listener until `stop` (a child of the appliance's shutdown, also
/// cancelled by a reload that moves the listener); connections run on `tracker`.
pub async fn serve(
    socket: TcpListener,
    cap: Cap,
    state: AdminState,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let mut server = HttpServer::new("admin");
    server.cap = cap;
    server.settings.header_read_timeout = std::time::Duration::from_secs(10);
    // On the control thread: a flood of admin connections leaves the core to the proxy.
    server.sliced = true;
    server
        .serve(
            socket,
            move |peer, req| {
                let state = state.clone();
                async move { route(&state, &req, peer) }
            },
            stop,
            tracker,
        )
        .await
}

fn route(
    state: &AdminState,
    req: &Request<ClientBody>,
    peer: std::net::SocketAddr,
) -> Response<Full<Bytes>> {
    let live = state.live.load();
    let hub = state.hub.get().map(|h| h.as_ref());
    let path = req.uri().path();
    if path.starts_with("/api/") || path == "/status" {
        let host = req.uri().authority().map(|a| a.as_str()).or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        });
        if !live.config.admin.serves_host(host) {
            return respond::error(
                StatusCode::FORBIDDEN,
                format!(
                    "this admin listener does not answer to the name `{}`: use its IP address or localhost, or add the name to admin.hosts (names nobody configured are how DNS rebinding reaches it)",
                    host.unwrap_or_default()
                ),
            );
        }
    }
    if let Some(a) = api::route(
        &live,
        hub,
        &state.history,
        &state.metrics,
        req.method(),
        path,
        req.headers(),
        peer,
    ) {
        return a;
    }
    // The hub's standing among the hubs is read when asked for (it sets its gauges).
    let cluster = hub.and_then(|h| h.cluster());
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.render(),
        ),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/status" => status::page(),
        "/ready" => {
            if state.shutdown.is_cancelled() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "draining\n".into(),
                )
            } else {
                let g = state.live.load().table.generation;
                // The proxy and DNS serve whatever etcd does: a hub cut off from it is said,
                // not made unready.
                let sync = match cluster {
                    None => String::new(),
                    Some(c) if c.connected => format!(
                        " hub={} etcd=connected leader={}",
                        c.hub,
                        c.leader.as_deref().unwrap_or("-")
                    ),
                    Some(c) => format!(
                        " hub={} etcd=unreachable (this hub changes nothing until it is back{})",
                        c.hub,
                        c.error.as_ref().map_or(String::new(), |e| format!(": {e}"))
                    ),
                };
                text(
                    StatusCode::OK,
                    "text/plain",
                    format!("ready generation={g}{sync}\n"),
                )
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /status, /metrics, /healthz, /ready or /api/pools\n".into(),
        ),
    }
}

fn text(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    respond::bytes(status, ctype, body)
}
