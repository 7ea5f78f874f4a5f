//! The agent's Prometheus metrics, in a registry of its own (prefix `lockstep_agent`), rendered
//! on the serve listener's `/.lockstep/metrics`. Several agents in one process (the demo, the
//! tests) each keep their own.

use crate::net::limit::ConnGate;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::sync::manifest::ReleaseId;

/// Labels naming a release.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReleaseLabels {
    /// The release id (full hex).
    pub release: String,
}

/// Labels of served requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    /// `2xx` … `5xx`.
    pub class: String,
}

/// Labels of a forwarding step or a refusal.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WhatLabels {
    /// `hub`/`peer` (forwarded), or what was refused.
    pub what: &'static str,
}

/// Every metric of one agent.
pub struct AgentMetrics {
    registry: Mutex<Registry>,
    /// 1 for the release being served (info-style: the id is the label).
    pub active: Family<ReleaseLabels, Gauge>,
    /// 1 for a release fully staged and waiting for its activation.
    pub staged: Family<ReleaseLabels, Gauge>,
    /// θ: hub clock minus this agent's, seconds.
    pub clock_offset: Gauge<f64, AtomicU64>,
    /// ε: the bound on θ's error, seconds.
    pub clock_error: Gauge<f64, AtomicU64>,
    /// How late each scheduled flip was against its activation time (0 when early), seconds.
    pub flip_lateness: Histogram,
    /// The last scheduled flip's lateness, signed (negative = early), seconds.
    pub last_flip_lateness: Gauge<f64, AtomicU64>,
    /// Flips of the active release (scheduled, late and bootstrap).
    pub flips: Counter,
    /// Blob bytes fetched from the hub.
    pub fetched_bytes: Counter,
    /// Blobs fetched from the hub (verified and stored).
    pub fetched_blobs: Counter,
    /// Blobs (and manifests) whose content did not match their hash: discarded.
    pub hash_failures: Counter,
    /// Staging attempts that failed (the old release kept serving).
    pub staging_failures: Counter,
    /// Responses served, by status class.
    pub requests: Family<ClassLabels, Counter>,
    /// Paths changed on this backend (watch.dir or the API), detected.
    pub changes_detected: Counter,
    /// Changesets delivered, to the hub or to a peer.
    pub forwarded: Family<WhatLabels, Counter>,
    /// Direct sends to a peer that failed twice (the peer catches up from the hub).
    pub forward_failures: Counter,
    /// Changesets from peers installed.
    pub installed: Counter,
    /// Things refused: `path` (escaping, oversized…), `changeset` (from a peer or local),
    /// `implausible` (a peer's changeset numbered ahead of this agent's hub time), `hub` (the
    /// hub refused ours), `watch_dir` (first start refused), `signature` (a release no trusted
    /// key vouches for, or a peer's changeset from an untrusted origin).
    pub refused: Family<WhatLabels, Counter>,
    /// Concurrent edits met by our changesets (either side lost).
    pub conflicts: Counter,
    /// From detection on the origin to installation here (hub clock), seconds.
    pub forward_latency: Histogram,
    /// Peers immediate changesets are sent to.
    pub peers: Gauge,
    /// Manifests and blobs removed from the store by collections.
    pub gc_removed: Family<WhatLabels, Counter>,
    /// Blob bytes freed by collections.
    pub gc_bytes: Counter,
    /// Connections open on `serve`, and those closed at accept over `max_connections`.
    pub connections: ConnGate,
}

