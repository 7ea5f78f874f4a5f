//! The `dns:` section: raw zones → checked [`Dns`] that the DNS responder trusts.
//!
//! Names are kept as lowercase text without the trailing dot (`www.farm.test`); the responder
//! turns them into wire names. Like the rest of `config`, this opens no sockets and reports
//! every problem at the line and column where it was written.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde_saphyr::Spanned;

use super::check::Ctx;
use super::error::unknown_pool;
use super::raw::{RawDns, RawRecord, RawRrl, RawZone};
use super::{ConfigError, Pos};

/// Default TTL of a zone's answers, seconds (short, so that health changes reach clients fast).
pub const DEFAULT_DNS_TTL: u32 = 30;
/// Default most addresses in one answer: the most there may be ([`MAX_ANSWERS_LIMIT`]).
pub const DEFAULT_MAX_ANSWERS: u32 = 8;

/// Size of a DNS header.
const HEADER: u32 = 12;
/// The longest question: a 255-byte name in wire form (RFC 1035 §2.3.4), its type and class.
const LONGEST_QUESTION: u32 = 255 + 4;
/// An AAAA record in an answer (the larger of A and AAAA): its owner a pointer to the
/// question (2), type (2), class (2), TTL (4), data length (2) and the address (16).
const AAAA_RECORD: u32 = 28;
/// The most addresses one answer may list: as many AAAA records as fit, after the header and
/// the longest question, in the 512 bytes of a UDP answer without EDNS (RFC 1035 §4.2.1):
/// (512 − 12 − 259) / 28 = 8. So an address answer never needs TC for any name, and it stays
/// small against the query that asked for it: at most 12 + q + 8 × 28 bytes for a question of
/// q bytes, about 8× the query for `www.farm.test` and 13× for a one-letter name, where
/// answers filling EDNS's 1232 bytes were ~30× (DNS amplification). Listing more addresses
/// would not spread clients any better: rotation already starts each answer at the next one.
pub const MAX_ANSWERS_LIMIT: u32 = (512 - HEADER - LONGEST_QUESTION) / AAAA_RECORD;

/// Default most DNS-over-TCP connections open at once. TCP is the fallback of the few clients
/// told TC (and of RRL's slipped answers); each connection holds a task, a descriptor and up
/// to a 64 KiB query buffer, so 256 bound that to ~16 MiB while leaving room for every
/// resolver of a busy farm that retries over TCP at once.
pub const DEFAULT_MAX_TCP_CONNECTIONS: u32 = 256;

/// Default answers per second to one client prefix. Resolvers cache answers for the TTL, so
/// even a /24 full of them asks a farm's few names far less often; 200 (Knot's documented
/// example) leaves them room and bounds what a spoofed flood can reflect at one victim prefix
/// to 200 answers (≤ ~50 KB) a second. Enabled by default (Knot's and NSD's RRL are off until
/// configured): an appliance facing the internet should not be an amplifier out of the box.
pub const DEFAULT_RRL_RATE: u32 = 200;
/// Default slip: every 2nd answer over the rate goes out truncated (NSD's and BIND's default),
/// so a real client behind a limited prefix soon retries over TCP, unlimited.
pub const DEFAULT_RRL_SLIP: u32 = 2;
/// Largest slip (Knot's bound): beyond it a limited client hardly ever hears back.
pub const MAX_RRL_SLIP: u32 = 100;
/// Default IPv4 prefix sharing one rate (Knot's and NSD's).
pub const DEFAULT_RRL_IPV4_PREFIX: u8 = 24;
/// Default IPv6 prefix sharing one rate (Knot's): a site's allocation is usually a /56 or /48.
pub const DEFAULT_RRL_IPV6_PREFIX: u8 = 56;

/// The checked `dns:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dns {
    /// Address for UDP and TCP.
    pub bind: SocketAddr,
    /// Most addresses in one answer (1..=[`MAX_ANSWERS_LIMIT`]).
    pub max_answers: u32,
    /// Most DNS-over-TCP connections open at once (≥ 1); more are closed at accept.
    pub max_tcp_connections: u32,
    /// Response-rate limiting of UDP answers.
    pub rrl: Rrl,
    /// Authoritative zones, in config order.
    pub zones: Vec<Zone>,
}

/// The checked `dns.rrl:` section: response-rate limiting of UDP answers per client prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rrl {
    /// Answers per second to one client prefix (also the burst); 0: RRL off.
    pub rate_limit: u32,
    /// Every `slip`-th answer over the rate goes out truncated (TC); 0: all are dropped.
    pub slip: u32,
    /// IPv4 prefix length sharing one rate (1..=32).
    pub ipv4_prefix: u8,
    /// IPv6 prefix length sharing one rate (1..=128).
    pub ipv6_prefix: u8,
}

