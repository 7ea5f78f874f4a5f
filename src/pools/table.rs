//! The live routing table: routes, and each pool's backends with their load and health.
//!
//! A [`Table`] is built whole from a [`Config`] and published through an `ArcSwap`; a request
//! loads it once and finishes on it even if a reload swaps in another. Per-backend state
//! (in-flight count, latency EWMA, health state machines) is carried over to the new table for
//! backends that stay (same pool, name and address), so a reload neither resets health nor
//! forgets load. Each pool's health is an immutable [`PoolHealth`] snapshot, rebuilt and swapped
//! when a backend changes state; the proxy and the DNS responder read it without locks.
#![allow(clippy::disallowed_methods)] // I/O shell: health snapshots are published as of the moment they are built

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use crate::config::{Backend, Config, Pool};
use crate::metrics::{BackendLabels, Metrics, PoolLabels, RequestLabels};
use crate::router::balance::{Balancer, Load, Member};
use crate::router::ewma::Ewma;
use crate::router::health::warm_share;
use crate::router::health::{ActiveHealth, Ejection};
use crate::router::ratelimit::{Limiter, DEFAULT_MAX_KEYS};
use crate::router::route::RouteTable;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// How fast the latency EWMA forgets (linkerd's default decay).
const EWMA_DECAY: Duration = Duration::from_secs(10);

/// The routing table of one config generation.
pub struct Table {
    /// Config generation (1 for the first load, +1 per successful reload).
    pub generation: u64,
    /// Host/path → pool index.
    pub routes: RouteTable,
    /// Each route's rate limiter (by route index), with its refusal counter.
    pub limiters: Vec<Option<Arc<RouteLimiter>>>,
    /// Pools in config order.
    pub pools: Vec<Arc<PoolState>>,
}

/// A route's rate limiter and its `lockstep_rate_limited_total` counter. Kept across a reload
/// when the route keeps its name and limit, so a reload resets no client's bucket.
pub struct RouteLimiter {
    /// The buckets.
    pub limiter: Limiter,
    /// Requests it refused.
    pub refused: Counter,
}

/// One pool at run time.
pub struct PoolState {
    /// Its config.
    pub config: Pool,
    /// Its balancing policy, built over `backends`.
    pub balancer: Balancer,
    /// Backends in config order (index = the balancer's member index).
    pub backends: Vec<Arc<BackendState>>,
    /// The current health snapshot.
    pub health: ArcSwap<PoolHealth>,
    /// Request latency histogram of this pool.
    pub latency: Histogram,
    /// Requests retried on another backend.
    pub retries: Counter,
    /// Requests waiting for a backend under its `max_connections`.
    pub queue: Queue,
    /// Serialises snapshot rebuilds so that two concurrent transitions cannot lose one.
    rebuild: Mutex<()>,
}

/// The requests of a pool waiting for a backend under its `max_connections`: woken (first
/// come, first served) each time a request to a capped backend ends.
pub struct Queue {
    /// Signalled when a request ends on a backend of this pool.
    pub freed: Arc<Notify>,
    /// Requests waiting now (at most `pools[].queue.max`).
    pub waiting: AtomicUsize,
    /// `lockstep_queue_depth{pool}`.
    pub depth: Gauge,
    /// `lockstep_queue_refused_total{pool, reason}`: full, timeout.
    pub refused: [Counter; 2],
}

/// Health of every backend of a pool at one moment (immutable; swapped whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolHealth {
    /// Active checks say up (true when the pool has no active checks).
    pub up: Vec<bool>,
    /// Passive ejection ends at this instant, if ejected.
    pub ejected_until: Vec<Option<Instant>>,
    /// Its sync agent serves a release behind the fleet's, and another backend of the pool
    /// that is up serves the current one (so a pool whose backends are all behind keeps them).
    pub behind: Vec<bool>,
    /// Drained by an operator (admin API): no new requests, no DNS answers.
    pub drained: Vec<bool>,
    /// When it came back (up again, no longer behind or drained) while the pool ran: its
    /// slow start runs from then (or from the end of an ejection, whichever is later). `None`
    /// for a backend available since the pool was built.
    pub back_since: Vec<Option<Instant>>,
}

impl PoolHealth {
    /// Whether backend `i` may take traffic at `now`.
    pub fn available(&self, i: usize, now: Instant) -> bool {
        self.up.get(i).copied().unwrap_or(false)
            && !self.behind.get(i).copied().unwrap_or(false)
            && !self.drained.get(i).copied().unwrap_or(false)
            && self
                .ejected_until
                .get(i)
                .copied()
                .flatten()
                .is_none_or(|until| now >= until)
    }

