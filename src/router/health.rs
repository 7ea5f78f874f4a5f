//! Backend health state machines: active checks (rise/fall hysteresis) and passive ejection
//! (consecutive failed requests, exponential back-off).
//!
//! Pure: opens no sockets and never reads the clock; the prober and the proxy feed in
//! outcomes and their own `now`. Keeping both machines free of I/O makes every threshold
//! testable to the exact request.

use std::time::{Duration, Instant};

/// Active-check state: `rise` consecutive successes bring a down backend up, `fall`
/// consecutive failures take an up one down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveHealth {
    up: bool,
    /// Consecutive results contradicting `up` (successes while down, failures while up).
    streak: u32,
}

impl ActiveHealth {
    /// Backends start up (so a fresh config serves at once; the first failed checks take
    /// them out).
    pub const fn new() -> Self {
        ActiveHealth {
            up: true,
            streak: 0,
        }
    }

    /// Whether active checks currently consider the backend serviceable.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Records one check result; returns true when the up/down state changed.
    ///
    /// A result agreeing with the current state resets the streak, so only consecutive
    /// contrary results count. `rise` or `fall` of 0 is treated as 1 (a threshold of zero
    /// results would flip the state without evidence).
    pub fn observe(&mut self, ok: bool, rise: u32, fall: u32) -> bool {
        if ok == self.up {
            self.streak = 0;
            return false;
        }
        self.streak = self.streak.saturating_add(1);
        let threshold = if self.up { fall } else { rise }.max(1);
        if self.streak >= threshold {
            self.up = !self.up;
            self.streak = 0;
            true
        } else {
            false
        }
    }
}

impl Default for ActiveHealth {
    fn default() -> Self {
        Self::new()
    }
}

/// Passive ejection policy (from config): after `failures` consecutive failed requests
/// (connect failure or 5xx), eject for `base`, doubling with each consecutive ejection up to
/// `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassivePolicy {
    /// Consecutive failures that trigger an ejection; 0 disables passive ejection.
    pub failures: u32,
    /// Length of the first ejection.
    pub base: Duration,
    /// Ceiling for the doubled ejection length (it also caps `base`).
    pub max: Duration,
}

/// Passive state of one backend.
#[derive(Debug, Clone, Default)]
pub struct Ejection {
    /// Consecutive failed requests recorded outside an ejection.
    failures: u32,
    /// Ejections since the backend last served a request successfully.
    ejections: u32,
    /// End of the latest ejection (may lie in the past).
    until: Option<Instant>,
}

impl Ejection {
    /// Records one proxied request outcome at `now`; returns true when the backend just
    /// became ejected.
    ///
    /// Exact rule:
    /// - `policy.failures == 0` disables passive ejection: the state is cleared (ending any
    ///   ejection at once, so turning the feature off takes effect immediately).
    /// - Outcomes recorded while ejected are ignored: they belong to requests that were in
    ///   flight when the ejection began and say nothing new.
    /// - A success outside an ejection resets both the failure streak and the ejection count:
    ///   the backend has served again, so the next ejection starts over at `base`.
    /// - A failure outside an ejection extends the streak; reaching `policy.failures` ejects
    ///   for `base × 2^(ejections so far)`, capped at `max`, and restarts the streak. So a
    ///   backend that fails its first `failures` requests after each ejection ends is
    ///   ejected for `base`, `2 base`, `4 base`, ... up to `max`.
    pub fn record(&mut self, ok: bool, now: Instant, policy: &PassivePolicy) -> bool {
        if policy.failures == 0 {
            *self = Ejection::default();
            return false;
        }
        if self.is_ejected(now) {
            return false;
        }
        if ok {
            self.failures = 0;
            self.ejections = 0;
            return false;
        }
        self.failures = self.failures.saturating_add(1);
        if self.failures < policy.failures {
            return false;
        }
        let doublings = self.ejections.min(31);
        let length = policy
            .base
            .checked_mul(1 << doublings)
            .unwrap_or(policy.max)
            .min(policy.max);
        self.failures = 0;
        self.ejections = self.ejections.saturating_add(1);
        self.until = Some(add_saturating(now, length));
        true
    }

    /// True while ejected at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }

    /// When the latest ejection ends, if any; it may already lie in the past, so compare
    /// with `now` (or use [`Ejection::is_ejected`]) before treating the backend as out.
    pub fn ejected_until(&self) -> Option<Instant> {
        self.until
    }
}

/// `now + d`, or the latest representable instant not beyond it (Instant addition panics
/// on overflow and config durations are user input).
fn add_saturating(now: Instant, mut d: Duration) -> Instant {
    loop {
        if let Some(t) = now.checked_add(d) {
            return t;
        }
        d /= 2;
        if d.is_zero() {
            return now;
        }
    }
}

/// The share of its normal traffic a backend takes `elapsed` after it came back, with a slow
/// start of `ramp`: linear from 5 % to all of it (never 0, so a pool of one still serves).
pub fn warm_share(elapsed: Duration, ramp: Duration) -> f64 {
    if ramp.is_zero() || elapsed >= ramp {
        return 1.0;
    }
    (elapsed.as_secs_f64() / ramp.as_secs_f64()).clamp(0.05, 1.0)
}

