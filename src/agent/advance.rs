//! After a scheduled flip, asks the hub to advance the cycle:
//! `POST /sync/v1/cycles/{n}/advance` is a compare-and-swap, so the first agent to ask promotes
//! the staged release on the hub and computes the next activation; the others are told it is
//! done. An agent whose clock estimate is a little early gets 409 "too early" and asks again
//! briefly; if none manages, the hub advances by itself after its grace period.
#![allow(clippy::disallowed_methods)] // I/O shell: retries a refused advance for a bounded time

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use tracing::{debug, info};

use crate::net::client::HttpClient;
use crate::sync::protocol::{Advanced, PREFIX};

/// How long "too early" answers are retried.
pub const RETRY_FOR: Duration = Duration::from_secs(3);
/// Pause between tries.
const PAUSE: Duration = Duration::from_millis(100);
/// Longest one call may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Advances `cycle`; never fails loudly (the hub has its own fallback).
pub async fn advance(client: HttpClient, cycle: u64) {
    let path = format!("{PREFIX}/cycles/{cycle}/advance");
    let until = Instant::now() + RETRY_FOR;
    loop {
        match client
            .json::<Advanced>(Method::POST, &path, None::<&()>, TIMEOUT)
            .await
        {
            Ok(a) if a.advanced => {
                info!(cycle, next_cycle = a.cycle, "advanced the hub's cycle");
                return;
            }
            Ok(a) => {
                debug!(cycle, hub_cycle = a.cycle, reason = ?a.reason, "cycle already advanced");
                return;
            }
            Err(e) if e.status() == Some(StatusCode::CONFLICT) && Instant::now() < until => {
                debug!(cycle, error = %e, "advance refused for now; asking again");
                tokio::time::sleep(PAUSE).await;
            }
            Err(e) => {
                debug!(cycle, error = %e, "advance not done; the hub advances by itself after its grace period");
                return;
            }
        }
    }
}
