//! Consistent hashing ring (ketama style) for sticky balancing by a request key.
//!
//! Pure: opens no sockets and reads no clock. Each backend owns `160 × weight` points on a
//! 64-bit ring at positions `hash_key("{name}#{n}")`; a key belongs to the first point at or
//! after its own position. Because points come from names (not indices), reordering the
//! config moves no keys, and removing one of N backends moves only the ~1/N of keys it owned.

use std::fmt::Write as _;

use super::{hash_key, Member};

/// Points per unit of weight: enough for an even spread (ketama's figure).
const POINTS_PER_WEIGHT: u64 = 160;
/// Ring size budget, so huge weights cannot make a pool cost megabytes.
const MAX_POINTS: u64 = 100_000;

/// The sorted ring of `(position, backend index)` points.
#[derive(Debug)]
pub(super) struct HashRing {
    points: Vec<(u64, usize)>,
    members: usize,
}

impl HashRing {
    /// Builds the ring. Weight-0 members get no points.
    ///
    /// When `160 × total weight` exceeds the budget, every member's point count is halved
    /// the same number of times (a power-of-two shift, each member keeping at least one
    /// point): ratios survive, and since the shift only changes when total weight crosses a
    /// power-of-two boundary, removing a member normally leaves the survivors' points intact.
    pub(super) fn new(members: &[Member<'_>]) -> Self {
        let total = members.iter().fold(0u64, |acc, m| {
            acc.saturating_add(u64::from(m.weight) * POINTS_PER_WEIGHT)
        });
        let mut shift = 0;
        while (total >> shift) > MAX_POINTS {
            shift += 1;
        }
        let mut points = Vec::new();
        let mut label = String::new();
        for (index, m) in members.iter().enumerate().filter(|(_, m)| m.weight > 0) {
            let count = ((u64::from(m.weight) * POINTS_PER_WEIGHT) >> shift).max(1);
            for n in 0..count {
                label.clear();
                // Writing to a String cannot fail.
                let _ = write!(label, "{}#{}", m.name, n);
                points.push((hash_key(label.as_bytes()), index));
            }
        }
        // Break position collisions by name so the ring never depends on config order.
        points.sort_unstable_by(|a, b| {
            let name = |i: usize| members.get(i).map_or("", |m| m.name);
            a.0.cmp(&b.0)
                .then_with(|| name(a.1).cmp(name(b.1)))
                .then(a.1.cmp(&b.1))
        });
        HashRing {
            points,
            members: members.len(),
        }
    }

    /// The owner of `key`, or the next eligible backend clockwise when the owner is out.
    ///
    /// Walking on rather than rehashing means an ineligible owner's keys spread over the
    /// other backends (by their ring share) and come straight back when it recovers, while
    /// every other key stays where it was.
    pub(super) fn pick(&self, key: u64, eligible: &dyn Fn(usize) -> bool) -> Option<usize> {
        let start = self.points.partition_point(|&(pos, _)| pos < key);
        let (before, after) = self.points.split_at(start);
        let mut walk = after.iter().chain(before).map(|&(_, m)| m);
        let owner = walk.next()?;
        if eligible(owner) {
            return Some(owner);
        }
        // Avoid walking the whole ring (up to ~100k points) when nothing is eligible.
        if !(0..self.members).any(eligible) {
            return None;
        }
        walk.find(|&m| m != owner && eligible(m))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Balancer, FixedLoad, Policy};
    use super::*;

    fn key(i: usize) -> u64 {
        hash_key(format!("client-{i}").as_bytes())
    }

    fn equal(names: &[&'static str]) -> Vec<Member<'static>> {
        names
            .iter()
            .map(|&name| Member { name, weight: 1 })
            .collect()
    }

    /// Owner name of each of `keys` keys.
    fn owners<'a>(members: &[Member<'a>], keys: usize) -> Vec<&'a str> {
        let ring = HashRing::new(members);
        (0..keys)
            .map(|i| members[ring.pick(key(i), &|_| true).unwrap()].name)
            .collect()
    }

