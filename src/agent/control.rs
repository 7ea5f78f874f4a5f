//! The agent's loop: one task owns what the agent holds (active, previous and staged
//! releases, the armed flip, the clock estimate) and reacts to events — a schedule from the
//! long-poll, a staging job done, a clock measurement, a flip fired — by re-planning with
//! [`plan::decide`]. Everything slow runs elsewhere: staging in background tasks, the flip on
//! its own thread, disk writes on one ordered worker, reports and advances in their tasks.
//!
//! Detect and forward: changesets — this backend's own in `immediate` mode, or
//! other backends' sent directly — are installed at once: applied to the served release (all
//! of a batch, or the one that does not fit is refused), built reusing the served release's
//! files, and swapped in with a compare-and-swap of the pointer, so an activation that lands
//! meanwhile is never overwritten (the batch is then applied to the new release). The agent
//! tracks which changesets its release includes (per origin, the highest sequence) and adopts
//! the hub's release only when the hub includes all of them, so a direct install is not
//! undone by a hub that has not heard of it yet — unless that lasts [`ADOPT_ANYWAY`].

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::activate::{self, Armed, Fired};
use super::messages::{Active, Input, Install};
use super::metrics::AgentMetrics;
use super::plan::{self, HubView, Scheduled};
use super::release::Release;
use super::release_dir;
use super::stage::{StageError, Stager};
use super::state::{AgentState, STATE_NAME};
use crate::sync::changeset::{self, Applied};
use crate::net::client::HttpClient;
use crate::sync::clock::{self, Anchor, Offset};
use crate::sync::gc::Gc;
use crate::sync::manifest::ReleaseId;
use crate::sync::protocol::{Report, Schedule};
use crate::sync::store::FsStore;

/// The clock is measured again this long before an activation.
pub const PREMEASURE: Duration = Duration::from_millis(1500);
/// First pause before staging a release again after a failure.
pub const STAGE_RETRY_BASE: Duration = Duration::from_secs(2);
/// Longest pause between staging attempts.
pub const STAGE_RETRY_MAX: Duration = Duration::from_secs(60);
/// The hub's release is adopted even though it lacks changesets this agent installed, when
/// that has lasted this long (the hub refused one, or its origin is gone for good).
pub const ADOPT_ANYWAY: Duration = Duration::from_secs(30);
/// Error bound given to an offset guessed from a schedule's `now_us` (used only until a real
/// measurement exists).
const ROUGH_ERROR_US: i64 = 1_000_000;

/// What a flip was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    /// A scheduled activation.
    Scheduled(Scheduled),
    /// At once: bootstrap (or the hub moved on without this agent).
    Now,
    /// Changesets installed at once (immediate mode).
    Installed,
}

/// What an install task returns: the release it built on, the jobs it applied, and the new
/// release (or why none).
type Installed = (
    Option<ReleaseId>,
    Vec<Install>,
    Result<Arc<Release>, String>,
);

/// What a staging task returns.
type Staged = (ReleaseId, Result<Arc<Release>, StageError>);

struct ArmedFlip {
    plan: Scheduled,
    handle: Armed,
    premeasured: bool,
}

struct Retry {
    attempts: u32,
    at: Instant,
}

/// Ordered disk work after a flip (state file, `current` symlink, pruning old copies).
#[derive(Debug)]
pub enum DiskJob {
    /// Write the state file.
    State(AgentState),
    /// Make sure `releases/<id>` exists and point `current` at it.
    Current(Arc<Release>),
    /// Drop release copies other than these.
    Prune(Vec<ReleaseId>),
    /// Store blobs received from a peer (before the state that names them).
    Blobs(Vec<(crate::sync::manifest::Hash, bytes::Bytes)>),
    /// Store the release's manifest if it is not (a release built from changesets), before
    /// the state that names it, so a restart can load it.
    Manifest(Arc<Release>),
    /// Remove what these releases and the outbox do not need (see [`crate::sync::gc`]).
    Collect {
        /// Releases held: active, previous, staged.
        keep: Vec<ReleaseId>,
        /// Age below which nothing goes.
        grace: Duration,
    },
}

