//! The data server: releases, the schedule, the hub clock, the
//! cycle compare-and-swap and the agents' reports, served as the sync API inside
//! `lockstep serve` when the config has a `sync:` section.
//!
//! [`Hub`] is the state and its operations. Every change of the cycle state is a pure
//! transition ([`crate::sync::cycle`]) applied with the store's compare-and-swap, so concurrent
//! publishers and agents cannot lose one another's updates, and exactly one advance wins each
//! cycle. Store calls block (file I/O with fsync), so they run on tokio's blocking pool.
//!
//! # Layout
//!
//! This file holds the [`Hub`] itself (its state, the schedule, the compare-and-swap
//! `transition`); each concern adds its operations in its own file, and none of them imports
//! another's:
//!
//! - `content`: manifests and blobs — upload, serve, check a release is complete, collect
//! - `cycle`: commit, rollback and the cycle advance
//! - `changesets`: agents' changesets applied to the releases, conflicts kept
//! - `agents`: agents' reports, the fleet view, who is behind
//! - `signatures`: publishers' signatures and changeset provenance kept beside releases, served
//! - `task`: the timer task (the hub's own advance after the grace, the behind set)
//! - [`api`]: the HTTP face (callers identified by `sync::caller`); `route`: its route table (pure)
//! - [`fleet`]: which agents are behind (pure); `metrics`: the hub's metrics
//! - `error`, `settings`: the error enum, the settings and the clock

mod agents;
pub mod api;
mod changesets;
mod content;
mod cycle;
mod error;
pub mod fleet;
mod metrics;
mod route;
mod settings;
mod signatures;
mod task;
mod uploads;

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::warn;

pub use self::error::HubError;
pub use self::metrics::HubMetrics;
pub use self::settings::{system_clock, Clock, Settings};
use crate::cluster::Peers;
use crate::sync::cycle::HubState;
pub use crate::sync::cycle::{Advancer, GRACE};
use crate::sync::protocol::{ClusterView, ConflictView, Schedule, SharedDrain};
use crate::sync::schedule::Rules;
use crate::sync::store::{HubStore, StoreError};

/// The hub.
pub struct Hub {
    store: Arc<dyn HubStore>,
    settings: ArcSwap<Settings>,
    clock: Clock,
    state: watch::Sender<HubState>,
    reports: Mutex<fleet::Reports>,
    reports_changed: Notify,
    behind: watch::Sender<HashSet<String>>,
    conflicts: Mutex<VecDeque<ConflictView>>,
    uploads: Mutex<uploads::Uploads>,
    metrics: HubMetrics,
    /// The other hubs sharing the farm (`sync.cluster`), once joined.
    peers: OnceLock<Arc<Peers>>,
}

/// Runs blocking store calls on tokio's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    // The closures do file I/O and never panic on input; a panic there is a bug worth
    // propagating.
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

impl Hub {
    /// A hub over `store`, its state read from it (changeset numbers recorded ahead of the
    /// clock brought back first: [`HubState::heal`]). A store shared with other hubs gives
    /// the state it follows, which it may not have yet (etcd not answering): the hub then
    /// starts cut off and takes the state when it arrives ([`Hub::run`]).
    pub fn new(
        store: Arc<dyn HubStore>,
        settings: Settings,
        clock: Clock,
        metrics: HubMetrics,
    ) -> Result<Arc<Hub>, StoreError> {
        let mut state = match (store.standing(), store.changes()) {
            (Some(_), Some(followed)) => followed.borrow().clone(),
            _ => store.state()?,
        };
        // (Nothing to heal in the empty state of a hub that has not read it yet.)
        if let Some(healed) = state.heal(clock()) {
            // A compare-and-swap: a change made meanwhile (another hub's) wins.
            if store.swap_state(state.version, &healed.state)? {
                warn!(
                    origins = ?healed.origins,
                    paths = healed.paths,
                    "changeset numbers recorded ahead of the hub's clock were brought back to it (a forged changeset, or the clock stepped back)"
                );
                state = healed.state;
            }
        }
        metrics.observe_state(&state);
        Ok(Arc::new(Hub {
            store,
            settings: ArcSwap::from_pointee(settings),
            clock,
            state: watch::Sender::new(state),
            reports: Mutex::new(fleet::Reports::new()),
            reports_changed: Notify::new(),
            behind: watch::Sender::new(HashSet::new()),
            conflicts: Mutex::new(VecDeque::new()),
            uploads: Mutex::default(),
            metrics,
            peers: OnceLock::new(),
        }))
    }