    #[test]
    fn same_key_always_maps_to_same_member() {
        let m = equal(&["a", "b", "c"]);
        assert_eq!(owners(&m, 1_000), owners(&m, 1_000));
        let ring = HashRing::new(&m);
        let first = ring.pick(key(42), &|_| true);
        assert!((0..100).all(|_| ring.pick(key(42), &|_| true) == first));
    }

    #[test]
    fn equal_members_get_an_even_share() {
        let m = equal(&["b0", "b1", "b2", "b3"]);
        let owners = owners(&m, 10_000);
        for name in ["b0", "b1", "b2", "b3"] {
            let share = owners.iter().filter(|&&o| o == name).count();
            assert!((1_875..=3_125).contains(&share), "{name}: {share}");
        }
    }

    #[test]
    fn removing_one_of_five_moves_only_its_keys() {
        let all = equal(&["b0", "b1", "b2", "b3", "b4"]);
        let without: Vec<_> = all.iter().copied().filter(|m| m.name != "b2").collect();
        let (before, after) = (owners(&all, 10_000), owners(&without, 10_000));
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if *b == "b2" {
                moved += 1;
            } else {
                assert_eq!(b, a, "a key on a surviving member moved");
            }
        }
        assert!(moved < 2_500, "{moved} of 10000 keys moved");
    }

    #[test]
    fn config_order_does_not_move_keys() {
        let m = equal(&["x", "y", "z", "w"]);
        let mut reversed = m.clone();
        reversed.reverse();
        assert_eq!(owners(&m, 2_000), owners(&reversed, 2_000));
    }

    #[test]
    fn weights_skew_the_share() {
        let m = [
            Member {
                name: "big",
                weight: 3,
            },
            Member {
                name: "small",
                weight: 1,
            },
        ];
        let big = owners(&m, 10_000).iter().filter(|&&o| o == "big").count();
        assert!((6_500..=8_500).contains(&big), "{big}");
    }

    #[test]
    fn huge_weights_stay_within_budget_and_keep_ratios() {
        let m = [
            Member {
                name: "big",
                weight: u32::MAX,
            },
            Member {
                name: "small",
                weight: u32::MAX / 3,
            },
            Member {
                name: "tiny",
                weight: 1,
            },
        ];
        let ring = HashRing::new(&m);
        assert!(
            ring.points.len() as u64 <= MAX_POINTS + 3,
            "{}",
            ring.points.len()
        );
        let big = owners(&m, 10_000).iter().filter(|&&o| o == "big").count();
        assert!((6_500..=8_500).contains(&big), "{big}");
    }

    #[test]
    fn ineligible_owner_moves_only_its_keys_and_they_come_back() {
        let m = equal(&["a", "b", "c", "d"]);
        let ring = HashRing::new(&m);
        let owner = ring.pick(key(7), &|_| true).unwrap();
        let out = |i: usize| i != owner;
        let moved = ring.pick(key(7), &out).unwrap();
        assert_ne!(moved, owner);
        for i in 0..2_000 {
            let normal = ring.pick(key(i), &|_| true).unwrap();
            let degraded = ring.pick(key(i), &out).unwrap();
            if normal != owner {
                assert_eq!(normal, degraded, "key {i} moved although its owner is up");
            }
        }
        assert_eq!(ring.pick(key(7), &|_| true), Some(owner));
        assert_eq!(ring.pick(key(7), &|_| false), None);
    }

    #[test]
    fn zero_weight_members_own_nothing() {
        let m = [
            Member {
                name: "a",
                weight: 0,
            },
            Member {
                name: "b",
                weight: 1,
            },
        ];
        assert!(owners(&m, 1_000).iter().all(|&o| o == "b"));
        assert_eq!(
            HashRing::new(&[Member {
                name: "a",
                weight: 0
            }])
            .pick(1, &|_| true),
            None
        );
    }

    #[test]
    fn request_without_key_still_picks_and_rotates() {
        let m = equal(&["a", "b", "c"]);
        let b = Balancer::build(Policy::Hash, &m);
        let picks: Vec<_> = (0..3)
            .map(|r| b.pick(&FixedLoad::default(), &|_| true, None, r).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2]);
        assert_eq!(b.pick(&FixedLoad::default(), &|i| i == 1, None, 0), Some(1));
    }
}
