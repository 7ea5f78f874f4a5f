//! The status page's recent history (`GET /api/history`): every `admin.history_interval` a point
//! per pool and per backend (requests per second, the share of 5xx answers, p50 and p99
//! latency to the response head), DNS answers per second, each route's rate-limit refusals
//! per second, each pool's queue depth, and the skew of the last 50 flips; the last
//! [`HISTORY_POINTS`] points are kept (15 minutes at the default 10 s).
//!
//! [`Recorder`] is pure: it is handed the counters' readings ([`Reading`]) and the time
//! between them and turns the differences into points; [`run`] is the shell that reads them.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::HISTORY_POINTS;
use crate::hub::fleet::FlipSkew;
use crate::live::Shared;
use crate::metrics::{quantile, Metrics, BUCKETS};

/// Flips whose skew is kept.
pub const FLIPS: usize = 50;

/// What one source (a pool, a backend) counted so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Counts {
    /// Answers, all statuses.
    pub requests: u64,
    /// 5xx answers.
    pub errors: u64,
    /// Latency buckets ([`crate::metrics::Buckets`]).
    pub latency: [u64; BUCKETS],
}

impl Default for Counts {
    fn default() -> Counts {
        Counts {
            requests: 0,
            errors: 0,
            latency: [0; BUCKETS],
        }
    }
}

/// Everything read at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    /// Per pool, per backend (by name).
    pub pools: Vec<(String, Vec<(String, Counts)>)>,
    /// DNS answers so far.
    pub dns: Option<u64>,
    /// Rate-limit refusals so far, per route.
    pub limited: Vec<(String, u64)>,
    /// Requests waiting now, per pool.
    pub queued: Vec<(String, u64)>,
    /// The fleet's last flip, as the hub sees it now.
    pub flip: Option<FlipSkew>,
}

/// Four series of one source: one value per point, `null` where nothing was measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Series {
    /// Answers per second.
    pub rps: VecDeque<Option<f64>>,
    /// The share of 5xx answers (0 to 1).
    pub errors: VecDeque<Option<f64>>,
    /// Median latency to the response head, ms.
    pub p50_ms: VecDeque<Option<f64>>,
    /// 99th percentile, ms.
    pub p99_ms: VecDeque<Option<f64>>,
}

/// One pool's history and its backends'.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PoolHistory {
    /// Its name.
    pub name: String,
    /// All its backends together.
    pub series: Series,
    /// Each backend, by name.
    pub backends: Vec<(String, Series)>,
    /// Requests waiting in its queue.
    pub queued: VecDeque<Option<f64>>,
}

/// One flip's skew.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Flip {
    /// The release (short id).
    pub release: String,
    /// Latest minus earliest lateness, ms.
    pub skew_ms: f64,
    /// Agents that reported it.
    pub agents: usize,
}

/// `GET /api/history`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HistoryView {
    /// Seconds between points.
    pub interval_s: f64,
    /// Points kept.
    pub points: usize,
    /// Per pool.
    pub pools: Vec<PoolHistory>,
    /// DNS answers per second (empty without DNS).
    pub dns_qps: VecDeque<Option<f64>>,
    /// Rate-limit refusals per second, per route that has a limit.
    pub limited: Vec<(String, VecDeque<Option<f64>>)>,
    /// The last flips' skew, oldest first.
    pub flips: VecDeque<Flip>,
}

/// Turns readings into points.
#[derive(Debug, Default)]
pub struct Recorder {
    last: Option<Reading>,
    view: HistoryView,
}

fn push<T>(q: &mut VecDeque<T>, v: T) {
    q.push_back(v);
    while q.len() > HISTORY_POINTS {
        q.pop_front();
    }
}

/// The series of `name` in `list`, made empty when new (every series ends at the latest
/// point; a new one is shorter).
fn entry<'a, T: Default>(list: &'a mut Vec<(String, T)>, name: &str) -> &'a mut T {
    match list.iter().position(|(n, _)| n == name) {
        Some(i) => &mut list[i].1,
        None => {
            list.push((name.to_string(), T::default()));
            &mut list.last_mut().expect("just pushed").1
        }
    }
}

impl Series {
    fn add(&mut self, now: &Counts, before: Option<&Counts>, seconds: f64) {
        let d = before.map(|b| Counts {
            requests: now.requests.saturating_sub(b.requests),
            errors: now.errors.saturating_sub(b.errors),
            latency: std::array::from_fn(|i| now.latency[i].saturating_sub(b.latency[i])),
        });
        let rate = d.as_ref().map(|d| d.requests as f64 / seconds);
        let errors = d
            .as_ref()
            .filter(|d| d.requests > 0)
            .map(|d| d.errors as f64 / d.requests as f64);
        let q = |p: f64| {
            d.as_ref()
                .and_then(|d| quantile(&d.latency, p))
                .map(|s| s * 1000.0)
        };
        push(&mut self.rps, rate);
        push(&mut self.errors, errors);
        push(&mut self.p50_ms, q(0.5));
        push(&mut self.p99_ms, q(0.99));
    }
}

