//! The hub's side of the cycle: a commit stages (or queues) a complete release, a rollback
//! stages the previous one, and the cycle compare-and-swap promotes the staged release once
//! its activation time has come — exactly one caller wins each cycle. The rules are the pure
//! transitions of [`crate::sync::cycle`]; this file applies them and answers.

use std::sync::Arc;

use tracing::info;

use super::{Hub, HubError};
use crate::sync::cycle::{Advance, Advancer, Published};
use crate::sync::manifest::ReleaseId;
use crate::sync::protocol::{Advanced, CommitState, Committed, NotAdvanced};
use crate::sync::sign::Signature;

impl Hub {
    /// Stages a complete release for activation, keeping `signatures` beside it (each must
    /// verify; with `sync.trusted_keys` one of those keys must have signed it).
    pub async fn commit(
        self: &Arc<Self>,
        id: ReleaseId,
        at_us: Option<u64>,
        signatures: Vec<Signature>,
    ) -> Result<Committed, HubError> {
        self.check_complete(id).await?;
        self.replicate_out(id).await?;
        self.sign(id, signatures).await?;
        let published = self
            .transition(move |s, now, rules| {
                let (next, p) = s.publish(id, at_us, now, rules)?;
                let next = (p != Published::AlreadyActive).then_some(next);
                Ok((next, p))
            })
            .await?;
        self.metrics.publishes.inc();
        info!(release = %id.short(), ?published, "release published");
        Ok(self.committed(id, published))
    }

    /// Stages the previous release (with the signatures it was committed with: they stay
    /// beside it).
    pub async fn rollback(self: &Arc<Self>) -> Result<Committed, HubError> {
        let (id, published) = self
            .transition(|s, now, rules| {
                let (next, p) = s.rollback(now, rules)?;
                // `rollback` succeeded, so `previous` is set.
                let id = s.previous.expect("rollback needs a previous release");
                Ok(((p != Published::AlreadyActive).then_some(next), (id, p)))
            })
            .await?;
        info!(release = %id.short(), ?published, "rollback published");
        Ok(self.committed(id, published))
    }

    /// The answer to a commit or rollback of `id` that did `p`.
    pub(super) fn committed(&self, id: ReleaseId, p: Published) -> Committed {
        let (state, activation_us) = match p {
            Published::Staged(at) => (CommitState::Staged, Some(at)),
            Published::Queued => (CommitState::Queued, None),
            Published::AlreadyActive => (CommitState::Active, None),
        };
        Committed {
            id,
            state,
            activation_us,
            schedule: self.schedule(),
        }
    }

