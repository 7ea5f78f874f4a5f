//! Response-rate limiting (RRL) of UDP answers, as Knot's and NSD's: the answers to one client
//! prefix (IPv4 /24, IPv6 /56 by default) are metered by a token bucket of `rate_limit`
//! answers a second (the burst is one second's worth). Over the rate an answer is dropped,
//! except every `slip`-th one, which goes out truncated — TC set, the question and nothing
//! else ([`slip_reply`]) — so a real client behind a limited prefix retries over TCP, which is
//! never limited. A spoofed-source flood then reflects at most `rate_limit` answers a second
//! at its victim's prefix, plus slipped ones no bigger than the queries.
//!
//! Simpler than Knot's: one bucket per prefix for every kind of answer (lockstep's answers are
//! all small and alike), no exempt list.
//!
//! Memory is bounded whatever the sources: a fixed table of [`SLOTS`] buckets, a prefix hashed
//! (keyed by a seed the caller draws, so a flood cannot aim at one slot) to a window of
//! [`HOPS`] neighbouring slots. A prefix takes its own slot in the window, else one unused for
//! a second (its bucket would be full again by now, so nothing is lost), else — every slot of
//! the window busy this very second, under a flood of many prefixes — it shares the first
//! slot's bucket rather than take a fresh one: colliding prefixes are limited together, and no
//! limited prefix ever gets a new burst by being pushed out (fail closed).
//!
//! One [`Limiter`] per UDP socket, owned by its receive loop (no lock, no shared atomics on
//! the hot path: one hash and a few compares per datagram). lockstep binds one UDP socket, so
//! the rate is the server's; with one socket per worker each would count its own share.
//!
//! Pure: no sockets, no clock (`now` is an argument), no randomness of its own (the seed is).

use std::hash::{DefaultHasher, Hasher};
use std::net::IpAddr;
use std::time::Instant;

use crate::config::Rrl;

/// Buckets in one limiter's table: 2 MiB. Enough for every prefix that gets an answer within
/// one second at a busy authoritative; beyond that prefixes share buckets (see the module doc).
pub const SLOTS: usize = 1 << 16;

/// Neighbouring slots a prefix may take.
pub const HOPS: usize = 4;

/// A token, in the bucket's unit: one millionth of a token per microsecond at a rate of one
/// answer a second, so refilling is integer arithmetic.
const TOKEN: u64 = 1_000_000;

/// A bucket unused this long is full again, so its slot may go to another prefix.
const STALE_US: u64 = 1_000_000;

/// What the limiter says about one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the rate: answer.
    Answer,
    /// Over the rate: send nothing.
    Drop,
    /// Over the rate, but this one goes out truncated ([`slip_reply`]).
    Slip,
}

/// The limits of one config generation, ready for the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Answers per second per prefix; 0: off.
    rate: u32,
    slip: u32,
    v4_mask: u32,
    v6_mask: u128,
}

impl Limits {
    /// The limits `rrl` configures.
    pub fn new(rrl: &Rrl) -> Limits {
        let v4 = u32::from(rrl.ipv4_prefix.min(32));
        let v6 = u32::from(rrl.ipv6_prefix.min(128));
        Limits {
            rate: rrl.rate_limit,
            slip: rrl.slip,
            v4_mask: u32::MAX.checked_shl(32 - v4).unwrap_or(0),
            v6_mask: u128::MAX.checked_shl(128 - v6).unwrap_or(0),
        }
    }

    /// No limiting (RRL off, or no `dns:` section).
    pub fn off() -> Limits {
        Limits {
            rate: 0,
            slip: 0,
            v4_mask: 0,
            v6_mask: 0,
        }
    }

    /// Whether answers are limited at all.
    pub fn is_on(&self) -> bool {
        self.rate > 0
    }

    /// The prefix `ip` belongs to, as one number (IPv4 as its IPv4-mapped IPv6 form, so an
    /// IPv4 client reaching a dual-stack socket counts as itself).
    fn prefix(&self, ip: IpAddr) -> u128 {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                u128::from(std::net::Ipv4Addr::from(u32::from(v4) & self.v4_mask).to_ipv6_mapped())
            }
            IpAddr::V6(v6) => u128::from(v6) & self.v6_mask,
        }
    }
}

