//! The controller's decisions: what the agent holds (active, previous and ready releases, the
//! armed flip, failed stagings, the clock estimate, the changesets its release includes, the
//! install queue) and what to do on each event — a schedule, a clock estimate, a staging job
//! done, a flip fired, an install built, a timer — given that state. Each event is a method
//! taking `now`; what the shell must do comes back as [`Action`]s (or a [`Flipped`]).
//!
//! Pure: reads no clock, opens no sockets, spawns nothing. Time is an argument; the armed
//! flip's thread is reached only through the `cancel` closure the shell passes in ("did the
//! cancel win?"), as [`plan::decide`] is told which releases are ready.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent::activate::Fired;
use crate::agent::messages::Install;
use crate::agent::plan::{self, HubView, Scheduled};
use crate::agent::release::Release;
use crate::agent::state::AgentState;
use crate::sync::changeset::{self, Applied};
use crate::sync::clock::{self, Anchor, Offset};
use crate::sync::gc::Gc;
use crate::sync::manifest::ReleaseId;
use crate::sync::protocol::Schedule;

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
/// A flip armed later than [`PREMEASURE`] before its instant still asks for a fresh estimate
/// when at least this much time is left (a measurement takes a few ms).
const LATE_PREMEASURE_MIN: Duration = Duration::from_millis(50);
/// The longest the loop sleeps with nothing due.
const IDLE_WAKE: Duration = Duration::from_secs(3600);

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

/// The flip armed on its thread, as far as decisions need it (the shell holds the handle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArmedFlip {
    /// What it is for.
    pub plan: Scheduled,
    /// When it fires (kept equal to the handle's deadline: only [`Core`] moves it).
    pub deadline: Instant,
    /// Whether the clock has been (or is being) measured again for it.
    pub premeasured: bool,
}

/// A staging job that failed, and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Retry {
    attempts: u32,
    at: Instant,
}

/// What the agent serves when the controller starts (loaded from the store).
#[derive(Default)]
pub struct Start {
    /// The release served.
    pub current: Option<Arc<Release>>,
    /// The release before it.
    pub previous: Option<Arc<Release>>,
    /// Changesets `current` includes (highest sequence per origin).
    pub applied: Applied,
}

/// A flip done (scheduled, at once, or an install): what the shell announces, records and
/// reports.
#[derive(Debug)]
pub struct Flipped {
    /// The release now served.
    pub release: Arc<Release>,
    /// What the flip was for.
    pub tag: Tag,
    /// The release served before it (kept on disk as the previous one).
    pub previous: Option<ReleaseId>,
    /// How late a scheduled flip was, hub clock µs (negative: early), if the clock is known.
    pub lateness_us: Option<i64>,
    /// Changesets the release includes, to record with it.
    pub applied: Applied,
    /// It was the armed flip: its handle is spent.
    pub was_armed: bool,
}

/// What the shell must do, in order.
#[derive(Debug)]
pub enum Action {
    /// Start staging this release.
    Stage(ReleaseId),
    /// Stop staging this release: it is no longer wanted.
    Abort(ReleaseId),
    /// Store this release into the served pointer now (bootstrap); a [`Action::Flipped`]
    /// follows.
    Activate(Arc<Release>),
    /// A flip to announce, record and report.
    Flipped(Flipped),
    /// The staged release changed under an armed flip: `was` is given up for `by`.
    Superseded {
        /// The release the flip was armed for.
        was: ReleaseId,
        /// The release the hub stages now.
        by: ReleaseId,
    },
    /// Start a flip thread for `release` at `deadline` (at once if it has passed).
    Arm {
        /// What the flip is for.
        plan: Scheduled,
        /// The release to serve.
        release: Arc<Release>,
        /// When.
        deadline: Instant,
    },
    /// Ask the measurer for a fresh clock estimate.
    Measure,
    /// The hub's release lacked this agent's changesets for [`ADOPT_ANYWAY`]; adopted anyway.
    AdoptAnyway,
    /// No staging failure is pending: a staging error in the report is history.
    StagingSettled,
    /// The staged release to report (ready and not served), whether or not it changed.
    Staged(Option<ReleaseId>),
    /// Collect the store, keeping these releases.
    Collect {
        /// Releases held.
        keep: Vec<ReleaseId>,
        /// Age below which nothing goes.
        grace: Duration,
    },
}

/// `d` after `t`, or a year after it for a `d` too long to add.
fn after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .unwrap_or_else(|| t + Duration::from_secs(365 * 24 * 3600))
}

