//! Protocol upgrades (WebSocket): once the backend answers 101, the client's and the
//! backend's connections are joined and bytes copied both ways until either side closes.
//!
//! A tunnel is still the client's connection: it keeps the connection's place under the
//! listener's cap and in its open-connection gauge, is counted in the tunnel gauge, and runs
//! on the appliance's task tracker, so a shutdown waits for it within the drain time like for
//! any request in flight. When the listener stops (shutdown or a reload that removes it), the
//! tunnel stays open until the drain ends; the process then exits and closes it.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::net::limit::Permit;

/// What a connection hands its tunnel: where to run it and what to count it in.
#[derive(Clone)]
pub struct Tunnels {
    /// The tracker a shutdown drains.
    pub tracker: TaskTracker,
    /// Tunnels open now on this listener.
    pub open: Gauge,
    /// The connection's place under the listener's cap.
    pub permit: Arc<Permit>,
}

/// Joins the two upgraded connections in a task on `tunnels.tracker`.
pub fn bridge(
    tunnels: &Tunnels,
    client: OnUpgrade,
    backend: OnUpgrade,
    peer: SocketAddr,
    backend_name: String,
) {
    let (open, permit) = (tunnels.open.clone(), tunnels.permit.clone());
    tunnels.tracker.spawn(async move {
        let (client, backend) = match tokio::try_join!(client, backend) {
            Ok(pair) => pair,
            Err(e) => {
                debug!(client.addr = %peer, backend = %backend_name, error = %e, "upgrade did not complete");
                return;
            }
        };
        open.inc();
        let mut client = TokioIo::new(client);
        let mut backend = TokioIo::new(backend);
        match tokio::io::copy_bidirectional(&mut client, &mut backend).await {
            Ok((up, down)) => {
                debug!(client.addr = %peer, backend = %backend_name, up, down, "upgraded connection closed")
            }
            Err(e) => {
                debug!(client.addr = %peer, backend = %backend_name, error = %e, "upgraded connection ended")
            }
        }
        open.dec();
        drop(permit);
    });
}
