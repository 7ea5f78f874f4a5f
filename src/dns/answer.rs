//! Building an answer: zone view + pool health + rotation turn + question → the records and
//! the response code.
//!
//! Pure: no sockets, no clock, no randomness. Health comes in through the [`Health`] seam (the
//! handler reads the router's snapshots; tests pass a table), the rotation turn through a
//! function of the name (the handler takes the name's next turn; tests pass a number).

use std::net::IpAddr;

use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::rdata::{A, AAAA};
use hickory_server::proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};

use super::zone::{NameEntry, Node, Source, ZoneView, Zones};

/// Largest UDP payload lockstep advertises and sends: the DNS flag day 2020 value, which
/// avoids IP fragmentation on common paths.
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// The backends of a pool as DNS sees them right now.
pub trait Health {
    /// Appends each backend of pool `pool` as (its DNS address, whether it is available now),
    /// in config order. Appends nothing for an unknown pool.
    fn backends(&self, pool: &str, out: &mut Vec<(IpAddr, bool)>);
}

/// One question.
#[derive(Debug, Clone, Copy)]
pub struct Question<'a> {
    /// The name as asked (its case is kept in the answer's owner names).
    pub name: &'a Name,
    /// The name, lowercased, for lookups.
    pub lower: &'a LowerName,
    /// Asked type.
    pub qtype: RecordType,
    /// Asked class.
    pub qclass: DNSClass,
}

/// The outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Response code.
    pub rcode: ResponseCode,
    /// Whether the AA bit is set (every answer from inside a zone).
    pub authoritative: bool,
    /// Answer section.
    pub answers: Vec<Record>,
    /// Authority section (the SOA of negative answers).
    pub authorities: Vec<Record>,
    /// Additional section (glue of in-zone nameservers).
    pub additionals: Vec<Record>,
    /// The pool whose backends are all listed because none was available (fail open).
    pub fail_open: Option<String>,
}

impl Answer {
    fn refused() -> Answer {
        Answer {
            rcode: ResponseCode::Refused,
            authoritative: false,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            fail_open: None,
        }
    }
}

/// Which address families a question wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
    Both,
}

impl Family {
    fn admits(self, ip: &IpAddr) -> bool {
        match self {
            Family::V4 => ip.is_ipv4(),
            Family::V6 => ip.is_ipv6(),
            Family::Both => true,
        }
    }
}

/// Answers `q` from `zones`.
///
/// - Outside every zone, or a class other than IN/ANY: REFUSED, not authoritative.
/// - A name with addresses: A / AAAA (ANY: both) of its available addresses, rotated to start
///   at `turn(name) % n`, at most `zones.max_answers`. A pool whose backends of the asked
///   family are all down answers with all of them (`fail_open`): clients then still reach
///   something, and the proxy's own health view decides further.
/// - Apex SOA and NS (with the addresses of in-zone nameservers as glue).
/// - A name that exists with nothing of the asked type: NODATA (NOERROR, no answers); a name
///   that does not exist: NXDOMAIN; both with the zone's SOA in the authority section, its
///   TTL the negative TTL.
pub fn answer(
    zones: &Zones,
    q: &Question<'_>,
    health: &impl Health,
    turn: impl FnOnce(&NameEntry) -> usize,
) -> Answer {
    if q.qclass != DNSClass::IN && q.qclass != DNSClass::ANY {
        return Answer::refused();
    }
    let Some(zone) = zones.zone_for(q.lower) else {
        return Answer::refused();
    };
    let mut out = Answer {
        rcode: ResponseCode::NoError,
        authoritative: true,
        answers: Vec::new(),
        authorities: Vec::new(),
        additionals: Vec::new(),
        fail_open: None,
    };
    let entry = match zone.node(q.lower) {
        Node::Missing => {
            out.rcode = ResponseCode::NXDomain;
            out.authorities.push(zone.negative_soa.clone());
            return out;
        }
        Node::Exists(entry) => entry,
    };
    let is_apex = *q.lower == zone.apex;
    let any = q.qtype == RecordType::ANY;
    if is_apex && (q.qtype == RecordType::SOA || any) {
        let mut soa = zone.soa.clone();
        soa.name = q.name.clone();
        out.answers.push(soa);
    }
    if is_apex && (q.qtype == RecordType::NS || any) {
        for ns in &zone.nameservers {
            let mut ns = ns.clone();
            ns.name = q.name.clone();
            out.answers.push(ns);
        }
        out.additionals = glue(zones, zone, health);
    }
    let family = match q.qtype {
        RecordType::A => Some(Family::V4),
        RecordType::AAAA => Some(Family::V6),
        RecordType::ANY => Some(Family::Both),
        _ => None,
    };
    if let (Some(entry), Some(family)) = (entry, family) {
        let (addrs, fail_open) = select(
            &entry.source,
            family,
            health,
            turn(entry),
            zones.max_answers,
        );
        if fail_open {
            if let Source::Pool(p) = &entry.source {
                out.fail_open = Some(p.clone());
            }
        }
        out.answers.extend(
            addrs
                .into_iter()
                .map(|ip| address_record(q.name, zone.ttl, ip)),
        );
    }
    if out.answers.is_empty() {
        out.authorities.push(zone.negative_soa.clone());
    }
    out
}

