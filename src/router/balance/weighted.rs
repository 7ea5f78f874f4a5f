//! Smooth weighted round robin, exactly as nginx does it.
//!
//! Pure: opens no sockets and reads no clock. Each pick adds every eligible backend's weight
//! to its running "current weight", takes the largest, and subtracts the round's total from
//! the winner. Over a full cycle every backend gets exactly its weight's share, and heavy
//! backends are interleaved with light ones (5,1,1 gives a a b a c a a, not a a a a a b c),
//! so no backend sees a burst.

use std::sync::Mutex;

/// Weights plus the running current weights, which every pick reads and writes together.
#[derive(Debug)]
pub(super) struct Weighted {
    weights: Vec<u32>,
    current: Mutex<Vec<i64>>,
}

impl Weighted {
    /// Balancer over these per-backend weights; all current weights start at 0.
    pub(super) fn new(weights: &[u32]) -> Self {
        Weighted {
            weights: weights.to_vec(),
            current: Mutex::new(vec![0; weights.len()]),
        }
    }

    /// One smooth-WRR step over the eligible, non-zero-weight backends.
    ///
    /// Ineligible backends neither gain nor lose current weight, so a backend coming back
    /// from an outage does not receive a burst for the turns it missed. Ties go to the lowest
    /// index, as in nginx.
    pub(super) fn pick(&self, eligible: &dyn Fn(usize) -> bool) -> Option<usize> {
        // A panic elsewhere while holding the lock cannot leave the weights invalid (any i64
        // vector is a valid state), so a poisoned lock is simply reused.
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let mut total: i64 = 0;
        let mut best: Option<(usize, i64)> = None;
        for (i, (&w, cw)) in self.weights.iter().zip(current.iter_mut()).enumerate() {
            if w == 0 || !eligible(i) {
                continue;
            }
            let w = i64::from(w);
            *cw = cw.saturating_add(w);
            total = total.saturating_add(w);
            if best.is_none_or(|(_, b)| *cw > b) {
                best = Some((i, *cw));
            }
        }
        let (winner, _) = best?;
        if let Some(cw) = current.get_mut(winner) {
            *cw = cw.saturating_sub(total);
        }
        Some(winner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(
        w: &Weighted,
        n: usize,
        picks: usize,
        eligible: &dyn Fn(usize) -> bool,
    ) -> Vec<usize> {
        let mut c = vec![0; n];
        for _ in 0..picks {
            c[w.pick(eligible).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn three_to_one_split_is_within_two_percent() {
        let w = Weighted::new(&[3, 1]);
        let c = counts(&w, 2, 10_000, &|_| true);
        assert!((7_300..=7_700).contains(&c[0]), "{c:?}");
        assert!((2_300..=2_700).contains(&c[1]), "{c:?}");
    }

    #[test]
    fn sequence_is_smooth_like_nginx() {
        let w = Weighted::new(&[5, 1, 1]);
        let seq: String = (0..14)
            .map(|_| ["a", "b", "c"][w.pick(&|_| true).unwrap()])
            .collect();
        assert_eq!(seq, "aabacaaaabacaa");
    }

    #[test]
    fn zero_weight_member_is_never_picked() {
        let w = Weighted::new(&[0, 1, 2]);
        let c = counts(&w, 3, 3_000, &|_| true);
        assert_eq!(c, [0, 1_000, 2_000]);
        assert_eq!(Weighted::new(&[0, 0]).pick(&|_| true), None);
    }

    #[test]
    fn ineligible_members_are_skipped_and_do_not_accumulate() {
        let w = Weighted::new(&[1, 1]);
        assert_eq!(counts(&w, 2, 10, &|i| i == 0), [10, 0]);
        // Back in rotation, b alternates with a instead of catching up on missed turns.
        let seq: Vec<_> = (0..6).map(|_| w.pick(&|_| true).unwrap()).collect();
        assert_eq!(seq, [0, 1, 0, 1, 0, 1]);
        assert_eq!(w.pick(&|_| false), None);
    }

    #[test]
    fn extreme_weights_do_not_overflow() {
        let w = Weighted::new(&[u32::MAX, u32::MAX, 1]);
        let c = counts(&w, 3, 1_000, &|_| true);
        assert_eq!(c[0] + c[1] + c[2], 1_000);
        assert!(c[0] >= 499 && c[1] >= 499, "{c:?}");
    }
}
