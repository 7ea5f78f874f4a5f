//! The hub's metrics: cycle, activation time, publishes, blob bytes received, cycle advances
//! won (by agents or by the hub after its grace period), agents behind, changesets refused for
//! numbers ahead of the hub's clock, reports that expired or were refused, content collected
//! from the store, each agent's reported clock offset, error bound and last flip lateness, and
//! the long polls parked now.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::Metrics;
use crate::sync::cycle::{Advancer, HubState};
use crate::sync::protocol::Report;

/// Labels naming who advanced a cycle.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByLabels {
    /// `agent` or `hub`.
    pub by: &'static str,
}

/// Labels naming a changeset mode.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    /// `immediate` or `scheduled`.
    pub mode: &'static str,
}

/// Labels naming a changeset field.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FieldLabels {
    /// `seq` or `detected_us`.
    pub field: &'static str,
}

/// Labels naming what a collection removed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WhatLabels {
    /// `releases` or `blobs`.
    pub what: &'static str,
}

/// Labels naming why a request was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `unauthenticated`, `role`, `identity` or `certificate`.
    pub reason: &'static str,
}

/// Labels naming an agent.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabels {
    /// The agent's name.
    pub agent: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Handles to the hub's metrics.
#[derive(Clone, Default)]
pub struct HubMetrics {
    /// The current cycle.
    pub cycle: Gauge,
    /// Activation time of the staged release (Unix seconds; 0 when nothing is staged).
    pub activation: FloatGauge,
    /// Releases committed.
    pub publishes: Counter,
    /// Blob bytes received from publishers.
    pub blob_bytes: Counter,
    /// Blobs served to agents.
    pub blobs_served: Counter,
    /// Blobs fetched from the other hubs (`sync.cluster`).
    pub blobs_fetched: Counter,
    /// 1 while this hub renews its etcd lease (`sync.cluster`; always 1 without).
    pub cluster_connected: Gauge,
    /// 1 while this hub holds the leader key (`sync.cluster`; always 1 without).
    pub cluster_leader: Gauge,
    /// Cycle advances won, by who.
    pub advances: Family<ByLabels, Counter>,
    /// Agents whose active release is behind the fleet's.
    pub behind: Gauge,
    /// Changesets applied, by mode.
    pub changesets: Family<ModeLabels, Counter>,
    /// Concurrent edits of one path resolved (one loser each).
    pub conflicts: Counter,
    /// Changesets refused because a number was ahead of the hub's clock, by field.
    pub implausible: Family<FieldLabels, Counter>,
    /// Agents whose last report is older than `report_expiry` (shown as stale).
    pub stale: Gauge,
    /// Reports of a new agent name refused because the table was full of fresh reports.
    pub reports_refused: Counter,
    /// Manifests and blobs removed by store collections.
    pub gc_removed: Family<WhatLabels, Counter>,
    /// Blob bytes freed by store collections.
    pub gc_bytes: Counter,
    /// Reported clock offset θ per agent, seconds.
    pub offset: Family<AgentLabels, FloatGauge>,
    /// Reported error bound ε per agent, seconds.
    pub error: Family<AgentLabels, FloatGauge>,
    /// Reported lateness of the last flip per agent, seconds.
    pub lateness: Family<AgentLabels, FloatGauge>,
    /// Long polls (`GET /sync/v1/schedule?wait=`) parked now.
    pub long_polls: Gauge,
    /// Requests refused before they did anything, by reason.
    pub refused: Family<ReasonLabels, Counter>,
    /// Bytes of uploaded blobs no release names yet (against `sync.upload_quota`).
    pub pending_upload_bytes: Gauge,
}

/// Counts one parked long poll in [`HubMetrics::long_polls`] until dropped.
pub(super) struct Parked(Gauge);

