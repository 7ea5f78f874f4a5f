//! The agent's loop: one task owns what the agent holds (active, previous and staged
//! releases, the armed flip, the clock estimate) and reacts to events — a schedule from the
//! long-poll, a staging job done, a clock measurement, a flip fired — by re-planning with
//! [`plan::decide`](crate::agent::plan::decide). Everything slow runs elsewhere: staging in
//! background tasks, the flip on its own thread, disk writes on one ordered worker, reports
//! and advances in their tasks.
//!
//! This file is the I/O shell: it runs those tasks, talks to the store, the hub client and the
//! flip thread, and updates metrics and the report. What to do on each event is decided in
//! [`decide`] (pure, unit-tested with injected time), which this shell calls with the time
//! read once per event and whose [`Action`]s it carries out.
//!
//! Detect and forward: changesets — this backend's own in `immediate` mode, or
//! other backends' sent directly — are installed at once: applied to the served release (all
//! of a batch, or the one that does not fit is refused, see [`install`]), built reusing the
//! served release's files, and swapped in with a compare-and-swap of the pointer, so an
//! activation that lands meanwhile is never overwritten (the batch is then applied to the new
//! release). The agent tracks which changesets its release includes (per origin, the highest
//! sequence) and adopts the hub's release only when the hub includes all of them, so a direct
//! install is not undone by a hub that has not heard of it yet — unless that lasts
//! [`ADOPT_ANYWAY`].
//!
//! # Layout
//!
//! - [`decide`]: the decisions: held releases, armed flip, clock, install queue → actions (pure)
//! - [`install`]: a batch of changesets applied to the served release and built (blocking)
//! - [`disk`]: the ordered disk worker (state file, `current`, pruning, blobs, collection)
#![allow(clippy::disallowed_methods)] // I/O shell: the controller's shell reads the clock once per event for its pure core

pub mod decide;
pub mod disk;
pub mod install;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::agent::activate::{self, Armed, Fired};
use crate::agent::messages::{Active, Input, Install};
use crate::agent::metrics::AgentMetrics;
use crate::agent::plan::Scheduled;
use crate::agent::release::Release;
use crate::agent::stage::{StageError, Stager};
use crate::agent::state::{AgentState, Provisional, StateFile};
use crate::net::client::HttpClient;
use crate::sync::changeset::Applied;
use crate::sync::clock::{Anchor, Offset};
use crate::sync::gc::Gc;
use crate::sync::manifest::ReleaseId;
use crate::sync::protocol::{Report, Schedule};
pub use decide::{
    Action, Core, Flipped, Start, Tag, ADOPT_ANYWAY, PREMEASURE, STAGE_RETRY_BASE, STAGE_RETRY_MAX,
};
pub use disk::{disk_worker, DiskJob};
use install::Installed;

/// What a staging task returns.
type Staged = (ReleaseId, Result<Arc<Release>, StageError>);

/// The long-lived handles the controller works through.
pub struct Handles {
    /// Hub client (advance calls).
    pub client: HttpClient,
    /// The served pointer.
    pub active: Active,
    /// Metrics.
    pub metrics: Arc<AgentMetrics>,
    /// Starts staging jobs.
    pub stager: Stager,
    /// Ordered disk work.
    pub disk: mpsc::UnboundedSender<DiskJob>,
    /// The state file's writer (the disk worker's too).
    pub state: Arc<StateFile>,
    /// The latest report.
    pub report: watch::Sender<Report>,
    /// Asks the measurer for a fresh estimate.
    pub measure_now: Arc<Notify>,
    /// The local-edit thread, told of every release change and of the hub's record of
    /// applied changesets (once the clock is measured).
    pub local: Option<mpsc::UnboundedSender<Input>>,
}

/// The controller's settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// The one anchor local times come from.
    pub anchor: Anchor,
    /// Store collection settings.
    pub gc: Gc,
}

/// What the controller's loop receives.
pub struct Inbox {
    /// Schedules from the long-poll.
    pub schedules: mpsc::Receiver<Schedule>,
    /// Clock estimates from the measurer.
    pub clock: watch::Receiver<Option<Offset>>,
    /// Changesets to install at once.
    pub installs: mpsc::Receiver<Install>,
}

/// The loop's state: the handles, the tasks it runs, and the decisions' [`Core`].
pub struct Controller {
    io: Handles,
    core: Core,
    staging: JoinSet<Staged>,
    in_flight: HashMap<tokio::task::Id, (ReleaseId, tokio::task::AbortHandle)>,
    /// The flip thread's handle, present exactly while [`Core::armed`] is.
    flip: Option<Armed>,
    fired_tx: mpsc::UnboundedSender<Fired<Tag>>,
    fired_rx: mpsc::UnboundedReceiver<Fired<Tag>>,
    installing: JoinSet<Installed>,
    /// Whether the measurer has produced an estimate of the hub's clock.
    measured: bool,
    /// The hub's record of applied changesets, from the latest schedule.
    hub_record: Option<Applied>,
    /// The record last passed to the local-edit thread.
    told: Option<Applied>,
}

