//! Which agents are behind the fleet's release (pure): the router stops sending traffic to
//! their backends until they catch up; which reports still count; which agent a full table
//! gives up for a new one; and the skew of the fleet's last flip.
//!
//! The fleet's release at hub time `now` is the staged one once its activation time has come
//! (agents flip at that instant; the hub's own promotion follows a moment later), else the
//! active one.
//!
//! A report counts for the hub's `report_expiry` after it arrived ([`fresh`]); agents renew
//! theirs every 30 s. An expired (*stale*) report says nothing any more: its agent is
//! unknown — neither current nor behind — so a backend whose agent went quiet keeps its
//! place in rotation like one without an agent, and a forged `active: null` under a real
//! backend's name takes it out for at most that long unless it is sent again.

use std::collections::{BTreeMap, HashSet};

use crate::sync::cycle::HubState;
use crate::sync::manifest::ReleaseId;
use serde::{Deserialize, Serialize};

use crate::sync::protocol::{Fleet, Report};

/// The release every agent should serve at `now_us`.
pub fn fleet_release(state: &HubState, now_us: u64) -> Option<ReleaseId> {
    match state.staged {
        Some(s) if now_us >= s.at_us => Some(s.id),
        _ => state.active,
    }
}

/// For this long after an activation time, an agent still reporting the release before it is
/// not counted behind: its report of the flip is on its way, and marking agents behind one by
/// one as their reports land would send a whole pool to the first one for that moment.
pub const FLIP_REPORT_GRACE_US: u64 = 1_000_000;

/// For this long after an immediate changeset changed the active release, no agent is counted
/// behind: the changeset reaches agents directly and their reports follow; a burst of edits
/// must not pull backends out of rotation one after another.
pub const FORWARD_GRACE_US: u64 = 5_000_000;

/// Whether a report that arrived at `reported_us` still counts at `now_us`.
pub fn fresh(reported_us: u64, now_us: u64, expiry_us: u64) -> bool {
    now_us < reported_us.saturating_add(expiry_us)
}

/// When the first of the reports (their arrival times) still counting at `now_us` expires.
pub fn next_expiry(
    reported: impl IntoIterator<Item = u64>,
    now_us: u64,
    expiry_us: u64,
) -> Option<u64> {
    reported
        .into_iter()
        .map(|at| at.saturating_add(expiry_us))
        .filter(|&end| end > now_us)
        .min()
}

/// Names of the agents whose report still counts and whose active release is not the
/// fleet's (none when the fleet has no release yet, or while immediate changesets are
/// settling). `reports`: name, report, arrival time.
pub fn behind<'a>(
    state: &HubState,
    now_us: u64,
    expiry_us: u64,
    reports: impl IntoIterator<Item = (&'a String, &'a Report, u64)>,
) -> HashSet<String> {
    let Some(release) = fleet_release(state, now_us) else {
        return HashSet::new();
    };
    if state
        .forwarded_us
        .is_some_and(|t| now_us < t.saturating_add(FORWARD_GRACE_US))
    {
        return HashSet::new();
    }
    let also = match state.staged {
        Some(s) if now_us >= s.at_us && now_us < s.at_us.saturating_add(FLIP_REPORT_GRACE_US) => {
            state.active
        }
        _ => None,
    };
    reports
        .into_iter()
        .filter(|(_, _, at)| fresh(*at, now_us, expiry_us))
        .filter(|(_, r, _)| r.active != Some(release) && (also.is_none() || r.active != also))
        .map(|(name, _, _)| name.clone())
        .collect()
}

/// When [`behind`] may change by time alone after `now_us`: the activation and the end of the
/// flip-report grace.
pub fn next_change(state: &HubState, now_us: u64) -> Option<u64> {
    let flip = state
        .staged
        .map(|s| [s.at_us, s.at_us.saturating_add(FLIP_REPORT_GRACE_US)]);
    let forward = state
        .forwarded_us
        .map(|t| t.saturating_add(FORWARD_GRACE_US));
    flip.into_iter()
        .flatten()
        .chain(forward)
        .filter(|&t| t > now_us)
        .min()
}

/// Reports keyed by agent name, with the hub time each arrived.
pub type Reports = BTreeMap<String, (Report, u64)>;

/// Where a report of a name goes in a table that holds at most `max` agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// A known name, or there is room: record it.
    Insert,
    /// Full: give up this agent's stale report (the oldest) for it.
    Evict(String),
    /// Full of reports that still count: refuse the new name.
    Full,
}

