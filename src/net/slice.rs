//! Short slices for a thread that shares a core with the data path: after a slice of
//! continuous work, while the core is contended, it steps off the core for as long again.
//!
//! Why: the control plane's thread runs at a lower priority than the proxy's workers
//! (`CONTROL_NICE`), which bounds its share of a contended core but not how long it keeps the
//! core once it has it: the kernel takes a running task off only at a tick (4 ms at `HZ=250`),
//! so a burst of control-plane work (thousands of connections to the admin or sync listener
//! opened or timed out at once) held the proxy off its core for 4 ms at a time, every ~40 ms
//! (seen with `perf sched timehist`; the proxy's p99 doubled, BENCHMARKS.md). Offering the
//! core (`sched_yield`) is not enough: the fair scheduler hands it straight back to a thread
//! still owed its share. Sleeping is: the thread blocks, so the proxy runs, and the control
//! plane's holds last about a slice.
//!
//! Sleeping costs the control plane half its speed, which is wasted when nobody else wants the
//! core (100 agents fetching a blob from an otherwise idle hub took 10 s instead of 5.8): so it
//! pauses only while the core is contended, which the kernel tells: the thread, ready to run,
//! waited for a core ([`CONTENDED_WAIT`] or more since the last check: the run delay in
//! `/proc/thread-self/schedstat`) within the last [`CONTENTION_MEMORY`]. (Involuntary context
//! switches were tried first: a thread that pauses itself is rarely switched out, so the
//! contention was forgotten while it lasted.) The decision is [`Slicer`], pure; this module's
//! functions are its shell. Where the kernel does not say, the thread never pauses.
//!
//! Even so, a pause stops the whole thread: checkpoints sit only where floods arrive, the
//! accept loop and the admin listener's connections, not in the hub's, whose blob transfers
//! they halved (100 agents fetching a 64 MiB blob: 10.6 s against 5.7, BENCHMARKS.md).
//!
//! A thread opts in with [`limit_this_thread`]; its runtime calls [`parked`] and [`unparked`]
//! each time it waits for events and wakes (`on_thread_park`, `on_thread_unpark`), which
//! starts a new slice; [`sliced`] futures and the accept loop call [`checkpoint`]. On any other
//! thread a checkpoint is one thread-local read.
//!
//! The same run delay tells how long a wake-up waited for the core ([`Wake`], [`queued`]): at
//! the control plane's lower priority a busy host keeps the hub's thread waiting up to
//! milliseconds after a request arrives, all of it on the way in, which biased every agent's
//! clock estimate under load by as much (skew 0.9–1.3 ms, BENCHMARKS.md); the hub's clock
//! exchange reports that wait so the agents can take it out.
#![allow(clippy::disallowed_methods)] // I/O shell: the slice is measured on the clock

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::future::{poll_fn, Future};
use std::os::unix::fs::FileExt;
use std::pin::pin;
use std::time::{Duration, Instant};

/// How long a wait for the core marks it as contended.
pub const CONTENTION_MEMORY: Duration = Duration::from_millis(100);
/// A wait for the core this long (in total since the last check) is contention; shorter is
/// a wake-up's ordinary latency.
pub const CONTENDED_WAIT: Duration = Duration::from_micros(50);

/// When a thread on slices pauses: the pure core of this module.
#[derive(Debug, Clone, Copy)]
pub struct Slicer {
    slice: Duration,
    began: Instant,
    waited: Duration,
    contended_until: Option<Instant>,
}

impl Slicer {
    /// Slices of `slice`, the first beginning `now`; `waited`: how long the thread has waited
    /// for a core so far.
    pub fn new(slice: Duration, now: Instant, waited: Duration) -> Slicer {
        Slicer {
            slice,
            began: now,
            waited,
            contended_until: None,
        }
    }

    /// The thread woke from waiting at `now`: a new slice.
    pub fn unparked(&mut self, now: Instant) {
        self.began = now;
    }

    /// Whether the slice begun last is spent at `now` (then the caller reads the wait and
    /// calls [`Slicer::spent`]).
    pub fn is_spent(&self, now: Instant) -> bool {
        now.duration_since(self.began) >= self.slice
    }

    /// The slice is spent at `now` and the thread has waited `waited` for a core so far: how
    /// long to pause (the core is contended), if at all. A new slice begins at the end of the
    /// pause.
    pub fn spent(&mut self, now: Instant, waited: Duration) -> Option<Duration> {
        if waited.saturating_sub(self.waited) >= CONTENDED_WAIT {
            self.contended_until = Some(now + CONTENTION_MEMORY);
        }
        self.waited = waited;
        let pause = self
            .contended_until
            .is_some_and(|until| now < until)
            .then_some(self.slice);
        self.began = now + pause.unwrap_or_default();
        pause
    }
}

