//! What the agent should do given the hub's schedule and what it holds:
//! which releases to stage, which to activate at once (bootstrap, or a flip already due), and
//! which to arm for its activation time. Also the back-off between retries.
//!
//! Pure: the hub's time and "is this release ready" are arguments.

use std::time::Duration;

use crate::sync::manifest::ReleaseId;

/// The hub's schedule, as far as a plan needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubView {
    /// The hub's cycle.
    pub cycle: u64,
    /// What every agent should serve now.
    pub active: Option<ReleaseId>,
    /// The staged release and its activation time (hub clock, µs).
    pub staged: Option<(ReleaseId, u64)>,
}

/// A flip armed for an activation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    /// The release.
    pub id: ReleaseId,
    /// Activation time, hub clock, µs.
    pub at_us: u64,
    /// The cycle to advance after the flip.
    pub cycle: u64,
}

/// The decision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Releases the agent must hold (stage those it lacks), most urgent first.
    pub want: Vec<ReleaseId>,
    /// Activate this (ready) release at once.
    pub now: Option<ReleaseId>,
    /// Arm a flip to this (ready) release at its time (at once if the time has passed).
    pub at: Option<Scheduled>,
}

/// Decides, for an agent serving `ours`, given the hub's view, which releases are `ready`
/// (fully staged and verified), and the hub's time now if known.
///
/// - A staged release other than ours is wanted, and armed for its time once ready.
/// - The hub's active release, when it is not ours, is wanted and activated at once when ready
///   (bootstrap: a new or restarted agent, or one that missed a flip) — unless ours is the
///   staged release (this agent has flipped and the hub has not advanced yet) or the staged
///   release is ready and already due (flipping to it directly skips a useless step).
pub fn decide(
    ours: Option<ReleaseId>,
    hub: &HubView,
    ready: impl Fn(ReleaseId) -> bool,
    hub_now_us: Option<i64>,
) -> Decision {
    let mut d = Decision::default();
    let mut ours_is_staged = false;
    if let Some((id, at_us)) = hub.staged {
        if Some(id) == ours {
            ours_is_staged = true;
        } else {
            d.want.push(id);
            if ready(id) {
                d.at = Some(Scheduled {
                    id,
                    at_us,
                    cycle: hub.cycle,
                });
            }
        }
    }
    let staged_due =
        d.at.is_some_and(|s| hub_now_us.is_some_and(|now| now >= s.at_us as i64));
    if let Some(active) = hub.active {
        if Some(active) != ours && !ours_is_staged && !staged_due {
            // Bootstrap comes first: it is what the fleet serves now.
            d.want.retain(|w| *w != active);
            d.want.insert(0, active);
            if ready(active) {
                d.now = Some(active);
                if d.at.is_some_and(|s| s.id == active) {
                    d.at = None;
                }
            }
        }
    }
    d
}

/// The hub time at which an agent flipped, minus the activation time: how late (µs; negative
/// = early).
pub fn lateness_us(flipped_hub_us: i64, at_us: u64) -> i64 {
    flipped_hub_us - at_us as i64
}

/// Wait before retry `attempt` (1-based): `base` doubling to at most `max`.
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exp = attempt.saturating_sub(1).min(16);
    base.saturating_mul(1 << exp).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::manifest::Hash;

    fn id(n: u8) -> ReleaseId {
        Hash::of(&[n])
    }

    fn view(active: Option<u8>, staged: Option<(u8, u64)>) -> HubView {
        HubView {
            cycle: 7,
            active: active.map(id),
            staged: staged.map(|(n, at)| (id(n), at)),
        }
    }

    const NONE_READY: fn(ReleaseId) -> bool = |_| false;
    const ALL_READY: fn(ReleaseId) -> bool = |_| true;

    #[test]
    fn an_empty_agent_bootstraps_the_hubs_active_release() {
        let d = decide(None, &view(Some(1), None), NONE_READY, Some(0));
        assert_eq!(d.want, vec![id(1)]);
        assert_eq!((d.now, d.at), (None, None));
        let d = decide(None, &view(Some(1), None), ALL_READY, Some(0));
        assert_eq!(d.now, Some(id(1)));
        // Nothing published yet: nothing to do.
        assert_eq!(
            decide(None, &view(None, None), ALL_READY, None),
            Decision::default()
        );
    }

    #[test]
    fn a_staged_release_is_fetched_then_armed_for_its_time() {
        let v = view(Some(1), Some((2, 500)));
        let d = decide(Some(id(1)), &v, NONE_READY, Some(100));
        assert_eq!(d.want, vec![id(2)]);
        assert_eq!(d.at, None);
        let d = decide(Some(id(1)), &v, |r| r == id(2), Some(100));
        assert_eq!(
            d.at,
            Some(Scheduled {
                id: id(2),
                at_us: 500,
                cycle: 7
            })
        );
        assert_eq!(d.now, None);
    }

    #[test]
    fn a_behind_agent_bootstraps_and_also_stages_whats_next() {
        // Serving 0, the fleet serves 1, 2 activates at 500.
        let d = decide(
            Some(id(0)),
            &view(Some(1), Some((2, 500))),
            ALL_READY,
            Some(100),
        );
        assert_eq!(d.want, vec![id(1), id(2)]);
        assert_eq!(d.now, Some(id(1)));
        assert_eq!(d.at.map(|s| s.id), Some(id(2)));
        // ...but when 2 is ready and already due, straight to 2 (a late flip).
        let d = decide(
            Some(id(0)),
            &view(Some(1), Some((2, 500))),
            ALL_READY,
            Some(600),
        );
        assert_eq!(d.now, None);
        assert_eq!(d.at.map(|s| s.id), Some(id(2)));
    }

    #[test]
    fn after_its_flip_an_agent_does_not_go_back_before_the_hub_advances() {
        // Flipped to 2 at 500; the hub still says active 1, staged 2.
        let d = decide(
            Some(id(2)),
            &view(Some(1), Some((2, 500))),
            ALL_READY,
            Some(501),
        );
        assert_eq!(d, Decision::default());
    }

    #[test]
    fn a_release_both_active_and_staged_is_activated_once() {
        let d = decide(
            Some(id(0)),
            &view(Some(1), Some((1, 500))),
            ALL_READY,
            Some(100),
        );
        assert_eq!(d.want, vec![id(1)]);
        assert_eq!((d.now, d.at), (Some(id(1)), None));
    }

    #[test]
    fn a_replaced_staged_release_is_no_longer_armed() {
        let armed_for_2 = decide(
            Some(id(1)),
            &view(Some(1), Some((2, 500))),
            ALL_READY,
            Some(0),
        );
        let now_3 = decide(
            Some(id(1)),
            &view(Some(1), Some((3, 900))),
            |r| r != id(3),
            Some(0),
        );
        assert_eq!(armed_for_2.at.map(|s| s.id), Some(id(2)));
        assert_eq!(now_3.at, None, "3 is not ready; 2 must not stay armed");
        assert_eq!(now_3.want, vec![id(3)]);
    }

    #[test]
    fn lateness_and_backoff() {
        assert_eq!(lateness_us(1_000_250, 1_000_000), 250);
        assert_eq!(lateness_us(999_900, 1_000_000), -100);
        let (base, max) = (Duration::from_millis(250), Duration::from_secs(30));
        assert_eq!(backoff(1, base, max), base);
        assert_eq!(backoff(3, base, max), Duration::from_secs(1));
        assert_eq!(backoff(40, base, max), max);
        assert_eq!(backoff(0, base, max), base);
    }
}
