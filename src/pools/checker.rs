//! Active health checks: one task per backend of every pool with `health:` configured,
//! GETting the check path on the interval and feeding the result to the pool's rise/fall
//! state machine. The tasks of a table generation stop when a reload replaces it. Checks go
//! through the pool's own upstream client ([`crate::net::upstream::Clients`]): the same
//! connect timeout and keep-alive connections as the requests they vouch for.
#![allow(clippy::disallowed_methods)] // I/O shell: check jitter

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::table::{PoolState, Table};
use crate::net::body::RequestBody;
use crate::net::upstream::Clients;

/// Starts the checkers of `table`, each pool's through `clients` (same index as
/// `table.pools`); they stop when `stop` is cancelled.
pub fn spawn_all(
    table: &Table,
    clients: &[Clients],
    stop: &CancellationToken,
    tracker: &TaskTracker,
) {
    for (pool, client) in table.pools.iter().zip(clients) {
        let Some(hc) = &pool.config.health else {
            continue;
        };
        for i in 0..pool.backends.len() {
            // Spread the first checks over the interval so a big pool is not probed at once.
            let jitter = hc.interval.mul_f64(rand::random::<f64>() * 0.2);
            tracker.spawn(check_loop(
                pool.clone(),
                i,
                client.clone(),
                stop.clone(),
                jitter,
            ));
        }
    }
}

async fn check_loop(
    pool: Arc<PoolState>,
    i: usize,
    client: Clients,
    stop: CancellationToken,
    jitter: Duration,
) {
    let (Some(hc), Some(backend)) = (pool.config.health.clone(), pool.backends.get(i).cloned())
    else {
        return;
    };
    let Ok(req) = Request::get(hc.path.as_str())
        .header(http::header::USER_AGENT, "lockstep-health-check")
        .body(())
    else {
        return;
    };
    let (parts, ()) = req.into_parts();
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = tokio::time::sleep(jitter) => {}
    }
    let mut tick = tokio::time::interval(hc.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let check = client.request(
            backend.config.address,
            &parts,
            &[],
            RequestBody::Empty,
            hc.timeout,
            std::time::Instant::now(),
        );
        // The client bounds the wait for the answer; this bounds the whole check, its
        // connect (the pool's connect timeout, maybe longer) included.
        let outcome = tokio::time::timeout(hc.timeout, check).await;
        let (ok, why) = match outcome {
            Ok(Ok(resp)) => {
                let s = resp.status();
                (s.is_success() || s.is_redirection(), format!("status {s}"))
            }
            Ok(Err(e)) => (false, format!("request failed: {e}")),
            Err(_) => (false, format!("no answer within {:?}", hc.timeout)),
        };
        if !ok {
            backend.check_failures.inc();
        }
        match pool.record_check(i, ok) {
            Some(false) => {
                warn!(pool = %pool.config.name, backend = %backend.config.name, reason = %why, "backend down")
            }
            Some(true) => {
                info!(pool = %pool.config.name, backend = %backend.config.name, "backend up")
            }
            None => {}
        }
    }
}
