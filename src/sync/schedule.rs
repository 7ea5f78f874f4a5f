//! Activation times: on a grid of `cadence` aligned to the Unix epoch of the
//! hub's clock, no sooner than `lead` after now, or an explicit time chosen by the publisher.
//!
//! Pure: `now` is an argument; all times are µs on the hub's clock.

use std::time::Duration;

/// How the hub picks activation times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Activations happen on multiples of this (µs since the epoch).
    pub cadence_us: u64,
    /// No activation sooner than this after the publish that stages it.
    pub lead_us: u64,
    /// A staged release is no longer replaced this close to its activation; a publish that
    /// late is queued for the next cycle instead, so no agent flips to a release the hub has
    /// already dropped.
    pub guard_us: u64,
}

/// Default activation grid.
pub const DEFAULT_CADENCE: Duration = Duration::from_secs(60);
/// Default least time from publish to activation.
pub const DEFAULT_LEAD: Duration = Duration::from_secs(10);
/// Farthest an explicit activation time may lie ahead.
pub const MAX_HORIZON: Duration = Duration::from_secs(366 * 24 * 3600);
/// Longest replace guard ([`Rules::guard_us`] is this or `lead`, the smaller).
pub const MAX_GUARD: Duration = Duration::from_secs(2);

impl Rules {
    /// Rules for a cadence and lead; the guard follows from the lead.
    pub fn new(cadence: Duration, lead: Duration) -> Rules {
        Rules {
            cadence_us: (cadence.as_micros() as u64).max(1),
            lead_us: lead.as_micros() as u64,
            guard_us: lead.min(MAX_GUARD).as_micros() as u64,
        }
    }

    /// The first grid point at least `lead` after `now_us`.
    pub fn next_activation(&self, now_us: u64) -> u64 {
        let earliest = now_us.saturating_add(self.lead_us);
        earliest
            .div_ceil(self.cadence_us)
            .checked_mul(self.cadence_us)
            // Past the end of time: the last grid point there is.
            .unwrap_or(u64::MAX / self.cadence_us * self.cadence_us)
    }

    /// An explicit activation time, or why it cannot be used: it must be in the future and
    /// within [`MAX_HORIZON`] of now (so every time on the wire also fits an `i64`).
    pub fn explicit(&self, at_us: u64, now_us: u64) -> Result<u64, ScheduleError> {
        if at_us <= now_us {
            return Err(ScheduleError::InPast { at_us, now_us });
        }
        if at_us - now_us > MAX_HORIZON.as_micros() as u64 {
            return Err(ScheduleError::TooFar { at_us, now_us });
        }
        Ok(at_us)
    }
}

/// Why an activation time is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScheduleError {
    /// The time has passed on the hub's clock.
    #[error("activation time {at_us} µs is not in the future (hub time is {now_us} µs)")]
    InPast {
        /// The time asked for.
        at_us: u64,
        /// The hub's time.
        now_us: u64,
    },
    /// More than [`MAX_HORIZON`] ahead.
    #[error("activation time {at_us} µs is more than a year after the hub's time ({now_us} µs)")]
    TooFar {
        /// The time asked for.
        at_us: u64,
        /// The hub's time.
        now_us: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;

    #[test]
    fn activations_land_on_the_grid_after_the_lead() {
        let r = Rules::new(Duration::from_secs(60), Duration::from_secs(10));
        assert_eq!(r.next_activation(0), 60 * S);
        assert_eq!(r.next_activation(49 * S), 60 * S);
        assert_eq!(r.next_activation(50 * S), 60 * S);
        assert_eq!(r.next_activation(50 * S + 1), 120 * S);
        assert_eq!(r.next_activation(1_700_000_000 * S) % (60 * S), 0);
        assert_eq!(r.guard_us, 2 * S);
    }

    #[test]
    fn a_grid_finer_than_the_lead_and_no_lead() {
        let r = Rules::new(Duration::from_millis(500), Duration::from_secs(3));
        assert_eq!(r.next_activation(S + 1), 4 * S + S / 2);
        let r = Rules::new(Duration::from_secs(1), Duration::ZERO);
        assert_eq!(r.next_activation(7 * S), 7 * S);
        assert_eq!(r.guard_us, 0);
        assert_eq!(r.next_activation(u64::MAX - 5) % S, 0);
    }

    #[test]
    fn explicit_times_must_be_in_the_future() {
        let r = Rules::new(Duration::from_secs(60), Duration::from_secs(10));
        assert_eq!(r.explicit(5 * S, 4 * S), Ok(5 * S));
        assert!(r.explicit(4 * S, 4 * S).is_err());
        assert!(r.explicit(u64::MAX, 4 * S).is_err());
        assert!(r
            .explicit(4 * S + MAX_HORIZON.as_micros() as u64 + 1, 4 * S)
            .is_err());
    }
}