/// Runs disk jobs one after another, so that two quick flips cannot reorder their writes.
pub async fn disk_worker(
    store: Arc<FsStore>,
    release_dir: Option<PathBuf>,
    metrics: Arc<AgentMetrics>,
    mut rx: mpsc::UnboundedReceiver<DiskJob>,
) {
    while let Some(job) = rx.recv().await {
        let (store, dir, metrics) = (store.clone(), release_dir.clone(), metrics.clone());
        let outcome = tokio::task::spawn_blocking(move || -> Result<(), String> {
            match job {
                DiskJob::Manifest(r) if store.has_release(&r.id()) => Ok(()),
                DiskJob::Manifest(r) => store
                    .write_release(&r.id(), &r.manifest().to_json())
                    .map_err(|e| format!("cannot store the release's manifest: {e}")),
                DiskJob::Collect { keep, grace } => {
                    let pinned = super::outbox::outbox_blobs(&store);
                    let c = store
                        .collect(&keep, &pinned, grace)
                        .map_err(|e| format!("store collection: {e}"))?;
                    metrics.gc_removed(&c);
                    if c.releases + c.blobs > 0 {
                        info!(
                            releases = c.releases,
                            blobs = c.blobs,
                            bytes = c.bytes,
                            "collected unused content from the store"
                        );
                    }
                    Ok(())
                }
                DiskJob::Blobs(blobs) => blobs
                    .iter()
                    .filter(|(h, _)| !store.has_blob(h))
                    .try_for_each(|(h, b)| store.write_blob(h, b))
                    .map_err(|e| format!("cannot store blobs from a peer: {e}")),
                DiskJob::State(s) => store
                    .write_state(STATE_NAME, &s)
                    .map_err(|e| format!("cannot record the active release: {e}")),
                DiskJob::Current(r) => match &dir {
                    Some(dir) => release_dir::materialise(dir, &r.id(), r.manifest(), &store)
                        .and_then(|_| release_dir::switch_current(dir, &r.id()))
                        .map_err(|e| format!("release_dir: {e}")),
                    None => Ok(()),
                },
                DiskJob::Prune(keep) => match &dir {
                    Some(dir) => {
                        release_dir::prune(dir, &keep).map_err(|e| format!("release_dir: {e}"))
                    }
                    None => Ok(()),
                },
            }
        })
        .await;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(error = %e, "disk write after a flip failed; the release is served from memory")
            }
            Err(e) => error!(error = %e, "disk task failed"),
        }
    }
}

/// `d` after `t`, or a year after it for a `d` too long to add.
fn after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .unwrap_or_else(|| t + Duration::from_secs(365 * 24 * 3600))
}

/// The loop's state.
pub struct Controller {
    /// Hub client (advance calls).
    pub client: HttpClient,
    /// The one anchor local times come from.
    pub anchor: Anchor,
    /// The served pointer.
    pub active: Active,
    /// Metrics.
    pub metrics: Arc<AgentMetrics>,
    /// Starts staging jobs.
    pub stager: Stager,
    /// Ordered disk work.
    pub disk: mpsc::UnboundedSender<DiskJob>,
    /// The latest report.
    pub report: watch::Sender<Report>,
    /// Asks the measurer for a fresh estimate.
    pub measure_now: Arc<Notify>,
    /// The release served.
    pub current: Option<Arc<Release>>,
    /// The release before it.
    pub previous: Option<Arc<Release>>,
    ready: HashMap<ReleaseId, Arc<Release>>,
    staging: JoinSet<Staged>,
    in_flight: HashMap<tokio::task::Id, (ReleaseId, tokio::task::AbortHandle)>,
    failed: HashMap<ReleaseId, Retry>,
    schedule: Option<Schedule>,
    clock: Option<Offset>,
    rough: Option<Offset>,
    armed: Option<ArmedFlip>,
    /// Flips that fired after their handle was given up; their [`Fired`] is still coming.
    pending_fired: u32,
    fired_tx: mpsc::UnboundedSender<Fired<Tag>>,
    fired_rx: mpsc::UnboundedReceiver<Fired<Tag>>,
    /// Changesets the served release includes (highest sequence per origin).
    applied: Applied,
    /// Since when the hub has lacked some of them.
    uncovered_since: Option<Instant>,
    install_queue: Vec<Install>,
    installing: JoinSet<Installed>,
    /// The local-edit thread, told of every release change.
    local: Option<mpsc::UnboundedSender<Input>>,
    /// Store collection settings.
    gc: Gc,
    /// When the store is next collected.
    next_gc: Instant,
}

