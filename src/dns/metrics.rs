//! The DNS responder's metrics: queries by type and response code, answer latency, fail-open
//! answers, what response-rate limiting held back, and DNS-over-TCP connections (open, and
//! closed at accept over the cap). Registered once in the process registry
//! ([`crate::metrics::Metrics`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use crate::metrics::Metrics;

/// Labels of the query counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    /// Asked type (`A`, `AAAA`, ...).
    pub qtype: &'static str,
    /// Response code as dig prints it (`NOERROR`, `NXDOMAIN`, ...).
    pub rcode: &'static str,
}

/// Labels of the fail-open counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabels {
    /// The pool whose backends were all down.
    pub pool: String,
}

/// Labels of the response-rate limiting counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RrlLabels {
    /// `dropped` (no answer sent) or `slipped` (a truncated answer sent instead).
    pub action: &'static str,
}

/// Handles to the DNS metrics (cheap to clone: each is an `Arc` inside).
#[derive(Clone)]
pub struct DnsMetrics {
    /// Queries answered, by type and response code.
    pub queries: Family<QueryLabels, Counter>,
    /// Time from the query decoded to the answer handed to the socket, seconds.
    pub latency: Histogram,
    /// Answers that listed every backend of a pool because none was available.
    pub fail_open: Family<NameLabels, Counter>,
    /// UDP answers over a client prefix's rate, by what became of them.
    pub rrl: Family<RrlLabels, Counter>,
    /// DNS-over-TCP connections open.
    pub tcp_connections: Gauge,
    /// DNS-over-TCP connections closed at accept because `max_tcp_connections` were open.
    pub tcp_refused: Counter,
}

impl DnsMetrics {
    /// Creates the metrics and registers them in `metrics`' registry.
    pub fn register(metrics: &Metrics) -> DnsMetrics {
        let m = DnsMetrics {
            queries: Family::default(),
            // From 5 µs: an answer from memory takes microseconds.
            latency: Histogram::new(exponential_buckets(0.000_005, 2.0, 16)),
            fail_open: Family::default(),
            rrl: Family::default(),
            tcp_connections: Gauge::default(),
            tcp_refused: Counter::default(),
        };
        metrics.with_registry(|r| {
            r.register(
                "dns_queries",
                "DNS queries answered, by type and response code",
                m.queries.clone(),
            );
            r.register(
                "dns_answer_duration_seconds",
                "Time to build and send a DNS answer",
                m.latency.clone(),
            );
            r.register(
                "dns_fail_open_answers",
                "DNS answers listing every backend of a pool because none was available",
                m.fail_open.clone(),
            );
            r.register(
                "dns_rrl",
                "DNS answers over UDP held back by response-rate limiting: dropped, or slipped (sent truncated)",
                m.rrl.clone(),
            );
            r.register(
                "dns_tcp_connections",
                "Open DNS-over-TCP connections",
                m.tcp_connections.clone(),
            );
            r.register(
                "dns_tcp_refused",
                "DNS-over-TCP connections closed at accept because dns.max_tcp_connections were open",
                m.tcp_refused.clone(),
            );
        });
        m
    }
}