    /// The cycle compare-and-swap.
    pub async fn advance(self: &Arc<Self>, cycle: u64, by: Advancer) -> Result<Advanced, HubError> {
        let outcome = self
            .transition(move |s, now, rules| match s.advance(cycle, now, rules) {
                Advance::Won(next) => {
                    let c = next.cycle;
                    Ok((Some(*next), Ok(c)))
                }
                other => Ok((None, Err(other))),
            })
            .await?;
        match outcome {
            Ok(c) => {
                self.metrics.advance(by);
                info!(cycle = c, by = ?by, active = ?self.state().active.map(|r| r.short()), "cycle advanced");
                Ok(Advanced {
                    advanced: true,
                    cycle: c,
                    reason: None,
                })
            }
            Err(Advance::Already { cycle }) => Ok(Advanced {
                advanced: false,
                cycle,
                reason: Some(NotAdvanced::AlreadyAdvanced),
            }),
            Err(Advance::TooEarly { at_us }) => Err(HubError::Conflict(format!(
                "too early: the activation is at {at_us} µs (hub time {} µs)",
                self.now_us()
            ))),
            Err(_) => Err(HubError::Conflict("nothing is staged in this cycle".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::metrics::ByLabels;
    use crate::hub::testing::{self, manual, release, set, S};
    use crate::sync::protocol::NotAdvanced;

    #[tokio::test]
    async fn a_commit_stages_for_the_grid_and_exactly_one_advance_wins_the_cycle() {
        let (clock, now) = manual(100 * S);
        let fx = testing::hub(clock);
        let id = release(&fx.hub, &[("index.html", "v1")]).await;
        let c = fx.hub.commit(id, None, vec![]).await.unwrap();
        // First grid point (10 s) at least the lead (3 s) ahead.
        assert_eq!(
            (c.state, c.activation_us),
            (CommitState::Staged, Some(110 * S))
        );
        assert_eq!(c.schedule.staged, Some(id));

        set(&now, 110 * S - 1);
        let early = fx.hub.advance(0, Advancer::Agent).await.unwrap_err();
        assert!(
            matches!(early, HubError::Conflict(ref m) if m.starts_with("too early")),
            "{early}"
        );
        assert_eq!(fx.hub.state().active, None);

        set(&now, 110 * S);
        let (a, b) = tokio::join!(
            fx.hub.advance(0, Advancer::Agent),
            fx.hub.advance(0, Advancer::Agent)
        );
        let mut answers = [a.unwrap(), b.unwrap()];
        answers.sort_by_key(|a| a.advanced);
        assert_eq!(
            answers,
            [
                Advanced {
                    advanced: false,
                    cycle: 1,
                    reason: Some(NotAdvanced::AlreadyAdvanced)
                },
                Advanced {
                    advanced: true,
                    cycle: 1,
                    reason: None
                },
            ]
        );
        let s = fx.hub.state();
        assert_eq!((s.cycle, s.active, s.staged), (1, Some(id), None));
        let won = |by| fx.metrics.advances.get_or_create(&ByLabels { by }).get();
        assert_eq!((won("agent"), won("hub")), (1, 0));
        // The next cycle has nothing staged: refused, not "already".
        let none = fx.hub.advance(1, Advancer::Agent).await.unwrap_err();
        assert_eq!(none.to_string(), "nothing is staged in this cycle");
    }

    #[tokio::test]
    async fn a_commit_within_the_guard_of_the_staged_activation_is_queued_for_the_next_cycle() {
        let (clock, now) = manual(100 * S);
        let fx = testing::hub(clock);
        let v1 = release(&fx.hub, &[("index.html", "v1")]).await;
        let v2 = release(&fx.hub, &[("index.html", "v2")]).await;
        let v3 = release(&fx.hub, &[("index.html", "v3")]).await;
        fx.hub.commit(v1, None, vec![]).await.unwrap();
        // Outside the guard (2 s before 110 s): replaces the staged release, same instant.
        set(&now, 105 * S);
        let c = fx.hub.commit(v2, None, vec![]).await.unwrap();
        assert_eq!(
            (c.state, c.activation_us),
            (CommitState::Staged, Some(110 * S))
        );
        // Inside it: agents may be flipping to v2 already, so v3 waits.
        set(&now, 108 * S + 1);
        let c = fx.hub.commit(v3, None, vec![]).await.unwrap();
        assert_eq!((c.state, c.activation_us), (CommitState::Queued, None));
        assert_eq!((c.schedule.staged, c.schedule.queued), (Some(v2), Some(v3)));
        // The advance activates v2 and stages v3 for the next grid point past the lead.
        set(&now, 110 * S);
        assert!(fx.hub.advance(0, Advancer::Agent).await.unwrap().advanced);
        let s = fx.hub.schedule();
        assert_eq!((s.active, s.staged, s.queued), (Some(v2), Some(v3), None));
        assert_eq!(s.activation_us, Some(120 * S));
    }

    #[tokio::test]
    async fn a_release_with_missing_blobs_cannot_be_committed() {
        let (clock, _) = manual(100 * S);
        let fx = testing::hub(clock);
        let m = testing::manifest(&[("a.html", "a"), ("b.html", "b")]);
        let up = fx.hub.upload_manifest(&m.to_json()).await.unwrap();
        assert_eq!(up.missing.len(), 2);
        let e = fx.hub.commit(up.id, None, vec![]).await.unwrap_err();
        assert!(matches!(e, HubError::Conflict(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "release {} lacks 2 blob(s): PUT them before the commit",
                up.id
            )
        );
        assert_eq!(fx.hub.state().staged, None);
    }

    #[tokio::test]
    async fn committing_the_active_release_again_changes_nothing() {
        let (clock, now) = manual(100 * S);
        let fx = testing::hub(clock);
        let v1 = release(&fx.hub, &[("index.html", "v1")]).await;
        fx.hub.commit(v1, None, vec![]).await.unwrap();
        set(&now, 110 * S);
        fx.hub.advance(0, Advancer::Agent).await.unwrap();
        let version = fx.hub.state().version;
        let c = fx.hub.commit(v1, None, vec![]).await.unwrap();
        assert_eq!((c.state, c.activation_us), (CommitState::Active, None));
        assert_eq!(fx.hub.state().version, version, "no new state was written");
    }

    #[tokio::test]
    async fn a_rollback_stages_the_previous_release() {
        let (clock, now) = manual(100 * S);
        let fx = testing::hub(clock);
        assert_eq!(
            fx.hub.rollback().await.unwrap_err().to_string(),
            "there is no previous release to roll back to"
        );
        let v1 = release(&fx.hub, &[("index.html", "v1")]).await;
        let v2 = release(&fx.hub, &[("index.html", "v2")]).await;
        for (v, at) in [(v1, 110), (v2, 120)] {
            fx.hub.commit(v, None, vec![]).await.unwrap();
            set(&now, at * S);
            let cycle = fx.hub.state().cycle;
            assert!(
                fx.hub
                    .advance(cycle, Advancer::Agent)
                    .await
                    .unwrap()
                    .advanced
            );
        }
        let c = fx.hub.rollback().await.unwrap();
        assert_eq!((c.id, c.state), (v1, CommitState::Staged));
        assert_eq!((c.schedule.active, c.schedule.staged), (Some(v2), Some(v1)));
    }
}