    /// The share of its normal traffic backend `i` takes at `now` under a slow start of
    /// `ramp` ([`warm_share`]); 1 without one.
    pub fn share(&self, i: usize, now: Instant, ramp: Option<Duration>) -> f64 {
        let Some(ramp) = ramp else { return 1.0 };
        let back = self.back_since.get(i).copied().flatten();
        // An ejection that ended is a comeback too.
        let unejected = self
            .ejected_until
            .get(i)
            .copied()
            .flatten()
            .filter(|&until| until <= now);
        match back.into_iter().chain(unejected).max() {
            Some(since) => warm_share(now.saturating_duration_since(since), ramp),
            None => 1.0,
        }
    }

    /// Number of backends available at `now`.
    pub fn available_count(&self, now: Instant) -> usize {
        (0..self.up.len())
            .filter(|&i| self.available(i, now))
            .count()
    }
}

/// One backend at run time; shared between table generations while it stays configured.
pub struct BackendState {
    /// Its config.
    pub config: Backend,
    /// `address` as a URI authority, parsed once for the request path.
    pub authority: http::uri::Authority,
    /// Requests in flight to it.
    pub in_flight: AtomicU64,
    /// Latency EWMA, for `p2c_ewma`.
    pub ewma: Ewma,
    /// Its answers' latency (to the response head), for the status page's p50/p99.
    pub latency: crate::metrics::Buckets,
    /// Active-check state machine.
    pub active: Mutex<ActiveHealth>,
    /// Passive-ejection state machine.
    pub ejection: Mutex<Ejection>,
    /// Request counters by status class (1xx..5xx), looked up once.
    pub requests: [Counter; 5],
    /// 1 while the backend takes traffic.
    pub up_gauge: Gauge,
    /// Failed active checks.
    pub check_failures: Counter,
    /// Passive ejections.
    pub ejections: Counter,
    /// Set after a failed request so that successes only take the ejection lock when needed.
    failing: AtomicBool,
    /// Its sync agent reports a release behind the fleet's (set by the sync hub).
    pub behind: AtomicBool,
    /// Drained through the admin API (kept across reloads while the backend is configured).
    pub drained: AtomicBool,
}

/// One request in flight to a backend: counted from [`BackendState::start_request`] until
/// dropped, so a request future dropped midway (an h2 reset, a client gone, an idle timeout)
/// ends its count as surely as one that completes.
#[must_use = "the request counts as in flight only while this lives"]
pub struct InFlight {
    backend: Arc<BackendState>,
    /// The pool's queue, told when the request ends.
    freed: Arc<Notify>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::AcqRel);
        if self.backend.config.max_connections.is_some() {
            self.freed.notify_one();
        }
    }
}

