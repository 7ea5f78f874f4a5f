//! Power of two choices over peak-EWMA latency (as in linkerd and finagle).
//!
//! Pure: opens no sockets and reads no clock; the two candidates are derived from the
//! caller's random number and their cost from the caller's [`Load`]. Comparing two random
//! backends instead of scanning for the global best keeps picks O(1) and avoids every proxy
//! thread herding onto the same "best" backend at once.

use super::Load;

/// Random draws tried before falling back to a scan; enough that a pool with half its
/// backends out almost never scans.
const DRAWS: usize = 6;

/// Picks the cheaper of two distinct eligible backends; with only one eligible, that one.
///
/// Cost is `latency_ewma * (in_flight + 1)`. An unknown latency (0.0, or anything not a
/// positive finite number) is priced at the other candidate's latency, so a new backend
/// competes as an average peer and gets tried; when both are unknown, in-flight counts alone
/// decide. Exact ties go to the first drawn candidate, which is itself random.
pub(super) fn pick(
    n: usize,
    load: &dyn Load,
    eligible: &dyn Fn(usize) -> bool,
    random: u64,
) -> Option<usize> {
    match n {
        0 => return None,
        1 => return eligible(0).then_some(0),
        _ => {}
    }
    let mut rng = SplitMix(random);
    let mut first: Option<usize> = None;
    for _ in 0..DRAWS {
        match first {
            None => {
                let i = rng.below(n);
                if eligible(i) {
                    first = Some(i);
                }
            }
            Some(a) => {
                // Draw among the other n-1 so the pair is always distinct.
                let mut b = rng.below(n - 1);
                if b >= a {
                    b += 1;
                }
                if eligible(b) {
                    return Some(cheaper(load, a, b));
                }
            }
        }
    }
    // Few eligible backends: scan once from a random offset. The pair found this way is not
    // uniformly random, which is acceptable for a pool that is mostly out of service.
    let offset = rng.below(n);
    let mut rest = (0..n)
        .map(|k| (offset + k) % n)
        .filter(|&i| Some(i) != first && eligible(i));
    let a = match first {
        Some(a) => a,
        None => rest.next()?,
    };
    Some(match rest.next() {
        Some(b) => cheaper(load, a, b),
        None => a,
    })
}

/// `a` unless `b` is strictly cheaper.
fn cheaper(load: &dyn Load, a: usize, b: usize) -> usize {
    let known = |v: f64| (v.is_finite() && v > 0.0).then_some(v);
    let (la, lb) = (known(load.latency_ewma(a)), known(load.latency_ewma(b)));
    let fallback = match (la, lb) {
        (Some(x), Some(y)) => x.min(y),
        (Some(x), None) | (None, Some(x)) => x,
        (None, None) => 1.0,
    };
    // u64 -> f64 rounds for huge counts; the comparison only needs to be roughly right there.
    let cost =
        |lat: Option<f64>, i: usize| lat.unwrap_or(fallback) * (load.in_flight(i) as f64 + 1.0);
    if cost(lb, b) < cost(la, a) {
        b
    } else {
        a
    }
}

/// splitmix64: turns one caller-supplied random u64 into as many well-mixed draws as needed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-enough index below `n` (Lemire's multiply-shift; uses the high bits).
    fn below(&mut self, n: usize) -> usize {
        let wide = (u128::from(self.next()) * n as u128) >> 64;
        // wide < n, so it always fits.
        usize::try_from(wide).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::FixedLoad;
    use super::*;

    const MS: f64 = 1e6;

    fn counts(n: usize, load: &FixedLoad, eligible: &dyn Fn(usize) -> bool) -> Vec<usize> {
        let mut c = vec![0; n];
        for r in 0..10_000u64 {
            c[pick(n, load, eligible, r.wrapping_mul(0x2545_f491_4f6c_dd1d)).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn slow_backend_loses_every_pair_it_is_in() {
        // Distinct pairs: the slow one is always paired with a fast one, so it never wins.
        let load = FixedLoad {
            in_flight: vec![0; 3],
            ewma: vec![MS, 100.0 * MS, MS],
        };
        let c = counts(3, &load, &|_| true);
        assert_eq!(c[1], 0, "{c:?}");
        assert!(c[0] > 4_000 && c[2] > 4_000, "{c:?}");
    }

    #[test]
    fn in_flight_counts_matter() {
        // Fast but busy (1 ms × 10) costs more than slower but idle (2 ms × 1).
        let load = FixedLoad {
            in_flight: vec![9, 0],
            ewma: vec![MS, 2.0 * MS],
        };
        assert_eq!(counts(2, &load, &|_| true), [0, 10_000]);
        // Equal latency: the loaded one never wins a pair.
        let load = FixedLoad {
            in_flight: vec![0, 5, 0],
            ewma: vec![MS; 3],
        };
        assert_eq!(counts(3, &load, &|_| true)[1], 0);
    }

    #[test]
    fn only_eligible_members_are_picked() {
        let load = FixedLoad {
            in_flight: vec![0; 3],
            ewma: vec![MS, 50.0 * MS, 50.0 * MS],
        };
        let c = counts(3, &load, &|i| i != 0);
        assert_eq!(c[0], 0);
        // Sparse eligibility exercises the scan fallback.
        let load = FixedLoad::default();
        assert_eq!(counts(100, &load, &|i| i == 77)[77], 10_000);
        assert_eq!(pick(100, &load, &|_| false, 1), None);
        assert_eq!(pick(1, &load, &|_| false, 1), None);
        assert_eq!(pick(1, &load, &|_| true, 1), Some(0));
        assert_eq!(pick(0, &load, &|_| true, 1), None);
    }

    #[test]
    fn unknown_latency_backend_still_gets_tried() {
        let load = FixedLoad {
            in_flight: vec![0, 0],
            ewma: vec![5.0 * MS, 0.0],
        };
        let c = counts(2, &load, &|_| true);
        assert!(c[1] > 3_000 && c[0] > 3_000, "{c:?}");
        // Nonsense values are treated as unknown rather than as free.
        let load = FixedLoad {
            in_flight: vec![0, 3],
            ewma: vec![5.0 * MS, f64::NAN],
        };
        assert_eq!(counts(2, &load, &|_| true)[1], 0);
    }

    #[test]
    fn equal_backends_share_the_traffic() {
        let load = FixedLoad {
            in_flight: vec![1; 4],
            ewma: vec![MS; 4],
        };
        let c = counts(4, &load, &|_| true);
        assert!(c.iter().all(|&x| x > 1_500), "{c:?}");
    }
}
