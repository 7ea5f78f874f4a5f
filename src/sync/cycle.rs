//! The hub's synchronisation state and its transitions: publish
//! stages a release for an activation time; after that time the first caller of *advance* for
//! the current cycle promotes staged → active and computes the next activation; later callers
//! of the same cycle are told it is done.
//!
//! Pure: `now` is an argument and a transition returns a new [`HubState`]; the store applies
//! it with a compare-and-swap on [`HubState::version`], which is what makes "first one wins this
//! cycle" hold across concurrent callers.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::changeset::{Applied, Stamp, Stamps, MAX_AHEAD_US};
use super::manifest::ReleaseId;
use super::schedule::{Rules, ScheduleError};

/// How long the hub remembers the last writer of a path (concurrent edits are closer than
/// this; an older write counts as "before any changeset").
pub const STAMP_TTL_US: u64 = 3600 * 1_000_000;

/// Everything the hub must not forget (persisted as `state` in the store).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubState {
    /// Bumped by every change; long-polls wait for it and the store swaps on it.
    pub version: u64,
    /// The synchronisation cycle: bumped by each activation.
    pub cycle: u64,
    /// The release every agent should serve.
    pub active: Option<ReleaseId>,
    /// The release before it (what `publish --rollback` stages).
    pub previous: Option<ReleaseId>,
    /// The release agents stage now, and when they activate it.
    pub staged: Option<Staged>,
    /// Published too close to the staged activation: staged by the next advance.
    pub queued: Option<Queued>,
    /// Highest changeset sequence applied per origin agent.
    #[serde(default, skip_serializing_if = "Applied::is_empty")]
    pub applied: Applied,
    /// Last changeset write per path (pruned after [`STAMP_TTL_US`]).
    #[serde(default, skip_serializing_if = "Stamps::is_empty")]
    pub stamps: Stamps,
    /// Hub time the active release was last changed by an immediate changeset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarded_us: Option<u64>,
}

/// What a changeset changed in the hub's releases (computed from the manifests by the hub).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The origin agent.
    pub origin: String,
    /// Its sequence number.
    pub seq: u64,
    /// The paths it wrote, with the stamp each now carries.
    pub written: Vec<(String, Stamp)>,
}

/// A release staged for an activation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Staged {
    /// The release.
    pub id: ReleaseId,
    /// Activation time, µs on the hub's clock.
    pub at_us: u64,
}

/// A release waiting for the next cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Queued {
    /// The release.
    pub id: ReleaseId,
    /// The publisher's explicit activation time, if any.
    pub at_us: Option<u64>,
}

/// What [`HubState::heal`] put right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Healed {
    /// The state with the numbers brought back.
    pub state: HubState,
    /// Origins whose recorded sequence was ahead.
    pub origins: Vec<String>,
    /// Paths whose last-write stamp was ahead.
    pub paths: usize,
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Staged for this activation time.
    Staged(u64),
    /// Queued behind the staged release, which activates too soon to replace.
    Queued,
    /// Already the active release with nothing staged: nothing to do.
    AlreadyActive,
}

/// What an advance did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Advance {
    /// This caller promoted the staged release: the new state.
    Won(Box<HubState>),
    /// The cycle asked about has already been advanced (by someone else).
    Already {
        /// The hub's cycle now.
        cycle: u64,
    },
    /// The activation time has not come yet.
    TooEarly {
        /// The activation time.
        at_us: u64,
    },
    /// Nothing is staged in this cycle.
    NothingStaged,
}

/// If no agent has advanced a cycle this long after its activation time, the hub does it.
pub const GRACE: Duration = Duration::from_secs(2);

/// Who advanced a cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advancer {
    /// An agent, after its flip.
    Agent,
    /// The hub itself, [`GRACE`] after the activation time.
    Hub,
}

/// Why a publish is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CycleError {
    /// The explicit time is unusable.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// Rollback with no previous release.
    #[error("there is no previous release to roll back to")]
    NoPrevious,
}