impl Default for Rrl {
    fn default() -> Self {
        Rrl {
            rate_limit: DEFAULT_RRL_RATE,
            slip: DEFAULT_RRL_SLIP,
            ipv4_prefix: DEFAULT_RRL_IPV4_PREFIX,
            ipv6_prefix: DEFAULT_RRL_IPV6_PREFIX,
        }
    }
}

/// One authoritative zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    /// The apex, lowercase, no trailing dot (`farm.test`).
    pub name: String,
    /// TTL of every answer, seconds (≥ 1).
    pub ttl: u32,
    /// NS names of the apex, lowercase full names without the trailing dot.
    pub nameservers: Vec<String>,
    /// The names of the zone.
    pub records: Vec<Record>,
}

/// One name of a zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The full name, lowercase, no trailing dot (`www.farm.test`; the apex for `@`).
    pub name: String,
    /// What it answers with.
    pub target: Target,
}

/// What a name answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The available backends of this pool (their `dns_address`).
    Pool(String),
    /// These fixed addresses.
    Addresses(Vec<IpAddr>),
}

/// Checks a domain name written in the config: labels of 1–63 letters, digits, `-` or `_`,
/// not starting or ending with `-`, 253 characters at most. Returns it lowercase without the
/// trailing dot.
pub fn check_name(s: &str) -> Result<String, String> {
    let s = s.trim();
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.is_empty() {
        return Err("is empty".into());
    }
    if s.len() > 253 {
        return Err(format!(
            "is {} characters long; a domain name has at most 253",
            s.len()
        ));
    }
    for label in s.split('.') {
        if label.is_empty() {
            return Err("has an empty label (two dots in a row, or a leading dot)".into());
        }
        if label.len() > 63 {
            return Err(format!(
                "has the label `{label}` of {} characters; a label has at most 63",
                label.len()
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!(
                "has `{c}` in the label `{label}`: use letters, digits, - and _"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("has the label `{label}` starting or ending with -"));
        }
    }
    Ok(s.to_ascii_lowercase())
}

/// Whether `name` is `zone` or under it (both lowercase, no trailing dot).
pub fn in_zone(name: &str, zone: &str) -> bool {
    name == zone
        || name
            .strip_suffix(zone)
            .is_some_and(|rest| rest.ends_with('.'))
}

/// Checks the `dns:` section; `pools` maps pool names to their index.
pub(super) fn dns(cx: &mut Ctx<'_>, raw: &RawDns, pools: &HashMap<String, usize>) -> Option<Dns> {
    let bind = cx.socket_addr(&raw.bind, "dns bind");
    let max_answers = match &raw.max_answers {
        None => DEFAULT_MAX_ANSWERS,
        Some(m) if m.value == 0 => {
            cx.err(
                m,
                "dns.max_answers is 0: an answer needs at least 1 address (default: 8)",
            );
            DEFAULT_MAX_ANSWERS
        }
        Some(m) if m.value > MAX_ANSWERS_LIMIT => {
            cx.err(
                m,
                format!(
                    "dns.max_answers is {}: at most {MAX_ANSWERS_LIMIT}, as many AAAA records as fit a 512-byte UDP answer for the longest name; more would only make answers bigger (DNS amplification), rotation already spreads clients over every address: use {MAX_ANSWERS_LIMIT} or fewer",
                    m.value
                ),
            );
            DEFAULT_MAX_ANSWERS
        }
        Some(m) => m.value,
    };
    let max_tcp_connections = match &raw.max_tcp_connections {
        None => DEFAULT_MAX_TCP_CONNECTIONS,
        Some(m) if m.value == 0 => {
            cx.err(
                m,
                format!("dns.max_tcp_connections is 0: DNS over TCP would refuse every client, and truncated answers tell them to use it; use at least 1 (default: {DEFAULT_MAX_TCP_CONNECTIONS})"),
            );
            DEFAULT_MAX_TCP_CONNECTIONS
        }
        Some(m) => m.value,
    };
    let rrl = raw.rrl.as_ref().map_or_else(Rrl::default, |r| rrl(cx, r));
    let mut zones: Vec<Zone> = Vec::new();
    for z in &raw.zones {
        if let Some(zone) = zone(cx, z, pools) {
            if zones.iter().any(|o| o.name == zone.name) {
                cx.err(
                    &z.name,
                    format!(
                        "duplicate zone `{}`: each zone may appear once; merge their records",
                        zone.name
                    ),
                );
                continue;
            }
            zones.push(zone);
        }
    }
    Some(Dns {
        bind: bind?,
        max_answers,
        max_tcp_connections,
        rrl,
        zones,
    })
}

/// Checks the `dns.rrl:` section; absent keys take their defaults.
fn rrl(cx: &mut Ctx<'_>, raw: &RawRrl) -> Rrl {
    let d = Rrl::default();
    let slip = match &raw.slip {
        None => d.slip,
        Some(s) if s.value > MAX_RRL_SLIP => {
            cx.err(
                s,
                format!(
                    "dns.rrl.slip is {}: at most {MAX_RRL_SLIP} (a limited client would hardly ever be told to retry over TCP); 1 truncates every answer over the rate, 0 drops them all (default: {DEFAULT_RRL_SLIP})",
                    s.value
                ),
            );
            d.slip
        }
        Some(s) => s.value,
    };
    let mut prefix = |v: &Option<Spanned<u32>>, key: &str, bits: u8, default: u8| -> u8 {
        let Some(v) = v else { return default };
        match u8::try_from(v.value) {
            Ok(p) if (1..=bits).contains(&p) => p,
            _ => {
                cx.err(
                    v,
                    format!(
                        "dns.rrl.{key} is {}: a prefix length is 1 to {bits} (0 would put every client under one shared rate) (default: {default})",
                        v.value
                    ),
                );
                default
            }
        }
    };
    let ipv4_prefix = prefix(&raw.ipv4_prefix, "ipv4_prefix", 32, d.ipv4_prefix);
    let ipv6_prefix = prefix(&raw.ipv6_prefix, "ipv6_prefix", 128, d.ipv6_prefix);
    Rrl {
        rate_limit: raw.rate_limit.as_ref().map_or(d.rate_limit, |r| r.value),
        slip,
        ipv4_prefix,
        ipv6_prefix,
    }
}

fn zone(cx: &mut Ctx<'_>, z: &RawZone, pools: &HashMap<String, usize>) -> Option<Zone> {
    let name = match check_name(&z.name.value) {
        Ok(n) => Some(n),
        Err(e) => {
            cx.err(
                &z.name,
                format!(
                    "zone name `{}` {e}: write a domain such as farm.test",
                    z.name.value
                ),
            );
            None
        }
    };
    let ttl = match &z.ttl {
        None => DEFAULT_DNS_TTL,
        Some(t) if t.value == 0 => {
            cx.err(
                t,
                "zone ttl is 0: answers could not be cached at all; use at least 1 (default: 30)",
            );
            DEFAULT_DNS_TTL
        }
        Some(t) => t.value,
    };
    let records = records(cx, z, name.as_deref(), pools);
    let nameservers = nameservers(cx, z, name.as_deref(), &records);
    Some(Zone {
        name: name?,
        ttl,
        nameservers,
        records,
    })
}

/// A zone's records, each name once.
fn records(
    cx: &mut Ctx<'_>,
    z: &RawZone,
    zone: Option<&str>,
    pools: &HashMap<String, usize>,
) -> Vec<Record> {
    let mut records: Vec<Record> = Vec::new();
    let mut seen = HashSet::new();
    for r in &z.records {
        let Some(rec) = record(cx, r, zone, pools) else {
            continue;
        };
        if !seen.insert(rec.name.clone()) {
            cx.err(
                &r.name,
                format!(
                    "duplicate record `{}` in zone `{}`: give each name one record (list several addresses in `addresses:`)",
                    r.name.value,
                    zone.unwrap_or("?")
                ),
            );
            continue;
        }
        records.push(rec);
    }
    records
}

/// A zone's nameservers: full host names, and one inside the zone has its address there (glue),
/// or resolvers could never reach it.
fn nameservers(
    cx: &mut Ctx<'_>,
    z: &RawZone,
    zone: Option<&str>,
    records: &[Record],
) -> Vec<String> {
    let mut nameservers = Vec::new();
    for ns in &z.nameservers {
        match check_name(&ns.value) {
            Err(e) => cx.err(
                ns,
                format!(
                    "nameserver `{}` {e}: write a full host name such as ns1.farm.test",
                    ns.value
                ),
            ),
            Ok(n) if !n.contains('.') => cx.err(
                ns,
                format!(
                    "nameserver `{n}` is not a full host name: write e.g. `{n}.{}`",
                    zone.unwrap_or("farm.test")
                ),
            ),
            Ok(n) => {
                if let Some(zn) = zone {
                    if in_zone(&n, zn) && !records.iter().any(|r| r.name == n) {
                        let rel = n.strip_suffix(zn).unwrap_or(&n);
                        let rel = rel.strip_suffix('.').unwrap_or(rel);
                        let rel = if rel.is_empty() { "@" } else { rel };
                        cx.err(
                            ns,
                            format!(
                                "nameserver `{n}` is inside zone `{zn}` but has no record there: add `{{ name: {rel}, addresses: [...] }}` so resolvers can find it"
                            ),
                        );
                    }
                }
                nameservers.push(n);
            }
        }
    }
    nameservers
}

fn record(
    cx: &mut Ctx<'_>,
    r: &RawRecord,
    zone: Option<&str>,
    pools: &HashMap<String, usize>,
) -> Option<Record> {
    let written = r.name.value.trim();
    let name = if written == "@" {
        zone.map(str::to_string)
    } else {
        match check_name(written) {
            Err(e) => {
                cx.err(
                    &r.name,
                    format!(
                        "record name `{written}` {e}: write a name relative to the zone (www) or @ for the apex"
                    ),
                );
                None
            }
            // A trailing dot marks a full name, which must then be inside the zone.
            Ok(n) if written.ends_with('.') => match zone {
                Some(z) if !in_zone(&n, z) => {
                    cx.err(
                        &r.name,
                        format!("record name `{written}` is outside zone `{z}`: write a name relative to the zone (www) or @ for the apex"),
                    );
                    None
                }
                _ => Some(n),
            },
            Ok(n) => zone.map(|z| format!("{n}.{z}")),
        }
    };
    if let Some(n) = &name {
        if n.len() > 253 {
            cx.err(
                &r.name,
                format!("record name `{n}` is longer than 253 characters with its zone"),
            );
            return None;
        }
    }
    let target = match (&r.pool, &r.addresses) {
        (Some(_), Some(_)) => {
            cx.err(
                &r.name,
                format!("record `{written}` has both `pool:` and `addresses:`: keep one"),
            );
            None
        }
        (None, None) => {
            cx.err(
                &r.name,
                format!(
                    "record `{written}` has neither `pool:` nor `addresses:`: add one (pool: NAME, or addresses: [\"192.0.2.10\"])"
                ),
            );
            None
        }
        (Some(p), None) => pool_target(cx, p, pools),
        (None, Some(list)) => addresses(cx, r, list),
    };
    Some(Record {
        name: name?,
        target: target?,
    })
}

fn pool_target(
    cx: &mut Ctx<'_>,
    p: &Spanned<String>,
    pools: &HashMap<String, usize>,
) -> Option<Target> {
    if pools.contains_key(&p.value) {
        return Some(Target::Pool(p.value.clone()));
    }
    let hint = unknown_pool(&p.value, pools);
    cx.err(
        p,
        format!("record to pool `{}`, which does not exist: {hint}", p.value),
    );
    None
}

fn addresses(cx: &mut Ctx<'_>, r: &RawRecord, list: &[Spanned<String>]) -> Option<Target> {
    if list.is_empty() {
        cx.errors.push(ConfigError::at(
            cx.file,
            Pos::of(&r.name),
            format!(
                "record `{}` has an empty `addresses:` list: add at least one address",
                r.name.value
            ),
        ));
        return None;
    }
    let mut out = Vec::new();
    let mut ok = true;
    for a in list {
        match IpAddr::from_str(a.value.trim()) {
            Ok(ip) => out.push(ip),
            Err(_) => {
                cx.err(
                    a,
                    format!(
                        "address `{}` is not an IP address: write e.g. \"192.0.2.10\" or \"2001:db8::10\"",
                        a.value
                    ),
                );
                ok = false;
            }
        }
    }
    ok.then_some(Target::Addresses(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_lowercased() {
        assert_eq!(check_name("Farm.Test.").as_deref(), Ok("farm.test"));
        assert_eq!(check_name("_srv.a-b.test").as_deref(), Ok("_srv.a-b.test"));
        assert!(check_name("").is_err());
        assert!(check_name("a..b").is_err());
        assert!(check_name("-a.b").is_err());
        assert!(check_name("a b.c").is_err());
        assert!(check_name(&format!("{}.test", "a".repeat(64))).is_err());
        assert!(check_name(&format!("{}.test", "a".repeat(63))).is_ok());
    }

    #[test]
    fn in_zone_needs_a_label_boundary() {
        assert!(in_zone("farm.test", "farm.test"));
        assert!(in_zone("www.farm.test", "farm.test"));
        assert!(!in_zone("myfarm.test", "farm.test"));
        assert!(!in_zone("test", "farm.test"));
    }
}
