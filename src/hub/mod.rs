//! The data server: releases, the schedule, the hub clock, the
//! cycle compare-and-swap and the agents' reports, served as the sync API inside
//! `lockstep serve` when the config has a `sync:` section.
//!
//! [`Hub`] is the state and its operations; [`api`] is the HTTP face; [`fleet`] decides which
//! agents are behind. Every change of the cycle state is a pure transition
//! ([`crate::sync::cycle`]) applied with the store's compare-and-swap, so concurrent publishers
//! and agents cannot lose one another's updates, and exactly one advance wins each cycle.
//! Store calls block (file I/O with fsync), so they run on tokio's blocking pool.

pub mod api;
pub mod fleet;
mod metrics;

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::sync::auth::Tokens;
use crate::sync::changeset::{self, Changeset, Mode, Stamp};
use crate::sync::cycle::{Advance, CycleError, Forward, HubState, Published};
use crate::sync::gc::Gc;
use crate::sync::manifest::{Hash, Manifest, ManifestError, ReleaseId, MAX_BLOB_BYTES};
use crate::sync::protocol::{
    Advanced, AgentView, ChangesetReply, Committed, ConflictView, Fleet, Report, Schedule, Uploaded,
};
use crate::sync::schedule::Rules;
use crate::sync::store::{Collected, HubStore, StoreError};
use crate::config::sync::Sync as SyncConfig;
pub use metrics::HubMetrics;

/// If no agent has advanced a cycle this long after its activation time, the hub does it.
pub const GRACE: Duration = Duration::from_secs(2);

/// Most agents the hub keeps reports of (a peer cannot grow the map without bound).
pub const MAX_AGENTS: usize = 4096;
/// Resolved conflicts kept for `lockstep status`.
pub const MAX_CONFLICTS: usize = 64;
/// Longest `error` text kept from a report.
const MAX_REPORT_ERROR: usize = 1024;

/// The hub's clock: µs since the Unix epoch (injected so tests can move time).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0)
    })
}

/// Settings a reload may change.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Activation times.
    pub rules: Rules,
    /// Accepted tokens.
    pub tokens: Tokens,
    /// Collection of unused releases and blobs.
    pub gc: Gc,
}

impl Settings {
    /// From the checked `sync:` section.
    pub fn from_config(c: &SyncConfig) -> Settings {
        Settings {
            rules: Rules::new(c.cadence, c.lead),
            tokens: c.tokens.clone(),
            gc: c.gc,
        }
    }
}

/// Why a hub operation failed; [`api`] maps each to a status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// Malformed input (400).
    #[error("{0}")]
    Bad(String),
    /// A refused manifest (400).
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// Unknown release or blob (404).
    #[error("{0}")]
    NotFound(String),
    /// Not possible now (409).
    #[error("{0}")]
    Conflict(String),
    /// The store failed (500; a full disk reads "No space left on device").
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl From<CycleError> for HubError {
    fn from(e: CycleError) -> HubError {
        HubError::Conflict(e.to_string())
    }
}

/// Who advanced a cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advancer {
    /// An agent, after its flip.
    Agent,
    /// The hub itself, after [`GRACE`].
    Hub,
}

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
    metrics: HubMetrics,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    // The closures do file I/O and never panic on input; a panic there is a bug worth
    // propagating.
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

