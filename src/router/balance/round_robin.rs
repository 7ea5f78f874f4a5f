//! Round robin: each eligible backend in turn.
//!
//! Pure: opens no sockets and reads no clock; the only state is a shared atomic cursor, so
//! concurrent picks never block each other.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A lock-free rotating cursor over `n` backends.
#[derive(Debug)]
pub(super) struct RoundRobin {
    n: usize,
    cursor: AtomicUsize,
}

impl RoundRobin {
    /// A cursor over `n` backends, starting at backend 0.
    pub(super) fn new(n: usize) -> Self {
        RoundRobin {
            n,
            cursor: AtomicUsize::new(0),
        }
    }

    /// Next eligible backend after the cursor, visiting each backend at most once.
    pub(super) fn pick(&self, eligible: &dyn Fn(usize) -> bool) -> Option<usize> {
        if self.n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let found = (0..self.n).find(|&k| eligible(start.wrapping_add(k) % self.n))?;
        if found > 0 {
            // Move the cursor past the skipped backends too; otherwise the member after an
            // ineligible one would get its turn as well as its own (a double share).
            self.cursor.fetch_add(found, Ordering::Relaxed);
        }
        Some(start.wrapping_add(found) % self.n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_evenly_in_order() {
        let rr = RoundRobin::new(3);
        let seq: Vec<_> = (0..6).map(|_| rr.pick(&|_| true)).collect();
        assert_eq!(seq, [0, 1, 2, 0, 1, 2].map(Some));
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[rr.pick(&|_| true).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn skips_ineligible_and_shares_evenly_among_the_rest() {
        let rr = RoundRobin::new(3);
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[rr.pick(&|i| i != 1).unwrap()] += 1;
        }
        assert_eq!(counts, [150, 0, 150]);
    }

    #[test]
    fn all_ineligible_gives_none_after_one_pass() {
        let rr = RoundRobin::new(4);
        let asked = std::cell::Cell::new(0);
        let none = |_: usize| {
            asked.set(asked.get() + 1);
            false
        };
        assert_eq!(rr.pick(&none), None);
        assert_eq!(asked.get(), 4);
        assert_eq!(RoundRobin::new(0).pick(&|_| true), None);
    }
}