/// The sum of several sources' counts.
fn total<'a>(all: impl Iterator<Item = &'a Counts>) -> Counts {
    all.fold(Counts::default(), |mut t, c| {
        t.requests += c.requests;
        t.errors += c.errors;
        for i in 0..BUCKETS {
            t.latency[i] += c.latency[i];
        }
        t
    })
}

impl Recorder {
    /// A recorder whose points are `interval` apart.
    pub fn new(interval: Duration) -> Recorder {
        Recorder {
            last: None,
            view: HistoryView {
                interval_s: interval.as_secs_f64(),
                points: HISTORY_POINTS,
                ..HistoryView::default()
            },
        }
    }

    /// Adds the point between the previous reading and `now`, `seconds` apart (the first
    /// reading only sets the start: a rate needs two). Sources that went away (a reload)
    /// are dropped; new ones start blank.
    pub fn record(&mut self, now: Reading, seconds: f64) {
        let seconds = seconds.max(1e-3);
        if let Some(before) = self.last.take() {
            let find = |pool: &str, backend: Option<&str>| -> Option<Counts> {
                let (_, bs) = before.pools.iter().find(|(p, _)| p == pool)?;
                match backend {
                    Some(b) => bs.iter().find(|(n, _)| n == b).map(|(_, c)| c.clone()),
                    None => Some(total(bs.iter().map(|(_, c)| c))),
                }
            };
            let view = &mut self.view;
            view.pools
                .retain(|p| now.pools.iter().any(|(n, _)| *n == p.name));
            for (pool, backends) in &now.pools {
                let ph = match view.pools.iter().position(|p| p.name == *pool) {
                    Some(i) => &mut view.pools[i],
                    None => {
                        view.pools.push(PoolHistory {
                            name: pool.clone(),
                            ..PoolHistory::default()
                        });
                        view.pools.last_mut().expect("just pushed")
                    }
                };
                let sum = total(backends.iter().map(|(_, c)| c));
                ph.series.add(&sum, find(pool, None).as_ref(), seconds);
                ph.backends
                    .retain(|(n, _)| backends.iter().any(|(b, _)| b == n));
                for (name, counts) in backends {
                    let s = entry(&mut ph.backends, name);
                    s.add(counts, find(pool, Some(name)).as_ref(), seconds);
                }
                let waiting = now
                    .queued
                    .iter()
                    .find(|(p, _)| p == pool)
                    .map(|(_, n)| *n as f64);
                push(&mut ph.queued, waiting);
            }
            if let (Some(n), Some(b)) = (now.dns, before.dns) {
                push(
                    &mut view.dns_qps,
                    Some(n.saturating_sub(b) as f64 / seconds),
                );
            }
            view.limited
                .retain(|(r, _)| now.limited.iter().any(|(n, _)| n == r));
            for (route, n) in &now.limited {
                let b = before
                    .limited
                    .iter()
                    .find(|(r, _)| r == route)
                    .map(|(_, b)| *b);
                let s = entry(&mut view.limited, route);
                push(s, b.map(|b| n.saturating_sub(b) as f64 / seconds));
            }
        }
        if let Some(f) = &now.flip {
            let flip = Flip {
                release: f.release.short(),
                skew_ms: f.spread_us as f64 / 1000.0,
                agents: f.agents,
            };
            let flips = &mut self.view.flips;
            // The same flip again (more agents reported since): updated, not added.
            match flips.back_mut() {
                Some(last) if last.release == flip.release => *last = flip,
                _ => {
                    flips.push_back(flip);
                    while flips.len() > FLIPS {
                        flips.pop_front();
                    }
                }
            }
        }
        self.last = Some(now);
    }

    /// The history so far.
    pub fn view(&self) -> &HistoryView {
        &self.view
    }
}

/// The appliance's recorder, shared with the admin API.
pub type History = Arc<Mutex<Recorder>>;

/// Reads the counters now.
fn read(live: &Shared, metrics: &Metrics, hub: Option<&crate::hub::Hub>) -> Reading {
    let live = live.load();
    let pools = live
        .table
        .pools
        .iter()
        .map(|p| {
            let backends = p
                .backends
                .iter()
                .map(|b| {
                    let classes: Vec<u64> = b.requests.iter().map(|c| c.get()).collect();
                    let counts = Counts {
                        requests: classes.iter().sum(),
                        errors: classes.last().copied().unwrap_or(0),
                        latency: b.latency.counts(),
                    };
                    (b.config.name.clone(), counts)
                })
                .collect();
            (p.config.name.clone(), backends)
        })
        .collect();
    let queued = live
        .table
        .pools
        .iter()
        .map(|p| (p.config.name.clone(), p.queue.depth.get().max(0) as u64))
        .collect();
    let limited = live
        .table
        .routes
        .routes()
        .iter()
        .zip(&live.table.limiters)
        .filter_map(|(r, l)| Some((r.name.clone(), l.as_ref()?.refused.get())))
        .collect();
    let dns = live
        .config
        .dns
        .as_ref()
        .map(|_| super::view::DnsView::from_metrics(&metrics.render()).total);
    Reading {
        pools,
        dns,
        limited,
        queued,
        flip: hub.and_then(|h| crate::hub::fleet::last_flip_skew(&h.fleet())),
    }
}