/// What the agent holds, and the rules for changing it.
pub struct Core {
    anchor: Anchor,
    gc: Gc,
    current: Option<Arc<Release>>,
    previous: Option<Arc<Release>>,
    /// Staged releases that may still be activated.
    ready: HashMap<ReleaseId, Arc<Release>>,
    failed: HashMap<ReleaseId, Retry>,
    schedule: Option<Schedule>,
    clock: Option<Offset>,
    rough: Option<Offset>,
    armed: Option<ArmedFlip>,
    /// Flips that fired after their handle was given up; their [`Fired`] is still coming.
    pending_fired: u32,
    /// Changesets the served release includes (highest sequence per origin).
    applied: Applied,
    /// Since when the hub has lacked some of them.
    uncovered_since: Option<Instant>,
    install_queue: Vec<Install>,
    installing: bool,
    /// When the store is next collected.
    next_gc: Instant,
}

impl Core {
    /// Decisions for an agent serving `start`, with local times from `anchor`, at `now`.
    pub fn new(anchor: Anchor, gc: Gc, start: Start, now: Instant) -> Core {
        Core {
            anchor,
            gc,
            current: start.current,
            previous: start.previous,
            ready: HashMap::new(),
            failed: HashMap::new(),
            schedule: None,
            clock: None,
            rough: None,
            armed: None,
            pending_fired: 0,
            applied: start.applied,
            uncovered_since: None,
            install_queue: Vec::new(),
            installing: false,
            next_gc: after(now, gc.interval),
        }
    }

    /// The release served.
    pub fn current(&self) -> Option<&Arc<Release>> {
        self.current.as_ref()
    }

    fn current_id(&self) -> Option<ReleaseId> {
        self.current.as_ref().map(|r| r.id())
    }

    /// The armed flip.
    pub fn armed(&self) -> Option<&ArmedFlip> {
        self.armed.as_ref()
    }

    /// The measured offset, else the rough one from the last schedule.
    pub fn offset(&self) -> Option<Offset> {
        self.clock.or(self.rough)
    }

    /// The hub's time at `at`, if the offset is known.
    pub fn hub_time(&self, at: Instant) -> Option<i64> {
        self.offset().map(|o| clock::hub_time(at, o, &self.anchor))
    }

    fn known(&self, id: ReleaseId) -> Option<Arc<Release>> {
        [&self.current, &self.previous]
            .into_iter()
            .flatten()
            .find(|r| r.id() == id)
            .cloned()
            .or_else(|| self.ready.get(&id).cloned())
    }