impl Drop for Parked {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl HubMetrics {
    /// Creates the metrics and registers them in `metrics`' registry.
    // Long on purpose: one flat list of registrations (name, help, metric), read top to
    // bottom; split, it would only scatter the list.
    pub fn register(metrics: &Metrics) -> HubMetrics {
        let m = HubMetrics::default();
        metrics.with_registry(|r| {
            r.register(
                "sync_cycle",
                "Current synchronisation cycle",
                m.cycle.clone(),
            );
            r.register(
                "sync_activation_timestamp_seconds",
                "Activation time of the staged release (0: nothing staged)",
                m.activation.clone(),
            );
            r.register("sync_publishes", "Releases committed", m.publishes.clone());
            r.register(
                "sync_pending_upload_bytes",
                "Bytes of uploaded blobs no commit or changeset has named yet (sync.upload_quota)",
                m.pending_upload_bytes.clone(),
            );
            r.register(
                "sync_blob_received_bytes",
                "Blob bytes received from publishers",
                m.blob_bytes.clone(),
            );
            r.register(
                "sync_blobs_served",
                "Blobs served to agents",
                m.blobs_served.clone(),
            );
            r.register(
                "sync_cluster_connected",
                "1 while this hub renews its etcd lease (sync.cluster): 0 means it is cut off from etcd and changes nothing",
                m.cluster_connected.clone(),
            );
            r.register(
                "sync_cluster_leader",
                "1 while this hub leads (its own advances, collection) among the hubs of sync.cluster",
                m.cluster_leader.clone(),
            );
            r.register(
                "sync_blobs_fetched_from_hubs",
                "Blobs this hub lacked and fetched from the other hubs (sync.cluster)",
                m.blobs_fetched.clone(),
            );
            r.register(
                "sync_cycle_advances",
                "Cycles advanced, by who won the compare-and-swap",
                m.advances.clone(),
            );
            r.register(
                "sync_agents_behind",
                "Agents whose active release is behind the fleet's",
                m.behind.clone(),
            );
            r.register(
                "sync_changesets",
                "Changesets from agents applied, by mode",
                m.changesets.clone(),
            );
            r.register(
                "sync_conflicts",
                "Concurrent edits of one path resolved (the later by hub time won)",
                m.conflicts.clone(),
            );
            r.register(
                "sync_changesets_implausible",
                "Changesets refused because seq or detected_us was ahead of the hub's clock",
                m.implausible.clone(),
            );
            r.register(
                "sync_agents_stale",
                "Agents whose last report is older than sync.report_expiry (not counted behind)",
                m.stale.clone(),
            );
            r.register(
                "sync_reports_refused",
                "Reports of a new agent name refused: the agent table was full of fresh reports",
                m.reports_refused.clone(),
            );
            r.register(
                "sync_gc_removed",
                "Unused manifests (releases) and blobs removed from the hub's store",
                m.gc_removed.clone(),
            );
            r.register(
                "sync_gc_removed_bytes",
                "Blob bytes freed in the hub's store",
                m.gc_bytes.clone(),
            );
            r.register(
                "sync_agent_clock_offset_seconds",
                "Clock offset (hub minus agent) each agent measured",
                m.offset.clone(),
            );
            r.register(
                "sync_agent_clock_error_seconds",
                "Error bound of each agent's clock offset",
                m.error.clone(),
            );
            r.register(
                "sync_agent_flip_lateness_seconds",
                "How late each agent's last flip was against its activation time",
                m.lateness.clone(),
            );
            r.register(
                "sync_long_polls_waiting",
                "Long polls of the schedule parked until it changes",
                m.long_polls.clone(),
            );
            r.register(
                "sync_refused",
                "Sync API requests refused before they did anything, by reason (unauthenticated, role, identity: acting as another party, certificate: naming no party)",
                m.refused.clone(),
            );
        });
        // Both series from the start at 0, so that a rate over them means something before
        // the first advance of each kind.
        for by in ["agent", "hub"] {
            let _ = m.advances.get_or_create(&ByLabels { by });
        }
        m
    }

    pub(super) fn observe_state(&self, s: &HubState) {
        self.cycle.set(s.cycle as i64);
        self.activation
            .set(s.staged.map_or(0.0, |st| st.at_us as f64 / 1e6));
    }

    /// Counts a long poll as parked until the returned guard is dropped.
    pub(super) fn park(&self) -> Parked {
        self.long_polls.inc();
        Parked(self.long_polls.clone())
    }

    /// Counts a refused request.
    pub(super) fn refused(&self, labels: ReasonLabels) {
        self.refused.get_or_create(&labels).inc();
    }

    pub(super) fn changeset(&self, mode: crate::sync::changeset::Mode) {
        let mode = match mode {
            crate::sync::changeset::Mode::Immediate => "immediate",
            crate::sync::changeset::Mode::Scheduled => "scheduled",
        };
        self.changesets.get_or_create(&ModeLabels { mode }).inc();
    }

    pub(super) fn implausible(&self, field: crate::sync::changeset::TimeField) {
        self.implausible
            .get_or_create(&FieldLabels {
                field: field.as_str(),
            })
            .inc();
    }

    /// Forgets the per-agent series of an agent the hub no longer tracks.
    pub(super) fn forget_agent(&self, name: &str) {
        let labels = AgentLabels {
            agent: name.to_string(),
        };
        self.offset.remove(&labels);
        self.error.remove(&labels);
        self.lateness.remove(&labels);
    }

    pub(super) fn gc_removed(&self, c: &crate::sync::store::Collected) {
        self.gc_removed
            .get_or_create(&WhatLabels { what: "releases" })
            .inc_by(c.releases as u64);
        self.gc_removed
            .get_or_create(&WhatLabels { what: "blobs" })
            .inc_by(c.blobs as u64);
        self.gc_bytes.inc_by(c.bytes);
    }

    pub(super) fn advance(&self, by: Advancer) {
        let by = match by {
            Advancer::Agent => "agent",
            Advancer::Hub => "hub",
        };
        self.advances.get_or_create(&ByLabels { by }).inc();
    }

    pub(super) fn observe_report(&self, name: &str, r: &Report) {
        let labels = AgentLabels {
            agent: name.to_string(),
        };
        if let Some(o) = r.offset_us {
            self.offset.get_or_create(&labels).set(o as f64 / 1e6);
        }
        if let Some(e) = r.error_us {
            self.error.get_or_create(&labels).set(e as f64 / 1e6);
        }
        if let Some(l) = r.last_flip_lateness_us {
            self.lateness.get_or_create(&labels).set(l as f64 / 1e6);
        }
    }
}
