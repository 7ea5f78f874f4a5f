//! Measures the offset between the hub's clock and this agent's:
//! several `GET /sync/v1/time` exchanges over one kept-alive connection, a random moment apart
//! ([`SAMPLE_GAP`]), the lowest-delay one kept ([`clock::estimate`]). Local times `t1`/`t4`
//! come from one [`Anchor`] taken at start plus the monotonic clock, never from the wall clock
//! per sample, so a wall-clock step moves neither the offset nor a deadline.
#![allow(clippy::disallowed_methods)] // I/O shell: clock samples are readings of the clock

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::net::client::{ok, ClientError, HttpClient, Remote};
use crate::sync::clock::{self, Anchor, Offset, Sample};
use crate::sync::protocol::{TimeReply, PREFIX};

/// Exchanges per measurement.
pub const SAMPLES: usize = 8;
/// Before each exchange the agent waits a random time in this range: every agent measures
/// shortly before the same activation, and back-to-back exchanges from eight agents arrived at
/// the hub together, each queued behind the others (the hub answers them one at a time), so
/// that no sample was clean. Spread out, most find the hub idle; a measurement takes ~20 ms.
pub const SAMPLE_GAP: std::ops::Range<Duration> =
    Duration::from_micros(500)..Duration::from_millis(4);
/// Longest one exchange may take.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(2);

/// Takes `samples` exchanges and returns the estimate of the best. Stops at the first
/// transport failure (a hub that is down is not asked eight times); returns the last error
/// when no exchange succeeded.
pub async fn measure(
    client: &HttpClient,
    anchor: &Anchor,
    samples: usize,
) -> Result<Offset, ClientError> {
    let mut got = Vec::with_capacity(samples);
    let mut last_err = None;
    let path = format!("{PREFIX}/time");
    for _ in 0..samples.max(1) {
        let gap = rand::random_range(SAMPLE_GAP);
        tokio::time::sleep(gap).await;
        let t1 = anchor.local_us(Instant::now());
        let answer = client
            .send(Method::GET, &path, None, EXCHANGE_TIMEOUT)
            .await;
        let t4 = anchor.local_us(Instant::now());
        match answer.and_then(ok) {
            Ok(a) => match serde_json::from_slice::<TimeReply>(&a.body) {
                Ok(r) => got.push(Sample {
                    t1,
                    t2: r.receive_us,
                    t3: r.send_us,
                    t4,
                    queued: r.queued_us,
                }),
                Err(e) => {
                    last_err = Some(ClientError::Decode {
                        remote: Remote::Hub,
                        message: e.to_string(),
                    })
                }
            },
            Err(e) => {
                let transport = matches!(e, ClientError::Transport { .. });
                last_err = Some(e);
                if transport {
                    break;
                }
            }
        }
    }
    match clock::estimate(&got) {
        Some(o) => Ok(o),
        None => Err(last_err.unwrap_or_else(|| ClientError::Decode {
            remote: Remote::Hub,
            message: "no time samples".into(),
        })),
    }
}

/// How often the offset is measured when nothing asks sooner.
pub const EVERY: Duration = Duration::from_secs(30);

/// Measures at start, every [`EVERY`], and whenever `now` is notified (shortly before an
/// activation, or when the hub comes back), publishing each estimate on `tx`.
pub async fn measurer(
    client: HttpClient,
    anchor: Anchor,
    tx: watch::Sender<Option<Offset>>,
    now: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        match measure(&client, &anchor, SAMPLES).await {
            Ok(o) => {
                debug!(
                    offset_us = o.offset_us,
                    error_us = o.error_us,
                    "clock measured"
                );
                tx.send_replace(Some(o));
            }
            Err(e) => debug!(error = %e, "clock not measured"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
            _ = now.notified() => {}
        }
    }
}
