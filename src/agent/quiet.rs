//! When a changed path goes to `detect`: the watcher's debounce policy, pure (time is passed
//! in, nothing is read or sent here).
//!
//! - A path leaves `window` after its **last** event, so a file still being written is not
//!   read half-way (each new event for it starts its wait again) — unless that last event says
//!   the change is complete (**settled**): the writer closed the file, the file was renamed into
//!   place (how editors and rsync save) or removed. Then it leaves at once: nobody is writing
//!   it, and waiting would only add latency. A later event for it starts a wait again.
//! - A path leaves exactly when due: the watcher wakes at that instant (no periodic tick that
//!   would add up to one more window).
//! - Batches leave at most every `window / 4`: during a burst, the paths that went quiet
//!   meanwhile leave together, a few scopes per window rather than one per file.
//! - A full rescan asked for (events lost, watcher errors, the directory gone) leaves `window`
//!   after the last such request and covers every path due by then; paths still settling stay.
//! - At most [`MAX_PENDING`] paths wait: beyond that they are replaced by one full rescan, so
//!   memory does not grow with the size of a burst.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::detect::Scope;

/// Most distinct paths waiting to go quiet; more become one full rescan.
pub const MAX_PENDING: usize = 65_536;

/// Paths waiting for their window to pass.
#[derive(Debug)]
pub struct Quiet {
    window: Duration,
    /// Least time between two batches.
    gap: Duration,
    /// Path → when it may leave (its last event + `window`).
    pending: HashMap<String, Instant>,
    /// A full rescan waits, and when it may leave.
    all: Option<Instant>,
    last_batch: Option<Instant>,
}

impl Quiet {
    /// Nothing pending; paths leave `window` after their last event.
    pub fn new(window: Duration) -> Quiet {
        Quiet {
            window,
            gap: window / 4,
            pending: HashMap::new(),
            all: None,
            last_batch: None,
        }
    }

    /// Takes what one event (or a full-rescan request) says changed, at `now`; `settled`: the
    /// event says the change is complete (see the module docs).
    pub fn note(&mut self, scope: Scope, settled: bool, now: Instant) {
        let due = if settled { now } else { now + self.window };
        match scope {
            Scope::All => self.all = Some(due),
            Scope::Paths(paths) => {
                for p in paths {
                    self.pending.insert(p, due);
                }
                if self.pending.len() > MAX_PENDING {
                    self.pending.clear();
                    self.all = Some(due);
                }
            }
        }
    }

    /// When the next batch may leave (`None`: nothing waits).
    pub fn wake_at(&self) -> Option<Instant> {
        let first = self.pending.values().copied().chain(self.all).min()?;
        Some(match self.last_batch {
            Some(t) => first.max(t + self.gap),
            None => first,
        })
    }

    /// The batch due at `now`, if any: [`Scope::All`] when a full rescan is due (it covers the
    /// paths due too), else the paths that went quiet.
    pub fn release(&mut self, now: Instant) -> Option<Scope> {
        if self.wake_at().is_none_or(|t| t > now) {
            return None;
        }
        let due: BTreeSet<String> = self
            .pending
            .extract_if(|_, at| *at <= now)
            .map(|(path, _)| path)
            .collect();
        let all = self.all.is_some_and(|t| t <= now);
        if all {
            self.all = None;
        }
        if !all && due.is_empty() {
            return None;
        }
        self.last_batch = Some(now);
        Some(if all { Scope::All } else { Scope::Paths(due) })
    }

    /// How many paths wait.
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_millis(40);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn paths(list: &[&str]) -> Scope {
        Scope::Paths(list.iter().map(|p| p.to_string()).collect())
    }

    #[test]
    fn a_lone_edit_leaves_exactly_one_window_after_it() {
        let t0 = Instant::now();
        let mut q = Quiet::new(W);
        assert_eq!(q.wake_at(), None);
        q.note(paths(&["a.html"]), false, t0);
        assert_eq!(q.wake_at(), Some(t0 + W));
        assert_eq!(q.release(t0 + W - ms(1)), None);
        assert_eq!(q.release(t0 + W), Some(paths(&["a.html"])));
        assert_eq!(q.wake_at(), None);
        // The next lone edit, long after, is not held back by the gap.
        q.note(paths(&["b.html"]), false, t0 + ms(500));
        assert_eq!(q.wake_at(), Some(t0 + ms(500) + W));
    }