impl Controller {
    /// A controller serving `current` (loaded from the store at start, if any).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: HttpClient,
        anchor: Anchor,
        active: Active,
        metrics: Arc<AgentMetrics>,
        stager: Stager,
        disk: mpsc::UnboundedSender<DiskJob>,
        report: watch::Sender<Report>,
        measure_now: Arc<Notify>,
        current: Option<Arc<Release>>,
        previous: Option<Arc<Release>>,
        applied: Applied,
        local: Option<mpsc::UnboundedSender<Input>>,
        gc: Gc,
    ) -> Controller {
        let (fired_tx, fired_rx) = mpsc::unbounded_channel();
        Controller {
            client,
            anchor,
            active,
            metrics,
            stager,
            disk,
            report,
            measure_now,
            current,
            previous,
            ready: HashMap::new(),
            staging: JoinSet::new(),
            in_flight: HashMap::new(),
            failed: HashMap::new(),
            schedule: None,
            clock: None,
            rough: None,
            armed: None,
            pending_fired: 0,
            fired_tx,
            fired_rx,
            applied,
            uncovered_since: None,
            install_queue: Vec::new(),
            installing: JoinSet::new(),
            local,
            gc,
            next_gc: after(Instant::now(), gc.interval),
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(
        mut self,
        mut schedules: mpsc::Receiver<Schedule>,
        mut clock: watch::Receiver<Option<Offset>>,
        mut installs: mpsc::UnboundedReceiver<Install>,
        shutdown: CancellationToken,
    ) {
        loop {
            let wake = tokio::time::Instant::from_std(self.next_wake());
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(f) = self.fired_rx.recv() => self.on_fired(f),
                Ok(()) = clock.changed() => {
                    let o = *clock.borrow_and_update();
                    self.on_clock(o);
                }
                Some(s) = schedules.recv() => self.on_schedule(s),
                Some(job) = installs.recv() => {
                    self.install_queue.push(job);
                    while let Ok(job) = installs.try_recv() {
                        self.install_queue.push(job);
                    }
                    self.start_install();
                }
                Some(done) = self.installing.join_next(), if !self.installing.is_empty() => {
                    self.on_installed(done);
                }
                Some(done) = self.staging.join_next_with_id(), if !self.staging.is_empty() => {
                    self.on_staged(done);
                }
                _ = tokio::time::sleep_until(wake) => self.on_wake(),
            }
            self.replan();
        }
        if let Some(a) = self.armed.take() {
            a.handle.cancel();
        }
        // A flip that fired just before the stop still has its state to record, or a restart
        // would come back on the release before it.
        while let Ok(f) = self.fired_rx.try_recv() {
            self.on_fired(f);
        }
        self.staging.abort_all();
        if let Some(l) = &self.local {
            let _ = l.send(Input::Stop);
        }
    }

    /// Builds the served release plus every queued changeset, in the background.
    fn start_install(&mut self) {
        if !self.installing.is_empty() || self.install_queue.is_empty() {
            return;
        }
        let jobs = std::mem::take(&mut self.install_queue);
        let base = self.current.clone();
        let store = self.stager.store.clone();
        let metrics = self.metrics.clone();
        let fresh: std::collections::HashMap<_, _> =
            jobs.iter().flat_map(|j| j.blobs.iter().cloned()).collect();
        self.installing.spawn_blocking(move || {
            let mut manifest = base
                .as_ref()
                .map(|r| r.manifest().clone())
                .unwrap_or_default();
            let mut kept = Vec::with_capacity(jobs.len());
            for job in jobs {
                let changes = job
                    .cs
                    .changes
                    .iter()
                    .map(|(p, c)| (p, &c.entry));
                match changeset::apply(&manifest, changes) {
                    Ok(m) => {
                        manifest = m;
                        kept.push(job);
                    }
                    Err(e) => {
                        metrics.refused("changeset");
                        warn!(changeset = %job.cs.name(), error = %e, "changeset refused: it does not fit the served release; nothing of it is installed");
                    }
                }
            }
            let built = Release::build_reusing(&store, manifest, base.as_deref(), &fresh)
                .map(Arc::new)
                .map_err(|e| e.to_string());
            (base.map(|r| r.id()), kept, built)
        });
    }

    fn on_installed(&mut self, done: Result<Installed, tokio::task::JoinError>) {
        let Ok((base, jobs, built)) = done else {
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
                    self.metrics.refused("changeset");
                    error!(changeset = %j.cs.name(), error = %e, "cannot install the changeset; the hub's release brings it later");
                }
                self.start_install();
                return;
            }
        };
        let current = self.active.load_full();
        let still_base = current.as_ref().map(|r| r.id()) == base
            && self.current.as_ref().map(|r| r.id()) == base
            && self.pending_fired == 0;
        let swapped = still_base && {
            let prev = self
                .active
                .compare_and_swap(&current, Some(release.clone()));
            match (&*prev, &current) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
        };
        if !swapped {
            // The served release moved on (an activation): apply the batch to it instead.
            let mut jobs = jobs;
            jobs.append(&mut self.install_queue);
            self.install_queue = jobs;
            self.start_install();
            return;
        }
        let hub_now = self
            .offset()
            .map(|o| clock::hub_time(Instant::now(), o, &self.anchor));
        let blobs: Vec<_> = jobs.iter().flat_map(|j| j.blobs.iter().cloned()).collect();
        if !blobs.is_empty() {
            let _ = self.disk.send(DiskJob::Blobs(blobs));
        }
        for j in &jobs {
            let seq = self.applied.entry(j.cs.origin.clone()).or_insert(0);
            *seq = (*seq).max(j.cs.seq);
            if j.remote {
                self.metrics.installed.inc();
                if let Some(now) = hub_now {
                    let latency = (now - j.cs.detected_us as i64).max(0) as f64 / 1e6;
                    self.metrics.forward_latency.observe(latency);
                }
                info!(changeset = %j.cs.name(), paths = j.cs.changes.len(), release = %release.id().short(), "changeset installed");
            }
        }
        self.on_fired(Fired {
            release,
            at: Instant::now(),
            tag: Tag::Installed,
        });
        self.start_install();
    }

    fn offset(&self) -> Option<Offset> {
        self.clock.or(self.rough)
    }

    fn known(&self, id: ReleaseId) -> Option<Arc<Release>> {
        [&self.current, &self.previous]
            .into_iter()
            .flatten()
            .find(|r| r.id() == id)
            .cloned()
            .or_else(|| self.ready.get(&id).cloned())
    }

    fn update_report(&self, f: impl FnOnce(&mut Report)) {
        self.report.send_if_modified(|r| {
            let before = r.clone();
            f(r);
            *r != before
        });
    }

    fn next_wake(&self) -> Instant {
        let mut wake = Instant::now() + Duration::from_secs(3600);
        if let Some(a) = &self.armed {
            if !a.premeasured {
                wake = wake.min(a.handle.deadline().checked_sub(PREMEASURE).unwrap_or(wake));
            }
        }
        for r in self.failed.values() {
            wake = wake.min(r.at);
        }
        if let Some(since) = self.uncovered_since {
            wake = wake.min(since + ADOPT_ANYWAY);
        }
        if !self.gc.interval.is_zero() {
            wake = wake.min(self.next_gc);
        }
        wake
    }

    fn on_wake(&mut self) {
        let now = Instant::now();
        if !self.gc.interval.is_zero() && self.next_gc <= now {
            self.next_gc = after(now, self.gc.interval);
            // Ready releases are staged (their manifests are stored); one still being staged
            // is protected by its age.
            let keep = [&self.current, &self.previous]
                .into_iter()
                .flatten()
                .map(|r| r.id())
                .chain(self.ready.keys().copied())
                .collect();
            let _ = self.disk.send(DiskJob::Collect {
                keep,
                grace: self.gc.grace,
            });
        }
        if let Some(a) = &mut self.armed {
            if !a.premeasured && a.handle.deadline() <= now + PREMEASURE {
                a.premeasured = true;
                self.measure_now.notify_one();
            }
        }
    }

    fn on_clock(&mut self, o: Option<Offset>) {
        let Some(o) = o else { return };
        self.clock = Some(o);
        self.metrics.clock_offset.set(o.offset_us as f64 / 1e6);
        self.metrics.clock_error.set(o.error_us as f64 / 1e6);
        self.update_report(|r| {
            r.offset_us = Some(o.offset_us);
            r.error_us = Some(o.error_us);
        });
        if let Some(a) = &self.armed {
            a.handle
                .retarget(clock::deadline(a.plan.at_us as i64, o, &self.anchor));
        }
    }

    fn on_schedule(&mut self, s: Schedule) {
        // A first guess at the offset, good to a round trip, until a measurement exists.
        let local = self.anchor.local_us(Instant::now());
        self.rough = Some(Offset {
            offset_us: s.now_us as i64 - local,
            error_us: ROUGH_ERROR_US,
        });
        if self.clock.is_none() {
            self.measure_now.notify_one();
        }
        self.schedule = Some(s);
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
                self.failed.remove(&id);
                self.ready.insert(id, release);
                self.update_report(|r| {
                    if r.error.as_deref().is_some_and(|e| e.starts_with("staging")) {
                        r.error = None;
                    }
                });
            }
            Err(e) => {
                self.metrics.staging_failures.inc();
                let attempts = self.failed.get(&id).map_or(0, |r| r.attempts) + 1;
                let wait = plan::backoff(attempts, STAGE_RETRY_BASE, STAGE_RETRY_MAX);
                error!(release = %id.short(), error = %e, retry_in = ?wait, "staging failed; the active release keeps serving");
                self.failed.insert(
                    id,
                    Retry {
                        attempts,
                        at: Instant::now() + wait,
                    },
                );
                let message = format!("staging {} failed: {e}", id.short());
                self.update_report(|r| r.error = Some(message));
            }
        }
    }

    fn start_staging(&mut self, id: ReleaseId) {
        let stager = self.stager.clone();
        let handle = self
            .staging
            .spawn(async move { (id, stager.stage(id).await) });
        self.in_flight.insert(handle.id(), (id, handle));
    }

    /// Gives up the armed flip; counts it if it had already fired.
    fn disarm(&mut self) {
        if let Some(a) = self.armed.take() {
            if !a.handle.cancel() {
                self.pending_fired += 1;
            }
        }
    }

    fn arm(&mut self, p: Scheduled) {
        let Some(release) = self.known(p.id) else {
            return;
        };
        let Some(offset) = self.offset() else {
            // Armed as soon as the clock is known (the next re-plan).
            self.measure_now.notify_one();
            return;
        };
        let deadline = clock::deadline(p.at_us as i64, offset, &self.anchor);
        let now = Instant::now();
        info!(
            release = %p.id.short(),
            at_us = p.at_us,
            in_ms = deadline.saturating_duration_since(now).as_millis() as u64,
            "flip armed"
        );
        let handle = activate::arm(
            deadline,
            self.active.clone(),
            release,
            Tag::Scheduled(p),
            self.fired_tx.clone(),
        );
        let premeasured = deadline <= now + PREMEASURE;
        if premeasured && deadline > now + Duration::from_millis(50) {
            // Armed late: still worth a fresh estimate (a few ms) before the instant.
            self.measure_now.notify_one();
        }
        self.armed = Some(ArmedFlip {
            plan: p,
            handle,
            premeasured,
        });
    }

    /// Activates `release` at once (bootstrap).
    fn flip_now(&mut self, release: Arc<Release>) {
        if self.pending_fired > 0 {
            // A scheduled flip has fired and is not accounted for yet: decide after it.
            return;
        }
        if let Some(a) = self.armed.take() {
            if !a.handle.cancel() {
                self.pending_fired += 1;
                return;
            }
            // Re-armed by the plan right after, if still wanted.
        }
        self.active.store(Some(release.clone()));
        self.on_fired(Fired {
            release,
            at: Instant::now(),
            tag: Tag::Now,
        });
    }

    fn on_fired(&mut self, f: Fired<Tag>) {
        match (&f.tag, &self.armed) {
            (Tag::Scheduled(p), Some(a)) if a.plan == *p => self.armed = None,
            (Tag::Scheduled(_), _) => self.pending_fired = self.pending_fired.saturating_sub(1),
            (Tag::Now | Tag::Installed, _) => {}
        }
        if !matches!(f.tag, Tag::Installed) {
            // The hub's release: it includes what the schedule says it does.
            if let Some(s) = &self.schedule {
                for (origin, seq) in &s.applied {
                    let ours = self.applied.entry(origin.clone()).or_insert(0);
                    *ours = (*ours).max(*seq);
                }
            }
        }
        let id = f.release.id();
        if self.current.as_ref().map(|r| r.id()) != Some(id) {
            self.previous = self.current.replace(f.release.clone());
        }
        self.ready.remove(&id);
        let lateness = match f.tag {
            Tag::Scheduled(p) => self
                .offset()
                .map(|o| plan::lateness_us(clock::hub_time(f.at, o, &self.anchor), p.at_us)),
            Tag::Now | Tag::Installed => None,
        };
        if let Some(l) = lateness {
            self.metrics.flip_lateness.observe(l.max(0) as f64 / 1e6);
            self.metrics.last_flip_lateness.set(l as f64 / 1e6);
        }
        self.metrics.flips.inc();
        self.metrics.set_active(Some(id));
        let previous = self.previous.as_ref().map(|r| r.id());
        match f.tag {
            Tag::Scheduled(p) => {
                info!(release = %id.short(), lateness_us = lateness.unwrap_or_default(), cycle = p.cycle, "flipped")
            }
            Tag::Now => info!(release = %id.short(), "activated the hub's active release"),
            Tag::Installed => {}
        }
        if let Some(l) = &self.local {
            let _ = l.send(Input::Installed(f.release.clone()));
        }
        if self.report.borrow().staged == Some(id) {
            self.metrics.set_staged(None);
        }
        self.update_report(|r| {
            r.active = Some(id);
            if r.staged == Some(id) {
                r.staged = None;
            }
            if lateness.is_some() {
                r.last_flip = Some(id);
                r.last_flip_lateness_us = lateness;
            }
        });
        let _ = self.disk.send(DiskJob::Manifest(f.release.clone()));
        let _ = self.disk.send(DiskJob::State(AgentState {
            active: Some(id),
            previous,
            applied: self.applied.clone(),
        }));
        let _ = self.disk.send(DiskJob::Current(f.release));
        let _ = self.disk.send(DiskJob::Prune(
            [Some(id), previous].into_iter().flatten().collect(),
        ));
        if let Tag::Scheduled(p) = f.tag {
            tokio::spawn(super::advance::advance(self.client.clone(), p.cycle));
        }
    }

    /// Re-plans from the latest schedule and what is held.
    fn replan(&mut self) {
        while let Ok(f) = self.fired_rx.try_recv() {
            self.on_fired(f);
        }
        let Some(s) = &self.schedule else { return };
        let ours = self.current.as_ref().map(|r| r.id());
        // Adopt the hub's release only if it includes every changeset ours does.
        let covered = changeset::covers(&s.applied, &self.applied);
        let adopt = if covered || s.active == ours {
            self.uncovered_since = None;
            true
        } else {
            let since = *self.uncovered_since.get_or_insert_with(Instant::now);
            let anyway = since.elapsed() >= ADOPT_ANYWAY;
            if anyway {
                warn!("the hub's release still lacks changesets this agent installed {ADOPT_ANYWAY:?} ago; adopting it anyway");
            }
            anyway
        };
        let view = HubView {
            cycle: s.cycle,
            active: if adopt { s.active } else { ours },
            staged: s.staged.zip(s.activation_us),
        };
        let hub_now = self
            .offset()
            .map(|o| clock::hub_time(Instant::now(), o, &self.anchor));
        let ours = self.current.as_ref().map(|r| r.id());
        let d = plan::decide(ours, &view, |id| self.known(id).is_some(), hub_now);

        let now = Instant::now();
        let in_flight: HashSet<ReleaseId> = self.in_flight.values().map(|(id, _)| *id).collect();
        for id in &d.want {
            let waiting = self.failed.get(id).is_some_and(|r| r.at > now);
            if self.known(*id).is_none() && !in_flight.contains(id) && !waiting {
                self.start_staging(*id);
            }
        }
        self.failed.retain(|id, _| d.want.contains(id));
        if self.failed.is_empty() {
            // The release that failed is no longer wanted: its error is history.
            self.update_report(|r| {
                if r.error.as_deref().is_some_and(|e| e.starts_with("staging")) {
                    r.error = None;
                }
            });
        }
        // A release the hub no longer stages is not worth the bandwidth.
        for (id, task) in self.in_flight.values() {
            if !d.want.contains(id) {
                task.abort();
            }
        }
        if let Some(id) = d.now {
            if let Some(r) = self.known(id) {
                self.flip_now(r);
            }
        }
        match d.at {
            None => self.disarm(),
            Some(p) if self.armed.as_ref().map(|a| a.plan) != Some(p) => {
                if let Some(a) = &self.armed {
                    warn!(was = %a.plan.id.short(), now = %p.id.short(), "the hub's staged release changed; re-planning the flip");
                }
                self.disarm();
                self.arm(p);
            }
            Some(_) => {}
        }
        // Keep in memory only what may still be activated.
        let armed = self.armed.as_ref().map(|a| a.plan.id);
        self.ready
            .retain(|id, _| d.want.contains(id) || Some(*id) == armed);
        let ours = self.current.as_ref().map(|r| r.id());
        let staged = view
            .staged
            .map(|(id, _)| id)
            .filter(|id| Some(*id) != ours && self.known(*id).is_some());
        if self.report.borrow().staged != staged {
            self.metrics.set_staged(staged);
            self.update_report(|r| r.staged = staged);
        }
    }
}
