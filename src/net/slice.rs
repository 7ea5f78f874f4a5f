//! Short slices for a thread that shares a core with the data path: after a slice of
//! continuous work it steps off the core for as long again before going on.
//!
//! Why: the control plane's thread runs at a lower priority than the proxy's workers
//! (`CONTROL_NICE`), which bounds its share of a contended core but not how long it keeps the
//! core once it has it: the kernel takes a running task off only at a tick (4 ms at `HZ=250`),
//! so a burst of control-plane work (thousands of connections to the admin or sync listener
//! opened or timed out at once) held the proxy off its core for 4 ms at a time, every ~40 ms
//! (seen with `perf sched timehist`; the proxy's p99 doubled, BENCHMARKS.md). Offering the
//! core (`sched_yield`) is not enough: the fair scheduler hands it straight back to a thread
//! still owed its share. Sleeping is: the thread blocks, so the proxy runs, and the control
//! plane's holds last about a slice. The price is that a burst of control-plane work takes
//! twice as long (at most half a core while it lasts), whether or not anyone else wanted the
//! core; its steady work, which waits between events, is not slowed.
//!
//! A thread opts in with [`limit_this_thread`]; its runtime calls [`unparked`] each time it
//! wakes from waiting (`on_thread_unpark`), which starts a new slice; [`sliced`] futures and
//! the accept loop call [`checkpoint`]. On any other thread a checkpoint is one thread-local
//! read.
#![allow(clippy::disallowed_methods)] // I/O shell: the slice is measured on the clock

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::time::{Duration, Instant};

thread_local! {
    /// This thread's slice and when its current one began; `None`: not limited.
    static SLICE: Cell<Option<(Duration, Instant)>> = const { Cell::new(None) };
}

/// From now on, this thread steps off the core at a [`checkpoint`] once it has worked `slice`
/// without waiting.
pub fn limit_this_thread(slice: Duration) {
    SLICE.with(|s| s.set(Some((slice, Instant::now()))));
}

/// The thread woke from waiting: its slice starts over (a runtime's `on_thread_unpark`).
pub fn unparked() {
    SLICE.with(|s| {
        if let Some((slice, _)) = s.get() {
            s.set(Some((slice, Instant::now())));
        }
    });
}

/// Steps off the core for a slice if this thread is limited and its slice is spent; whether
/// it did.
pub fn checkpoint() -> bool {
    SLICE.with(|s| {
        let Some((slice, began)) = s.get() else {
            return false;
        };
        let now = Instant::now();
        if now.duration_since(began) < slice {
            return false;
        }
        std::thread::sleep(slice);
        s.set(Some((slice, Instant::now())));
        true
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

    /// Burns `d` of CPU on this thread.
    fn spin(d: Duration) {
        let t = Instant::now();
        while t.elapsed() < d {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn an_unlimited_thread_never_yields() {
        std::thread::spawn(|| {
            spin(Duration::from_millis(2));
            assert!(!checkpoint());
            unparked();
            assert!(!checkpoint());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_limited_thread_yields_once_its_slice_is_spent_and_starts_over() {
        std::thread::spawn(|| {
            limit_this_thread(Duration::from_millis(50));
            assert!(!checkpoint(), "the slice just began");
            spin(Duration::from_millis(60));
            assert!(checkpoint(), "spent: steps off");
            assert!(!checkpoint(), "a new slice after the pause");
            spin(Duration::from_millis(60));
            unparked();
            assert!(!checkpoint(), "waking from a wait starts a new slice");
        })
        .join()
        .unwrap();
    }
}
