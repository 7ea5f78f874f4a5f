//! The agent's view of the hub's clock: NTP-style offset estimation
//! from request/response samples, and the conversion of a hub-clock activation time into a
//! **monotonic** deadline.
//!
//! Pure: every reading of a clock is an argument. The agent's "local time" is its monotonic clock
//! anchored once to its wall clock ([`Anchor`]), so a wall-clock step after the anchor moves
//! neither the offset nor a deadline.

use std::time::{Duration, Instant};

/// One request/response exchange with the hub, in microseconds: `t1` local send, `t2` hub
/// receive, `t3` hub send, `t4` local receive (local times on the anchored clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Local time the request left.
    pub t1: i64,
    /// Hub time the request arrived.
    pub t2: i64,
    /// Hub time the response left.
    pub t3: i64,
    /// Local time the response arrived.
    pub t4: i64,
    /// How long the request had waited for the hub's thread before `t2` was taken, by the
    /// hub's account (µs; 0 when it does not know).
    pub queued: i64,
}

impl Sample {
    /// θ = ((t2′ − t1) + (t3 − t4)) / 2: hub time minus local time, exact when the two legs of
    /// the exchange take equally long. t2′ is `t2` less the hub's wait for its own core
    /// ([`Sample::hub_wait`]): a wait on the way in only, which would otherwise count as half a
    /// longer first leg (a hub thread kept from its core for 1 ms put every agent 0.5 ms early).
    pub fn offset(&self) -> i64 {
        let up = i128::from(self.t2) - i128::from(self.hub_wait()) - i128::from(self.t1);
        let down = i128::from(self.t3) - i128::from(self.t4);
        ((up + down) / 2).clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
    }

    /// The hub's account of its wait, bounded by the exchange itself: never negative, never
    /// more than the delay (a wait longer than the whole round trip outside the hub cannot be).
    pub fn hub_wait(&self) -> i64 {
        self.queued.clamp(0, self.delay())
    }

    /// δ = (t4 − t1) − (t3 − t2): the round trip without the hub's own time.
    pub fn delay(&self) -> i64 {
        let rtt = i128::from(self.t4) - i128::from(self.t1);
        let hold = i128::from(self.t3) - i128::from(self.t2);
        (rtt - hold).clamp(0, i128::from(i64::MAX)) as i64
    }

    /// Whether the sample can be true: the hub answered after it received, and held the
    /// request no longer than the whole round trip. Anything else (a clock stepped inside the
    /// hub, a forged answer) says nothing about the offset.
    pub fn is_plausible(&self) -> bool {
        self.t3 >= self.t2 && self.t4 >= self.t1 && (self.t3 - self.t2) <= (self.t4 - self.t1)
    }
}

/// The estimated offset of the hub's clock from the agent's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offset {
    /// θ in µs: hub time = local time + θ.
    pub offset_us: i64,
    /// ε in µs: |true θ − θ| ≤ ε, whatever the split of the delay between the two legs, given
    /// the hub's timestamps and its account of its wait (the exchange alone, without that
    /// account, allows ε plus half the wait).
    pub error_us: i64,
}

/// The estimate from the sample with the lowest delay (the one least disturbed by queueing;
/// NTP's clock filter does the same), chosen on the whole delay so that a sample is never
/// preferred for the hub's account of its wait. `None` when there are no samples.
pub fn estimate(samples: &[Sample]) -> Option<Offset> {
    let best = samples
        .iter()
        .filter(|s| s.is_plausible())
        .min_by_key(|s| s.delay())?;
    Some(Offset {
        offset_us: best.offset(),
        // The true offset lies within half the delay of the estimate; round up.
        error_us: (best.delay() + 1) / 2,
    })
}

/// A simultaneous reading of the agent's wall and monotonic clocks: local time from then on is
/// `wall_us + (now − mono)`.
#[derive(Debug, Clone, Copy)]
pub struct Anchor {
    /// Wall clock, µs since the Unix epoch.
    pub wall_us: i64,
    /// Monotonic clock at the same moment.
    pub mono: Instant,
}

/// The wall clock, µs since the Unix epoch (0 before it): the one place lockstep reads it.
/// Logic takes the value as an argument; only shells call this.
#[allow(clippy::disallowed_methods)] // the process's one reader of the wall clock
pub fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Anchor {
    /// Reads both clocks now (the one place this module's callers take real time from).
    #[allow(clippy::disallowed_methods)] // the agent's one reading of both clocks
    pub fn now() -> Anchor {
        Anchor {
            wall_us: wall_us() as i64,
            mono: Instant::now(),
        }
    }

    /// Local time (µs) at monotonic instant `at`.
    pub fn local_us(&self, at: Instant) -> i64 {
        if at >= self.mono {
            self.wall_us + (at - self.mono).as_micros() as i64
        } else {
            self.wall_us - (self.mono - at).as_micros() as i64
        }
    }

    /// The monotonic instant at which local time reads `local_us`.
    pub fn instant_at(&self, local_us: i64) -> Instant {
        let delta = local_us.saturating_sub(self.wall_us);
        if delta >= 0 {
            self.mono + Duration::from_micros(delta as u64)
        } else {
            self.mono
                .checked_sub(Duration::from_micros(delta.unsigned_abs()))
                .unwrap_or(self.mono)
        }
    }
}

/// The monotonic instant at which the hub's clock reads `hub_us`: local time `hub_us − θ`.
pub fn deadline(hub_us: i64, offset: Offset, anchor: &Anchor) -> Instant {
    anchor.instant_at(hub_us.saturating_sub(offset.offset_us))
}

