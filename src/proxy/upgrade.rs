//! Protocol upgrades (WebSocket): once the backend answers 101, the client's and the
//! backend's connections are joined and bytes copied both ways until either side closes.

use std::net::SocketAddr;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::debug;

/// Joins the two upgraded connections in a background task.
pub fn bridge(client: OnUpgrade, backend: OnUpgrade, peer: SocketAddr, backend_name: String) {
    tokio::spawn(async move {
        let (client, backend) = match tokio::try_join!(client, backend) {
            Ok(pair) => pair,
            Err(e) => {
                debug!(client.addr = %peer, backend = %backend_name, error = %e, "upgrade did not complete");
                return;
            }
        };
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
    });
}