/// One bucket.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// The hash of the prefix that owns it; 0: unused.
    key: u64,
    /// When it was last refilled, µs since the limiter's epoch.
    last_us: u64,
    /// Tokens left, in millionths ([`TOKEN`]).
    tokens: u64,
    /// Answers refused since the prefix took the slot (for the slip count).
    limited: u32,
}

/// The token buckets of one UDP socket.
pub struct Limiter {
    slots: Box<[Slot]>,
    seed: u64,
    epoch: Instant,
}

impl Limiter {
    /// A limiter of [`SLOTS`] buckets hashing with `seed` (drawn by the caller at random);
    /// `now` is its epoch.
    pub fn new(seed: u64, now: Instant) -> Limiter {
        Limiter::with_slots(SLOTS, seed, now)
    }

    /// A limiter of `slots` buckets (a power of two, at least [`HOPS`]; rounded up).
    pub fn with_slots(slots: usize, seed: u64, now: Instant) -> Limiter {
        let n = slots.max(HOPS).next_power_of_two();
        Limiter {
            slots: vec![Slot::default(); n].into_boxed_slice(),
            seed,
            epoch: now,
        }
    }

    /// How many buckets it holds (fixed at creation, whatever the traffic).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Meters one answer to `src` at `now` under `limits`.
    pub fn check(&mut self, src: IpAddr, now: Instant, limits: &Limits) -> Verdict {
        if !limits.is_on() {
            return Verdict::Answer;
        }
        let now_us = u64::try_from(now.saturating_duration_since(self.epoch).as_micros())
            .unwrap_or(u64::MAX);
        let key = self.hash(limits.prefix(src));
        let index = self.find(key, now_us);
        let Some(slot) = self.slots.get_mut(index) else {
            // `find` returns an index of the table; answering is the safe way to be wrong.
            return Verdict::Answer;
        };
        let rate = u64::from(limits.rate);
        let full = rate.saturating_mul(TOKEN);
        let elapsed = now_us.saturating_sub(slot.last_us).min(STALE_US);
        slot.tokens = slot
            .tokens
            .saturating_add(elapsed.saturating_mul(rate))
            .min(full);
        slot.last_us = slot.last_us.max(now_us);
        if slot.tokens >= TOKEN {
            slot.tokens -= TOKEN;
            return Verdict::Answer;
        }
        slot.limited = slot.limited.wrapping_add(1);
        if limits.slip > 0 && slot.limited % limits.slip == 0 {
            Verdict::Slip
        } else {
            Verdict::Drop
        }
    }

    /// The slot of the prefix hashed to `key`: its own within the window, else a free or stale
    /// one (taken, with a full bucket), else the window's first (shared).
    fn find(&mut self, key: u64, now_us: u64) -> usize {
        let mask = self.slots.len() - 1;
        // Truncating the hash to the table's index bits is the point.
        let home = (key as usize) & mask;
        let mut free = None;
        for hop in 0..HOPS {
            let i = (home + hop) & mask;
            let Some(slot) = self.slots.get(i) else {
                continue;
            };
            if slot.key == key {
                return i;
            }
            let stale = slot.key == 0 || now_us.saturating_sub(slot.last_us) >= STALE_US;
            if stale && free.is_none() {
                free = Some(i);
            }
        }
        match free.and_then(|i| Some((i, self.slots.get_mut(i)?))) {
            Some((i, slot)) => {
                *slot = Slot {
                    key,
                    last_us: now_us,
                    // Full: the refill in `check` adds nothing within the same microsecond.
                    tokens: u64::MAX,
                    limited: 0,
                };
                i
            }
            None => home,
        }
    }

    /// The keyed hash of a prefix, never 0 (which marks an unused slot).
    fn hash(&self, prefix: u128) -> u64 {
        // SipHash over the seed and the prefix: with the seed unknown, which prefixes share a
        // window cannot be chosen from outside.
        let mut h = DefaultHasher::new();
        h.write_u64(self.seed);
        h.write_u128(prefix);
        h.finish().max(1)
    }
}

