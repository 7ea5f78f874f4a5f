//! What every balancing policy reads: a backend as the policies see it ([`Member`]), the live
//! load of a pool's backends ([`Load`]), and the hash of a request key ([`hash_key`]).
//!
//! Pure: opens no sockets and reads no clock.

/// Live load of a pool's backends, by index, as the policies see it.
pub trait Load {
    /// Requests currently in flight to backend `i`.
    fn in_flight(&self, i: usize) -> u64;
    /// Decayed latency average of backend `i` in nanoseconds (as of the caller's `now`); 0.0
    /// when unknown.
    fn latency_ewma(&self, i: usize) -> f64;
}

/// One backend as the policies need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member<'a> {
    /// Stable backend name; the hash ring is derived from names so reordering the config
    /// does not move keys.
    pub name: &'a str,
    /// Relative share of traffic; 0 means drained (never picked by any policy).
    pub weight: u32,
}

/// Stable 64-bit hash of a hash-key value (header value, cookie value, client IP bytes).
///
/// FNV-1a 64 followed by the murmur3 `fmix64` finalizer: fully specified arithmetic, so every
/// process, platform and Rust version (and therefore every appliance in a farm) agrees.
/// FNV alone mixes its last bytes poorly; the finalizer spreads them over all 64 bits.
pub fn hash_key(bytes: &[u8]) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}