    #[test]
    fn a_file_still_being_written_waits_for_its_last_write() {
        let t0 = Instant::now();
        let mut q = Quiet::new(W);
        for i in 0..10 {
            q.note(paths(&["big.bin"]), false, t0 + ms(10 * i));
        }
        assert_eq!(q.release(t0 + ms(90) + W - ms(1)), None);
        assert_eq!(q.wake_at(), Some(t0 + ms(90) + W));
        assert_eq!(q.release(t0 + ms(90) + W), Some(paths(&["big.bin"])));
    }

    #[test]
    fn a_closed_or_renamed_file_leaves_at_once_and_a_new_write_waits_again() {
        let t0 = Instant::now();
        let mut q = Quiet::new(W);
        // open(O_TRUNC), write: wait; close after writing: settled.
        q.note(paths(&["page.html"]), false, t0);
        q.note(paths(&["page.html"]), true, t0 + ms(1));
        assert_eq!(q.wake_at(), Some(t0 + ms(1)));
        assert_eq!(q.release(t0 + ms(1)), Some(paths(&["page.html"])));
        // Closed, then opened and written again: it waits a window after that write.
        q.note(paths(&["log.txt"]), true, t0 + ms(100));
        q.note(paths(&["log.txt"]), false, t0 + ms(100));
        assert_eq!(q.release(t0 + ms(100)), None);
        assert_eq!(q.wake_at(), Some(t0 + ms(100) + W));
    }

    #[test]
    fn a_burst_leaves_in_few_batches_each_path_once_quiet() {
        let t0 = Instant::now();
        let mut q = Quiet::new(W);
        // 400 files, one every 0.25 ms (100 ms of writes), then the watcher runs its loop.
        let mut now = t0;
        let mut batches = Vec::new();
        for i in 0..400u64 {
            now = t0 + Duration::from_micros(250 * i);
            while let Some(at) = q.wake_at().filter(|at| *at <= now) {
                batches.push((at, q.release(at).unwrap()));
            }
            q.note(paths(&[&format!("f{i}")]), false, now);
        }
        while let Some(at) = q.wake_at() {
            batches.push((at, q.release(at).unwrap()));
        }
        let mut seen = BTreeSet::new();
        for w in batches.windows(2) {
            assert!(
                w[1].0 - w[0].0 >= W / 4,
                "batches closer than a quarter window"
            );
        }
        for (_, b) in &batches {
            let Scope::Paths(p) = b else { panic!("{b:?}") };
            for f in p {
                assert!(seen.insert(f.clone()), "{f} twice");
            }
        }
        assert_eq!(seen.len(), 400);
        // 100 ms of writes and one window: about (100 + 40) / 10 batches.
        assert!(batches.len() <= 15, "{} batches", batches.len());
        let _ = now;
    }

    #[test]
    fn a_full_rescan_covers_the_paths_due_and_leaves_the_settling_ones() {
        let t0 = Instant::now();
        let mut q = Quiet::new(W);
        q.note(paths(&["a"]), false, t0);
        q.note(Scope::All, false, t0 + ms(5));
        q.note(paths(&["b"]), false, t0 + ms(30));
        assert_eq!(q.release(t0 + W), Some(paths(&["a"])));
        // Due at 45 ms, but a quarter window after the last batch.
        assert_eq!(q.wake_at(), Some(t0 + W + W / 4));
        assert_eq!(q.release(t0 + ms(5) + W), None);
        assert_eq!(q.release(t0 + W + W / 4), Some(Scope::All));
        assert_eq!(q.pending(), 1, "b is still settling");
        assert_eq!(q.wake_at(), Some(t0 + ms(30) + W));
        assert_eq!(q.release(t0 + ms(30) + W), Some(paths(&["b"])));
        assert_eq!(q.wake_at(), None);
    }

    #[test]
    fn too_many_waiting_paths_become_one_full_rescan() {
        let t0 = Instant::now();
        let mut q = Quiet::new(W);
        let many: BTreeSet<String> = (0..=MAX_PENDING).map(|i| format!("f{i}")).collect();
        q.note(Scope::Paths(many), false, t0);
        assert_eq!(q.pending(), 0);
        assert_eq!(q.release(t0 + W), Some(Scope::All));
        assert_eq!(q.wake_at(), None);
    }
}