/// Whether a report of `name` may enter `reports` at `now_us`: a known name always; a new one
/// while there is room, else in place of the oldest *stale* report. A fresh report is never
/// given up, so a flood of forged names can fill the free places but cannot push out a live
/// agent (which renews its report well within the expiry), and the flood's own entries make
/// room again once it stops.
pub fn admit(reports: &Reports, name: &str, now_us: u64, expiry_us: u64, max: usize) -> Admit {
    if reports.contains_key(name) || reports.len() < max {
        return Admit::Insert;
    }
    reports
        .iter()
        .filter(|(_, (_, at))| !fresh(*at, now_us, expiry_us))
        .min_by_key(|(_, (_, at))| *at)
        .map_or(Admit::Full, |(n, _)| Admit::Evict(n.clone()))
}

/// The skew of the fleet's last flip, as the agents measured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlipSkew {
    /// The release flipped to (the hub's active one).
    pub release: ReleaseId,
    /// How many agents reported their lateness for it.
    pub agents: usize,
    /// Latest minus earliest lateness, µs.
    pub spread_us: i64,
    /// The earliest lateness, µs (negative: early).
    pub min_us: i64,
    /// The latest lateness, µs.
    pub max_us: i64,
}

/// The skew of the fleet's last flip: among agents whose last flip activated the hub's active
/// release (and whose report still counts), the spread of their measured lateness.
pub fn last_flip_skew(f: &Fleet) -> Option<FlipSkew> {
    let release = f.schedule.active?;
    let late: Vec<i64> = f
        .agents
        .iter()
        .filter(|a| !a.stale && a.report.last_flip == Some(release))
        .filter_map(|a| a.report.last_flip_lateness_us)
        .collect();
    let (min_us, max_us) = (*late.iter().min()?, *late.iter().max()?);
    Some(FlipSkew {
        release,
        agents: late.len(),
        spread_us: max_us - min_us,
        min_us,
        max_us,
    })
}

