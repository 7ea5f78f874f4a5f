//! Hears of the hub's schedule (a publish, an activation) by long-polling
//! `GET /sync/v1/schedule?wait=VERSION`: the hub holds the request until its version moves, so
//! the agent learns of a staged release at once. When the hub is down the poll reconnects with
//! back-off, logging the outage once and the recovery once — not a line per attempt.
#![allow(clippy::disallowed_methods)] // I/O shell: measures how long a long poll took

use std::time::{Duration, Instant};

use http::Method;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::plan::backoff;
use crate::net::client::{ClientError, HttpClient};
use crate::sync::protocol::{Schedule, LONG_POLL, PREFIX};
use http::StatusCode;

/// First pause after a failed poll.
pub const RETRY_BASE: Duration = Duration::from_millis(250);
/// Longest pause between polls while the hub is down.
pub const RETRY_MAX: Duration = Duration::from_secs(10);
/// Extra time over the hub's hold before a poll is given up.
const SLACK: Duration = Duration::from_secs(10);

/// Polls until `shutdown` (or until the receiver is gone), sending every schedule received.
pub async fn poll(client: HttpClient, tx: mpsc::Sender<Schedule>, shutdown: CancellationToken) {
    let mut version: Option<u64> = None;
    let mut failures: u32 = 0;
    loop {
        let path = match version {
            Some(v) => format!("{PREFIX}/schedule?wait={v}"),
            None => format!("{PREFIX}/schedule"),
        };
        let started = Instant::now();
        let got = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = client.json::<Schedule>(Method::GET, &path, None::<&()>, LONG_POLL + SLACK) => r,
        };
        let pause = match got {
            Ok(s) => {
                if failures > 0 {
                    info!(hub = client.url(), "hub reachable again");
                }
                failures = 0;
                // An unchanged version answered at once would make this loop spin.
                let same = version == Some(s.version);
                version = Some(s.version);
                if tx.send(s).await.is_err() {
                    return;
                }
                if same && started.elapsed() < Duration::from_secs(1) {
                    Duration::from_secs(1)
                } else {
                    Duration::ZERO
                }
            }
            Err(e) => {
                failures += 1;
                let from = client.url().to_string();
                let cut_off = matches!(&e, ClientError::Status { status, .. } if *status == StatusCode::SERVICE_UNAVAILABLE);
                // It answers, but not the schedule (cut off from the other hubs): the next.
                let moved = cut_off.then(|| client.move_on()).flatten();
                if let Some(to) = moved.filter(|_| failures == 1) {
                    warn!(hub = %from, error = %e, now = %to, "the hub cannot give the schedule: moved to the next");
                } else if moved.is_some() {
                    debug!(hub = %from, error = %e, attempt = failures, "the hub cannot give the schedule: moved to the next");
                } else if failures == 1 {
                    warn!(hub = client.url(), error = %e, "cannot reach the hub; retrying with back-off (the active release keeps serving)");
                } else {
                    debug!(hub = client.url(), error = %e, attempt = failures, "hub still unreachable");
                }
                backoff(failures, RETRY_BASE, RETRY_MAX)
            }
        };
        if !pause.is_zero() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}