/// Whether a pick drawing `random` admits a backend taking `share` of its traffic.
pub fn admits(share: f64, random: u64) -> bool {
    // The top 53 bits as a uniform fraction in [0, 1).
    share >= 1.0 || ((random >> 11) as f64 / (1u64 << 53) as f64) < share
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn starts_up() {
        assert!(ActiveHealth::new().is_up());
        assert_eq!(ActiveHealth::default(), ActiveHealth::new());
    }

    #[test]
    fn falls_exactly_at_fall_and_rises_exactly_at_rise() {
        let mut h = ActiveHealth::new();
        assert!(!h.observe(false, 2, 3));
        assert!(!h.observe(false, 2, 3));
        assert!(h.is_up());
        assert!(h.observe(false, 2, 3));
        assert!(!h.is_up());
        assert!(!h.observe(true, 2, 3));
        assert!(!h.is_up());
        assert!(h.observe(true, 2, 3));
        assert!(h.is_up());
    }

    #[test]
    fn interrupted_streak_starts_over() {
        let mut h = ActiveHealth::new();
        for _ in 0..10 {
            h.observe(false, 2, 3);
            h.observe(false, 2, 3);
            h.observe(true, 2, 3); // a single failure (or two) never takes it down with fall=3
        }
        assert!(h.is_up());
        h.observe(false, 2, 3);
        h.observe(false, 2, 3);
        h.observe(false, 2, 3);
        assert!(!h.is_up());
        h.observe(true, 2, 3);
        h.observe(false, 2, 3);
        h.observe(true, 2, 3);
        assert!(!h.is_up(), "rise needs consecutive successes");
    }

    #[test]
    fn zero_thresholds_act_as_one() {
        let mut h = ActiveHealth::new();
        assert!(h.observe(false, 0, 0));
        assert!(h.observe(true, 0, 0));
        assert!(!h.observe(true, 0, 0));
    }

    fn policy(failures: u32) -> PassivePolicy {
        PassivePolicy {
            failures,
            base: 10 * S,
            max: 35 * S,
        }
    }

    #[test]
    fn ejects_after_n_consecutive_failures() {
        let (p, t0) = (policy(3), Instant::now());
        let mut e = Ejection::default();
        assert!(!e.record(false, t0, &p));
        assert!(!e.record(false, t0, &p));
        assert!(!e.is_ejected(t0));
        assert!(e.record(false, t0, &p));
        assert!(e.is_ejected(t0));
        assert_eq!(e.ejected_until(), Some(t0 + 10 * S));
    }

    #[test]
    fn a_success_breaks_the_failure_streak() {
        let (p, t0) = (policy(3), Instant::now());
        let mut e = Ejection::default();
        for _ in 0..10 {
            e.record(false, t0, &p);
            e.record(false, t0, &p);
            e.record(true, t0, &p);
        }
        assert!(!e.is_ejected(t0));
        assert_eq!(e.ejected_until(), None);
    }

    #[test]
    fn back_off_doubles_up_to_max_and_resets_after_serving() {
        let p = policy(2);
        let mut e = Ejection::default();
        let mut now = Instant::now();
        let mut lengths = Vec::new();
        for _ in 0..4 {
            e.record(false, now, &p);
            assert!(e.record(false, now, &p));
            let until = e.ejected_until().unwrap();
            lengths.push(until - now);
            now = until;
        }
        assert_eq!(lengths, [10 * S, 20 * S, 35 * S, 35 * S]);
        // Served successfully once: the next ejection is back to base.
        e.record(true, now, &p);
        e.record(false, now, &p);
        assert!(e.record(false, now, &p));
        assert_eq!(e.ejected_until(), Some(now + 10 * S));
    }

    #[test]
    fn not_ejected_from_until_on_and_outcomes_while_ejected_are_ignored() {
        let (p, t0) = (policy(1), Instant::now());
        let mut e = Ejection::default();
        assert!(e.record(false, t0, &p));
        let until = e.ejected_until().unwrap();
        // Late failures from requests already in flight neither extend nor re-eject.
        assert!(!e.record(false, t0 + S, &p));
        assert_eq!(e.ejected_until(), Some(until));
        assert!(e.is_ejected(until - Duration::from_nanos(1)));
        assert!(!e.is_ejected(until));
        assert!(!e.is_ejected(until + S));
    }

    #[test]
    fn zero_failures_disables_ejection() {
        let t0 = Instant::now();
        let mut e = Ejection::default();
        for _ in 0..100 {
            assert!(!e.record(false, t0, &policy(0)));
        }
        assert!(!e.is_ejected(t0));
        // Disabling also ends an ejection already under way.
        assert!(e.record(false, t0, &policy(1)));
        e.record(false, t0, &policy(0));
        assert!(!e.is_ejected(t0));
    }

    #[test]
    fn absurd_durations_do_not_panic() {
        let t0 = Instant::now();
        let p = PassivePolicy {
            failures: 1,
            base: Duration::MAX,
            max: Duration::MAX,
        };
        let mut e = Ejection::default();
        assert!(e.record(false, t0, &p));
        assert!(e.is_ejected(t0 + 1_000_000 * S));
    }

    #[test]
    fn a_backend_that_comes_back_ramps_up_linearly_and_never_to_zero() {
        let ramp = Duration::from_secs(10);
        assert_eq!(warm_share(Duration::ZERO, ramp), 0.05);
        assert!((warm_share(Duration::from_secs(5), ramp) - 0.5).abs() < 1e-9);
        assert_eq!(warm_share(Duration::from_secs(10), ramp), 1.0);
        assert_eq!(warm_share(Duration::from_secs(99), ramp), 1.0);
        assert_eq!(warm_share(Duration::ZERO, Duration::ZERO), 1.0);
        // Over many draws, the admitted fraction is the share.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let admitted = (0..100_000)
            .filter(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                admits(0.3, x)
            })
            .count();
        assert!((29_000..31_000).contains(&admitted), "{admitted}");
        assert!(admits(1.0, u64::MAX));
    }
}