/// Takes a point every `interval` until `stop`.
pub async fn run(
    history: History,
    live: Shared,
    metrics: Arc<Metrics>,
    hub: Arc<std::sync::OnceLock<Arc<crate::hub::Hub>>>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The time between readings from the ticks themselves (no clock read here).
    let mut last: Option<tokio::time::Instant> = None;
    loop {
        let at = tokio::select! {
            _ = stop.cancelled() => return,
            at = tick.tick() => at,
        };
        let reading = read(&live, &metrics, hub.get().map(|h| h.as_ref()));
        let seconds = last
            .map_or(interval, |l| at.duration_since(l))
            .as_secs_f64();
        last = Some(at);
        history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(reading, seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(requests: u64, errors: u64, fast: u64, slow: u64) -> Counts {
        let mut latency = [0; BUCKETS];
        latency[0] = fast; // ≤ 250 µs
        latency[6] = slow; // 8–16 ms
        Counts {
            requests,
            errors,
            latency,
        }
    }

    fn reading(web1: Counts, web2: Counts, dns: u64) -> Reading {
        Reading {
            pools: vec![(
                "www".into(),
                vec![("web-1".into(), web1), ("web-2".into(), web2)],
            )],
            dns: Some(dns),
            limited: vec![("api".into(), dns / 10)],
            queued: vec![("www".into(), 3)],
            flip: None,
        }
    }

    #[test]
    fn rates_shares_and_quantiles_come_from_the_differences() {
        let mut r = Recorder::new(Duration::from_secs(10));
        r.record(reading(counts(0, 0, 0, 0), counts(0, 0, 0, 0), 0), 10.0);
        assert!(r.view().pools.is_empty(), "a rate needs two readings");
        r.record(
            reading(counts(100, 10, 90, 10), counts(100, 0, 100, 0), 500),
            10.0,
        );
        let v = r.view();
        let www = &v.pools[0];
        assert_eq!(www.series.rps, [Some(20.0)]);
        assert_eq!(www.series.errors, [Some(0.05)]);
        let (name, web1) = &www.backends[0];
        assert_eq!(name, "web-1");
        assert_eq!(web1.rps, [Some(10.0)]);
        assert_eq!(web1.errors, [Some(0.1)]);
        let p99 = web1.p99_ms[0].unwrap();
        assert!((8.0..=16.0).contains(&p99), "{p99}");
        assert!(web1.p50_ms[0].unwrap() <= 0.25);
        assert_eq!(www.queued, [Some(3.0)]);
        assert_eq!(v.dns_qps, [Some(50.0)]);
        assert_eq!(
            v.limited,
            [("api".to_string(), VecDeque::from([Some(5.0)]))]
        );
        // A quiet interval: a rate of 0, no share, no quantile.
        r.record(
            reading(counts(100, 10, 90, 10), counts(100, 0, 100, 0), 500),
            10.0,
        );
        let web1 = &r.view().pools[0].backends[0].1;
        assert_eq!(web1.rps.back(), Some(&Some(0.0)));
        assert_eq!(web1.errors.back(), Some(&None));
        assert_eq!(web1.p99_ms.back(), Some(&None));
    }

    #[test]
    fn history_is_bounded_and_follows_reloads() {
        let mut r = Recorder::new(Duration::from_secs(1));
        for i in 0..(HISTORY_POINTS as u64 + 20) {
            r.record(reading(counts(i, 0, i, 0), counts(i, 0, i, 0), i), 1.0);
        }
        let www = &r.view().pools[0];
        assert_eq!(www.series.rps.len(), HISTORY_POINTS);
        assert_eq!(www.backends[0].1.rps.len(), HISTORY_POINTS);
        // A reload that removed web-2 and added web-3.
        let mut next = reading(counts(500, 0, 0, 0), counts(0, 0, 0, 0), 0);
        next.pools[0].1[1].0 = "web-3".into();
        r.record(next, 1.0);
        let names: Vec<&str> = r.view().pools[0]
            .backends
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(names, ["web-1", "web-3"]);
        assert_eq!(
            r.view().pools[0].backends[1].1.rps,
            [None],
            "a new backend starts blank"
        );
    }

    #[test]
    fn the_last_fifty_flips_are_kept_once_each() {
        use crate::sync::manifest::Hash;
        let mut r = Recorder::new(Duration::from_secs(1));
        for i in 0..60u8 {
            let release = Hash::of(&[i]);
            for agents in [1, 3] {
                let mut now = reading(Counts::default(), Counts::default(), 0);
                now.flip = Some(FlipSkew {
                    release,
                    agents,
                    spread_us: 1500 + i64::from(i),
                    min_us: 0,
                    max_us: 1500,
                });
                r.record(now, 1.0);
            }
        }
        let flips = &r.view().flips;
        assert_eq!(flips.len(), FLIPS);
        assert!(
            flips.iter().all(|f| f.agents == 3),
            "updated, not added again"
        );
        assert_eq!(flips.back().unwrap().skew_ms, 1.559);
    }
}
