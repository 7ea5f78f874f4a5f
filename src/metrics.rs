//! Prometheus metrics (prometheus-client): one registry for the process, rendered in the text
//! format on the admin listener's `/metrics`.
//!
//! Hot-path handles (a backend's counters, a pool's histogram) are looked up once when a
//! routing table is built and kept beside it, so a request touches atomics only.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of a per-backend series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// Pool name.
    pub pool: String,
    /// Backend name.
    pub backend: String,
}

/// Labels of a request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Pool name (`none` when no route matched).
    pub pool: String,
    /// Backend name (`none` when no backend was picked).
    pub backend: String,
    /// `2xx`, `3xx`, `4xx` or `5xx`.
    pub class: String,
}

/// Labels with a pool only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// Pool name.
    pub pool: String,
}

/// Labels with a listener only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// Listener name.
    pub listener: String,
}

/// Labels with a route only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Route name (`name:`, else `route N`).
    pub route: String,
}

/// A latency histogram kept beside the Prometheus ones, for the status page's per-backend
/// p50/p99: counts in buckets doubling from 250 µs (the last one open-ended), read by taking
/// the counts and subtracting the previous reading ([`quantile`]).
#[derive(Debug, Default)]
pub struct Buckets([std::sync::atomic::AtomicU64; BUCKETS]);

/// How many [`Buckets`]: 250 µs · 2^21 ≈ 9 min for the last bounded one.
pub const BUCKETS: usize = 22;

/// The upper bound of bucket `i`, seconds (`f64::INFINITY` for the last).
pub fn bucket_bound(i: usize) -> f64 {
    if i + 1 >= BUCKETS {
        f64::INFINITY
    } else {
        0.000_25 * f64::from(1u32 << i)
    }
}

impl Buckets {
    /// Counts one observation of `seconds`.
    pub fn observe(&self, seconds: f64) {
        let i = (0..BUCKETS)
            .find(|&i| seconds <= bucket_bound(i))
            .unwrap_or(BUCKETS - 1);
        self.0[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The counts now.
    pub fn counts(&self) -> [u64; BUCKETS] {
        std::array::from_fn(|i| self.0[i].load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// The `q` quantile (0..1) of the observations counted in `counts`, seconds: linear within the
/// bucket it falls in (as Prometheus' histogram_quantile); `None` without observations.
pub fn quantile(counts: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        if c > 0 && (below + c) as f64 >= rank {
            let lo = if i == 0 { 0.0 } else { bucket_bound(i - 1) };
            let hi = bucket_bound(i);
            if hi.is_infinite() {
                return Some(lo);
            }
            let within = ((rank - below as f64) / c as f64).clamp(0.0, 1.0);
            return Some(lo + (hi - lo) * within);
        }
        below += c;
    }
    Some(bucket_bound(BUCKETS - 2))
}

/// Labels of a listener's certificate.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    /// Listener name.
    pub listener: String,
    /// The certificate's first DNS name (or `certificate N`).
    pub certificate: String,
}

/// Labels of an ACME order's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcmeLabels {
    /// Listener name.
    pub listener: String,
    /// `ok` or `error`.
    pub result: String,
}

/// Labels of a pool's queue refusals.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    /// Pool name.
    pub pool: String,
    /// `full` or `timeout`.
    pub reason: String,
}

/// Labels of the reload counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: String,
}

/// Every metric lockstep exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Proxied requests by pool, backend and status class.
    pub requests: Family<RequestLabels, Counter>,
    /// Request latency by pool, seconds.
    pub latency: Family<PoolLabels, Histogram>,
    /// 1 when a backend is available, 0 when down or ejected.
    pub backend_up: Family<BackendLabels, Gauge>,
    /// Failed active health checks.
    pub check_failures: Family<BackendLabels, Counter>,
    /// Passive ejections.
    pub ejections: Family<BackendLabels, Counter>,
    /// Retries to another backend.
    pub retries: Family<PoolLabels, Counter>,
    /// Config reloads by result.
    pub reloads: Family<ResultLabels, Counter>,
    /// Open client connections by listener (upgraded tunnels included).
    pub connections: Family<ListenerLabels, Gauge>,
    /// Connections closed at accept because their listener was at `max_connections`.
    pub connections_refused: Family<ListenerLabels, Counter>,
    /// Upgraded (WebSocket) tunnels open now, by listener.
    pub tunnels: Family<ListenerLabels, Gauge>,
    /// Requests refused (429) by a route's rate limit.
    pub rate_limited: Family<RouteLabels, Counter>,
    /// When each listener's certificate expires, seconds since the epoch.
    pub tls_expiry: Family<CertLabels, Gauge>,
    /// ACME orders by listener and result (`ok` or `error`).
    pub acme_orders: Family<AcmeLabels, Counter>,
    /// Requests waiting in a pool's queue now.
    pub queue_depth: Family<PoolLabels, Gauge>,
    /// Requests a pool's queue refused (503, `fault=queue`): full, or waited too long.
    pub queue_refused: Family<QueueLabels, Counter>,
    /// Connections open on the admin listener, and those refused at its cap.
    pub admin_connections: (Gauge, Counter),
    /// Connections open on the sync API, and those refused at its cap.
    pub sync_connections: (Gauge, Counter),
}