fn address_record(name: &Name, ttl: u32, ip: IpAddr) -> Record {
    let data = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name.clone(), ttl, data)
}

/// The A/AAAA records of the zone's nameservers that live inside it.
fn glue(zones: &Zones, zone: &ZoneView, health: &impl Health) -> Vec<Record> {
    let mut out = Vec::new();
    for ns in &zone.nameservers {
        let RData::NS(target) = &ns.data else {
            continue;
        };
        let lower = LowerName::new(&target.0);
        if let Some(entry) = zone.entry(&lower) {
            // No rotation for glue: it is a hint, and a stable order keeps it cacheable.
            let (addrs, _) = select(&entry.source, Family::Both, health, 0, zones.max_answers);
            out.extend(
                addrs
                    .into_iter()
                    .map(|ip| address_record(&target.0, zone.ttl, ip)),
            );
        }
    }
    out
}

/// The addresses of `source` in `family`: the available ones (all of them when none is, for
/// a pool), without duplicates, rotated to start at `turn`, at most `max`. Returns whether it
/// failed open.
fn select(
    source: &Source,
    family: Family,
    health: &impl Health,
    turn: usize,
    max: usize,
) -> (Vec<IpAddr>, bool) {
    let mut candidates = Vec::new();
    let fail_open = candidates_in_place(source, |ip| family.admits(ip), health, &mut candidates);
    let mut chosen: Vec<IpAddr> = candidates.into_iter().map(|(ip, _)| ip).collect();
    let n = chosen.len();
    if n == 0 {
        return (chosen, false);
    }
    chosen.rotate_left(turn % n);
    chosen.truncate(max);
    (chosen, fail_open)
}