impl BackendState {
    /// Counts a request in flight until the returned guard is dropped (the forwarder keeps
    /// it until the response's body has ended), within the backend's `max_connections`:
    /// `None` when it is at its limit. The pool's queue hears of each end.
    pub fn start_request(self: &Arc<Self>, freed: &Arc<Notify>) -> Option<InFlight> {
        match self.config.max_connections {
            None => {
                self.in_flight.fetch_add(1, Ordering::AcqRel);
            }
            Some(max) => {
                self.in_flight
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < u64::from(max)).then_some(n + 1)
                    })
                    .ok()?;
            }
        }
        Some(InFlight {
            backend: self.clone(),
            freed: freed.clone(),
        })
    }

    /// Whether it has room for another request under its `max_connections`.
    pub fn has_room(&self) -> bool {
        self.config
            .max_connections
            .is_none_or(|max| self.in_flight.load(Ordering::Acquire) < u64::from(max))
    }

    fn new(pool: &str, config: Backend, metrics: &Metrics) -> Self {
        let labels = BackendLabels {
            pool: pool.to_string(),
            backend: config.name.clone(),
        };
        let requests = crate::metrics::CLASSES.map(|class| {
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    pool: pool.to_string(),
                    backend: config.name.clone(),
                    class: class.to_string(),
                })
                .clone()
        });
        BackendState {
            requests,
            up_gauge: metrics.backend_up.get_or_create(&labels).clone(),
            check_failures: metrics.check_failures.get_or_create(&labels).clone(),
            ejections: metrics.ejections.get_or_create(&labels).clone(),
            // A SocketAddr always prints as a valid authority (`ip:port`, `[v6]:port`).
            authority: http::uri::Authority::try_from(config.address.to_string())
                .expect("socket address is a valid authority"),
            config,
            in_flight: AtomicU64::new(0),
            ewma: Ewma::new(EWMA_DECAY),
            latency: crate::metrics::Buckets::default(),
            active: Mutex::new(ActiveHealth::new()),
            ejection: Mutex::new(Ejection::default()),
            failing: AtomicBool::new(false),
            behind: AtomicBool::new(false),
            drained: AtomicBool::new(false),
        }
    }

    fn snapshot(&self) -> (bool, Option<Instant>) {
        let up = lock(&self.active).is_up();
        let until = lock(&self.ejection).ejected_until();
        (up, until)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the small state machines inconsistent,
    // so a poisoned lock is still safe to use.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PoolState {
    fn new(config: Pool, backends: Vec<Arc<BackendState>>, metrics: &Metrics) -> Self {
        let members: Vec<Member<'_>> = backends
            .iter()
            .map(|b| Member {
                name: &b.config.name,
                weight: b.config.weight,
            })
            .collect();
        let balancer = Balancer::build(config.policy, &members);
        let config_name = config.name.clone();
        let pool = PoolState {
            config,
            balancer,
            backends,
            health: ArcSwap::from_pointee(PoolHealth {
                up: Vec::new(),
                ejected_until: Vec::new(),
                behind: Vec::new(),
                drained: Vec::new(),
                back_since: Vec::new(),
            }),
            queue: Queue {
                freed: Arc::new(Notify::new()),
                waiting: AtomicUsize::new(0),
                depth: metrics
                    .queue_depth
                    .get_or_create(&PoolLabels {
                        pool: config_name.clone(),
                    })
                    .clone(),
                refused: ["full", "timeout"].map(|reason| {
                    metrics
                        .queue_refused
                        .get_or_create(&crate::metrics::QueueLabels {
                            pool: config_name.clone(),
                            reason: reason.to_string(),
                        })
                        .clone()
                }),
            },
            latency: metrics
                .latency
                .get_or_create(&PoolLabels {
                    pool: config_name.clone(),
                })
                .clone(),
            retries: metrics
                .retries
                .get_or_create(&PoolLabels {
                    pool: config_name.clone(),
                })
                .clone(),
            rebuild: Mutex::new(()),
        };
        pool.publish_health();
        pool
    }

    /// Rebuilds the health snapshot from the backends' state machines and swaps it in.
    /// Returns the new snapshot.
    pub fn publish_health(&self) -> Arc<PoolHealth> {
        let _guard = lock(&self.rebuild);
        let (up, ejected_until): (Vec<bool>, Vec<_>) =
            self.backends.iter().map(|b| b.snapshot()).unzip();
        let flagged: Vec<bool> = self
            .backends
            .iter()
            .map(|b| b.behind.load(Ordering::Relaxed))
            .collect();
        // Backends behind the fleet's release leave only while some backend that can take
        // traffic (up, not ejected) serves the current one; otherwise stale content beats no
        // content. (An ejection ending later does not rebuild the snapshot: until the next
        // rebuild the behind backends then stay in, which errs on the side of serving.)
        let now = Instant::now();
        let some_current = (0..up.len()).any(|i| {
            up[i] && !flagged[i] && ejected_until[i].is_none_or(|until: Instant| now >= until)
        });
        let behind: Vec<bool> = flagged.iter().map(|&f| f && some_current).collect();
        let drained: Vec<bool> = self
            .backends
            .iter()
            .map(|b| b.drained.load(Ordering::Relaxed))
            .collect();
        let old = self.health.load();
        let able = |up: &[bool], behind: &[bool], drained: &[bool], i: usize| {
            up.get(i).copied()?.then_some(())?;
            (!behind.get(i).copied()? && !drained.get(i).copied()?).then_some(())
        };
        let back_since = (0..up.len())
            .map(|i| {
                let now_able = able(&up, &behind, &drained, i).is_some();
                let known = i < old.up.len();
                let was_able = able(&old.up, &old.behind, &old.drained, i).is_some();
                match (now_able, known && !was_able) {
                    (false, _) => None,
                    (true, true) => Some(now),
                    (true, false) => old.back_since.get(i).copied().flatten(),
                }
            })
            .collect();
        let snap = Arc::new(PoolHealth {
            up,
            ejected_until,
            behind,
            drained,
            back_since,
        });
        for (i, b) in self.backends.iter().enumerate() {
            b.up_gauge.set(i64::from(snap.available(i, now)));
        }
        self.health.store(snap.clone());
        snap
    }

    /// Marks the backends whose names are in `behind` as serving a release behind the fleet's
    /// (and clears the others); republishes the snapshot when anything changed.
    pub fn set_behind(&self, behind: &std::collections::HashSet<String>) {
        let mut changed = false;
        for b in &self.backends {
            let now_behind = behind.contains(&b.config.name);
            changed |= b.behind.swap(now_behind, Ordering::Relaxed) != now_behind;
        }
        if changed {
            self.publish_health();
        }
    }

    /// Drains (or enables) backend `name`: a drained backend gets no new requests and leaves
    /// the DNS answers; requests in flight finish. `None` when the pool has no such backend.
    pub fn set_drained(&self, name: &str, drained: bool) -> Option<bool> {
        let b = self.backends.iter().find(|b| b.config.name == name)?;
        if b.drained.swap(drained, Ordering::Relaxed) != drained {
            self.publish_health();
        }
        Some(drained)
    }

    /// Records an active check result for backend `i`; returns the new state when it changed.
    pub fn record_check(&self, i: usize, ok: bool) -> Option<bool> {
        let hc = self.config.health.as_ref()?;
        let b = self.backends.get(i)?;
        let (changed, up) = {
            let mut a = lock(&b.active);
            (a.observe(ok, hc.rise, hc.fall), a.is_up())
        };
        if changed {
            self.publish_health();
            Some(up)
        } else {
            None
        }
    }

    /// Records the outcome of a proxied request to backend `i` (passive health); returns true
    /// when it got the backend ejected.
    pub fn record_outcome(&self, i: usize, ok: bool, now: Instant) -> bool {
        let Some(b) = self.backends.get(i) else {
            return false;
        };
        if ok && !b.failing.load(Ordering::Relaxed) {
            return false;
        }
        let ejected = {
            let mut e = lock(&b.ejection);
            let ejected = e.record(ok, now, &self.config.passive);
            b.failing.store(!ok, Ordering::Relaxed);
            ejected
        };
        if ejected {
            b.ejections.inc();
            self.publish_health();
        }
        ejected
    }
}