/// How long after the thread woke its burst of work still counts as the wake-up's: a request
/// handled this soon is taken to be what woke the thread, and to have waited for the core as
/// long as the thread did.
pub const WAKE_FRESH: Duration = Duration::from_micros(500);

/// How the thread's current burst of work began (pure): when it ran again after waiting for
/// events, and how long it had waited for a core in all (its run delay) when it parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wake {
    /// When the thread ran again.
    pub at: Instant,
    /// Its run delay when it parked.
    pub waited_at_park: Duration,
}

impl Wake {
    /// How long work that woke the thread has waited for its core, seen `now` with the run
    /// delay at `waited`: all the thread's waiting since it parked (woken but not yet on a core,
    /// or taken off it since), while the burst is fresh ([`WAKE_FRESH`]); later, work may have
    /// arrived during the burst and the wait says nothing about it (zero).
    pub fn queued(&self, now: Instant, waited: Duration) -> Duration {
        if now.saturating_duration_since(self.at) <= WAKE_FRESH {
            waited.saturating_sub(self.waited_at_park)
        } else {
            Duration::ZERO
        }
    }
}

thread_local! {
    /// This thread's slices; `None`: not limited.
    static SLICE: Cell<Option<Slicer>> = const { Cell::new(None) };
    /// The run delay when the thread last parked, then when it ran again: how its current burst
    /// began.
    static PARKED_WAITED: Cell<Duration> = const { Cell::new(Duration::ZERO) };
    static WAKE: Cell<Option<Wake>> = const { Cell::new(None) };
    /// This thread's `/proc/thread-self/schedstat`, open while it is limited.
    static SCHEDSTAT: RefCell<Option<File>> = const { RefCell::new(None) };
}

/// How long this thread has waited for a core so far (the second field of its schedstat: run
/// delay, in nanoseconds); zero when the kernel will not say.
fn waited() -> Duration {
    SCHEDSTAT.with(|f| {
        let f = f.borrow();
        let Some(f) = f.as_ref() else {
            return Duration::ZERO;
        };
        let mut buf = [0u8; 96];
        let n = f.read_at(&mut buf, 0).unwrap_or(0);
        std::str::from_utf8(&buf[..n])
            .ok()
            .and_then(|s| s.split_ascii_whitespace().nth(1))
            .and_then(|ns| ns.parse().ok())
            .map_or(Duration::ZERO, Duration::from_nanos)
    })
}

/// From now on, this thread steps off the core at a [`checkpoint`] once it has worked `slice`
/// without waiting, while its core is contended.
pub fn limit_this_thread(slice: Duration) {
    SCHEDSTAT.with(|f| *f.borrow_mut() = File::open("/proc/thread-self/schedstat").ok());
    let s = Slicer::new(slice, Instant::now(), waited());
    SLICE.with(|c| c.set(Some(s)));
}

/// The thread is about to wait for events (a runtime's `on_thread_park`): its run delay so
/// far, from which [`queued`] tells how long the wake-up waited for a core. (One read of
/// schedstat per park; the wake-up itself reads only the clock.)
pub fn parked() {
    if SLICE.with(Cell::get).is_some() {
        PARKED_WAITED.with(|c| c.set(waited()));
    }
}

/// The thread woke from waiting (a runtime's `on_thread_unpark`): its slice starts over, and
/// [`queued`] counts from here.
pub fn unparked() {
    SLICE.with(|c| {
        if let Some(mut s) = c.get() {
            let now = Instant::now();
            s.unparked(now);
            c.set(Some(s));
            let waited_at_park = PARKED_WAITED.with(Cell::get);
            WAKE.with(|w| {
                w.set(Some(Wake {
                    at: now,
                    waited_at_park,
                }))
            });
        }
    });
}

/// How long what this thread is handling now has waited for the thread's core
/// ([`Wake::queued`]); zero on a thread that is not limited. The hub's clock exchange reports
/// it, so that an agent can tell the hub's wait from the network's.
pub fn queued() -> Duration {
    match WAKE.with(Cell::get) {
        Some(w) if SLICE.with(Cell::get).is_some() => w.queued(Instant::now(), waited()),
        _ => Duration::ZERO,
    }
}