/// The hub's time (µs) at monotonic instant `at`.
pub fn hub_time(at: Instant, offset: Offset, anchor: &Anchor) -> i64 {
    anchor.local_us(at).saturating_add(offset.offset_us)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exchange with a hub whose clock is `theta` ahead, legs of `up` and `down` µs, and
    /// `hold` µs spent inside the hub.
    fn exchange(t1: i64, theta: i64, up: i64, hold: i64, down: i64) -> Sample {
        let t2 = t1 + up + theta;
        let t3 = t2 + hold;
        Sample {
            t1,
            t2,
            t3,
            t4: t3 - theta + down,
            queued: 0,
        }
    }

    #[test]
    fn symmetric_delays_give_the_exact_offset() {
        let hour = 3_600_000_000;
        for theta in [0, hour, -hour, 17] {
            let s = exchange(1_000_000, theta, 150, 20, 150);
            assert_eq!(s.offset(), theta);
            assert_eq!(s.delay(), 300);
        }
    }

    #[test]
    fn asymmetric_delays_stay_within_the_error_bound() {
        let theta = -3_600_000_000;
        for (up, down) in [(10, 990), (990, 10), (0, 500), (300, 0)] {
            let s = exchange(5_000, theta, up, 40, down);
            let e = estimate(&[s]).unwrap();
            assert!(
                (e.offset_us - theta).abs() <= e.error_us,
                "{up}/{down}: {e:?}"
            );
            assert_eq!(e.offset_us - theta, (up - down) / 2);
        }
    }

    #[test]
    fn the_lowest_delay_sample_wins() {
        let theta = 42_000;
        let samples = [
            exchange(0, theta, 5_000, 10, 100),  // queued on the way up
            exchange(10_000, theta, 60, 10, 80), // the clean one
            exchange(20_000, theta, 100, 10, 9_000),
        ];
        let e = estimate(&samples).unwrap();
        assert_eq!(e.offset_us, theta - 10);
        assert_eq!(e.error_us, 70);
        assert_eq!(estimate(&[]), None);
        // Impossible samples (the hub answering before it received, or holding the request
        // longer than the round trip) are ignored, however small their delay looks.
        let forged = Sample {
            t1: 0,
            t2: 500,
            t3: 400,
            t4: 50,
            queued: 0,
        };
        let held = Sample {
            t1: 0,
            t2: 10,
            t3: 900,
            t4: 100,
            queued: 0,
        };
        assert_eq!(estimate(&[forged, held]), None);
        assert_eq!(
            estimate(&[forged, samples[1]]).unwrap().offset_us,
            theta - 10
        );
        let huge = Sample {
            t1: i64::MIN,
            t2: i64::MAX,
            t3: i64::MAX,
            t4: i64::MAX,
            queued: i64::MAX,
        };
        let _ = (huge.offset(), huge.delay(), huge.hub_wait());
    }

    #[test]
    fn the_hubs_wait_for_its_core_is_taken_off_the_way_in() {
        let theta = 3_600_000_000;
        // 1.2 ms waiting for the hub's thread on the way in, 60/50 µs on the wire.
        let mut s = exchange(7_000, theta, 60 + 1_200, 15, 50);
        let blind = s.offset();
        assert_eq!(
            blind - theta,
            (1_260 - 50) / 2,
            "without the account: 0.6 ms off"
        );
        s.queued = 1_200;
        assert_eq!(s.offset() - theta, (60 - 50) / 2);
        let e = estimate(&[s]).unwrap();
        assert!((e.offset_us - theta).abs() <= e.error_us, "{e:?}");
        // An account longer than the exchange allows is cut to the delay; a negative one
        // counts for nothing.
        s.queued = 50_000;
        assert_eq!(s.hub_wait(), s.delay());
        assert!((s.offset() - theta).abs() <= (s.delay() + 1) / 2);
        s.queued = -5;
        assert_eq!(s.offset(), blind);
    }

    #[test]
    fn a_sample_is_not_chosen_for_its_hubs_account() {
        let theta = -42;
        let clean = exchange(0, theta, 70, 10, 70);
        // Slower on the whole, though the hub says it waited most of it.
        let mut waited = exchange(10_000, theta, 900, 10, 60);
        waited.queued = 880;
        assert_eq!(estimate(&[waited, clean]).unwrap().offset_us, theta);
        // Alone, its account is used: (20 − 60) / 2 off.
        assert_eq!(estimate(&[waited]).unwrap().offset_us, theta - 20);
    }

    #[test]
    fn deadlines_are_monotonic_and_corrected_by_the_offset() {
        let mono = Instant::now();
        let anchor = Anchor {
            wall_us: 1_000_000_000,
            mono,
        };
        // The hub is an hour behind this agent; it activates at its 1_000_000_000 + 5 s − 1 h.
        let offset = Offset {
            offset_us: -3_600_000_000,
            error_us: 50,
        };
        let t = 1_000_000_000 + 5_000_000 - 3_600_000_000;
        assert_eq!(deadline(t, offset, &anchor), mono + Duration::from_secs(5));
        assert_eq!(hub_time(mono + Duration::from_secs(5), offset, &anchor), t);
        // A time already past maps before the anchor (or to it, at the start of the clock).
        assert!(deadline(t - 10_000_000, offset, &anchor) <= mono);
        assert_eq!(
            anchor.local_us(mono + Duration::from_micros(7)),
            1_000_000_007
        );
    }
}
