//! The flip: on a dedicated thread, sleep until just before a
//! **monotonic** deadline, spin the last instants, then store the staged release into the
//! active-release pointer — one atomic store, so every request after it sees the new release
//! whole and none sees a mix.
//!
//! tokio's timer wheel ticks in whole milliseconds, so the wait runs on a std thread with
//! relative sleeps (no `clock_nanosleep`: the crate forbids `unsafe`, and tests run agents under
//! libfaketime) down to [`SPIN`] before the deadline, then spins for at most that long. The spin
//! is kept to about the kernel's timer slack on purpose: eight agents share two cores in the
//! benchmark and all of them flip at the same instant, and longer spins (300 µs–1 ms, yielding
//! or not) kept cores from the threads still asleep and made them 3–6 ms late, where sleeping
//! to the deadline lets the kernel wake each one within a few hundred µs (BENCHMARKS.md). The
//! thread also asks for real-time priority (SCHED_FIFO 1) so that a busy host does not make it
//! wait for a core at the deadline; without the privilege it runs as an ordinary thread. Right
//! after the store it yields, so that another flip thread waiting for the core stores before
//! this one reports and exits (eight agents on two cores: skew p50 ~370 → ~70 µs, BENCHMARKS.md).
//! Beside it a second thread, of ordinary priority, records the flip on disk as soon as it is
//! stored ([`Provisional`]), without waiting for the controller to hear of it: an agent killed
//! after the flip comes back on the release it flipped to. The deadline can be moved
//! while the thread sleeps (a fresher clock estimate), and the flip cancelled until it fires;
//! exactly one of "fired" and "cancelled" wins. The store is [`make_active`], kept out of line
//! as the probe point of the benchmark's outside measurement.
#![allow(clippy::disallowed_methods)] // I/O shell: the flip thread sleeps and spins against the monotonic clock

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;
use tracing::warn;

use super::messages::Active;
use super::release::Release;
use super::state::Provisional;

/// How long before the deadline the thread stops sleeping and spins: about the default timer
/// slack (50 µs), which a sleep may overrun by anyway.
pub const SPIN: Duration = Duration::from_micros(50);
/// While more than this is left, the spinning thread yields its core between two looks at the
/// clock (with [`SPIN`] this short it never does; kept for a longer `SPIN`).
pub const YIELD_UNTIL: Duration = Duration::from_micros(50);
/// Longest single sleep, so that a moved deadline or a cancel is seen promptly.
pub const SLICE: Duration = Duration::from_millis(20);

const ARMED: u8 = 0;
const FIRED: u8 = 1;
const CANCELLED: u8 = 2;

/// What the flip thread does next (pure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Sleep this long, then look again.
    Sleep(Duration),
    /// Spin until the deadline.
    Spin,
    /// The deadline has come: store the pointer.
    Fire,
}

/// The next step at `now` for `deadline`.
pub fn step(now: Instant, deadline: Instant) -> Step {
    if now >= deadline {
        return Step::Fire;
    }
    let left = deadline - now;
    if left <= SPIN {
        Step::Spin
    } else {
        Step::Sleep((left - SPIN).min(SLICE))
    }
}

/// A flip that fired: which release, and the monotonic instant right after the store.
#[derive(Debug)]
pub struct Fired<T> {
    /// The release now active.
    pub release: Arc<Release>,
    /// When the pointer was stored.
    pub at: Instant,
    /// What the caller attached (which schedule it was for).
    pub tag: T,
}

struct Ctl {
    state: AtomicU8,
    base: Instant,
    /// The deadline, ns after `base`.
    deadline_ns: AtomicU64,
}

impl Ctl {
    fn deadline(&self) -> Instant {
        self.base + Duration::from_nanos(self.deadline_ns.load(Ordering::Acquire))
    }
    fn set_deadline(&self, at: Instant) {
        let ns = at.saturating_duration_since(self.base).as_nanos();
        self.deadline_ns
            .store(u64::try_from(ns).unwrap_or(u64::MAX), Ordering::Release);
    }
}

/// A flip waiting on its thread.
pub struct Armed {
    ctl: Arc<Ctl>,
}

impl Armed {
    /// Moves the deadline (effective unless the thread is already spinning or has fired).
    pub fn retarget(&self, deadline: Instant) {
        self.ctl.set_deadline(deadline);
    }

    /// The current deadline.
    pub fn deadline(&self) -> Instant {
        self.ctl.deadline()
    }

    /// Cancels the flip; `false` if it has already fired (its [`Fired`] is on its way).
    pub fn cancel(&self) -> bool {
        match self
            .ctl
            .state
            .compare_exchange(ARMED, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(state) => state == CANCELLED,
        }
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        // An abandoned handle must not leave a flip behind.
        self.cancel();
    }
}