impl HubState {
    /// Stages `id` (activating at `at_us` if given, else on the grid), replacing a staged
    /// release unless its activation is within the guard, in which case `id` is queued.
    pub fn publish(
        &self,
        id: ReleaseId,
        at_us: Option<u64>,
        now_us: u64,
        rules: &Rules,
    ) -> Result<(HubState, Published), CycleError> {
        if let Some(at) = at_us {
            rules.explicit(at, now_us)?;
        }
        if self.staged.is_none() && self.queued.is_none() && self.active == Some(id) {
            return Ok((self.clone(), Published::AlreadyActive));
        }
        let mut next = self.clone();
        next.version += 1;
        match self.staged {
            Some(s) if now_us.saturating_add(rules.guard_us) >= s.at_us => {
                next.queued = Some(Queued { id, at_us });
                Ok((next, Published::Queued))
            }
            _ => {
                let at = at_us.unwrap_or_else(|| rules.next_activation(now_us));
                next.staged = Some(Staged { id, at_us: at });
                Ok((next, Published::Staged(at)))
            }
        }
    }

    /// Records an applied changeset: its origin's sequence and the paths' stamps (old stamps
    /// pruned).
    fn record(&self, f: Forward, now_us: u64) -> HubState {
        let mut next = self.clone();
        next.version += 1;
        let seq = next.applied.entry(f.origin).or_insert(0);
        *seq = (*seq).max(f.seq);
        next.stamps
            .retain(|_, s| s.at_us.saturating_add(STAMP_TTL_US) > now_us);
        next.stamps.extend(f.written);
        next
    }

    /// An immediate changeset applied: `active` (and the staged and queued releases rebased
    /// onto it, so an activation does not undo the edit) replace the current ones at once.
    pub fn forward_immediate(
        &self,
        f: Forward,
        active: ReleaseId,
        staged: Option<ReleaseId>,
        queued: Option<ReleaseId>,
        now_us: u64,
    ) -> HubState {
        let mut next = self.record(f, now_us);
        if next.active != Some(active) {
            next.forwarded_us = Some(now_us);
        }
        next.active = Some(active);
        if let (Some(s), Some(id)) = (next.staged.as_mut(), staged) {
            s.id = id;
        }
        if let (Some(q), Some(id)) = (next.queued.as_mut(), queued) {
            q.id = id;
        }
        next
    }

    /// A scheduled changeset applied to the newest pending release (queued, else staged, else
    /// active), giving `release`: it takes that release's place — the queued one, the staged
    /// one (same activation time, unless that is within the guard: then queued), or it is
    /// staged for the next activation.
    pub fn forward_scheduled(
        &self,
        f: Forward,
        release: ReleaseId,
        now_us: u64,
        rules: &Rules,
    ) -> (HubState, Published) {
        let mut next = self.record(f, now_us);
        if let Some(q) = next.queued.as_mut() {
            q.id = release;
            return (next, Published::Queued);
        }
        match next.staged {
            Some(s) if now_us.saturating_add(rules.guard_us) >= s.at_us => {
                next.queued = Some(Queued {
                    id: release,
                    at_us: None,
                });
                (next, Published::Queued)
            }
            Some(s) => {
                next.staged = Some(Staged {
                    id: release,
                    at_us: s.at_us,
                });
                (next, Published::Staged(s.at_us))
            }
            None if next.active == Some(release) => (next, Published::AlreadyActive),
            None => {
                let at = rules.next_activation(now_us);
                next.staged = Some(Staged {
                    id: release,
                    at_us: at,
                });
                (next, Published::Staged(at))
            }
        }
    }

    /// The state with every changeset number it recorded ahead of `now_us` by more than
    /// [`MAX_AHEAD_US`] brought back to `now_us`; `None` when there is none. Such numbers come
    /// from a changeset accepted before the hub bounded them (a `seq = u64::MAX` that would
    /// answer every later edit of its origin "duplicate", a stamp a day ahead that would win
    /// every conflict), or from a hub clock stepped back since: either way no honest changeset
    /// can pass them. Brought back to `now_us`, not dropped, so the changesets the hub has
    /// applied stay duplicates and the paths keep their last writer.
    pub fn heal(&self, now_us: u64) -> Option<Healed> {
        let bound = now_us.saturating_add(MAX_AHEAD_US);
        let mut next = self.clone();
        let mut origins = Vec::new();
        for (origin, seq) in next.applied.iter_mut() {
            if *seq > bound {
                *seq = now_us;
                origins.push(origin.clone());
            }
        }
        let mut paths = 0;
        for stamp in next.stamps.values_mut() {
            if stamp.at_us > bound {
                stamp.at_us = now_us;
                paths += 1;
            }
        }
        if origins.is_empty() && paths == 0 {
            return None;
        }
        next.version += 1;
        Some(Healed {
            state: next,
            origins,
            paths,
        })
    }

