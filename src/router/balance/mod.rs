//! Backend balancing: the policy named in config, built once per pool, picking one backend
//! index per request attempt.
//!
//! Pure: opens no sockets and reads no clock. Live load (in-flight counts, latency averages)
//! is read through [`Load`], eligibility through a caller closure, and randomness arrives as a
//! `u64` argument, so every decision is reproducible in tests. Each policy lives in its own
//! file; this module only dispatches; what every policy reads (a backend as policies see it, live
//! load, the key hash) is [`member`]'s.

mod hash;
mod least_conn;
mod member;
mod p2c_ewma;
mod round_robin;
mod weighted;

use hash::HashRing;
pub use member::{hash_key, Load, Member};
use round_robin::RoundRobin;
use weighted::Weighted;

/// The balancing policy named in config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Each eligible backend in turn; weights only matter as "0 = drained".
    RoundRobin,
    /// nginx smooth weighted round robin.
    Weighted,
    /// Fewest in-flight requests relative to weight.
    LeastConn,
    /// Power of two random choices, cost = latency EWMA × (in-flight + 1).
    P2cEwma,
    /// Consistent hashing of a per-request key (sticky by header, cookie or client IP).
    Hash,
}

/// A built balancer for one pool (built once per config; picks are `&self` and thread-safe:
/// Send + Sync).
#[derive(Debug)]
pub struct Balancer {
    /// Weights by backend index; also the pool size.
    weights: Vec<u32>,
    kind: Kind,
}

/// Per-policy state. Least-conn and p2c need none beyond the weights.
#[derive(Debug)]
enum Kind {
    RoundRobin(RoundRobin),
    Weighted(Weighted),
    LeastConn,
    P2cEwma,
    /// Requests without a key still need a backend; they rotate like round robin.
    Hash {
        ring: HashRing,
        keyless: RoundRobin,
    },
}

impl Balancer {
    /// Builds the policy over the pool's members (their index in `members` is the backend
    /// index used everywhere).
    pub fn build(policy: Policy, members: &[Member<'_>]) -> Balancer {
        let weights: Vec<u32> = members.iter().map(|m| m.weight).collect();
        let n = members.len();
        let kind = match policy {
            Policy::RoundRobin => Kind::RoundRobin(RoundRobin::new(n)),
            Policy::Weighted => Kind::Weighted(Weighted::new(&weights)),
            Policy::LeastConn => Kind::LeastConn,
            Policy::P2cEwma => Kind::P2cEwma,
            Policy::Hash => Kind::Hash {
                ring: HashRing::new(members),
                keyless: RoundRobin::new(n),
            },
        };
        Balancer { weights, kind }
    }

    /// Picks a backend index among those for which `eligible(i)` is true (healthy, not
    /// ejected, not already tried by this request) and whose weight is non-zero.
    ///
    /// `key` is the request's hash key for `Hash` (None → round robin for that request).
    /// `random` is a fresh random u64 from the caller (used by p2c and for tie breaks) so the
    /// policy itself stays pure. Returns None only when no member is eligible. `eligible` is
    /// only called with indices below the pool size, and must not call back into this
    /// balancer (the weighted policy holds its lock while asking).
    pub fn pick(
        &self,
        load: &dyn Load,
        eligible: &dyn Fn(usize) -> bool,
        key: Option<u64>,
        random: u64,
    ) -> Option<usize> {
        // Weight 0 is how operators drain a backend; folding it into eligibility makes every
        // policy honour it the same way.
        let ok = |i: usize| self.weights.get(i).is_some_and(|&w| w > 0) && eligible(i);
        match &self.kind {
            Kind::RoundRobin(rr) => rr.pick(&ok),
            Kind::Weighted(w) => w.pick(&ok),
            Kind::LeastConn => least_conn::pick(&self.weights, load, &ok, random),
            Kind::P2cEwma => p2c_ewma::pick(self.weights.len(), load, &ok, random),
            Kind::Hash { ring, keyless } => match key {
                Some(k) => ring.pick(k, &ok),
                None => keyless.pick(&ok),
            },
        }
    }
}

/// A fixed load for the policy tests: indices past the vectors read as idle/unknown.
#[cfg(test)]
#[derive(Debug, Default)]
struct FixedLoad {
    in_flight: Vec<u64>,
    ewma: Vec<f64>,
}

#[cfg(test)]
impl Load for FixedLoad {
    fn in_flight(&self, i: usize) -> u64 {
        self.in_flight.get(i).copied().unwrap_or(0)
    }
    fn latency_ewma(&self, i: usize) -> f64 {
        self.ewma.get(i).copied().unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Policy; 5] = [
        Policy::RoundRobin,
        Policy::Weighted,
        Policy::LeastConn,
        Policy::P2cEwma,
        Policy::Hash,
    ];

    #[test]
    fn hash_key_is_pinned_across_versions() {
        // Values from an independent implementation; a change here splits a farm.
        assert_eq!(hash_key(b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(hash_key(b"a"), 0x82a2_a958_a9be_ce5b);
        assert_eq!(hash_key(b"10.0.0.1"), 0xc879_e56d_dc6c_5c88);
        assert_eq!(hash_key(b"backend-1#0"), 0x7bca_724c_9747_cd3f);
    }

    #[test]
    fn zero_weight_member_is_never_picked_by_any_policy() {
        let members = [
            Member {
                name: "a",
                weight: 1,
            },
            Member {
                name: "drained",
                weight: 0,
            },
            Member {
                name: "c",
                weight: 1,
            },
        ];
        // Make the drained one look like the best choice for every load-aware policy.
        let load = FixedLoad {
            in_flight: vec![5, 0, 5],
            ewma: vec![9e9, 1.0, 9e9],
        };
        for policy in ALL {
            let b = Balancer::build(policy, &members);
            for r in 0..500u64 {
                let key = (r % 2 == 0).then(|| hash_key(&r.to_le_bytes()));
                let got = b.pick(&load, &|_| true, key, hash_key(&r.to_be_bytes()));
                assert!(matches!(got, Some(0 | 2)), "{policy:?} picked {got:?}");
            }
        }
    }

    #[test]
    fn nothing_eligible_gives_none_for_every_policy() {
        let members = [
            Member {
                name: "a",
                weight: 1,
            },
            Member {
                name: "b",
                weight: 2,
            },
        ];
        let load = FixedLoad::default();
        for policy in ALL {
            let b = Balancer::build(policy, &members);
            assert_eq!(b.pick(&load, &|_| false, Some(7), 7), None, "{policy:?}");
            let empty = Balancer::build(policy, &[]);
            assert_eq!(empty.pick(&load, &|_| true, Some(7), 7), None, "{policy:?}");
        }
    }

    #[test]
    fn eligible_is_never_asked_about_indices_outside_the_pool() {
        let members = [
            Member {
                name: "a",
                weight: 1,
            },
            Member {
                name: "b",
                weight: 1,
            },
        ];
        let load = FixedLoad::default();
        for policy in ALL {
            let b = Balancer::build(policy, &members);
            for r in 0..200u64 {
                let check = |i: usize| {
                    assert!(i < 2, "{policy:?} asked about {i}");
                    i == 1
                };
                assert_eq!(
                    b.pick(&load, &check, Some(hash_key(&r.to_le_bytes())), r),
                    Some(1)
                );
            }
        }
    }

    #[test]
    fn balancer_is_send_and_sync() {
        fn shared<T: Send + Sync>(_: &T) {}
        shared(&Balancer::build(
            Policy::Weighted,
            &[Member {
                name: "a",
                weight: 1,
            }],
        ));
    }
}