/// Writes into `out` the truncated reply RRL slips to `query`: its ID, QR and TC set, RD
/// copied, NOERROR, and its question — no records, no OPT, so it is never bigger than the
/// query. `None` (send nothing) unless `query` is a standard query with one plain question.
pub fn slip_reply(query: &[u8], out: &mut [u8]) -> Option<usize> {
    let flags = *query.get(2)?;
    // QR clear, opcode QUERY.
    if flags & 0xf8 != 0 {
        return None;
    }
    if query.get(4..6)? != [0, 1] {
        return None;
    }
    // The question: plain labels (no compression pointer in the first name), ≤ 255 bytes.
    let mut at = 12usize;
    loop {
        let len = usize::from(*query.get(at)?);
        if len > 63 {
            return None;
        }
        at += len + 1;
        if at - 12 > 255 {
            return None;
        }
        if len == 0 {
            break;
        }
    }
    let end = at + 4;
    let question = query.get(12..end)?;
    let reply = out.get_mut(..end)?;
    let (header, rest) = reply.split_at_mut(12);
    header.copy_from_slice(&[
        *query.first()?,
        *query.get(1)?,
        0x80 | 0x02 | (flags & 0x01), // QR, TC, RD copied
        0,                            // RA clear, NOERROR
        0,
        1, // one question
        0,
        0,
        0,
        0,
        0,
        0,
    ]);
    rest.copy_from_slice(question);
    Some(end)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn limits(rate: u32, slip: u32) -> Limits {
        Limits::new(&Rrl {
            rate_limit: rate,
            slip,
            ..Rrl::default()
        })
    }

    /// `n` answers to `src` at `at`: how many of each verdict, in order.
    fn run(l: &mut Limiter, src: &str, at: Instant, n: usize, lim: &Limits) -> Vec<Verdict> {
        (0..n).map(|_| l.check(ip(src), at, lim)).collect()
    }

    fn count(v: &[Verdict], which: Verdict) -> usize {
        v.iter().filter(|x| **x == which).count()
    }

    #[test]
    fn a_burst_of_one_seconds_worth_is_answered_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let lim = limits(10, 0);
        let mut l = Limiter::new(7, t0);
        let v = run(&mut l, "192.0.2.1", t0, 15, &lim);
        assert_eq!(v[..10], [Verdict::Answer; 10]);
        assert_eq!(v[10..], [Verdict::Drop; 5]);
        // 100 ms at 10/s: one token; 250 ms: two more (and a half kept).
        assert_eq!(
            run(
                &mut l,
                "192.0.2.1",
                t0 + Duration::from_millis(100),
                2,
                &lim
            ),
            [Verdict::Answer, Verdict::Drop]
        );
        let t = t0 + Duration::from_millis(350);
        assert_eq!(
            count(&run(&mut l, "192.0.2.1", t, 5, &lim), Verdict::Answer),
            2
        );
        let t = t0 + Duration::from_millis(400);
        assert_eq!(
            count(&run(&mut l, "192.0.2.1", t, 5, &lim), Verdict::Answer),
            1
        );
        // Idle for long: never more than one second's worth at once.
        let t = t0 + Duration::from_secs(60);
        assert_eq!(
            count(&run(&mut l, "192.0.2.1", t, 50, &lim), Verdict::Answer),
            10
        );
    }

    #[test]
    fn a_steady_flood_gets_the_rate_and_no_more() {
        let t0 = Instant::now();
        let lim = limits(200, 0);
        let mut l = Limiter::new(1, t0);
        // 10 000 queries a second for 5 s, one every 100 µs.
        let mut answered = 0;
        for i in 0..50_000u64 {
            let t = t0 + Duration::from_micros(i * 100);
            if l.check(ip("198.51.100.7"), t, &lim) == Verdict::Answer {
                answered += 1;
            }
        }
        // The burst (200), then 200 a second for the 4.9999 s that follow.
        assert_eq!(answered, 200 + 999);
    }

    #[test]
    fn every_slip_th_answer_over_the_rate_is_truncated() {
        let t0 = Instant::now();
        for (slip, want) in [
            (0, vec![Verdict::Drop; 6]),
            (1, vec![Verdict::Slip; 6]),
            (2, [Verdict::Drop, Verdict::Slip].repeat(3)),
            (3, [Verdict::Drop, Verdict::Drop, Verdict::Slip].repeat(2)),
        ] {
            let lim = limits(1, slip);
            let mut l = Limiter::new(3, t0);
            assert_eq!(l.check(ip("192.0.2.1"), t0, &lim), Verdict::Answer);
            assert_eq!(run(&mut l, "192.0.2.1", t0, 6, &lim), want, "slip {slip}");
        }
    }

    #[test]
    fn clients_share_a_rate_by_prefix_and_only_by_prefix() {
        let t0 = Instant::now();
        let lim = limits(2, 0);
        let mut l = Limiter::new(11, t0);
        // One /24: .1, .200 and the IPv4-mapped form of .9 share two answers.
        assert_eq!(l.check(ip("192.0.2.1"), t0, &lim), Verdict::Answer);
        assert_eq!(l.check(ip("192.0.2.200"), t0, &lim), Verdict::Answer);
        assert_eq!(l.check(ip("::ffff:192.0.2.9"), t0, &lim), Verdict::Drop);
        // The next /24 and another family have their own.
        assert_eq!(l.check(ip("192.0.3.1"), t0, &lim), Verdict::Answer);
        assert_eq!(l.check(ip("2001:db8:0:100::1"), t0, &lim), Verdict::Answer);
        // One /56: 2001:db8:0:100::/56 holds ...:1ff:..., not ...:200::.
        assert_eq!(l.check(ip("2001:db8:0:1ff::9"), t0, &lim), Verdict::Answer);
        assert_eq!(l.check(ip("2001:db8:0:1ab::1"), t0, &lim), Verdict::Drop);
        assert_eq!(l.check(ip("2001:db8:0:200::1"), t0, &lim), Verdict::Answer);

        // Prefix lengths are the config's.
        let narrow = Limits::new(&Rrl {
            rate_limit: 1,
            slip: 0,
            ipv4_prefix: 32,
            ipv6_prefix: 128,
        });
        let mut l = Limiter::new(11, t0);
        assert_eq!(l.check(ip("192.0.2.1"), t0, &narrow), Verdict::Answer);
        assert_eq!(l.check(ip("192.0.2.2"), t0, &narrow), Verdict::Answer);
        assert_eq!(l.check(ip("192.0.2.1"), t0, &narrow), Verdict::Drop);
        assert_eq!(l.check(ip("2001:db8::2"), t0, &narrow), Verdict::Answer);
        let wide = Limits::new(&Rrl {
            rate_limit: 1,
            slip: 0,
            ipv4_prefix: 8,
            ipv6_prefix: 32,
        });
        let mut l = Limiter::new(11, t0);
        assert_eq!(l.check(ip("10.1.2.3"), t0, &wide), Verdict::Answer);
        assert_eq!(l.check(ip("10.200.0.1"), t0, &wide), Verdict::Drop);
        assert_eq!(l.check(ip("2001:db8:ffff::1"), t0, &wide), Verdict::Answer);
        assert_eq!(l.check(ip("2001:db8:1::1"), t0, &wide), Verdict::Drop);
    }

    #[test]
    fn off_answers_everything() {
        let t0 = Instant::now();
        let mut l = Limiter::with_slots(4, 0, t0);
        for lim in [limits(0, 2), Limits::off()] {
            assert!(!lim.is_on());
            let v = run(&mut l, "192.0.2.1", t0, 10_000, &lim);
            assert_eq!(count(&v, Verdict::Answer), 10_000);
        }
    }

    #[test]
    fn memory_is_fixed_and_a_flood_of_prefixes_gives_no_limited_prefix_a_new_burst() {
        let t0 = Instant::now();
        let lim = limits(5, 0);
        let mut l = Limiter::with_slots(16, 42, t0);
        assert_eq!(l.capacity(), 16);
        // The victim's prefix spends its burst.
        let v = run(&mut l, "203.0.113.1", t0, 10, &lim);
        assert_eq!(count(&v, Verdict::Answer), 5);
        // 100 000 other prefixes within the same second: the table stays 16 buckets.
        for i in 0..100_000u32 {
            let src = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8)));
            l.check(src, t0 + Duration::from_micros(u64::from(i % 1000)), &lim);
        }
        assert_eq!(l.capacity(), 16);
        // Still limited within that second: its slot was never handed out afresh.
        let t = t0 + Duration::from_millis(1);
        assert_eq!(
            count(&run(&mut l, "203.0.113.1", t, 10, &lim), Verdict::Answer),
            0
        );
        // A second later every bucket is stale: fresh prefixes get their own again.
        let t = t0 + Duration::from_secs(2);
        let v = run(&mut l, "198.51.100.1", t, 10, &lim);
        assert_eq!(count(&v, Verdict::Answer), 5);
    }

    #[test]
    fn colliding_prefixes_take_neighbouring_slots_and_keep_their_own_rates() {
        let t0 = Instant::now();
        let lim = limits(3, 0);
        let mut l = Limiter::with_slots(HOPS, 5, t0);
        // HOPS slots, one window: HOPS prefixes each get their own bucket.
        let srcs: Vec<String> = (0..HOPS).map(|i| format!("192.0.{i}.1")).collect();
        for s in &srcs {
            assert_eq!(
                count(&run(&mut l, s, t0, 5, &lim), Verdict::Answer),
                3,
                "{s}"
            );
        }
        // One more within the second shares a busy bucket: limited with it, no fresh burst.
        assert_eq!(
            count(&run(&mut l, "192.0.99.1", t0, 5, &lim), Verdict::Answer),
            0
        );
        // After a second, each bucket has refilled its own prefix's rate.
        let t = t0 + Duration::from_secs(1);
        for s in &srcs {
            assert_eq!(
                count(&run(&mut l, s, t, 5, &lim), Verdict::Answer),
                3,
                "{s}"
            );
        }
    }

    #[test]
    fn a_changed_rate_applies_at_once() {
        let t0 = Instant::now();
        let mut l = Limiter::new(9, t0);
        let v = run(&mut l, "192.0.2.1", t0, 100, &limits(100, 0));
        assert_eq!(count(&v, Verdict::Answer), 100);
        // Lowered by a reload: the refill caps at the new rate.
        let t = t0 + Duration::from_secs(5);
        let v = run(&mut l, "192.0.2.1", t, 100, &limits(10, 0));
        assert_eq!(count(&v, Verdict::Answer), 10);
    }

    fn query(name: &[u8], extra: &[u8]) -> Vec<u8> {
        let mut q = vec![
            0xbe,
            0xef,
            0x01,
            0x20,
            0,
            1,
            0,
            0,
            0,
            0,
            0,
            u8::from(!extra.is_empty()),
        ];
        q.extend_from_slice(name);
        q.extend_from_slice(&[0, 1, 0, 1]);
        q.extend_from_slice(extra);
        q
    }

    #[test]
    fn a_slip_reply_is_the_question_with_tc_and_never_bigger_than_the_query() {
        let name = b"\x03www\x04farm\x04test\x00";
        // With an OPT record: the reply leaves it out.
        let opt = [0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0];
        for q in [query(name, &[]), query(name, &opt)] {
            let mut out = [0u8; 512];
            let n = slip_reply(&q, &mut out).expect("a reply");
            assert!(n <= q.len());
            let r = &out[..n];
            assert_eq!(&r[..2], &[0xbe, 0xef], "id");
            assert_eq!(r[2], 0x80 | 0x02 | 0x01, "QR, TC, RD");
            assert_eq!(r[3], 0, "RA clear, NOERROR");
            assert_eq!(&r[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
            assert_eq!(&r[12..], &q[12..12 + name.len() + 4], "the question");
        }
    }

    #[test]
    fn anything_but_a_plain_query_gets_no_slip_reply() {
        let name = b"\x03www\x04farm\x04test\x00";
        let ok = query(name, &[]);
        let mut out = [0u8; 512];
        let mut bad = Vec::new();
        let mut response = ok.clone();
        response[2] |= 0x80;
        bad.push(response);
        let mut notify = ok.clone();
        notify[2] |= 4 << 3;
        bad.push(notify);
        let mut two = ok.clone();
        two[5] = 2;
        bad.push(two);
        let mut pointer = ok[..12].to_vec();
        pointer.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        bad.push(pointer);
        for cut in 0..ok.len() {
            bad.push(ok[..cut].to_vec());
        }
        for b in &bad {
            assert_eq!(slip_reply(b, &mut out), None, "{b:02x?}");
        }
        // A name over 255 bytes.
        let mut long = ok[..12].to_vec();
        for _ in 0..5 {
            long.push(63);
            long.extend(std::iter::repeat_n(b'a', 63));
        }
        long.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert_eq!(slip_reply(&long, &mut out), None);
        // An output buffer too small.
        assert_eq!(slip_reply(&ok, &mut [0u8; 20]), None);
        // Random bytes never panic.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..400usize {
            let b: Vec<u8> = (0..len % 64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            if let Some(n) = slip_reply(&b, &mut out) {
                assert!(n <= b.len());
            }
        }
    }
}
