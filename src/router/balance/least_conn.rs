//! Least connections: the eligible backend with the fewest in-flight requests per unit of
//! weight.
//!
//! Pure: opens no sockets and reads no clock; load comes from the caller's [`Load`] and the
//! tie-break offset from the caller's random number. Stateless, so it needs no locking.

use super::Load;

/// Scans every backend once, starting at an offset derived from `random` so that equally
/// loaded backends (the normal case on a quiet pool) share the traffic instead of all of it
/// going to index 0.
///
/// `a` beats `b` when `in_flight_a / weight_a < in_flight_b / weight_b`, compared as
/// `in_flight_a * weight_b < in_flight_b * weight_a` in u128 so it is exact and cannot
/// overflow. Weight-0 backends are skipped (division by zero would make them look idle).
pub(super) fn pick(
    weights: &[u32],
    load: &dyn Load,
    eligible: &dyn Fn(usize) -> bool,
    random: u64,
) -> Option<usize> {
    let n = weights.len();
    if n == 0 {
        return None;
    }
    // usize fits in u64 on every supported target; fall back to 0 rather than panic.
    let offset = usize::try_from(random % u64::try_from(n).unwrap_or(u64::MAX)).unwrap_or(0);
    let mut best: Option<(usize, u128, u128)> = None;
    for k in 0..n {
        let i = (offset + k) % n;
        let w = weights.get(i).copied().unwrap_or(0);
        if w == 0 || !eligible(i) {
            continue;
        }
        let (load_i, w) = (u128::from(load.in_flight(i)), u128::from(w));
        if best.is_none_or(|(_, bl, bw)| load_i * bw < bl * w) {
            best = Some((i, load_i, w));
        }
    }
    best.map(|(i, _, _)| i)
}

#[cfg(test)]
mod tests {
    use super::super::FixedLoad;
    use super::*;

    #[test]
    fn picks_the_least_loaded() {
        let load = FixedLoad {
            in_flight: vec![4, 1, 3],
            ..Default::default()
        };
        for r in 0..50 {
            assert_eq!(pick(&[1, 1, 1], &load, &|_| true, r), Some(1));
        }
    }

    #[test]
    fn respects_weights() {
        // 2 in flight on weight 3 (0.67 each) is lighter than 1 on weight 1.
        let load = FixedLoad {
            in_flight: vec![2, 1],
            ..Default::default()
        };
        assert_eq!(pick(&[3, 1], &load, &|_| true, 0), Some(0));
        assert_eq!(pick(&[3, 1], &load, &|_| true, 1), Some(0));
        // ...but 4 on weight 3 (1.33) is heavier.
        let load = FixedLoad {
            in_flight: vec![4, 1],
            ..Default::default()
        };
        assert_eq!(pick(&[3, 1], &load, &|_| true, 0), Some(1));
    }

    #[test]
    fn ties_are_spread_over_all_members() {
        let load = FixedLoad {
            in_flight: vec![2; 4],
            ..Default::default()
        };
        let mut counts = [0; 4];
        for r in 0..400u64 {
            counts[pick(
                &[1; 4],
                &load,
                &|_| true,
                super::super::hash_key(&r.to_le_bytes()),
            )
            .unwrap()] += 1;
        }
        assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
    }

    #[test]
    fn only_eligible_members_are_picked() {
        let load = FixedLoad {
            in_flight: vec![0, 9, 5],
            ..Default::default()
        };
        assert_eq!(pick(&[1, 1, 1], &load, &|i| i != 0, 3), Some(2));
        assert_eq!(pick(&[1, 1, 1], &load, &|_| false, 3), None);
        assert_eq!(pick(&[], &load, &|_| true, 3), None);
    }

    #[test]
    fn huge_counts_and_weights_compare_exactly() {
        let load = FixedLoad {
            in_flight: vec![u64::MAX, u64::MAX - 1],
            ..Default::default()
        };
        assert_eq!(pick(&[u32::MAX, u32::MAX], &load, &|_| true, 0), Some(1));
    }
}
