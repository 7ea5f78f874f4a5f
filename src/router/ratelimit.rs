//! Per-client rate limits of a route: a token bucket per key (the client's address, or a
//! request header's value), `rate` tokens a second up to `burst`; a request takes one or is
//! refused with the time until the next one (for `Retry-After`).
//!
//! Bounded: at most `max_keys` buckets of a few dozen bytes each (a header value is kept as
//! its keyed 64-bit hash, so a long or varied value costs no more). A bucket that has refilled
//! to its burst is the same as none, so those go first when the table is full; then the one
//! seen longest ago (its client starts again from a full bucket: a flood of new keys can make
//! the limit lenient for some clients, never refuse one that is within its rate). Pure: time
//! is passed in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderName;

/// What a bucket is kept for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    /// The client's address (the connection's peer, or what the PROXY protocol gave).
    ClientIp,
    /// A request header's value (an API key, say); a request without it is counted by its
    /// client's address.
    Header(HeaderName),
}

/// A route's limit.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    /// Tokens added a second.
    pub rate: f64,
    /// Most tokens a bucket holds: the burst allowed after a quiet spell.
    pub burst: u32,
    /// What a bucket is kept for.
    pub key: LimitKey,
}

/// Buckets kept per limiter by default.
pub const DEFAULT_MAX_KEYS: usize = 65_536;

const SHARDS: usize = 16;

/// One client's key: its address, or the keyed hash of its header's value (the key is this
/// process's secret, so nobody can make two values share a bucket on purpose).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    /// An address.
    Ip(IpAddr),
    /// A header's value, hashed.
    Value(u64),
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets of one route's limit.
#[derive(Debug)]
pub struct Limiter {
    limit: RateLimit,
    per_shard: usize,
    shards: [Mutex<HashMap<Key, Bucket>>; SHARDS],
    hasher: std::collections::hash_map::RandomState,
}

impl Limiter {
    /// A limiter for `limit` keeping at most `max_keys` buckets.
    pub fn new(limit: RateLimit, max_keys: usize) -> Limiter {
        Limiter {
            limit,
            per_shard: max_keys.div_ceil(SHARDS).max(1),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// The limit it applies.
    pub fn limit(&self) -> &RateLimit {
        &self.limit
    }

    /// The key of a request from `client` whose header (when the limit names one) has
    /// `value`; without the header, the client's address.
    pub fn key(&self, client: IpAddr, value: Option<&[u8]>) -> Key {
        use std::hash::BuildHasher;
        match (&self.limit.key, value) {
            (LimitKey::Header(_), Some(v)) => Key::Value(self.hasher.hash_one(v)),
            _ => Key::Ip(client),
        }
    }

    /// Takes a token for `key` at `now`: `Ok`, or `Err(wait)` until one is there.
    pub fn check(&self, key: Key, now: Instant) -> Result<(), Duration> {
        use std::hash::BuildHasher;
        let shard = (self.hasher.hash_one(key) as usize) % SHARDS;
        let mut map = self.shards[shard].lock().unwrap_or_else(|p| p.into_inner());
        let burst = f64::from(self.limit.burst);
        if !map.contains_key(&key) && map.len() >= self.per_shard {
            self.make_room(&mut map, now);
        }
        let b = map.entry(key).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.limit.rate;
        b.tokens = (b.tokens + refill).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.limit.rate))
        }
    }

    /// Frees at least one place in a full shard: the buckets already refilled, else the one
    /// seen longest ago.
    fn make_room(&self, map: &mut HashMap<Key, Bucket>, now: Instant) {
        let burst = f64::from(self.limit.burst);
        let rate = self.limit.rate;
        map.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
        });
        if map.len() >= self.per_shard {
            if let Some(oldest) = map.iter().min_by_key(|(_, b)| b.at).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        }
    }

    /// Buckets kept now.
    pub fn keys(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: f64, burst: u32, max: usize) -> Limiter {
        Limiter::new(
            RateLimit {
                rate,
                burst,
                key: LimitKey::ClientIp,
            },
            max,
        )
    }

    fn ip(n: u8) -> Key {
        Key::Ip(IpAddr::from([10, 0, 0, n]))
    }

    #[test]
    fn a_burst_then_the_rate_and_the_wait_until_the_next_token() {
        let l = limiter(10.0, 3, 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check(ip(1), t0).is_ok());
        }
        let wait = l.check(ip(1), t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        // Another client has its own bucket.
        assert!(l.check(ip(2), t0).is_ok());
        // A token every 100 ms.
        assert!(l.check(ip(1), t0 + Duration::from_millis(100)).is_ok());
        assert!(l.check(ip(1), t0 + Duration::from_millis(150)).is_err());
        // Never more than the burst after a long quiet spell.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(l.check(ip(1), later).is_ok());
        }
        assert!(l.check(ip(1), later).is_err());
    }

    #[test]
    fn the_table_stays_bounded_under_a_flood_of_keys() {
        let l = limiter(1.0, 2, 64);
        let t0 = Instant::now();
        // A flood of new keys, each once: the refilled ones (none yet) then the oldest go.
        for n in 0..10_000u32 {
            let k = Key::Value(u64::from(n));
            let _ = l.check(k, t0 + Duration::from_millis(1));
            assert!(l.keys() <= 64 + SHARDS);
        }
        // Keys of buckets that refilled are dropped first: after a second the flood's buckets
        // (one token taken, one a second) are full again and make way.
        let t1 = t0 + Duration::from_secs(2);
        for n in 0..100u8 {
            let _ = l.check(ip(n), t1);
        }
        assert!(l.keys() <= 64 + SHARDS);
    }

    #[test]
    fn header_keys_are_hashed_and_a_missing_header_falls_back_to_the_address() {
        let by_header = Limiter::new(
            RateLimit {
                rate: 1.0,
                burst: 1,
                key: LimitKey::Header(HeaderName::from_static("x-api-key")),
            },
            16,
        );
        let client = IpAddr::from([192, 0, 2, 1]);
        assert_eq!(by_header.key(client, None), Key::Ip(client));
        let long = vec![b'a'; 100_000];
        assert_eq!(
            by_header.key(client, Some(&long)),
            by_header.key(client, Some(&long))
        );
        assert_ne!(
            by_header.key(client, Some(b"k1")),
            by_header.key(client, Some(b"k2"))
        );
        let by_ip = limiter(1.0, 1, 16);
        assert_eq!(by_ip.key(client, Some(b"x")), Key::Ip(client));
    }
}