impl AgentMetrics {
    /// Creates and registers every metric.
    // Long on purpose: one flat list of registrations (name, help, metric), read top to
    // bottom; split, it would only scatter the list.
    pub fn new() -> AgentMetrics {
        let mut r = Registry::with_prefix("lockstep_agent");
        let m = AgentMetrics {
            registry: Mutex::new(Registry::default()),
            active: Family::default(),
            staged: Family::default(),
            clock_offset: Gauge::default(),
            clock_error: Gauge::default(),
            // 10 µs … ~5 s.
            flip_lateness: Histogram::new(exponential_buckets(0.000_01, 2.0, 20)),
            last_flip_lateness: Gauge::default(),
            flips: Counter::default(),
            fetched_bytes: Counter::default(),
            fetched_blobs: Counter::default(),
            hash_failures: Counter::default(),
            staging_failures: Counter::default(),
            requests: Family::default(),
            changes_detected: Counter::default(),
            forwarded: Family::default(),
            forward_failures: Counter::default(),
            installed: Counter::default(),
            refused: Family::default(),
            conflicts: Counter::default(),
            // 100 µs … ~50 s.
            forward_latency: Histogram::new(exponential_buckets(0.000_1, 2.0, 20)),
            peers: Gauge::default(),
            gc_removed: Family::default(),
            gc_bytes: Counter::default(),
            connections: ConnGate::default(),
        };
        r.register(
            "active_release",
            "1 for the release this agent serves",
            m.active.clone(),
        );
        r.register(
            "staged_release",
            "1 for a release staged and waiting for its activation time",
            m.staged.clone(),
        );
        r.register(
            "clock_offset_seconds",
            "Hub clock minus agent clock (theta)",
            m.clock_offset.clone(),
        );
        r.register(
            "clock_error_seconds",
            "Bound on the offset's error (epsilon, half the best round trip)",
            m.clock_error.clone(),
        );
        r.register(
            "flip_lateness_seconds",
            "Time from a scheduled activation to this agent's flip, on the hub's clock",
            m.flip_lateness.clone(),
        );
        r.register(
            "last_flip_lateness_seconds",
            "The last scheduled flip's lateness (negative = early)",
            m.last_flip_lateness.clone(),
        );
        r.register("flips", "Flips of the active release", m.flips.clone());
        r.register(
            "fetched_bytes",
            "Blob bytes fetched from the hub",
            m.fetched_bytes.clone(),
        );
        r.register(
            "fetched_blobs",
            "Blobs fetched from the hub",
            m.fetched_blobs.clone(),
        );
        r.register(
            "hash_failures",
            "Blobs or manifests refused because their content did not match their hash",
            m.hash_failures.clone(),
        );
        r.register(
            "staging_failures",
            "Staging attempts that failed",
            m.staging_failures.clone(),
        );
        r.register(
            "http_requests",
            "Responses served from the active release, by status class",
            m.requests.clone(),
        );
        r.register(
            "changes_detected",
            "Paths changed on this backend (watch.dir or the API)",
            m.changes_detected.clone(),
        );
        r.register(
            "changesets_forwarded",
            "Changesets delivered, to the hub or to a peer",
            m.forwarded.clone(),
        );
        r.register(
            "forward_failures",
            "Direct sends to a peer that failed (it catches up from the hub)",
            m.forward_failures.clone(),
        );
        r.register(
            "changesets_installed",
            "Changesets from other backends installed",
            m.installed.clone(),
        );
        r.register(
            "refused",
            "Refused paths, changesets, hub answers, watch directories or releases no trusted key signed",
            m.refused.clone(),
        );
        r.register(
            "conflicts",
            "Concurrent edits met by this agent's changesets",
            m.conflicts.clone(),
        );
        r.register(
            "forward_latency_seconds",
            "From detection on the origin to installation here (hub clock)",
            m.forward_latency.clone(),
        );
        r.register(
            "peers",
            "Other agents immediate changesets are sent to",
            m.peers.clone(),
        );
        r.register(
            "gc_removed",
            "Unused manifests (releases) and blobs removed from the store",
            m.gc_removed.clone(),
        );
        r.register(
            "gc_removed_bytes",
            "Blob bytes freed in the store",
            m.gc_bytes.clone(),
        );
        r.register(
            "open_connections",
            "Connections open on the serve address",
            m.connections.open.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed at accept because serve was at max_connections",
            m.connections.refused.clone(),
        );
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = r;
        m
    }

    /// Marks `id` as the one active release.
    pub fn set_active(&self, id: Option<ReleaseId>) {
        set_only(&self.active, id);
    }

    /// Marks `id` as the one staged release.
    pub fn set_staged(&self, id: Option<ReleaseId>) {
        set_only(&self.staged, id);
    }

    /// Counts what a collection removed.
    pub fn gc_removed(&self, c: &crate::sync::store::Collected) {
        for (what, n) in [("releases", c.releases), ("blobs", c.blobs)] {
            self.gc_removed
                .get_or_create(&WhatLabels { what })
                .inc_by(n as u64);
        }
        self.gc_bytes.inc_by(c.bytes);
    }

    /// Counts a refusal.
    pub fn refused(&self, what: &'static str) {
        self.refused.get_or_create(&WhatLabels { what }).inc();
    }

    /// Counts a delivery.
    pub fn forwarded(&self, what: &'static str) {
        self.forwarded.get_or_create(&WhatLabels { what }).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4 * 1024);
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
        out
    }
}

/// Leaves `family` with one series, `id`'s, at 1 (or none).
fn set_only(family: &Family<ReleaseLabels, Gauge>, id: Option<ReleaseId>) {
    family.clear();
    if let Some(id) = id {
        family
            .get_or_create(&ReleaseLabels {
                release: id.to_hex(),
            })
            .set(1);
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::manifest::Hash;

    #[test]
    fn active_release_is_exactly_one_series() {
        let m = AgentMetrics::new();
        m.set_active(Some(Hash::of(b"1")));
        m.set_active(Some(Hash::of(b"2")));
        m.hash_failures.inc();
        let text = m.render();
        assert!(text.contains(&format!(
            "lockstep_agent_active_release{{release=\"{}\"}} 1",
            Hash::of(b"2")
        )));
        assert!(!text.contains(&Hash::of(b"1").to_hex()));
        assert!(text.contains("lockstep_agent_hash_failures_total 1"));
    }
}