/// Starts a thread that stores `release` into `active` at `deadline` (at once if it has
/// passed) and sends a [`Fired`] on `done`; `record`, when given, then records the flip on a
/// thread of its own.
pub fn arm<T: Send + 'static>(
    deadline: Instant,
    active: Active,
    release: Arc<Release>,
    tag: T,
    done: UnboundedSender<Fired<T>>,
    record: Option<Provisional>,
) -> Armed {
    let base = Instant::now().min(deadline);
    let ctl = Arc::new(Ctl {
        state: AtomicU8::new(ARMED),
        base,
        deadline_ns: AtomicU64::new(0),
    });
    ctl.set_deadline(deadline);
    let recorder = record.and_then(recorder);
    let thread_ctl = ctl.clone();
    let spawned = std::thread::Builder::new()
        .name("lockstep-flip".into())
        .spawn(move || {
            if let Some(fired) = run(&thread_ctl, &active, release, tag) {
                if let Some(r) = recorder {
                    let _ = r.send(fired.release.clone());
                }
                let _ = done.send(fired);
            }
        });
    if let Err(e) = spawned {
        // Without a thread there is no flip: leave it cancelled so the caller can see it.
        warn!(error = %e, "cannot start the flip thread");
        ctl.state.store(CANCELLED, Ordering::Release);
    }
    Armed { ctl }
}

/// The flip's recorder: a thread of ordinary priority that waits for the release the flip
/// stored and records it (the real-time part ends at the store: a disk write there would hold
/// its core from the flip threads of other agents on the host). It ends, recording nothing,
/// when the flip is cancelled (the sender dropped). `None` if it cannot start: then the
/// controller's record is the only one, as before there was a recorder.
fn recorder(record: Provisional) -> Option<std::sync::mpsc::SyncSender<Arc<Release>>> {
    let (hand_over, flipped) = std::sync::mpsc::sync_channel::<Arc<Release>>(1);
    let spawned = std::thread::Builder::new()
        .name("lockstep-record".into())
        .spawn(move || {
            if let Ok(release) = flipped.recv() {
                if let Err(e) = record.record(&release) {
                    warn!(error = %e, "cannot record the flip; the controller's record follows");
                }
            }
        });
    match spawned {
        Ok(_) => Some(hand_over),
        Err(e) => {
            warn!(error = %e, "cannot start the flip's recorder; the controller records it");
            None
        }
    }
}

/// Asks for the lowest real-time priority (SCHED_FIFO 1) for the calling thread, above every
/// ordinary thread, so that at the deadline it gets a core at once even when other threads
/// (other agents on the host, its own request workers) keep every core busy. It sleeps until
/// the deadline and then runs a few µs, so it cannot starve anyone. Without the privilege
/// (`CAP_SYS_NICE`, or `LimitRTPRIO=` in the unit) it stays an ordinary thread.
fn prefer_this_thread() -> bool {
    use thread_priority::unix::{
        set_thread_priority_and_policy, thread_native_id, RealtimeThreadSchedulePolicy,
        ThreadSchedulePolicy,
    };
    set_thread_priority_and_policy(
        thread_native_id(),
        thread_priority::ThreadPriority::Min,
        ThreadSchedulePolicy::Realtime(RealtimeThreadSchedulePolicy::Fifo),
    )
    .is_ok()
}