    /// The release a scheduled changeset applies to: the queued, else the staged, else the
    /// active one.
    pub fn newest(&self) -> Option<ReleaseId> {
        self.queued
            .map(|q| q.id)
            .or(self.staged.map(|s| s.id))
            .or(self.active)
    }

    /// Stages the previous release.
    pub fn rollback(
        &self,
        now_us: u64,
        rules: &Rules,
    ) -> Result<(HubState, Published), CycleError> {
        let previous = self.previous.ok_or(CycleError::NoPrevious)?;
        self.publish(previous, None, now_us, rules)
    }

    /// Hub time from which the hub advances the current cycle itself, because no agent did:
    /// [`GRACE`] after the staged release's activation (none when nothing is staged).
    pub fn hub_advance_at(&self) -> Option<u64> {
        self.staged
            .map(|s| s.at_us.saturating_add(GRACE.as_micros() as u64))
    }

    /// Advance of `cycle` at `now_us`: promotes staged → active, stages the queued release (if
    /// any) for its next activation, and starts the next cycle — only if `cycle` is still the
    /// current one and its activation time has come.
    pub fn advance(&self, cycle: u64, now_us: u64, rules: &Rules) -> Advance {
        if cycle != self.cycle {
            return Advance::Already { cycle: self.cycle };
        }
        let Some(staged) = self.staged else {
            return Advance::NothingStaged;
        };
        if now_us < staged.at_us {
            return Advance::TooEarly {
                at_us: staged.at_us,
            };
        }
        let mut next = self.clone();
        next.version += 1;
        next.cycle += 1;
        if self.active != Some(staged.id) {
            next.previous = self.active;
        }
        next.active = Some(staged.id);
        next.staged = self.queued.map(|q| Staged {
            id: q.id,
            at_us: q
                .at_us
                .filter(|&at| at > now_us.saturating_add(rules.lead_us))
                .unwrap_or_else(|| rules.next_activation(now_us)),
        });
        next.queued = None;
        Advance::Won(Box::new(next))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::sync::manifest::Hash;

    const S: u64 = 1_000_000;

    fn rules() -> Rules {
        Rules::new(Duration::from_secs(10), Duration::from_secs(3))
    }

    fn id(n: u8) -> ReleaseId {
        Hash::of(&[n])
    }

    #[test]
    fn publish_then_advance_promotes_once() {
        let s0 = HubState::default();
        let (s1, p) = s0.publish(id(1), None, 100 * S, &rules()).unwrap();
        assert_eq!(p, Published::Staged(110 * S));
        assert_eq!(
            s1.advance(0, 109 * S, &rules()),
            Advance::TooEarly { at_us: 110 * S }
        );
        let Advance::Won(s2) = s1.advance(0, 110 * S, &rules()) else {
            panic!("advance at the activation time must win");
        };
        assert_eq!((s2.cycle, s2.active, s2.staged), (1, Some(id(1)), None));
        assert_eq!(
            s1.advance(5, 111 * S, &rules()),
            Advance::Already { cycle: 0 }
        );
        assert_eq!(
            s2.advance(0, 111 * S, &rules()),
            Advance::Already { cycle: 1 }
        );
        assert_eq!(s2.advance(1, 111 * S, &rules()), Advance::NothingStaged);
        assert!(s2.version > s1.version && s1.version > s0.version);
    }

    #[test]
    fn the_hub_advances_itself_only_a_grace_after_the_activation() {
        assert_eq!(HubState::default().hub_advance_at(), None);
        let (s1, _) = HubState::default()
            .publish(id(1), None, 100 * S, &rules())
            .unwrap();
        assert_eq!(
            s1.hub_advance_at(),
            Some(110 * S + GRACE.as_micros() as u64)
        );
        let Advance::Won(s2) = s1.advance(0, 110 * S, &rules()) else {
            panic!("advance at the activation time must win");
        };
        assert_eq!(
            s2.hub_advance_at(),
            None,
            "nothing staged: nothing to advance"
        );
    }

    #[test]
    fn a_late_publish_is_queued_and_staged_by_the_advance() {
        let (s1, _) = HubState::default()
            .publish(id(1), None, 100 * S, &rules())
            .unwrap();
        // Early enough: replaces the staged release.
        let (s2, p) = s1.publish(id(2), None, 105 * S, &rules()).unwrap();
        assert_eq!(p, Published::Staged(110 * S));
        assert_eq!(s2.staged.unwrap().id, id(2));
        // Within the guard (2 s) of the activation: queued.
        let (s3, p) = s2.publish(id(3), None, 108 * S + 1, &rules()).unwrap();
        assert_eq!(p, Published::Queued);
        assert_eq!(s3.staged.unwrap().id, id(2));
        let Advance::Won(s4) = s3.advance(0, 110 * S, &rules()) else {
            panic!()
        };
        assert_eq!(s4.active, Some(id(2)));
        assert_eq!(
            s4.staged,
            Some(Staged {
                id: id(3),
                at_us: 120 * S
            })
        );
        assert_eq!(s4.queued, None);
    }

    #[test]
    fn explicit_times_rollback_and_republishing_the_active_release() {
        let r = rules();
        assert!(HubState::default()
            .publish(id(1), Some(5 * S), 6 * S, &r)
            .is_err());
        let (s1, p) = HubState::default()
            .publish(id(1), Some(7 * S), 6 * S, &r)
            .unwrap();
        assert_eq!(p, Published::Staged(7 * S));
        let Advance::Won(s2) = s1.advance(0, 7 * S, &r) else {
            panic!()
        };
        assert_eq!(s2.rollback(8 * S, &r), Err(CycleError::NoPrevious));
        assert_eq!(
            s2.publish(id(1), None, 8 * S, &r).unwrap().1,
            Published::AlreadyActive
        );
        let (s3, _) = s2.publish(id(2), None, 8 * S, &r).unwrap();
        let Advance::Won(s4) = s3.advance(1, 20 * S, &r) else {
            panic!()
        };
        assert_eq!((s4.active, s4.previous), (Some(id(2)), Some(id(1))));
        let (s5, p) = s4.rollback(21 * S, &r).unwrap();
        assert_eq!(p, Published::Staged(30 * S));
        assert_eq!(s5.staged.unwrap().id, id(1));
    }

    /// Many callers race to advance the same cycle through a compare-and-swap on the version,
    /// as the hub's store does: exactly one wins, every other is told it is done.
    fn fwd(origin: &str, seq: u64, path: &str, at_us: u64) -> Forward {
        Forward {
            origin: origin.into(),
            seq,
            written: vec![(
                path.into(),
                Stamp {
                    at_us,
                    origin: origin.into(),
                },
            )],
        }
    }

    #[test]
    fn immediate_changesets_replace_active_and_rebase_pending_releases() {
        let (s1, _) = HubState {
            active: Some(id(1)),
            ..HubState::default()
        }
        .publish(id(2), None, 100 * S, &rules())
        .unwrap();
        let s2 = s1.forward_immediate(
            fwd("a", 1, "x", 101 * S),
            id(11),
            Some(id(12)),
            None,
            101 * S,
        );
        assert_eq!(s2.active, Some(id(11)));
        assert_eq!(s2.staged.unwrap().id, id(12));
        assert_eq!(s2.staged.unwrap().at_us, s1.staged.unwrap().at_us);
        assert_eq!(s2.applied["a"], 1);
        assert_eq!(s2.forwarded_us, Some(101 * S));
        assert_eq!(
            s2.previous, s1.previous,
            "an edit is not a release to roll back to"
        );
        assert!(s2.version > s1.version);
        // Stamps older than the TTL are forgotten; sequences only grow.
        let later = 101 * S + STAMP_TTL_US;
        let s3 = s2.forward_immediate(fwd("a", 1, "y", later), id(13), None, None, later);
        assert!(!s3.stamps.contains_key("x") && s3.stamps.contains_key("y"));
        assert_eq!(s3.applied["a"], 1);
    }

    #[test]
    fn numbers_recorded_ahead_of_the_clock_are_brought_back() {
        let now = 1_000 * S;
        let s = HubState {
            version: 7,
            applied: [
                ("silenced".to_string(), u64::MAX),
                ("honest".to_string(), now - S),
                ("edge".to_string(), now + MAX_AHEAD_US),
            ]
            .into(),
            stamps: [
                (
                    "a".to_string(),
                    fwd("x", 1, "a", now + 86_400 * S).written[0].1.clone(),
                ),
                (
                    "b".to_string(),
                    fwd("y", 1, "b", now - S).written[0].1.clone(),
                ),
            ]
            .into(),
            ..HubState::default()
        };
        let h = s.heal(now).unwrap();
        assert_eq!(h.origins, ["silenced"]);
        assert_eq!(h.paths, 1);
        assert_eq!(h.state.version, 8);
        assert_eq!(h.state.applied["silenced"], now);
        assert_eq!(h.state.applied["honest"], now - S);
        assert_eq!(h.state.applied["edge"], now + MAX_AHEAD_US);
        assert_eq!(h.state.stamps["a"].at_us, now);
        assert_eq!(h.state.stamps["a"].origin, "x");
        assert_eq!(h.state.stamps["b"], s.stamps["b"]);
        assert_eq!(h.state.heal(now), None, "nothing left to heal");
        assert_eq!(HubState::default().heal(now), None);
    }

    #[test]
    fn scheduled_changesets_take_the_newest_pending_place() {
        let r = rules();
        // Nothing pending: staged for the next activation.
        let s0 = HubState {
            active: Some(id(1)),
            ..HubState::default()
        };
        assert_eq!(s0.newest(), Some(id(1)));
        let (s1, p) = s0.forward_scheduled(fwd("a", 1, "x", 100 * S), id(2), 100 * S, &r);
        assert_eq!(
            (s1.staged.unwrap().id, p),
            (id(2), Published::Staged(110 * S))
        );
        assert_eq!(s1.newest(), Some(id(2)));
        // A staged release: replaced, same instant.
        let (s2, p) = s1.forward_scheduled(fwd("b", 1, "y", 101 * S), id(3), 101 * S, &r);
        assert_eq!(
            (s2.staged.unwrap().id, p),
            (id(3), Published::Staged(110 * S))
        );
        // Within the guard: queued, staged by the advance.
        let (s3, p) = s2.forward_scheduled(fwd("b", 2, "y", 109 * S), id(4), 109 * S, &r);
        assert_eq!(
            (s3.staged.unwrap().id, s3.queued.unwrap().id, p),
            (id(3), id(4), Published::Queued)
        );
        assert_eq!(s3.newest(), Some(id(4)));
        let (s4, _) = s3.forward_scheduled(fwd("b", 3, "z", 109 * S), id(5), 109 * S, &r);
        assert_eq!(s4.queued.unwrap().id, id(5));
        assert_eq!(s4.applied["b"], 3);
    }

    #[test]
    fn concurrent_advances_have_exactly_one_winner() {
        let r = rules();
        let (staged, _) = HubState::default().publish(id(1), None, 0, &r).unwrap();
        let store = Arc::new(Mutex::new(staged));
        let wins = Arc::new(Mutex::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (store, wins) = (store.clone(), wins.clone());
                std::thread::spawn(move || loop {
                    let seen = store.lock().unwrap().clone();
                    match seen.advance(0, 10 * S, &r) {
                        Advance::Won(next) => {
                            let mut cur = store.lock().unwrap();
                            if cur.version == seen.version {
                                *cur = *next;
                                *wins.lock().unwrap() += 1;
                                return true;
                            }
                            // Lost the swap: read again and retry.
                        }
                        Advance::Already { cycle } => {
                            assert_eq!(cycle, 1);
                            return false;
                        }
                        other => panic!("{other:?}"),
                    }
                })
            })
            .collect();
        let winners = threads
            .into_iter()
            .filter(|_| true)
            .map(|t| t.join().unwrap())
            .filter(|w| *w)
            .count();
        assert_eq!(winners, 1);
        assert_eq!(*wins.lock().unwrap(), 1);
        assert_eq!(store.lock().unwrap().active, Some(id(1)));
    }
}