/// A fleet of three agents — two flipped to release 2 (lateness +120 and −30 µs), one
/// still on release 1 — and the two release ids; for the tests of `lockstep status` and the admin API.
#[cfg(test)]
pub(crate) fn sample_fleet() -> (
    Fleet,
    crate::sync::manifest::Hash,
    crate::sync::manifest::Hash,
) {
    use crate::sync::manifest::Hash;
    use crate::sync::protocol::{AgentView, Report, Schedule};
    let (r1, r2) = (Hash::of(b"1"), Hash::of(b"2"));
    let agent = |name: &str, flip: Hash, late: i64| AgentView {
        name: name.into(),
        report: Report {
            active: Some(flip),
            last_flip: Some(flip),
            last_flip_lateness_us: Some(late),
            ..Report::default()
        },
        reported_us: 0,
        current: flip == r2,
        stale: false,
    };
    let fleet = Fleet {
        cluster: None,
        conflicts: Vec::new(),
        schedule: Schedule {
            version: 3,
            cycle: 2,
            active: Some(r2),
            staged: None,
            activation_us: None,
            queued: None,
            previous: Some(r1),
            now_us: 0,
            applied: Default::default(),
        },
        agents: vec![
            agent("a", r2, 120),
            agent("b", r2, -30),
            agent("c", r1, 9_000),
        ],
    };
    (fleet, r1, r2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::cycle::Staged;
    use crate::sync::manifest::Hash;

    const DAY_US: u64 = 86_400_000_000;

    fn report(active: Option<ReleaseId>) -> Report {
        Report {
            active,
            ..Report::default()
        }
    }

    /// An expired report is unknown, not behind: a forged `active: null` stops steering the
    /// rotation once nobody renews it; the agent's next report counts again.
    #[test]
    fn expired_reports_are_neither_behind_nor_current() {
        let (r1, r2) = (Hash::of(b"1"), Hash::of(b"2"));
        let state = HubState {
            active: Some(r2),
            ..HubState::default()
        };
        let (forged, stuck, fine) = ("web1".to_string(), "web2".to_string(), "web3".to_string());
        let (none, old, new) = (report(None), report(Some(r1)), report(Some(r2)));
        let ttl = 90;
        // web1's forged report came at 0, web2 (really behind) renews at 50, web3 is current.
        let reports = [(&forged, &none, 0), (&stuck, &old, 50), (&fine, &new, 50)];
        let at = |now| behind(&state, now, ttl, reports);
        assert_eq!(at(89), [forged.clone(), stuck.clone()].into());
        assert_eq!(at(90), [stuck.clone()].into(), "web1's report expired");
        assert_eq!(at(140), HashSet::new(), "and then web2's");
        assert!(fresh(0, 89, ttl) && !fresh(0, 90, ttl));
        assert!(fresh(u64::MAX - 1, u64::MAX - 1, ttl), "no overflow");
        // The task wakes when the first report still counting expires.
        assert_eq!(next_expiry([0, 50, 50], 10, ttl), Some(90));
        assert_eq!(next_expiry([0, 50, 50], 90, ttl), Some(140));
        assert_eq!(next_expiry([0, 50], 140, ttl), None);
    }

    /// A full table takes a new name only in place of the oldest stale report: a flood of
    /// forged names never pushes out an agent that keeps reporting.
    #[test]
    fn a_full_table_gives_up_only_stale_reports() {
        let ttl = 90;
        let mut reports = Reports::new();
        reports.insert("live".into(), (report(None), 100));
        assert_eq!(admit(&reports, "new", 100, ttl, 2), Admit::Insert, "room");
        reports.insert("flood-1".into(), (report(None), 20));
        assert_eq!(admit(&reports, "live", 100, ttl, 2), Admit::Insert, "known");
        assert_eq!(
            admit(&reports, "flood-2", 100, ttl, 2),
            Admit::Full,
            "all fresh"
        );
        reports.insert("flood-0".into(), (report(None), 5));
        // flood-0 and flood-1 are stale at 110; the older goes first; `live` never does.
        assert_eq!(
            admit(&reports, "flood-2", 110, ttl, 3),
            Admit::Evict("flood-0".into())
        );
        assert_eq!(
            admit(&reports, "flood-2", 95, ttl, 3),
            Admit::Evict("flood-0".into())
        );
        assert_eq!(admit(&reports, "flood-2", 94, ttl, 3), Admit::Full);
        assert_eq!(
            admit(&reports, "flood-2", 1_000, ttl, 3),
            Admit::Evict("flood-0".into())
        );
    }

    #[test]
    fn agents_behind_the_active_or_just_activated_release() {
        let (r1, r2) = (Hash::of(b"1"), Hash::of(b"2"));
        let state = HubState {
            active: Some(r1),
            staged: Some(Staged { id: r2, at_us: 100 }),
            ..HubState::default()
        };
        let reports: BTreeMap<String, Report> = [
            ("a".to_string(), report(Some(r1))),
            ("b".to_string(), report(Some(r2))),
            ("c".to_string(), report(None)),
        ]
        .into();
        // Every report arrived at 0 and counts for a day.
        let behind = |state: &HubState, now: u64, reports: &BTreeMap<String, Report>| {
            behind(state, now, DAY_US, reports.iter().map(|(n, r)| (n, r, 0)))
        };
        let before: HashSet<String> = ["b".into(), "c".into()].into();
        assert_eq!(behind(&state, 99, &reports), before);
        // Right after the activation both releases count as current while reports land.
        let settling: HashSet<String> = ["c".into()].into();
        assert_eq!(behind(&state, 100, &reports), settling);
        let after: HashSet<String> = ["a".into(), "c".into()].into();
        assert_eq!(behind(&state, 100 + FLIP_REPORT_GRACE_US, &reports), after);
        assert_eq!(next_change(&state, 50), Some(100));
        assert_eq!(next_change(&state, 100), Some(100 + FLIP_REPORT_GRACE_US));
        assert!(behind(&HubState::default(), 100, &reports).is_empty());
        // While immediate changesets settle, nobody is behind.
        let forwarding = HubState {
            active: Some(r2),
            forwarded_us: Some(1000),
            ..HubState::default()
        };
        assert!(behind(&forwarding, 1000 + FORWARD_GRACE_US - 1, &reports).is_empty());
        assert_eq!(
            next_change(&forwarding, 1000),
            Some(1000 + FORWARD_GRACE_US)
        );
        let after: HashSet<String> = ["a".into(), "c".into()].into();
        assert_eq!(
            behind(&forwarding, 1000 + FORWARD_GRACE_US, &reports),
            after
        );
    }
}
