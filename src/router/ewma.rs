//! Peak-EWMA of one backend's response latency, the cost signal of the `p2c_ewma` policy.
//!
//! Pure: opens no sockets and never reads the clock; every call takes the caller's `now`, so
//! tests drive time explicitly. Between samples the value decays towards zero, which lets a
//! backend that stopped receiving traffic (because it looked slow) be retried eventually.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Peak-EWMA of response latency (as in linkerd/finagle): decays towards new samples with
/// time constant `decay`; a sample higher than the current value is taken at once (peak
/// sensitivity), so a backend that turns slow is avoided immediately, not after many samples.
#[derive(Debug)]
pub struct Ewma {
    decay: Duration,
    /// (value in ns, time of the last observation); the two must change together.
    state: Mutex<(f64, Option<Instant>)>,
}

impl Ewma {
    /// An empty average with time constant `decay` (after `decay` without samples the value
    /// has fallen to 1/e; a zero `decay` keeps only the latest sample).
    pub fn new(decay: Duration) -> Ewma {
        Ewma {
            decay,
            state: Mutex::new((0.0, None)),
        }
    }

    /// Records one response time observed at `now`.
    ///
    /// With `w = exp(-elapsed / decay)` since the previous observation, the new value is
    /// `current * w + rtt * (1 - w)` where `current` is [`Ewma::get_at`]`(now)`, unless
    /// `rtt` exceeds `current`, in which case it becomes `rtt` outright. Observations that
    /// arrive out of order (an earlier `now` than the last one) count as simultaneous.
    pub fn observe(&self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (value, stamp) = *state;
        let next = match stamp {
            None => rtt,
            Some(stamp) => {
                let w = self.weight(now.saturating_duration_since(stamp));
                let current = value * w;
                if rtt > current {
                    rtt
                } else {
                    current + rtt * (1.0 - w)
                }
            }
        };
        let stamp = stamp.map_or(now, |s| s.max(now));
        *state = (next, Some(stamp));
    }

    /// Value as of `now` in nanoseconds (decayed since the last observation); 0.0 if nothing
    /// observed.
    pub fn get_at(&self, now: Instant) -> f64 {
        let (value, stamp) = *self.state.lock().unwrap_or_else(|e| e.into_inner());
        match stamp {
            None => 0.0,
            Some(stamp) => value * self.weight(now.saturating_duration_since(stamp)),
        }
    }

    /// Share of the old value that survives `elapsed`.
    fn weight(&self, elapsed: Duration) -> f64 {
        if elapsed.is_zero() {
            1.0
        } else if self.decay.is_zero() {
            0.0
        } else {
            (-elapsed.as_secs_f64() / self.decay.as_secs_f64()).exp()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: f64 = 1e6;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn nothing_observed_reads_zero() {
        let e = Ewma::new(ms(10_000));
        assert_eq!(e.get_at(Instant::now()), 0.0);
    }

    #[test]
    fn first_sample_is_taken_as_is() {
        let e = Ewma::new(ms(10_000));
        let t0 = Instant::now();
        e.observe(ms(30), t0);
        assert_eq!(e.get_at(t0), 30.0 * MS);
    }

    #[test]
    fn decays_toward_lower_samples_gradually() {
        let e = Ewma::new(ms(1_000));
        let t0 = Instant::now();
        e.observe(ms(100), t0);
        let mut prev = e.get_at(t0);
        for step in 1..=20 {
            let t = t0 + ms(100 * step);
            e.observe(ms(10), t);
            let v = e.get_at(t);
            assert!(v < prev && v > 10.0 * MS, "step {step}: {v} after {prev}");
            prev = v;
        }
        // Two seconds of 10 ms samples at tau = 1 s: close to 10 ms, far from 100 ms.
        assert!(prev < 25.0 * MS, "{prev}");
        // One step's exact arithmetic: w = e^-0.1.
        let e = Ewma::new(ms(1_000));
        e.observe(ms(100), t0);
        e.observe(ms(10), t0 + ms(100));
        let w = (-0.1f64).exp();
        let expected = 100.0 * MS * w + 10.0 * MS * (1.0 - w);
        assert!((e.get_at(t0 + ms(100)) - expected).abs() < 1.0);
    }

    #[test]
    fn peak_is_taken_at_once() {
        let e = Ewma::new(ms(10_000));
        let t0 = Instant::now();
        e.observe(ms(10), t0);
        e.observe(ms(500), t0 + ms(1));
        assert_eq!(e.get_at(t0 + ms(1)), 500.0 * MS);
    }

    #[test]
    fn value_decays_while_idle() {
        let e = Ewma::new(ms(1_000));
        let t0 = Instant::now();
        e.observe(ms(100), t0);
        let v = e.get_at(t0 + ms(1_000));
        assert!((v - 100.0 * MS / std::f64::consts::E).abs() < 1.0, "{v}");
        assert!(e.get_at(t0 + ms(60_000)) < 1.0);
    }

    #[test]
    fn out_of_order_and_zero_decay_stay_sane() {
        let t0 = Instant::now();
        let e = Ewma::new(ms(1_000));
        e.observe(ms(50), t0 + ms(500));
        e.observe(ms(10), t0); // earlier than the last stamp: no decay, no panic
        assert_eq!(e.get_at(t0 + ms(500)), 50.0 * MS);
        let z = Ewma::new(Duration::ZERO);
        z.observe(ms(50), t0);
        z.observe(ms(10), t0 + ms(1));
        assert_eq!(z.get_at(t0 + ms(1)), 10.0 * MS);
        assert!(!z.get_at(t0).is_nan());
    }
}