/// Waits for the deadline and stores; the flip that fired, `None` if it was cancelled.
fn run<T>(ctl: &Ctl, active: &Active, release: Arc<Release>, tag: T) -> Option<Fired<T>> {
    if !prefer_this_thread() {
        tracing::debug!("flip thread runs at normal priority (no real-time privilege)");
    }
    loop {
        if ctl.state.load(Ordering::Acquire) != ARMED {
            return None;
        }
        match step(Instant::now(), ctl.deadline()) {
            Step::Sleep(d) => std::thread::sleep(d),
            Step::Spin | Step::Fire => break,
        }
    }
    // The last instants: the deadline is fixed from here.
    let deadline = ctl.deadline();
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if deadline - now > YIELD_UNTIL {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    if ctl
        .state
        .compare_exchange(ARMED, FIRED, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return None;
    }
    make_active(active, &release);
    let at = Instant::now();
    // At real-time priority, let any other flip thread waiting for this core (other agents on
    // the same host, flipping at the same instant) store before this one reports and exits.
    std::thread::yield_now();
    Some(Fired { release, at, tag })
}

/// The flip itself: one atomic store. A function of its own, never inlined, so that a uprobe on
/// its symbol timestamps each agent's flip on the kernel's clock from outside the agent
/// (`bench/sync.sh`, whose agents run under libfaketime, measures the skew that way).
#[inline(never)]
fn make_active(active: &Active, release: &Arc<Release>) {
    active.store(Some(release.clone()));
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use arc_swap::ArcSwapOption;

    use super::*;
    use crate::sync::manifest::Manifest;
    use crate::sync::store::FsStore;

    #[test]
    fn steps_sleep_in_slices_then_spin_then_fire() {
        let t = Instant::now();
        let d = t + Duration::from_secs(1);
        assert_eq!(step(t, d), Step::Sleep(SLICE));
        assert_eq!(
            step(d - Duration::from_millis(5), d),
            Step::Sleep(Duration::from_millis(5) - SPIN)
        );
        assert_eq!(step(d - SPIN, d), Step::Spin);
        assert_eq!(step(d - Duration::from_micros(1), d), Step::Spin);
        assert_eq!(step(d, d), Step::Fire);
        assert_eq!(step(d + Duration::from_secs(1), d), Step::Fire);
    }

    fn empty_release() -> Arc<Release> {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FsStore::open(dir.path()).unwrap());
        Arc::new(Release::build(&store, Manifest::new(BTreeMap::new()).unwrap()).unwrap())
    }

    /// The pointer changes at the deadline, never before it (checked from outside, loosely).
    #[tokio::test]
    async fn fires_at_the_deadline_and_not_before() {
        let active: Active = Arc::new(ArcSwapOption::empty());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let release = empty_release();
        let deadline = Instant::now() + Duration::from_millis(80);
        let armed = arm(deadline, active.clone(), release, 7u32, tx, None);
        tokio::time::sleep(Duration::from_millis(40)).await;
        // Seen flipped, then the clock read still before the deadline: the flip was early. (On
        // a loaded machine this look may come after the deadline; `fired.at` below still
        // proves the flip was not early.)
        let flipped = active.load().is_some();
        assert!(
            !(flipped && Instant::now() < deadline),
            "flipped before its deadline"
        );
        let fired = rx.recv().await.unwrap();
        assert!(fired.at >= deadline);
        assert!(active.load().is_some());
        assert_eq!(fired.tag, 7);
        // Generous: a loaded CI machine may be late, never early.
        assert!(fired.at - deadline < Duration::from_millis(500));
        assert!(!armed.cancel(), "a fired flip cannot be cancelled");
    }

    #[tokio::test]
    async fn a_cancelled_or_dropped_flip_never_fires_and_a_moved_one_follows() {
        let active: Active = Arc::new(ArcSwapOption::empty());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let soon = Instant::now() + Duration::from_millis(30);
        let a = arm(
            soon,
            active.clone(),
            empty_release(),
            1u32,
            tx.clone(),
            None,
        );
        assert!(a.cancel());
        drop(arm(
            soon,
            active.clone(),
            empty_release(),
            2u32,
            tx.clone(),
            None,
        ));
        let b = arm(
            Instant::now() + Duration::from_secs(3600),
            active.clone(),
            empty_release(),
            3u32,
            tx,
            None,
        );
        let moved = Instant::now() + Duration::from_millis(60);
        b.retarget(moved);
        let fired = rx.recv().await.unwrap();
        assert_eq!(fired.tag, 3, "only the moved flip fires");
        assert!(fired.at >= moved);
        // Past deadlines fire at once.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _late = arm(
            Instant::now() - Duration::from_secs(5),
            active,
            empty_release(),
            4u32,
            tx,
            None,
        );
        assert_eq!(rx.recv().await.unwrap().tag, 4);
    }

    /// A flip records itself as soon as it is stored, without the controller (which this test
    /// never runs): an agent killed at any moment after the store, however busy its controller
    /// or its disk worker, comes back on the release it flipped to. A cancelled flip records
    /// nothing.
    #[tokio::test]
    async fn a_flip_records_itself_and_a_cancelled_one_records_nothing() {
        use crate::agent::state::{AgentState, StateFile, STATE_NAME};
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FsStore::open(dir.path()).unwrap());
        let active: Active = Arc::new(ArcSwapOption::empty());
        let file = Arc::new(StateFile::new(store.clone(), active.clone()));
        let release =
            Arc::new(Release::build(&store, Manifest::new(BTreeMap::new()).unwrap()).unwrap());
        let provisional = || {
            Some(Provisional {
                file: file.clone(),
                state: AgentState {
                    active: Some(release.id()),
                    ..AgentState::default()
                },
            })
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let cancelled = arm(
            Instant::now() + Duration::from_secs(3600),
            active.clone(),
            release.clone(),
            1u32,
            tx.clone(),
            provisional(),
        );
        assert!(cancelled.cancel());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(store.read_state::<AgentState>(STATE_NAME).unwrap(), None);
        let _armed = arm(
            Instant::now() + Duration::from_millis(20),
            active,
            release.clone(),
            2u32,
            tx,
            provisional(),
        );
        assert_eq!(rx.recv().await.unwrap().tag, 2);
        // The Fired is not processed: nothing else writes the state.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let on_disk: Option<AgentState> = store.read_state(STATE_NAME).unwrap();
            if on_disk.and_then(|s| s.active) == Some(release.id()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the flip recorded itself within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