/// Load view over a pool's backends for the balancing policies.
pub struct PoolLoad<'a> {
    /// The backends.
    pub backends: &'a [Arc<BackendState>],
    /// The instant EWMAs are read at.
    pub now: Instant,
}

impl Load for PoolLoad<'_> {
    fn in_flight(&self, i: usize) -> u64 {
        self.backends
            .get(i)
            .map_or(0, |b| b.in_flight.load(Ordering::Relaxed))
    }

    fn latency_ewma(&self, i: usize) -> f64 {
        self.backends
            .get(i)
            .map_or(0.0, |b| b.ewma.get_at(self.now))
    }
}

impl Table {
    /// Builds the table for `config`, reusing backend state from `previous` for backends that
    /// stay (same pool name, backend name and address).
    pub fn build(
        config: &Config,
        previous: Option<&Table>,
        generation: u64,
        metrics: &Metrics,
    ) -> Table {
        let pools = config
            .pools
            .iter()
            .map(|p| {
                let old = previous.and_then(|t| t.pools.iter().find(|o| o.config.name == p.name));
                let backends = p
                    .backends
                    .iter()
                    .map(|b| {
                        old.and_then(|o| o.backends.iter().find(|ob| ob.config == *b).cloned())
                            .unwrap_or_else(|| {
                                let fresh = BackendState::new(&p.name, b.clone(), metrics);
                                // A drain outlives a change of the backend's settings.
                                let drained = old
                                    .and_then(|o| {
                                        o.backends.iter().find(|ob| ob.config.name == b.name)
                                    })
                                    .is_some_and(|ob| ob.drained.load(Ordering::Relaxed));
                                fresh.drained.store(drained, Ordering::Relaxed);
                                Arc::new(fresh)
                            })
                    })
                    .collect();
                Arc::new(PoolState::new(p.clone(), backends, metrics))
            })
            .collect();
        let limiters = config
            .routes
            .iter()
            .map(|r| {
                let limit = r.rate_limit.as_ref()?;
                let kept = previous.and_then(|t| {
                    t.routes
                        .routes()
                        .iter()
                        .zip(&t.limiters)
                        .find(|(o, l)| {
                            o.name == r.name
                                && l.as_ref().is_some_and(|l| l.limiter.limit() == limit)
                        })
                        .and_then(|(_, l)| l.clone())
                });
                Some(kept.unwrap_or_else(|| {
                    Arc::new(RouteLimiter {
                        limiter: Limiter::new(limit.clone(), DEFAULT_MAX_KEYS),
                        refused: metrics
                            .rate_limited
                            .get_or_create(&crate::metrics::RouteLabels {
                                route: r.name.clone(),
                            })
                            .clone(),
                    })
                }))
            })
            .collect();
        Table {
            generation,
            routes: RouteTable::new(config.routes.clone()),
            limiters,
            pools,
        }
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&Arc<PoolState>> {
        self.pools.iter().find(|p| p.config.name == name)
    }
}