    /// When the loop must wake next, at the latest, seen at `now`.
    pub fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = now + IDLE_WAKE;
        if let Some(a) = &self.armed {
            if !a.premeasured {
                wake = wake.min(a.deadline.checked_sub(PREMEASURE).unwrap_or(wake));
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

    /// A timer went off at `now`: collect the store if due, measure the clock before an
    /// armed flip.
    pub fn on_wake(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
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
            out.push(Action::Collect {
                keep,
                grace: self.gc.grace,
            });
        }
        if let Some(a) = &mut self.armed {
            if !a.premeasured && a.deadline <= now + PREMEASURE {
                a.premeasured = true;
                out.push(Action::Measure);
            }
        }
        out
    }

    /// A clock estimate: kept; the armed flip's new deadline, if one is armed.
    pub fn on_clock(&mut self, o: Offset) -> Option<Instant> {
        self.clock = Some(o);
        let a = self.armed.as_mut()?;
        a.deadline = clock::deadline(a.plan.at_us as i64, o, &self.anchor);
        Some(a.deadline)
    }

    /// A schedule from the hub, received at `now`; `true` when the clock should be measured
    /// (none measured yet).
    pub fn on_schedule(&mut self, s: Schedule, now: Instant) -> bool {
        // A first guess at the offset, good to a round trip, until a measurement exists.
        let local = self.anchor.local_us(now);
        self.rough = Some(Offset {
            offset_us: s.now_us as i64 - local,
            error_us: ROUGH_ERROR_US,
        });
        self.schedule = Some(s);
        self.clock.is_none()
    }

    /// A release is staged and verified.
    pub fn on_staged(&mut self, id: ReleaseId, release: Arc<Release>) {
        self.failed.remove(&id);
        self.ready.insert(id, release);
    }

    /// Staging `id` failed at `now`: the attempt's number and the wait before the next.
    pub fn on_stage_failed(&mut self, id: ReleaseId, now: Instant) -> (u32, Duration) {
        let attempts = self.failed.get(&id).map_or(0, |r| r.attempts) + 1;
        let wait = plan::backoff(attempts, STAGE_RETRY_BASE, STAGE_RETRY_MAX);
        self.failed.insert(
            id,
            Retry {
                attempts,
                at: now + wait,
            },
        );
        (attempts, wait)
    }

    /// What the state file says once a flip for `tag` serves `release`, as [`Core::on_fired`]
    /// will make it: the flip's recorder writes it as soon as the flip is stored, before the
    /// controller hears of it.
    pub fn state_after(&self, release: &Release, tag: &Tag) -> AgentState {
        let mut applied = self.applied.clone();
        with_schedule(&mut applied, self.schedule.as_ref(), tag);
        let id = release.id();
        let previous = if self.current_id() == Some(id) {
            self.previous.as_ref().map(|r| r.id())
        } else {
            self.current_id()
        };
        AgentState {
            active: Some(id),
            previous,
            applied,
        }
    }

    /// A flip happened (`f.at`: just after the pointer store).
    pub fn on_fired(&mut self, f: Fired<Tag>) -> Flipped {
        let was_armed = match (&f.tag, &self.armed) {
            (Tag::Scheduled(p), Some(a)) if a.plan == *p => {
                self.armed = None;
                true
            }
            (Tag::Scheduled(_), _) => {
                self.pending_fired = self.pending_fired.saturating_sub(1);
                false
            }
            (Tag::Now | Tag::Installed, _) => false,
        };
        with_schedule(&mut self.applied, self.schedule.as_ref(), &f.tag);
        let id = f.release.id();
        if self.current_id() != Some(id) {
            self.previous = self.current.replace(f.release.clone());
        }
        self.ready.remove(&id);
        let lateness_us = match f.tag {
            Tag::Scheduled(p) => self
                .hub_time(f.at)
                .map(|hub| plan::lateness_us(hub, p.at_us)),
            Tag::Now | Tag::Installed => None,
        };
        Flipped {
            release: f.release,
            tag: f.tag,
            previous: self.previous.as_ref().map(|r| r.id()),
            lateness_us,
            applied: self.applied.clone(),
            was_armed,
        }
    }

    /// Gives up the armed flip; counts it if it had already fired (`cancel` lost).
    pub fn disarm(&mut self, cancel: &mut dyn FnMut() -> bool) {
        if self.armed.take().is_some() && !cancel() {
            self.pending_fired += 1;
        }
    }

    /// Re-plans at `now` from the latest schedule and what is held; `staging` are the
    /// releases being staged.
    pub fn replan(
        &mut self,
        now: Instant,
        staging: &HashSet<ReleaseId>,
        cancel: &mut dyn FnMut() -> bool,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(view) = self.hub_view(now, &mut out) else {
            return out;
        };
        let ours = self.current_id();
        let d = plan::decide(
            ours,
            &view,
            |id| self.known(id).is_some(),
            self.hub_time(now),
        );
        self.fetch(&d.want, staging, now, &mut out);
        if let Some(r) = d.now.and_then(|id| self.known(id)) {
            self.flip_now(r, now, cancel, &mut out);
        }
        self.follow(d.at, now, cancel, &mut out);
        // Keep in memory only what may still be activated.
        let armed = self.armed.map(|a| a.plan.id);
        self.ready
            .retain(|id, _| d.want.contains(id) || Some(*id) == armed);
        let ours = self.current_id();
        let staged = view
            .staged
            .map(|(id, _)| id)
            .filter(|id| Some(*id) != ours && self.known(*id).is_some());
        out.push(Action::Staged(staged));
        out
    }

    /// The hub's schedule as the plan sees it: its active release only if it includes every
    /// changeset ours does (or has for [`ADOPT_ANYWAY`]); else ours stands in for it.
    fn hub_view(&mut self, now: Instant, out: &mut Vec<Action>) -> Option<HubView> {
        let s = self.schedule.as_ref()?;
        let ours = self.current_id();
        let (cycle, active, staged) = (s.cycle, s.active, s.staged.zip(s.activation_us));
        let covered = changeset::covers(&s.applied, &self.applied) || active == ours;
        let adopt = if covered {
            self.uncovered_since = None;
            true
        } else {
            let since = *self.uncovered_since.get_or_insert(now);
            let anyway = now.saturating_duration_since(since) >= ADOPT_ANYWAY;
            if anyway {
                out.push(Action::AdoptAnyway);
            }
            anyway
        };
        Some(HubView {
            cycle,
            active: if adopt { active } else { ours },
            staged,
        })
    }

    /// Stages the wanted releases not held, not being staged and not waiting for a retry;
    /// aborts stagings no longer wanted.
    fn fetch(
        &mut self,
        want: &[ReleaseId],
        staging: &HashSet<ReleaseId>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        for id in want {
            let waiting = self.failed.get(id).is_some_and(|r| r.at > now);
            if self.known(*id).is_none() && !staging.contains(id) && !waiting {
                out.push(Action::Stage(*id));
            }
        }
        self.failed.retain(|id, _| want.contains(id));
        if self.failed.is_empty() {
            // The release that failed is no longer wanted: its error is history.
            out.push(Action::StagingSettled);
        }
        // A release the hub no longer stages is not worth the bandwidth.
        for id in staging {
            if !want.contains(id) {
                out.push(Action::Abort(*id));
            }
        }
    }

    /// Activates `release` at once (bootstrap), unless a flip that fired is not accounted
    /// for yet: then the next re-plan, after its [`Fired`], decides.
    fn flip_now(
        &mut self,
        release: Arc<Release>,
        now: Instant,
        cancel: &mut dyn FnMut() -> bool,
        out: &mut Vec<Action>,
    ) {
        if self.pending_fired > 0 {
            return;
        }
        if self.armed.take().is_some() && !cancel() {
            self.pending_fired += 1;
            return;
        }
        // A flip given up here is re-armed by the plan right after, if still wanted.
        out.push(Action::Activate(release.clone()));
        let flipped = self.on_fired(Fired {
            release,
            at: now,
            tag: Tag::Now,
        });
        out.push(Action::Flipped(flipped));
    }

    /// Makes the armed flip the plan's: none, or re-armed when the plan changed.
    fn follow(
        &mut self,
        at: Option<Scheduled>,
        now: Instant,
        cancel: &mut dyn FnMut() -> bool,
        out: &mut Vec<Action>,
    ) {
        match at {
            None => self.disarm(cancel),
            Some(p) if self.armed.map(|a| a.plan) != Some(p) => {
                if let Some(a) = &self.armed {
                    out.push(Action::Superseded {
                        was: a.plan.id,
                        by: p.id,
                    });
                }
                self.disarm(cancel);
                self.arm(p, now, out);
            }
            Some(_) => {}
        }
    }

    fn arm(&mut self, p: Scheduled, now: Instant, out: &mut Vec<Action>) {
        let Some(release) = self.known(p.id) else {
            return;
        };
        let Some(offset) = self.offset() else {
            // Armed as soon as the clock is known (the next re-plan).
            out.push(Action::Measure);
            return;
        };
        let deadline = clock::deadline(p.at_us as i64, offset, &self.anchor);
        out.push(Action::Arm {
            plan: p,
            release,
            deadline,
        });
        let premeasured = deadline <= now + PREMEASURE;
        if premeasured && deadline > now + LATE_PREMEASURE_MIN {
            // Armed late: still worth a fresh estimate (a few ms) before the instant.
            out.push(Action::Measure);
        }
        self.armed = Some(ArmedFlip {
            plan: p,
            deadline,
            premeasured,
        });
    }

    /// Queues a changeset to install.
    pub fn queue_install(&mut self, job: Install) {
        self.install_queue.push(job);
    }

    /// The next install batch — the served release and every queued changeset, in order —
    /// unless one is being built or nothing is queued.
    pub fn next_install(&mut self) -> Option<(Option<Arc<Release>>, Vec<Install>)> {
        if self.installing || self.install_queue.is_empty() {
            return None;
        }
        self.installing = true;
        Some((
            self.current.clone(),
            std::mem::take(&mut self.install_queue),
        ))
    }

    /// The install being built is done (built or not).
    pub fn install_done(&mut self) {
        self.installing = false;
    }

    /// Whether a release built on `base` may replace the pointer, which serves `served`:
    /// nothing has flipped since the batch started, and no fired flip is still unaccounted.
    pub fn may_swap(&self, base: Option<ReleaseId>, served: Option<ReleaseId>) -> bool {
        served == base && self.current_id() == base && self.pending_fired == 0
    }

    /// The served release moved on under a batch: it goes first in the queue again, to be
    /// applied to the new release.
    pub fn requeue(&mut self, mut jobs: Vec<Install>) {
        jobs.append(&mut self.install_queue);
        self.install_queue = jobs;
    }

    /// `release`, built from `jobs`, was swapped in at `at`.
    pub fn installed(&mut self, jobs: &[Install], release: Arc<Release>, at: Instant) -> Flipped {
        for j in jobs {
            let seq = self.applied.entry(j.cs.origin.clone()).or_insert(0);
            *seq = (*seq).max(j.cs.seq);
        }
        self.on_fired(Fired {
            release,
            at,
            tag: Tag::Installed,
        })
    }
}

/// What a release activated for `tag` includes beside `applied`: the hub's release includes
/// what its schedule says it does.
fn with_schedule(applied: &mut Applied, schedule: Option<&Schedule>, tag: &Tag) {
    match (tag, schedule) {
        (Tag::Installed, _) | (_, None) => {}
        (_, Some(s)) => merge(applied, &s.applied),
    }
}

/// Raises `ours` to at least `theirs`, origin by origin.
fn merge(ours: &mut Applied, theirs: &Applied) {
    for (origin, seq) in theirs {
        let o = ours.entry(origin.clone()).or_insert(0);
        *o = (*o).max(*seq);
    }
}

#[cfg(test)]
mod tests;