impl Controller {
    /// A controller serving `start` (loaded from the store at start, if any).
    pub fn new(io: Handles, settings: Settings, start: Start) -> Controller {
        let (fired_tx, fired_rx) = mpsc::unbounded_channel();
        Controller {
            io,
            core: Core::new(settings.anchor, settings.gc, start, Instant::now()),
            staging: JoinSet::new(),
            in_flight: HashMap::new(),
            flip: None,
            fired_tx,
            fired_rx,
            installing: JoinSet::new(),
            measured: false,
            hub_record: None,
            told: None,
        }
    }

    /// Passes the hub's record of applied changesets to the local-edit thread once the clock
    /// is measured too (and again whenever it changes): it numbers no changeset before, and
    /// numbers above its own entry after.
    fn tell_local(&mut self) {
        let (Some(local), true, Some(record)) = (&self.io.local, self.measured, &self.hub_record)
        else {
            return;
        };
        if self.told.as_ref() == Some(record) {
            return;
        }
        let _ = local.send(Input::Hub(record.clone()));
        self.told = Some(record.clone());
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, mut inbox: Inbox, shutdown: CancellationToken) {
        loop {
            let wake = tokio::time::Instant::from_std(self.core.next_wake(Instant::now()));
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(f) = self.fired_rx.recv() => self.on_fired(f),
                Ok(()) = inbox.clock.changed() => {
                    let o = *inbox.clock.borrow_and_update();
                    self.on_clock(o);
                }
                Some(s) = inbox.schedules.recv() => self.on_schedule(s),
                Some(job) = inbox.installs.recv() => {
                    self.core.queue_install(job);
                    while let Ok(job) = inbox.installs.try_recv() {
                        self.core.queue_install(job);
                    }
                    self.start_install();
                }
                Some(done) = self.installing.join_next(), if !self.installing.is_empty() => {
                    self.on_installed(done);
                }
                Some(done) = self.staging.join_next_with_id(), if !self.staging.is_empty() => {
                    self.on_staged(done);
                }
                _ = tokio::time::sleep_until(wake) => {
                    let actions = self.core.on_wake(Instant::now());
                    self.carry_out(actions, Instant::now());
                }
            }
            self.replan();
        }
        let flip = &mut self.flip;
        self.core
            .disarm(&mut || flip.take().is_none_or(|h| h.cancel()));
        // A flip that fired just before the stop still has its state to record, or a restart
        // would come back on the release before it.
        while let Ok(f) = self.fired_rx.try_recv() {
            self.on_fired(f);
        }
        self.staging.abort_all();
        if let Some(l) = &self.io.local {
            let _ = l.send(Input::Stop);
        }
    }

    /// Builds the served release plus every queued changeset, in the background.
    fn start_install(&mut self) {
        let Some((base, jobs)) = self.core.next_install() else {
            return;
        };
        let store = self.io.stager.store.clone();
        let metrics = self.io.metrics.clone();
        self.installing
            .spawn_blocking(move || install::build(&store, &metrics, base, jobs));
    }

    fn on_installed(&mut self, done: Result<Installed, tokio::task::JoinError>) {
        self.core.install_done();
        let Ok(Installed { base, jobs, built }) = done else {
            error!("install task failed");
            return;
        };
        // A flip that fired meanwhile is accounted for first.
        while let Ok(f) = self.fired_rx.try_recv() {
            self.on_fired(f);
        }
        let release = match built {
            Ok(r) => r,
            Err(e) => {
                for j in &jobs {
                    self.io.metrics.refused("changeset");
                    error!(changeset = %j.cs.name(), error = %e, "cannot install the changeset; the hub's release brings it later");
                }
                self.start_install();
                return;
            }
        };
        if !self.swap_in(base, &release) {
            // The served release moved on (an activation): apply the batch to it instead.
            self.core.requeue(jobs);
            self.start_install();
            return;
        }
        self.announce_installed(&jobs, &release);
        let flipped = self.core.installed(&jobs, release, Instant::now());
        self.flipped(flipped);
        self.start_install();
    }

    /// Stores `release`, built on `base`, into the pointer if it still serves `base`.
    fn swap_in(&self, base: Option<ReleaseId>, release: &Arc<Release>) -> bool {
        let current = self.io.active.load_full();
        if !self.core.may_swap(base, current.as_ref().map(|r| r.id())) {
            return false;
        }
        let prev = self
            .io
            .active
            .compare_and_swap(&current, Some(release.clone()));
        match (&*prev, &current) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }

    /// Stores the blobs that came with installed changesets; counts and logs the remote ones.
    fn announce_installed(&self, jobs: &[Install], release: &Release) {
        let hub_now = self.core.hub_time(Instant::now());
        let blobs: Vec<_> = jobs.iter().flat_map(|j| j.blobs.iter().cloned()).collect();
        if !blobs.is_empty() {
            let _ = self.io.disk.send(DiskJob::Blobs(blobs));
        }
        for j in jobs.iter().filter(|j| j.remote) {
            self.io.metrics.installed.inc();
            if let Some(now) = hub_now {
                let latency = (now - j.cs.detected_us as i64).max(0) as f64 / 1e6;
                self.io.metrics.forward_latency.observe(latency);
            }
            info!(changeset = %j.cs.name(), paths = j.cs.changes.len(), release = %release.id().short(), "changeset installed");
        }
    }

    fn update_report(&self, f: impl FnOnce(&mut Report)) {
        self.io.report.send_if_modified(|r| {
            let before = r.clone();
            f(r);
            *r != before
        });
    }

    /// Clears a staging error from the report.
    fn staging_settled(&self) {
        self.update_report(|r| {
            if r.error.as_deref().is_some_and(|e| e.starts_with("staging")) {
                r.error = None;
            }
        });
    }

    fn on_clock(&mut self, o: Option<Offset>) {
        let Some(o) = o else { return };
        self.measured = true;
        self.tell_local();
        self.io.metrics.clock_offset.set(o.offset_us as f64 / 1e6);
        self.io.metrics.clock_error.set(o.error_us as f64 / 1e6);
        self.update_report(|r| {
            r.offset_us = Some(o.offset_us);
            r.error_us = Some(o.error_us);
        });
        if let (Some(deadline), Some(h)) = (self.core.on_clock(o), &self.flip) {
            h.retarget(deadline);
        }
    }

    fn on_schedule(&mut self, s: Schedule) {
        self.hub_record = Some(s.applied.clone());
        self.tell_local();
        if self.core.on_schedule(s, Instant::now()) {
            self.io.measure_now.notify_one();
        }
    }

    fn on_staged(&mut self, done: Result<(tokio::task::Id, Staged), tokio::task::JoinError>) {
        let (task, id, result) = match done {
            Ok((task, (id, r))) => (task, id, r),
            Err(e) => {
                let Some((id, _)) = self.in_flight.remove(&e.id()) else {
                    return;
                };
                if e.is_cancelled() {
                    // Aborted because the release is no longer wanted: not a failure.
                    return;
                }
                (e.id(), id, Err(StageError::Task(e.to_string())))
            }
        };
        self.in_flight.remove(&task);
        match result {
            Ok(release) => {
                self.core.on_staged(id, release);
                self.staging_settled();
            }
            Err(StageError::Untrusted(e)) => {
                // Asked again after the back-off: a trusted signature may be added meanwhile.
                self.io.metrics.refused("signature");
                let (_, wait) = self.core.on_stage_failed(id, Instant::now());
                let signed_by: Vec<String> = e.signed_by().iter().map(|k| k.to_string()).collect();
                error!(release = %id.short(), ?signed_by, error = %e, retry_in = ?wait, "release refused: no trusted key vouches for it; the active release keeps serving");
                let message = format!("staging {} refused: {e}", id.short());
                self.update_report(|r| r.error = Some(message));
            }
            Err(e) => {
                self.io.metrics.staging_failures.inc();
                let (_, wait) = self.core.on_stage_failed(id, Instant::now());
                error!(release = %id.short(), error = %e, retry_in = ?wait, "staging failed; the active release keeps serving");
                let message = format!("staging {} failed: {e}", id.short());
                self.update_report(|r| r.error = Some(message));
            }
        }
    }

    fn start_staging(&mut self, id: ReleaseId) {
        let stager = self.io.stager.clone();
        let handle = self
            .staging
            .spawn(async move { (id, stager.stage(id).await) });
        self.in_flight.insert(handle.id(), (id, handle));
    }

    fn on_fired(&mut self, f: Fired<Tag>) {
        let flipped = self.core.on_fired(f);
        self.flipped(flipped);
    }

    /// Announces, records and reports a flip.
    fn flipped(&mut self, f: Flipped) {
        if f.was_armed {
            // Spent: dropping it cancels nothing.
            self.flip = None;
        }
        let id = f.release.id();
        let metrics = &self.io.metrics;
        if let Some(l) = f.lateness_us {
            metrics.flip_lateness.observe(l.max(0) as f64 / 1e6);
            metrics.last_flip_lateness.set(l as f64 / 1e6);
        }
        metrics.flips.inc();
        metrics.set_active(Some(id));
        match f.tag {
            Tag::Scheduled(p) => {
                info!(release = %id.short(), lateness_us = f.lateness_us.unwrap_or_default(), cycle = p.cycle, "flipped")
            }
            Tag::Now => info!(release = %id.short(), "activated the hub's active release"),
            Tag::Installed => {}
        }
        if let Some(l) = &self.io.local {
            let _ = l.send(Input::Installed(f.release.clone()));
        }
        if self.io.report.borrow().staged == Some(id) {
            metrics.set_staged(None);
        }
        self.update_report(|r| {
            r.active = Some(id);
            if r.staged == Some(id) {
                r.staged = None;
            }
            if f.lateness_us.is_some() {
                r.last_flip = Some(id);
                r.last_flip_lateness_us = f.lateness_us;
            }
        });
        self.record(&f);
        if let Tag::Scheduled(p) = f.tag {
            tokio::spawn(crate::agent::advance::advance(
                self.io.client.clone(),
                p.cycle,
            ));
        }
    }

    /// The disk jobs after a flip, in order: state (with the manifest), `current`, pruning.
    fn record(&self, f: &Flipped) {
        let id = f.release.id();
        let disk = &self.io.disk;
        // A scheduled flip's recorder may have recorded it already (from what was known when
        // it was armed): this record is the exact one, written while `id` is served.
        let _ = disk.send(DiskJob::State(
            f.release.clone(),
            AgentState {
                active: Some(id),
                previous: f.previous,
                applied: f.applied.clone(),
            },
        ));
        let _ = disk.send(DiskJob::Current(f.release.clone()));
        let _ = disk.send(DiskJob::Prune(
            [Some(id), f.previous].into_iter().flatten().collect(),
        ));
    }

    /// Re-plans from the latest schedule and what is held.
    fn replan(&mut self) {
        while let Ok(f) = self.fired_rx.try_recv() {
            self.on_fired(f);
        }
        let now = Instant::now();
        let staging: HashSet<ReleaseId> = self.in_flight.values().map(|(id, _)| *id).collect();
        let flip = &mut self.flip;
        let actions = self.core.replan(now, &staging, &mut || {
            flip.take().is_none_or(|h| h.cancel())
        });
        self.carry_out(actions, now);
    }

    /// Does what the decisions asked, in order.
    fn carry_out(&mut self, actions: Vec<Action>, now: Instant) {
        for a in actions {
            match a {
                Action::Stage(id) => self.start_staging(id),
                Action::Abort(id) => {
                    for (_, task) in self.in_flight.values().filter(|(i, _)| *i == id) {
                        task.abort();
                    }
                }
                Action::Activate(release) => self.io.active.store(Some(release)),
                Action::Flipped(f) => self.flipped(f),
                Action::Superseded { was, by } => {
                    warn!(was = %was.short(), now = %by.short(), "the hub's staged release changed; re-planning the flip")
                }
                Action::Arm {
                    plan,
                    release,
                    deadline,
                } => self.arm(plan, release, deadline, now),
                Action::Measure => self.io.measure_now.notify_one(),
                Action::AdoptAnyway => {
                    warn!("the hub's release still lacks changesets this agent installed {ADOPT_ANYWAY:?} ago; adopting it anyway")
                }
                Action::StagingSettled => self.staging_settled(),
                Action::Staged(staged) => {
                    if self.io.report.borrow().staged != staged {
                        self.io.metrics.set_staged(staged);
                        self.update_report(|r| r.staged = staged);
                    }
                }
                Action::Collect { keep, grace } => {
                    let _ = self.io.disk.send(DiskJob::Collect { keep, grace });
                }
            }
        }
    }

    /// Starts the flip thread.
    fn arm(&mut self, plan: Scheduled, release: Arc<Release>, deadline: Instant, now: Instant) {
        info!(
            release = %plan.id.short(),
            at_us = plan.at_us,
            in_ms = deadline.saturating_duration_since(now).as_millis() as u64,
            "flip armed"
        );
        let tag = Tag::Scheduled(plan);
        let record = Provisional {
            file: self.io.state.clone(),
            state: self.core.state_after(&release, &tag),
        };
        self.flip = Some(activate::arm(
            deadline,
            self.io.active.clone(),
            release,
            tag,
            self.fired_tx.clone(),
            Some(record),
        ));
    }
}