/// Steps off the core for a slice if this thread is limited, its slice is spent and its core
/// contended; whether it did.
pub fn checkpoint() -> bool {
    SLICE.with(|c| {
        let Some(mut s) = c.get() else {
            return false;
        };
        let now = Instant::now();
        if !s.is_spent(now) {
            return false;
        }
        let pause = s.spent(now, waited());
        c.set(Some(s));
        if let Some(d) = pause {
            std::thread::sleep(d);
        }
        pause.is_some()
    })
}

/// `f`, with a [`checkpoint`] before each of its polls.
pub async fn sliced<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    poll_fn(|cx| {
        checkpoint();
        f.as_mut().poll(cx)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn no_pause_before_the_slice_is_spent_nor_on_a_core_nobody_else_wants() {
        let t0 = Instant::now();
        let mut s = Slicer::new(MS, t0, 5 * MS);
        assert!(!s.is_spent(t0 + MS / 2));
        assert!(s.is_spent(t0 + MS));
        let ordinary = 5 * MS + CONTENDED_WAIT / 2;
        assert_eq!(
            s.spent(t0 + MS, ordinary),
            None,
            "no wait for the core: run on"
        );
        assert!(!s.is_spent(t0 + MS + MS / 2), "a new slice began");
    }

    #[test]
    fn a_wait_for_the_core_makes_it_pause_each_slice_for_a_while() {
        let t0 = Instant::now();
        let mut s = Slicer::new(MS, t0, 5 * MS);
        assert_eq!(s.spent(t0 + MS, 6 * MS), Some(MS), "waited 1 ms: contended");
        // The next slice begins after the pause.
        assert!(!s.is_spent(t0 + 2 * MS + MS / 2));
        assert!(s.is_spent(t0 + 3 * MS));
        // No new wait, but within the memory of the last: still pauses.
        assert_eq!(s.spent(t0 + 3 * MS, 6 * MS), Some(MS));
        // Past the memory with no new wait: runs on.
        let later = t0 + MS + CONTENTION_MEMORY;
        assert_eq!(s.spent(later, 6 * MS), None);
        // Small waits do not add up across checks; a new wait renews it.
        assert_eq!(s.spent(later + MS, 6 * MS + CONTENDED_WAIT / 2), None);
        assert_eq!(s.spent(later + 2 * MS, 7 * MS), Some(MS));
    }

    #[test]
    fn waking_from_a_wait_starts_a_new_slice() {
        let t0 = Instant::now();
        let mut s = Slicer::new(MS, t0, Duration::ZERO);
        s.unparked(t0 + 10 * MS);
        assert!(!s.is_spent(t0 + 10 * MS + MS / 2));
        assert!(s.is_spent(t0 + 11 * MS));
    }

    #[test]
    fn work_that_woke_the_thread_waited_as_long_as_it_did_while_the_burst_is_fresh() {
        let t0 = Instant::now();
        let w = Wake {
            at: t0,
            waited_at_park: 40 * MS,
        };
        assert_eq!(w.queued(t0, 43 * MS), 3 * MS);
        assert_eq!(w.queued(t0 + WAKE_FRESH, 43 * MS), 3 * MS);
        assert_eq!(
            w.queued(t0 + WAKE_FRESH + Duration::from_micros(1), 43 * MS),
            Duration::ZERO,
            "later work may have come during the burst"
        );
        assert_eq!(w.queued(t0, 39 * MS), Duration::ZERO, "never negative");
    }

    #[test]
    fn a_limited_thread_knows_how_long_its_wake_up_waited_for_a_core() {
        std::thread::spawn(|| {
            unparked();
            assert_eq!(queued(), Duration::ZERO, "not limited: nothing known");
            limit_this_thread(Duration::from_secs(3600));
            parked();
            std::thread::sleep(MS);
            unparked();
            let wake = WAKE.with(Cell::get).expect("a wake-up noted");
            assert_eq!(wake.waited_at_park, PARKED_WAITED.with(Cell::get));
            // At most all the waiting the thread has done since it parked.
            assert!(queued() <= waited().saturating_sub(wake.waited_at_park));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_kernel_says_how_long_a_limited_thread_waited() {
        std::thread::spawn(|| {
            limit_this_thread(Duration::from_secs(3600));
            // Readable here (the run delay may still be zero on an idle core).
            assert!(SCHEDSTAT.with(|f| f.borrow().is_some()));
            let t = Instant::now();
            while t.elapsed() < 20 * MS {
                std::hint::spin_loop();
            }
            let _ = waited();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn an_unlimited_thread_never_pauses() {
        std::thread::spawn(|| {
            let t = Instant::now();
            while t.elapsed() < 2 * MS {
                std::hint::spin_loop();
            }
            assert!(!checkpoint());
            unparked();
            assert!(!checkpoint());
        })
        .join()
        .unwrap();
    }
}