impl Hub {
    /// A hub over `store`, its state read from it.
    pub fn new(
        store: Arc<dyn HubStore>,
        settings: Settings,
        clock: Clock,
        metrics: HubMetrics,
    ) -> Result<Arc<Hub>, StoreError> {
        let state = store.state()?;
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
            metrics,
        }))
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

    /// Stores a manifest and answers which of its blobs the hub lacks.
    pub async fn upload_manifest(self: &Arc<Self>, body: Vec<u8>) -> Result<Uploaded, HubError> {
        let manifest = Manifest::from_json(&body)?;
        let hub = self.clone();
        blocking(move || {
            let id = manifest.id();
            hub.store.put_release(&id, &manifest.to_json())?;
            let mut missing = Vec::new();
            for (hash, _) in manifest.blobs() {
                if !hub.store.has_blob(&hash)? {
                    missing.push(hash);
                }
            }
            Ok(Uploaded { id, missing })
        })
        .await
    }

    /// Stores a blob whose bytes hash to `hash`.
    pub async fn put_blob(self: &Arc<Self>, hash: Hash, body: Vec<u8>) -> Result<bool, HubError> {
        if body.len() as u64 > MAX_BLOB_BYTES {
            return Err(HubError::Bad(format!(
                "blob of {} bytes; the largest is {MAX_BLOB_BYTES}",
                body.len()
            )));
        }
        if Hash::of(&body) != hash {
            return Err(HubError::Bad(format!(
                "the body does not hash to {hash}: it was corrupted on the way, or the URL names the wrong blob"
            )));
        }
        let hub = self.clone();
        let len = body.len() as u64;
        let created = blocking(move || {
            if hub.store.has_blob(&hash)? {
                return Ok::<_, StoreError>(false);
            }
            hub.store.put_blob(&hash, &body)?;
            Ok(true)
        })
        .await?;
        if created {
            self.metrics.blob_bytes.inc_by(len);
        }
        Ok(created)
    }

    /// The manifest of a release (canonical bytes).
    pub async fn release(self: &Arc<Self>, id: ReleaseId) -> Result<Vec<u8>, HubError> {
        let hub = self.clone();
        blocking(move || hub.store.get_release(&id))
            .await?
            .ok_or_else(|| HubError::NotFound(format!("no release {id}")))
    }

    /// A blob's bytes.
    pub async fn blob(self: &Arc<Self>, hash: Hash) -> Result<Vec<u8>, HubError> {
        let hub = self.clone();
        let blob = blocking(move || hub.store.get_blob(&hash))
            .await?
            .ok_or_else(|| HubError::NotFound(format!("no blob {hash}")))?;
        self.metrics.blobs_served.inc();
        Ok(blob)
    }

    async fn check_complete(self: &Arc<Self>, id: ReleaseId) -> Result<(), HubError> {
        let manifest = Manifest::from_json(&self.release(id).await?)?;
        let hub = self.clone();
        let (missing, wrong) = blocking(move || {
            let (mut missing, mut wrong) = (0usize, None);
            for (hash, size) in manifest.blobs() {
                match hub.store.blob_len(&hash)? {
                    None => missing += 1,
                    Some(len) if len != size => wrong = Some((hash, size, len)),
                    Some(_) => {}
                }
            }
            Ok::<_, StoreError>((missing, wrong))
        })
        .await?;
        if let Some((hash, size, len)) = wrong {
            return Err(HubError::Bad(format!(
                "release {id} says blob {hash} is {size} bytes; it is {len}: fix the manifest"
            )));
        }
        if missing > 0 {
            return Err(HubError::Conflict(format!(
                "release {id} lacks {missing} blob(s): PUT them before the commit"
            )));
        }
        Ok(())
    }

    /// Stages a complete release for activation.
    pub async fn commit(
        self: &Arc<Self>,
        id: ReleaseId,
        at_us: Option<u64>,
    ) -> Result<Committed, HubError> {
        self.check_complete(id).await?;
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

    /// Applies a changeset from an agent: `immediate` changes the active release at
    /// once (and the staged and queued ones, so an activation does not undo them);
    /// `scheduled` makes the next release from the newest pending one. Concurrent edits of a
    /// path resolve last-writer-by-hub-time-wins; the losers are logged, counted and listed in
    /// [`Hub::fleet`]. A changeset whose blobs are not all here is answered `missing`; one
    /// already applied, `duplicate`. Whole or nothing: a refused one changes nothing.
    pub async fn changeset(self: &Arc<Self>, cs: Changeset) -> Result<ChangesetReply, HubError> {
        cs.check().map_err(|e| HubError::Bad(e.to_string()))?;
        let reply = |state: &str| ChangesetReply {
            state: state.into(),
            missing: Vec::new(),
            release: None,
            conflicts: Vec::new(),
        };
        if self.state().applied.get(&cs.origin) >= Some(&cs.seq) {
            return Ok(reply("duplicate"));
        }
        let hub = self.clone();
        let blobs = cs.blobs();
        let missing = blocking(move || {
            let mut missing = Vec::new();
            for (hash, size) in blobs {
                if hub.store.blob_len(&hash)? != Some(size) {
                    missing.push(hash);
                }
            }
            Ok::<_, StoreError>(missing)
        })
        .await?;
        if !missing.is_empty() {
            return Ok(ChangesetReply {
                missing,
                ..reply("missing")
            });
        }
        let hub = self.clone();
        let name = cs.name();
        let mode = cs.mode;
        let outcome = self
            .transition(move |s, now, rules| {
                if s.applied.get(&cs.origin) >= Some(&cs.seq) {
                    return Ok((None, None));
                }
                let load = |id: Option<ReleaseId>| -> Result<Manifest, HubError> {
                    let Some(id) = id else {
                        return Ok(Manifest::default());
                    };
                    let bytes = hub
                        .store
                        .get_release(&id)?
                        .ok_or_else(|| HubError::NotFound(format!("release {id} is not stored")))?;
                    Ok(Manifest::from_json(&bytes)?)
                };
                let put = |m: &Manifest| -> Result<ReleaseId, HubError> {
                    let id = m.id();
                    hub.store.put_release(&id, &m.to_json())?;
                    Ok(id)
                };
                let target = match cs.mode {
                    Mode::Immediate => s.active,
                    Mode::Scheduled => s.newest(),
                };
                let current = load(target)?;
                let r = changeset::resolve(&current, &s.stamps, &cs);
                let stamp = Stamp {
                    at_us: cs.detected_us,
                    origin: cs.origin.clone(),
                };
                let f = Forward {
                    origin: cs.origin.clone(),
                    seq: cs.seq,
                    written: r.apply.keys().map(|p| (p.clone(), stamp.clone())).collect(),
                };
                let refused = |e: ManifestError| {
                    HubError::Bad(format!("changeset {} refused: {e}", cs.name()))
                };
                let release = put(&changeset::apply(&current, &r.apply).map_err(refused)?)?;
                let next = match cs.mode {
                    Mode::Immediate => {
                        let rebase = |id: Option<ReleaseId>| match id {
                            Some(_) => changeset::apply(&load(id)?, &r.apply)
                                .map_err(refused)
                                .and_then(|m| put(&m))
                                .map(Some),
                            None => Ok(None),
                        };
                        let staged = rebase(s.staged.map(|x| x.id))?;
                        let queued = rebase(s.queued.map(|x| x.id))?;
                        s.forward_immediate(f, release, staged, queued, now)
                    }
                    Mode::Scheduled => s.forward_scheduled(f, release, now, rules).0,
                };
                Ok((Some(next), Some((release, r.conflicts))))
            })
            .await?;
        let Some((release, conflicts)) = outcome else {
            return Ok(reply("duplicate"));
        };
        self.metrics.changeset(mode);
        info!(changeset = %name, ?mode, release = %release.short(), conflicts = conflicts.len(), "changeset applied");
        if !conflicts.is_empty() {
            let now = self.now_us();
            let mut kept = self.conflicts.lock().unwrap_or_else(|p| p.into_inner());
            for c in &conflicts {
                self.metrics.conflicts.inc();
                warn!(
                    path = %c.path,
                    winner = %c.winner.origin,
                    winner_us = c.winner.at_us,
                    loser = %if c.loser.origin.is_empty() { "a publish" } else { &c.loser.origin },
                    loser_us = c.loser.at_us,
                    "concurrent edits of one path: the later by hub time wins"
                );
                if kept.len() == MAX_CONFLICTS {
                    kept.pop_front();
                }
                kept.push_back(ConflictView {
                    conflict: c.clone(),
                    resolved_us: now,
                });
            }
        }
        Ok(ChangesetReply {
            release: Some(release),
            conflicts,
            ..reply("applied")
        })
    }

    /// Stages the previous release.
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

    fn committed(&self, id: ReleaseId, p: Published) -> Committed {
        let (state, activation_us) = match p {
            Published::Staged(at) => ("staged", Some(at)),
            Published::Queued => ("queued", None),
            Published::AlreadyActive => ("active", None),
        };
        Committed {
            id,
            state: state.into(),
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
                reason: Some("already advanced".into()),
            }),
            Err(Advance::TooEarly { at_us }) => Err(HubError::Conflict(format!(
                "too early: the activation is at {at_us} µs (hub time {} µs)",
                self.now_us()
            ))),
            Err(_) => Err(HubError::Conflict("nothing is staged in this cycle".into())),
        }
    }

    /// Records an agent's report.
    pub fn report(&self, name: &str, mut report: Report) -> Result<(), HubError> {
        check_agent_name(name)?;
        if let Some(e) = report.error.as_mut() {
            if e.len() > MAX_REPORT_ERROR {
                let mut cut = MAX_REPORT_ERROR;
                while !e.is_char_boundary(cut) {
                    cut -= 1;
                }
                e.truncate(cut);
            }
        }
        let now = self.now_us();
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        if !reports.contains_key(name) && reports.len() >= MAX_AGENTS {
            return Err(HubError::Conflict(format!(
                "the hub already tracks {MAX_AGENTS} agents; restart it to forget old names"
            )));
        }
        self.metrics.observe_report(name, &report);
        reports.insert(name.to_string(), (report, now));
        drop(reports);
        self.reports_changed.notify_one();
        Ok(())
    }

    /// The fleet as the hub last heard of it.
    pub fn fleet(&self) -> Fleet {
        let schedule = self.schedule();
        let release = fleet::fleet_release(&self.state(), schedule.now_us);
        let reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        Fleet {
            agents: reports
                .iter()
                .map(|(name, (r, at))| AgentView {
                    name: name.clone(),
                    report: r.clone(),
                    reported_us: *at,
                    current: release.is_some() && r.active == release,
                })
                .collect(),
            schedule,
            conflicts: self
                .conflicts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned()
                .collect(),
        }
    }

    fn compute_behind(&self) -> HashSet<String> {
        let state = self.state();
        let reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        fleet::behind(
            &state,
            self.now_us(),
            reports.iter().map(|(n, (r, _))| (n, r)),
        )
    }

    /// Removes the releases no one needs (anything but active, previous, staged and queued)
    /// and the blobs only they used, once older than the grace period.
    pub async fn collect(&self) -> Result<Collected, HubError> {
        let state = self.state();
        let keep: Vec<ReleaseId> = [
            state.active,
            state.previous,
            state.staged.map(|s| s.id),
            state.queued.map(|q| q.id),
        ]
        .into_iter()
        .flatten()
        .collect();
        let grace = self.settings().gc.grace;
        let store = self.store.clone();
        let done = blocking(move || store.collect(&keep, grace)).await?;
        self.metrics.gc_removed(&done);
        Ok(done)
    }

    /// Runs until `shutdown`: collects the store every `gc.interval` (re-read after each, so
    /// a reload applies).
    pub async fn run_gc(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            // Off: look again in a minute, a reload may turn it on.
            let interval = self.settings().gc.interval;
            let wait = if interval.is_zero() {
                Duration::from_secs(60)
            } else {
                interval
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            if self.settings().gc.interval.is_zero() {
                continue;
            }
            match self.collect().await {
                Ok(c) if c.releases + c.blobs > 0 => {
                    info!(
                        releases = c.releases,
                        blobs = c.blobs,
                        bytes = c.bytes,
                        "collected unused content from the store"
                    )
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "store collection failed; nothing was removed on a guess")
                }
            }
        }
    }

    /// Runs until `shutdown`: advances a cycle itself when no agent has within [`GRACE`] of
    /// its activation, and keeps [`Hub::behind`] current.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut state_rx = self.state.subscribe();
        loop {
            let behind = self.compute_behind();
            self.metrics.behind.set(behind.len() as i64);
            self.behind.send_if_modified(|b| {
                let changed = *b != behind;
                *b = behind;
                changed
            });
            let state = self.state();
            // The next moment something changes by time alone: the activation, the end of the
            // flip-report grace (agents still on the old release go behind), or the end of the
            // advance grace period (the hub advances).
            let now = self.now_us();
            let grace_end = state
                .staged
                .map(|s| s.at_us.saturating_add(GRACE.as_micros() as u64));
            let wake = fleet::next_change(&state, now)
                .into_iter()
                .chain(grace_end.filter(|&t| t > now))
                .min()
                .map(|at| Duration::from_micros(at.saturating_sub(now)));
            if let Some(s) = state.staged {
                if now >= s.at_us.saturating_add(GRACE.as_micros() as u64) {
                    match self.advance(state.cycle, Advancer::Hub).await {
                        Ok(a) if a.advanced => {
                            warn!(
                                cycle = state.cycle,
                                "no agent advanced the cycle within the grace period; the hub did"
                            );
                            continue;
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "hub advance failed; retrying in 1 s"),
                    }
                    // Not advanced (a failing store, a clock stepped back): do not spin.
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = state_rx.changed() => {}
                _ = self.reports_changed.notified() => {}
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
}

/// Agent names are URL path segments and metric labels: keep them plain.
fn check_agent_name(name: &str) -> Result<(), HubError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(HubError::Bad(format!(
            "agent name `{}` must be 1–64 letters, digits, `-`, `_` or `.`",
            name.chars().take(70).collect::<String>()
        )))
    }
}