impl Metrics {
    /// Creates and registers every metric.
    // Long on purpose: one flat list of registrations (name, help, metric), read top to
    // bottom; split, it would only scatter the list.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("lockstep");
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            requests: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            backend_up: Family::default(),
            check_failures: Family::default(),
            ejections: Family::default(),
            retries: Family::default(),
            reloads: Family::default(),
            connections: Family::default(),
            connections_refused: Family::default(),
            tunnels: Family::default(),
            rate_limited: Family::default(),
            queue_depth: Family::default(),
            queue_refused: Family::default(),
            tls_expiry: Family::default(),
            acme_orders: Family::default(),
            admin_connections: Default::default(),
            sync_connections: Default::default(),
        };
        registry.register("http_requests", "Proxied HTTP requests", m.requests.clone());
        registry.register(
            "http_request_duration_seconds",
            "Time from request received to response head sent",
            m.latency.clone(),
        );
        registry.register(
            "backend_up",
            "1 if the backend takes traffic",
            m.backend_up.clone(),
        );
        registry.register(
            "health_check_failures",
            "Failed active health checks",
            m.check_failures.clone(),
        );
        registry.register(
            "backend_ejections",
            "Passive ejections",
            m.ejections.clone(),
        );
        registry.register(
            "retries",
            "Requests retried on another backend",
            m.retries.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads by result",
            m.reloads.clone(),
        );
        registry.register(
            "open_connections",
            "Open client connections",
            m.connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed at accept because the listener was at max_connections",
            m.connections_refused.clone(),
        );
        registry.register(
            "upgraded_connections",
            "Upgraded (WebSocket) tunnels open now",
            m.tunnels.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused with 429 by a route's rate_limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When each listener's certificate expires (its notAfter), seconds since the epoch",
            m.tls_expiry.clone(),
        );
        registry.register(
            "acme_orders",
            "Certificate orders to the ACME CA by listener and result (ok, error)",
            m.acme_orders.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting for a backend under its max_connections",
            m.queue_depth.clone(),
        );
        registry.register(
            "queue_refused",
            "Requests answered 503 by a pool's queue: full, or waited past queue.timeout",
            m.queue_refused.clone(),
        );
        for (what, (open, refused)) in [
            ("admin", &m.admin_connections),
            ("sync", &m.sync_connections),
        ] {
            registry.register(
                format!("{what}_open_connections"),
                format!("Open connections on the {what} listener"),
                open.clone(),
            );
            registry.register(
                format!("{what}_connections_refused"),
                format!("Connections closed at accept because the {what} listener was at its max_connections"),
                refused.clone(),
            );
        }
        registry.register(
            "access_log_dropped_lines",
            "Access log lines dropped because the writer could not keep up",
            access_log_dropped().clone(),
        );
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = registry;
        m
    }

    /// Registers further metrics (for the DNS and sync parts).
    pub fn with_registry<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        f(&mut self.registry.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Access-log lines dropped because stdout could not keep up. One per process, as the access
/// log's writer thread is; every registry exports the same counter.
pub fn access_log_dropped() -> &'static Counter {
    static DROPPED: std::sync::OnceLock<Counter> = std::sync::OnceLock::new();
    DROPPED.get_or_init(Counter::default)
}

/// The status classes, as metric labels, in order.
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The index in [`CLASSES`] of a status code's class (anything outside 100–599 counts as 5xx:
/// hyper never hands out such a status, so only a bug would make one).
pub fn class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// Status class label of a status code.
pub fn class(status: u16) -> &'static str {
    CLASSES[class_index(status)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes_label_and_index_alike() {
        for (status, label) in [
            (101, "1xx"),
            (200, "2xx"),
            (304, "3xx"),
            (404, "4xx"),
            (503, "5xx"),
        ] {
            assert_eq!(class(status), label);
            assert_eq!(CLASSES[class_index(status)], label);
        }
        assert_eq!(class(999), "5xx");
    }

    #[test]
    fn dropped_access_log_lines_are_exported() {
        let m = Metrics::new();
        let before = access_log_dropped().get();
        access_log_dropped().inc();
        let text = m.render();
        let line = text
            .lines()
            .find(|l| l.starts_with("lockstep_access_log_dropped_lines_total "))
            .unwrap_or_else(|| panic!("no dropped-lines counter in:\n{text}"));
        let value: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(value > before, "{line}");
    }

    #[test]
    fn quantiles_come_from_the_bucket_counts() {
        let b = Buckets::default();
        assert_eq!(quantile(&b.counts(), 0.5), None);
        // 90 fast (under 250 µs), 10 slow (between 16 and 32 ms).
        for _ in 0..90 {
            b.observe(0.0001);
        }
        for _ in 0..10 {
            b.observe(0.020);
        }
        let c = b.counts();
        let p50 = quantile(&c, 0.5).unwrap();
        assert!(p50 > 0.0 && p50 <= 0.000_25, "{p50}");
        let p99 = quantile(&c, 0.99).unwrap();
        assert!((0.016..=0.032).contains(&p99), "{p99}");
        // What arrived since a reading: the difference of two.
        let before = b.counts();
        b.observe(1.0);
        let now = b.counts();
        let since: [u64; BUCKETS] = std::array::from_fn(|i| now[i] - before[i]);
        let q = quantile(&since, 0.5).unwrap();
        assert!((0.512..=1.024).contains(&q), "{q}");
        // Beyond the last bound: its lower bound.
        let far = Buckets::default();
        far.observe(1e9);
        assert_eq!(
            quantile(&far.counts(), 0.5),
            Some(bucket_bound(BUCKETS - 2))
        );
    }
}
