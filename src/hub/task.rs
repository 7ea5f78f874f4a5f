//! The hub's timer task: keeps [`Hub::behind`] current as reports arrive and expire and the
//! state and the clock move, and advances a cycle itself when no agent has within
//! [`GRACE`](crate::sync::cycle::GRACE) of its activation. When it wakes is pure
//! ([`next_wake`]); the task only sleeps, recomputes and calls the cycle compare-and-swap.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{fleet, Hub};
use crate::sync::cycle::{Advancer, HubState};
use crate::sync::protocol::SharedReport;

/// How long the task waits after a failed or lost own advance before it looks again.
const RETRY: Duration = Duration::from_secs(1);

impl Hub {
    /// Runs until `shutdown`: advances a cycle itself when no agent has within
    /// [`GRACE`](crate::sync::cycle::GRACE) of its activation, and keeps [`Hub::behind`]
    /// current.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut state_rx = self.state.subscribe();
        // A store shared with other hubs: their changes, followed into this hub's state.
        let mut shared = self.store.changes();
        // And the agents' reports other hubs received.
        let mut reports = self.store.shared_reports();
        loop {
            let expires = self.publish_behind();
            let state = self.state();
            let now = self.now_us();
            if state.hub_advance_at().is_some_and(|at| now >= at) {
                // Another hub leads: it advances (its state arrives through `shared`); look
                // again in case it stops leading.
                if !self.store.leads() || !self.advance_overdue(state.cycle).await {
                    // Not advanced (a failing store, a clock stepped back): do not spin.
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(RETRY) => {}
                        s = shared_changed(&mut shared) => self.adopt(s),
                        r = shared_report(&mut reports) => self.adopt_report(r),
                    }
                }
                continue;
            }
            let wake = next_wake(&state, now, expires);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = state_rx.changed() => {}
                _ = self.reports_changed.notified() => {}
                s = shared_changed(&mut shared) => self.adopt(s),
                r = shared_report(&mut reports) => self.adopt_report(r),
                _ = async {
                    match wake {
                        // Wake a little after the instant so `now >= at` holds then.
                        Some(d) => tokio::time::sleep(d + Duration::from_millis(1)).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    }

    /// Takes a state another hub wrote, if it is newer than this hub's.
    fn adopt(&self, s: HubState) {
        let newer = s.version > self.state.borrow().version;
        if newer {
            self.metrics.observe_state(&s);
            self.state.send_if_modified(|cur| {
                let newer = s.version > cur.version;
                if newer {
                    *cur = s;
                }
                newer
            });
        }
    }

    /// Recomputes the agents behind and publishes the set if it changed; when the first
    /// report still counting expires.
    fn publish_behind(&self) -> Option<u64> {
        let computed = self.compute_behind();
        let behind = computed.names;
        self.metrics.behind.set(behind.len() as i64);
        self.metrics.stale.set(computed.stale as i64);
        self.behind.send_if_modified(|b| {
            let changed = *b != behind;
            *b = behind;
            changed
        });
        computed.next_expiry
    }

    /// The hub's own advance of `cycle`, its grace over: whether it promoted the release.
    async fn advance_overdue(self: &Arc<Self>, cycle: u64) -> bool {
        match self.advance(cycle, Advancer::Hub).await {
            Ok(a) if a.advanced => {
                warn!(
                    cycle,
                    "no agent advanced the cycle within the grace period; the hub did"
                );
                true
            }
            Ok(_) => false,
            Err(e) => {
                warn!(error = %e, "hub advance failed; retrying in 1 s");
                false
            }
        }
    }
}

/// The shared store's state once it changes; never for a store of one, or once the store
/// stopped following.
async fn shared_changed(shared: &mut Option<watch::Receiver<HubState>>) -> HubState {
    if let Some(rx) = shared {
        if rx.changed().await.is_ok() {
            return rx.borrow_and_update().clone();
        }
        *shared = None;
    }
    std::future::pending().await
}

/// The next report another hub received; never for a store of one, or once the store
/// stopped passing them.
async fn shared_report(reports: &mut Option<mpsc::Receiver<SharedReport>>) -> SharedReport {
    if let Some(rx) = reports {
        if let Some(r) = rx.recv().await {
            return r;
        }
        *reports = None;
    }
    std::future::pending().await
}

/// How long after `now` something changes by time alone: the activation, the end of the
/// flip-report grace (agents still on the old release go behind), the end of an immediate
/// changeset's settling time, the end of the advance grace (the hub advances), or `expires`,
/// when the first report still counting expires (its agent is no longer behind). `None`:
/// nothing does.
pub fn next_wake(state: &HubState, now: u64, expires: Option<u64>) -> Option<Duration> {
    fleet::next_change(state, now)
        .into_iter()
        .chain(state.hub_advance_at().filter(|&t| t > now))
        .chain(expires.filter(|&t| t > now))
        .min()
        .map(|at| Duration::from_micros(at.saturating_sub(now)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::metrics::ByLabels;
    use crate::hub::testing::{self, release, staged_at, tokio_clock, S};
    use crate::sync::cycle::{Staged, GRACE};
    use crate::sync::manifest::Hash;
    use crate::sync::protocol::Report;

    const GRACE_US: u64 = GRACE.as_micros() as u64;

    /// Sleeps (paused tokio time) until the hub's clock reads `at_us`.
    async fn until(hub: &Hub, at_us: u64) {
        tokio::time::sleep(Duration::from_micros(at_us.saturating_sub(hub.now_us()))).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_hub_advances_itself_a_grace_after_the_activation_when_no_agent_did() {
        let fx = testing::hub(tokio_clock(100 * S));
        let id = release(&fx.hub, &[("index.html", "v1")]).await;
        let at = staged_at(&fx.hub, id).await;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(fx.hub.clone().run(shutdown.clone()));

        until(&fx.hub, at + GRACE_US - 10_000).await;
        assert_eq!(
            (fx.hub.state().cycle, fx.hub.state().active),
            (0, None),
            "too soon"
        );

        until(&fx.hub, at + GRACE_US + 10_000).await;
        let s = fx.hub.state();
        assert_eq!((s.cycle, s.active, s.staged), (1, Some(id), None));
        let won = |by| fx.metrics.advances.get_or_create(&ByLabels { by }).get();
        assert_eq!((won("agent"), won("hub")), (0, 1));
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_advance_within_the_grace_leaves_the_hub_nothing_to_do() {
        let fx = testing::hub(tokio_clock(100 * S));
        let id = release(&fx.hub, &[("index.html", "v1")]).await;
        let at = staged_at(&fx.hub, id).await;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(fx.hub.clone().run(shutdown.clone()));
        until(&fx.hub, at + 100_000).await;
        assert!(fx.hub.advance(0, Advancer::Agent).await.unwrap().advanced);
        until(&fx.hub, at + 3 * GRACE_US).await;
        assert_eq!(fx.hub.state().cycle, 1, "one advance, the agent's");
        let won = |by| fx.metrics.advances.get_or_create(&ByLabels { by }).get();
        assert_eq!((won("agent"), won("hub")), (1, 0));
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn agents_still_on_the_old_release_go_behind_after_the_flip_grace() {
        let fx = testing::hub(tokio_clock(100 * S));
        let v1 = release(&fx.hub, &[("index.html", "v1")]).await;
        let at1 = staged_at(&fx.hub, v1).await;
        until(&fx.hub, at1).await;
        assert!(fx.hub.advance(0, Advancer::Agent).await.unwrap().advanced);
        let v2 = release(&fx.hub, &[("index.html", "v2")]).await;
        let at2 = staged_at(&fx.hub, v2).await;
        let on = |active| Report {
            active: Some(active),
            ..Report::default()
        };
        fx.hub.report("web1", on(v1)).unwrap();
        fx.hub.report("web2", on(v1)).unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(fx.hub.clone().run(shutdown.clone()));

        until(&fx.hub, at2 + 100_000).await;
        fx.hub.report("web1", on(v2)).unwrap();
        until(&fx.hub, at2 + fleet::FLIP_REPORT_GRACE_US / 2).await;
        assert!(
            fx.hub.behind().borrow().is_empty(),
            "web2's flip report may be on its way"
        );
        // web2 never flips: behind once the flip-report grace is over.
        let mut behind = fx.hub.behind();
        tokio::time::timeout(Duration::from_secs(5), behind.wait_for(|b| !b.is_empty()))
            .await
            .expect("web2 goes behind")
            .unwrap();
        assert!(fx.hub.now_us() >= at2 + fleet::FLIP_REPORT_GRACE_US);
        assert_eq!(*fx.hub.behind().borrow(), ["web2".to_string()].into());
        assert_eq!(fx.metrics.behind.get(), 1);
        shutdown.cancel();
        task.await.unwrap();
    }

    /// A forged `active: null` takes its backend out of rotation only until the report
    /// expires: the task wakes then and publishes the behind set without it.
    #[tokio::test(start_paused = true)]
    async fn a_report_nobody_renews_leaves_the_behind_set_when_it_expires() {
        let fx = testing::hub(tokio_clock(100 * S));
        let v1 = release(&fx.hub, &[("index.html", "v1")]).await;
        let at = staged_at(&fx.hub, v1).await;
        until(&fx.hub, at).await;
        assert!(fx.hub.advance(0, Advancer::Agent).await.unwrap().advanced);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(fx.hub.clone().run(shutdown.clone()));
        let forged_at = fx.hub.now_us();
        fx.hub.report("web1", Report::default()).unwrap();
        let mut behind = fx.hub.behind();
        tokio::time::timeout(Duration::from_secs(1), behind.wait_for(|b| !b.is_empty()))
            .await
            .expect("web1 goes behind")
            .unwrap();
        tokio::time::timeout(
            testing::REPORT_EXPIRY * 2,
            behind.wait_for(|b| b.is_empty()),
        )
        .await
        .expect("the forged report expires")
        .unwrap();
        let expiry = testing::REPORT_EXPIRY.as_micros() as u64;
        assert!(fx.hub.now_us() >= forged_at + expiry);
        assert!(fx.hub.now_us() < forged_at + expiry + S, "woken for it");
        assert_eq!((fx.metrics.behind.get(), fx.metrics.stale.get()), (0, 1));
        shutdown.cancel();
        task.await.unwrap();
    }

    #[test]
    fn the_task_wakes_at_the_activation_the_flip_grace_and_the_advance_grace() {
        assert_eq!(
            next_wake(&HubState::default(), 5 * S, None),
            None,
            "nothing to wait for"
        );
        assert_eq!(
            next_wake(&HubState::default(), 5 * S, Some(7 * S)),
            Some(Duration::from_secs(2)),
            "a report expires"
        );
        let state = HubState {
            staged: Some(Staged {
                id: Hash::of(b"1"),
                at_us: 10 * S,
            }),
            ..HubState::default()
        };
        let wake = |now| next_wake(&state, now, None).map(|d| d.as_micros() as u64);
        assert_eq!(wake(4 * S), Some(6 * S), "the activation");
        assert_eq!(
            wake(10 * S),
            Some(fleet::FLIP_REPORT_GRACE_US),
            "the flip grace"
        );
        assert_eq!(
            wake(10 * S + fleet::FLIP_REPORT_GRACE_US),
            Some(GRACE_US - fleet::FLIP_REPORT_GRACE_US),
            "the advance grace"
        );
        // Past it: the task advances rather than sleeps.
        assert_eq!(wake(10 * S + GRACE_US), None);
    }
}
