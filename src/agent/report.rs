//! Tells the hub how this agent stands (`POST /sync/v1/agents/{name}/report`): active and
//! staged release, clock offset and error bound, the last flip's lateness, the last problem.
//! Sent whenever it changes and refreshed periodically; a hub that is down gets it once it is
//! back (only the latest report matters, so none queue up).

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::plan::backoff;
use crate::net::client::{ok, HttpClient};
use crate::sync::protocol::{Report, PREFIX};

/// A report is sent at least this often (the hub's `report_expiry` is a few of these).
pub const REFRESH: Duration = crate::sync::protocol::REPORT_REFRESH;
/// Longest one report may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Sends the latest report on every change, and every [`REFRESH`], until `shutdown`.
pub async fn reporter(
    client: HttpClient,
    name: String,
    mut rx: watch::Receiver<Report>,
    shutdown: CancellationToken,
) {
    let path = format!("{PREFIX}/agents/{name}/report");
    let mut failures: u32 = 0;
    loop {
        let mut report = rx.borrow_and_update().clone();
        report.hub = Some(client.url().to_string());
        // Plain structs always serialise.
        let body = Bytes::from(serde_json::to_vec(&report).expect("report serialises"));
        let sent = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = client.send(Method::POST, &path, Some((body, "application/json")), TIMEOUT) => r.and_then(ok),
        };
        let wait = match sent {
            Ok(_) => {
                failures = 0;
                REFRESH
            }
            Err(e) => {
                failures += 1;
                debug!(error = %e, "report not delivered; retrying");
                backoff(failures, Duration::from_millis(500), REFRESH)
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