/// Fills `out` (cleared first; reused by the UDP fast path so it allocates nothing) with the
/// addresses a name answers with, before rotation: those of `source` that `admits` takes,
/// duplicates merged (two backends on one host share an address, available if either is),
/// then only the available ones — or all of them when none is (a pool failing open, returned
/// as `true`).
pub(super) fn candidates_in_place(
    source: &Source,
    admits: impl Fn(&IpAddr) -> bool,
    health: &impl Health,
    out: &mut Vec<(IpAddr, bool)>,
) -> bool {
    out.clear();
    match source {
        Source::Pool(p) => health.backends(p, out),
        Source::Addresses(a) => out.extend(a.iter().map(|ip| (*ip, true))),
    }
    out.retain(|(ip, _)| admits(ip));
    let mut unique = 0;
    for i in 0..out.len() {
        let (ip, up) = out[i];
        match out[..unique].iter_mut().find(|(u, _)| *u == ip) {
            Some((_, u)) => *u |= up,
            None => {
                out[unique] = (ip, up);
                unique += 1;
            }
        }
    }
    out.truncate(unique);
    let fail_open = !out.is_empty() && !out.iter().any(|(_, up)| *up);
    if !fail_open {
        out.retain(|(_, up)| *up);
    }
    fail_open
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Dns, Record as CfgRecord, Target, Zone};
    use std::collections::HashMap;
    use std::str::FromStr;

    struct Table(HashMap<&'static str, Vec<(IpAddr, bool)>>);

    impl Health for Table {
        fn backends(&self, pool: &str, out: &mut Vec<(IpAddr, bool)>) {
            out.extend(self.0.get(pool).into_iter().flatten().copied());
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn health(up: [bool; 3]) -> Table {
        Table(HashMap::from([(
            "www",
            vec![
                (ip("192.0.2.1"), up[0]),
                (ip("192.0.2.2"), up[1]),
                (ip("192.0.2.3"), up[2]),
                (ip("2001:db8::1"), true),
            ],
        )]))
    }

    fn zones(max_answers: u32) -> Zones {
        let rec = |name: &str, target: Target| CfgRecord {
            name: name.into(),
            target,
        };
        Zones::build(
            &Dns {
                bind: "127.0.0.1:0".parse().unwrap(),
                max_answers,
                max_tcp_connections: 256,
                rrl: crate::config::Rrl::default(),
                zones: vec![Zone {
                    name: "farm.test".into(),
                    ttl: 30,
                    nameservers: vec!["ns1.farm.test".into(), "ns.elsewhere.test".into()],
                    records: vec![
                        rec("www.farm.test", Target::Pool("www".into())),
                        rec(
                            "lb.farm.test",
                            Target::Addresses(vec![ip("192.0.2.10"), ip("192.0.2.11")]),
                        ),
                        rec("ns1.farm.test", Target::Addresses(vec![ip("192.0.2.53")])),
                    ],
                }],
            },
            9,
        )
    }

    fn ask(z: &Zones, h: &Table, name: &str, qtype: RecordType, turn: usize) -> Answer {
        let name = Name::from_ascii(name).unwrap();
        let lower = LowerName::new(&name);
        let q = Question {
            name: &name,
            lower: &lower,
            qtype,
            qclass: DNSClass::IN,
        };
        answer(z, &q, h, |_| turn)
    }

    fn addrs(a: &Answer) -> Vec<String> {
        a.answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.to_string(),
                RData::AAAA(a) => a.0.to_string(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn pool_name_answers_its_available_backends_rotated() {
        let z = zones(8);
        let h = health([true, true, true]);
        let a = ask(&z, &h, "www.farm.test.", RecordType::A, 0);
        assert_eq!(a.rcode, ResponseCode::NoError);
        assert!(a.authoritative && a.fail_open.is_none());
        assert_eq!(addrs(&a), ["192.0.2.1", "192.0.2.2", "192.0.2.3"]);
        let a = ask(&z, &h, "www.farm.test.", RecordType::A, 4);
        assert_eq!(addrs(&a), ["192.0.2.2", "192.0.2.3", "192.0.2.1"]);
        assert!(a.answers.iter().all(|r| r.ttl == 30));
    }

    #[test]
    fn every_address_comes_first_equally_often() {
        let z = zones(8);
        let h = health([true, true, true]);
        let mut firsts: HashMap<String, usize> = HashMap::new();
        for turn in 0..300 {
            let a = ask(&z, &h, "www.farm.test.", RecordType::A, turn);
            *firsts.entry(addrs(&a)[0].clone()).or_default() += 1;
        }
        assert_eq!(firsts.len(), 3);
        assert!(firsts.values().all(|&n| n == 100), "{firsts:?}");
    }

    #[test]
    fn down_backends_leave_the_answer() {
        let z = zones(8);
        let a = ask(
            &z,
            &health([true, false, true]),
            "www.farm.test.",
            RecordType::A,
            0,
        );
        assert_eq!(addrs(&a), ["192.0.2.1", "192.0.2.3"]);
        assert!(a.fail_open.is_none());
    }

    #[test]
    fn all_down_fails_open_with_every_backend() {
        let z = zones(8);
        let a = ask(
            &z,
            &health([false, false, false]),
            "www.farm.test.",
            RecordType::A,
            0,
        );
        assert_eq!(addrs(&a), ["192.0.2.1", "192.0.2.2", "192.0.2.3"]);
        assert_eq!(a.fail_open.as_deref(), Some("www"));
    }

    #[test]
    fn max_answers_caps_the_rotated_list() {
        let z = zones(2);
        let a = ask(&z, &health([true; 3]), "www.farm.test.", RecordType::A, 2);
        assert_eq!(addrs(&a), ["192.0.2.3", "192.0.2.1"]);
    }

    #[test]
    fn aaaa_answers_the_v6_addresses_only() {
        let z = zones(8);
        let a = ask(
            &z,
            &health([true; 3]),
            "www.farm.test.",
            RecordType::AAAA,
            0,
        );
        assert_eq!(addrs(&a), ["2001:db8::1"]);
        let a = ask(&z, &health([true; 3]), "lb.farm.test.", RecordType::AAAA, 0);
        assert_eq!(a.rcode, ResponseCode::NoError);
        assert!(a.answers.is_empty(), "NODATA: {a:?}");
        assert!(matches!(a.authorities[0].data, RData::SOA(_)));
    }

    #[test]
    fn duplicate_addresses_are_answered_once() {
        let z = zones(8);
        let h = Table(HashMap::from([(
            "www",
            vec![(ip("127.0.0.1"), false), (ip("127.0.0.1"), true)],
        )]));
        let a = ask(&z, &h, "www.farm.test.", RecordType::A, 0);
        assert_eq!(addrs(&a), ["127.0.0.1"]);
        assert!(a.fail_open.is_none());
    }

    #[test]
    fn unknown_name_is_nxdomain_with_the_negative_soa() {
        let z = zones(8);
        let a = ask(&z, &health([true; 3]), "nope.farm.test.", RecordType::A, 0);
        assert_eq!(a.rcode, ResponseCode::NXDomain);
        assert!(a.authoritative && a.answers.is_empty());
        assert_eq!(a.authorities.len(), 1);
        let RData::SOA(soa) = &a.authorities[0].data else {
            panic!("{a:?}")
        };
        assert_eq!(a.authorities[0].ttl, 30u32.min(soa.minimum));
    }

    #[test]
    fn outside_the_zones_is_refused() {
        let z = zones(8);
        let a = ask(&z, &health([true; 3]), "example.com.", RecordType::A, 0);
        assert_eq!(a.rcode, ResponseCode::Refused);
        assert!(!a.authoritative && a.answers.is_empty() && a.authorities.is_empty());
    }

    #[test]
    fn other_classes_are_refused() {
        let z = zones(8);
        let name = Name::from_str("www.farm.test.").unwrap();
        let lower = LowerName::new(&name);
        let q = Question {
            name: &name,
            lower: &lower,
            qtype: RecordType::A,
            qclass: DNSClass::CH,
        };
        assert_eq!(
            answer(&z, &q, &health([true; 3]), |_| 0).rcode,
            ResponseCode::Refused
        );
    }

    #[test]
    fn apex_answers_soa_and_ns_with_glue_for_in_zone_nameservers() {
        let z = zones(8);
        let h = health([true; 3]);
        let a = ask(&z, &h, "Farm.Test.", RecordType::SOA, 0);
        assert_eq!(a.answers.len(), 1);
        assert_eq!(a.answers[0].name.to_string(), "Farm.Test.");
        let RData::SOA(soa) = &a.answers[0].data else {
            panic!("{a:?}")
        };
        assert_eq!(soa.serial, 9);
        let a = ask(&z, &h, "farm.test.", RecordType::NS, 0);
        let ns: Vec<String> = a
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::NS(n) => n.0.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(ns, ["ns1.farm.test.", "ns.elsewhere.test."]);
        assert_eq!(a.additionals.len(), 1, "glue only for ns1: {a:?}");
        assert_eq!(a.additionals[0].name.to_string(), "ns1.farm.test.");
        // The apex has no address record: NODATA for A.
        let a = ask(&z, &h, "farm.test.", RecordType::A, 0);
        assert_eq!(a.rcode, ResponseCode::NoError);
        assert!(a.answers.is_empty() && a.authorities.len() == 1);
    }

    #[test]
    fn other_types_at_a_name_are_nodata() {
        let z = zones(8);
        let a = ask(&z, &health([true; 3]), "www.farm.test.", RecordType::MX, 0);
        assert_eq!(a.rcode, ResponseCode::NoError);
        assert!(a.answers.is_empty());
        assert!(matches!(a.authorities[0].data, RData::SOA(_)));
    }

    #[test]
    fn owner_names_keep_the_asked_case() {
        let z = zones(8);
        let a = ask(&z, &health([true; 3]), "WwW.fArM.test.", RecordType::A, 0);
        assert!(a
            .answers
            .iter()
            .all(|r| r.name.to_string() == "WwW.fArM.test."));
    }
}