    /// Joins the other hubs of the farm: blobs this hub lacks come from them, and a commit
    /// waits until `sync.cluster.replicas` hubs store the release's blobs.
    pub fn join_peers(&self, peers: Arc<Peers>) {
        let _ = self.peers.set(peers);
    }

    /// This hub's standing among the hubs sharing the farm (`sync.cluster`), also set on the
    /// metrics; `None` for a hub of one.
    pub fn cluster(&self) -> Option<ClusterView> {
        let view = self.store.standing();
        let (connected, leads) = match &view {
            Some(v) => (v.connected, self.store.leads()),
            None => (true, true),
        };
        self.metrics.cluster_connected.set(i64::from(connected));
        self.metrics.cluster_leader.set(i64::from(leads));
        view
    }

    /// The store, when several hubs share it (`sync.cluster`): what ACME shares through.
    pub fn shared_store(&self) -> Option<Arc<dyn HubStore>> {
        self.store.standing().is_some().then(|| self.store.clone())
    }

    /// Passes a backend drained or enabled here to the other appliances (`sync.cluster`;
    /// nothing without): in the background, a failure logged.
    pub fn share_drain(&self, drain: SharedDrain) {
        if self.store.standing().is_none() {
            return;
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.share_drain(&drain) {
                warn!(pool = %drain.pool, backend = %drain.backend, error = %e, "the other appliances did not learn of this drain");
            }
        });
    }

    /// Applies reloaded settings (cadence, lead, tokens).
    pub fn set_settings(&self, settings: Settings) {
        self.settings.store(Arc::new(settings));
    }

    /// The current settings.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.load_full()
    }

    /// Hub time now, µs.
    pub fn now_us(&self) -> u64 {
        (self.clock)()
    }

    /// The state as last written.
    pub fn state(&self) -> HubState {
        self.state.borrow().clone()
    }

    /// The schedule agents see.
    pub fn schedule(&self) -> Schedule {
        let s = self.state.borrow();
        Schedule {
            version: s.version,
            cycle: s.cycle,
            active: s.active,
            staged: s.staged.map(|st| st.id),
            activation_us: s.staged.map(|st| st.at_us),
            queued: s.queued.map(|q| q.id),
            previous: s.previous,
            now_us: self.now_us(),
            applied: s.applied.clone(),
        }
    }

    /// The schedule once its version differs from `version`, or after `timeout`, or at
    /// `shutdown`.
    pub async fn wait_schedule(
        &self,
        version: u64,
        timeout: Duration,
        shutdown: &CancellationToken,
    ) -> Schedule {
        let mut rx = self.state.subscribe();
        let _parked = self.metrics.park();
        let changed = rx.wait_for(|s| s.version != version);
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep(timeout) => {}
            _ = shutdown.cancelled() => {}
        }
        self.schedule()
    }

    /// Watches the names of agents behind the fleet's release.
    pub fn behind(&self) -> watch::Receiver<HashSet<String>> {
        self.behind.subscribe()
    }

    /// Applies a transition with the store's compare-and-swap, retrying on a lost race.
    async fn transition<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl Fn(&HubState, u64, &Rules) -> Result<(Option<HubState>, T), HubError> + Send + 'static,
    ) -> Result<T, HubError> {
        let hub = self.clone();
        blocking(move || loop {
            let current = hub.store.state()?;
            let (next, out) = f(&current, hub.now_us(), &hub.settings.load().rules)?;
            let Some(next) = next else { return Ok(out) };
            if hub.store.swap_state(current.version, &next)? {
                hub.metrics.observe_state(&next);
                // Two transitions may publish out of order: never let the watch go back.
                hub.state.send_if_modified(|cur| {
                    let newer = next.version > cur.version;
                    if newer {
                        *cur = next;
                    }
                    newer
                });
                return Ok(out);
            }
        })
        .await
    }
}

#[cfg(test)]
mod testing;
