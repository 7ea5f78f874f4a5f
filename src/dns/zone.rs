//! The zone view: the checked `dns:` config turned into wire names and ready-made SOA and NS
//! records, with the responder's limits of that generation (answer size, rate limits, TCP
//! connections), built once per config generation and read by every query.
//!
//! It owns each name's rotation turn (an atomic counter, so that every address of a name comes
//! first equally often) but nothing else that changes: health is read from the router's
//! snapshots at answer time. Pure apart from that counter: no sockets, no clock (the serial is
//! computed by [`next_serial`] from a time passed in).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hickory_server::proto::rr::rdata::{NS, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use tracing::warn;

use super::rrl::Limits;
use crate::config::{Dns, Target};

/// SOA refresh/retry/expire: only secondaries read them, and lockstep has none (no zone
/// transfers), so the usual values are enough.
const SOA_REFRESH: i32 = 3600;
const SOA_RETRY: i32 = 600;
const SOA_EXPIRE: i32 = 604_800;

/// The serial of a new zone generation: the current unix time, or one more than the previous
/// serial when that is not larger (two reloads in one second, or a clock set back), so that a
/// reload always bumps it (RFC 1982 arithmetic wraps; a u32 of seconds lasts until 2106).
pub fn next_serial(previous: Option<u32>, unix_now: u64) -> u32 {
    let now = u32::try_from(unix_now).unwrap_or(u32::MAX);
    match previous {
        Some(p) if now <= p => p.wrapping_add(1),
        _ => now,
    }
}

/// Every zone the responder is authoritative for, at one config generation.
#[derive(Debug)]
pub struct Zones {
    /// Longest apex first, so the first zone containing a name is the most specific.
    zones: Vec<ZoneView>,
    /// Most addresses in one answer.
    pub max_answers: usize,
    /// Response-rate limits of UDP answers.
    pub rrl: Limits,
    /// Most DNS-over-TCP connections open at once.
    pub max_tcp_connections: usize,
    /// SOA serial of every zone of this generation.
    pub serial: u32,
    /// Every name with addresses, keyed by its lowercased wire form, with the TTL of the zone
    /// that answers for it (the most specific one): the UDP fast path's lookup.
    by_wire: HashMap<Box<[u8]>, (u32, Arc<NameEntry>)>,
}

/// One zone.
#[derive(Debug)]
pub struct ZoneView {
    /// The apex.
    pub apex: LowerName,
    /// TTL of the zone's answers.
    pub ttl: u32,
    /// The apex SOA record.
    pub soa: Record,
    /// The SOA as it goes in the authority section of negative answers: its TTL is
    /// min(SOA TTL, SOA minimum) (RFC 2308 §3).
    pub negative_soa: Record,
    /// NS records of the apex.
    pub nameservers: Vec<Record>,
    names: HashMap<LowerName, Arc<NameEntry>>,
    /// Names that own nothing but have names under them (`b` when `a.b` exists): they exist,
    /// so a query for them is NODATA, not NXDOMAIN (RFC 8020).
    empty_non_terminals: HashSet<LowerName>,
}

/// A name that answers with addresses.
#[derive(Debug)]
pub struct NameEntry {
    /// The name as configured (the pool name is in `source`).
    pub name: Name,
    /// Where its addresses come from.
    pub source: Source,
    turn: AtomicUsize,
}

impl NameEntry {
    /// Takes this name's next rotation turn.
    pub fn next_turn(&self) -> usize {
        // Relaxed: the counter only has to hand out turns, not order other memory.
        self.turn.fetch_add(1, Ordering::Relaxed)
    }
}

/// Where a name's addresses come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The available backends of this pool.
    Pool(String),
    /// Fixed addresses.
    Addresses(Vec<IpAddr>),
}

/// What a name is within its zone.
#[derive(Debug)]
pub enum Node<'a> {
    /// The name exists; it has addresses when `Some`.
    Exists(Option<&'a NameEntry>),
    /// No such name in the zone.
    Missing,
}

fn wire_name(s: &str) -> Option<Name> {
    match Name::from_ascii(format!("{s}.")) {
        Ok(n) => Some(n),
        Err(e) => {
            // Config validation checked the name already; this is a belt, not the brace.
            warn!(name = s, error = %e, "dns name refused by the wire encoder; skipped");
            None
        }
    }
}

impl ZoneView {
    /// One configured zone: its SOA (serial `serial`), NS records, names and the empty
    /// non-terminals between them and the apex. `None` when the apex is not a DNS name.
    fn build(z: &crate::config::Zone, serial: u32) -> Option<ZoneView> {
        let apex = wire_name(&z.name)?;
        let mname = z
            .nameservers
            .first()
            .and_then(|n| wire_name(n))
            .unwrap_or_else(|| apex.clone());
        let rname = wire_name(&format!("hostmaster.{}", z.name)).unwrap_or(apex.clone());
        let soa_data = SOA::new(
            mname,
            rname,
            serial,
            SOA_REFRESH,
            SOA_RETRY,
            SOA_EXPIRE,
            z.ttl,
        );
        let soa = Record::from_rdata(apex.clone(), z.ttl, RData::SOA(soa_data.clone()));
        let negative_soa = Record::from_rdata(
            apex.clone(),
            z.ttl.min(soa_data.minimum),
            RData::SOA(soa_data),
        );
        let nameservers = z
            .nameservers
            .iter()
            .filter_map(|n| wire_name(n))
            .map(|n| Record::from_rdata(apex.clone(), z.ttl, RData::NS(NS(n))))
            .collect();
        let apex_lower = LowerName::new(&apex);
        let mut names = HashMap::new();
        let mut empty_non_terminals = HashSet::new();
        for r in &z.records {
            let Some(name) = wire_name(&r.name) else {
                continue;
            };
            let mut parent = name.base_name();
            while LowerName::new(&parent) != apex_lower && !parent.is_root() {
                empty_non_terminals.insert(LowerName::new(&parent));
                parent = parent.base_name();
            }
            let source = match &r.target {
                Target::Pool(p) => Source::Pool(p.clone()),
                Target::Addresses(a) => Source::Addresses(a.clone()),
            };
            let entry = NameEntry {
                name: name.clone(),
                source,
                turn: AtomicUsize::new(0),
            };
            names.insert(LowerName::new(&name), Arc::new(entry));
        }
        Some(ZoneView {
            apex: apex_lower,
            ttl: z.ttl,
            soa,
            negative_soa,
            nameservers,
            names,
            empty_non_terminals,
        })
    }
}

/// The fast path's index: each name with addresses by its lowercased wire form, only where the
/// query path would look (a name also inside a more specific zone is that zone's).
fn index_by_wire(zones: &[ZoneView]) -> HashMap<Box<[u8]>, (u32, Arc<NameEntry>)> {
    let mut by_wire = HashMap::new();
    for (i, zone) in zones.iter().enumerate() {
        for (lower, entry) in &zone.names {
            let owner = zones.iter().position(|z| z.apex.zone_of(lower));
            if owner == Some(i) {
                by_wire.insert(wire_key(lower), (zone.ttl, entry.clone()));
            }
        }
    }
    by_wire
}

impl Zones {
    /// Builds the view of `dns` with SOA serial `serial`.
    pub fn build(dns: &Dns, serial: u32) -> Zones {
        let mut zones: Vec<ZoneView> = dns
            .zones
            .iter()
            .filter_map(|z| ZoneView::build(z, serial))
            .collect();
        // Most specific first: a name is answered by the deepest zone that holds it.
        zones.sort_by_key(|z| std::cmp::Reverse(z.apex.num_labels()));
        let by_wire = index_by_wire(&zones);
        Zones {
            zones,
            max_answers: usize::try_from(dns.max_answers)
                .unwrap_or(usize::MAX)
                .max(1),
            rrl: Limits::new(&dns.rrl),
            max_tcp_connections: usize::try_from(dns.max_tcp_connections).unwrap_or(usize::MAX),
            serial,
            by_wire,
        }
    }

    /// The entry and TTL of a name with addresses, by its lowercased wire form (labels with
    /// their length bytes, ending with the root's 0).
    pub fn by_wire(&self, lower_wire: &[u8]) -> Option<(u32, &NameEntry)> {
        self.by_wire
            .get(lower_wire)
            .map(|(ttl, e)| (*ttl, e.as_ref()))
    }

    /// The most specific zone containing `name`, if any.
    pub fn zone_for(&self, name: &LowerName) -> Option<&ZoneView> {
        self.zones.iter().find(|z| z.apex.zone_of(name))
    }

    /// Every zone, most specific first.
    pub fn zones(&self) -> &[ZoneView] {
        &self.zones
    }
}

/// The lowercased wire form of `name`.
pub fn wire_key(name: &LowerName) -> Box<[u8]> {
    let name: &Name = name;
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name.iter() {
        out.push(u8::try_from(label.len()).unwrap_or(u8::MAX));
        out.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    out.push(0);
    out.into_boxed_slice()
}

impl ZoneView {
    /// What `name` (inside this zone) is.
    pub fn node(&self, name: &LowerName) -> Node<'_> {
        if let Some(e) = self.names.get(name) {
            return Node::Exists(Some(e.as_ref()));
        }
        if *name == self.apex || self.empty_non_terminals.contains(name) {
            return Node::Exists(None);
        }
        Node::Missing
    }

    /// The entry of `name`, when it has addresses.
    pub fn entry(&self, name: &LowerName) -> Option<&NameEntry> {
        self.names.get(name).map(|e| e.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Record as CfgRecord, Zone};
    use std::str::FromStr;

    fn lower(s: &str) -> LowerName {
        LowerName::new(&Name::from_str(s).unwrap())
    }

    fn dns() -> Dns {
        Dns {
            bind: "127.0.0.1:0".parse().unwrap(),
            max_answers: 8,
            max_tcp_connections: 256,
            rrl: crate::config::Rrl::default(),
            zones: vec![
                Zone {
                    name: "farm.test".into(),
                    ttl: 30,
                    nameservers: vec!["ns1.farm.test".into()],
                    records: vec![CfgRecord {
                        name: "a.b.farm.test".into(),
                        target: Target::Addresses(vec!["192.0.2.1".parse().unwrap()]),
                    }],
                },
                Zone {
                    name: "sub.farm.test".into(),
                    ttl: 10,
                    nameservers: vec![],
                    records: vec![],
                },
            ],
        }
    }

    #[test]
    fn serial_is_unix_time_and_always_increases() {
        assert_eq!(next_serial(None, 1_700_000_000), 1_700_000_000);
        assert_eq!(
            next_serial(Some(1_600_000_000), 1_700_000_000),
            1_700_000_000
        );
        assert_eq!(
            next_serial(Some(1_700_000_000), 1_700_000_000),
            1_700_000_001
        );
        assert_eq!(
            next_serial(Some(1_700_000_005), 1_700_000_000),
            1_700_000_006
        );
    }

    #[test]
    fn most_specific_zone_wins_and_names_outside_have_none() {
        let z = Zones::build(&dns(), 7);
        let apex = |n: &str| z.zone_for(&lower(n)).map(|z| z.apex.to_string());
        assert_eq!(apex("x.sub.farm.test.").as_deref(), Some("sub.farm.test."));
        assert_eq!(apex("WWW.Farm.Test.").as_deref(), Some("farm.test."));
        assert_eq!(apex("farm.example."), None);
        assert_eq!(apex("myfarm.test."), None);
    }

    #[test]
    fn apex_and_empty_non_terminals_exist_without_addresses() {
        let z = Zones::build(&dns(), 7);
        let zone = z.zone_for(&lower("farm.test.")).unwrap();
        assert!(matches!(
            zone.node(&lower("farm.test.")),
            Node::Exists(None)
        ));
        assert!(matches!(
            zone.node(&lower("b.farm.test.")),
            Node::Exists(None)
        ));
        assert!(matches!(
            zone.node(&lower("a.b.farm.test.")),
            Node::Exists(Some(_))
        ));
        assert!(matches!(zone.node(&lower("c.farm.test.")), Node::Missing));
    }

    #[test]
    fn soa_carries_the_serial_and_negative_ttl() {
        let z = Zones::build(&dns(), 42);
        let zone = z.zone_for(&lower("farm.test.")).unwrap();
        let RData::SOA(soa) = &zone.soa.data else {
            panic!("not an SOA: {:?}", zone.soa)
        };
        assert_eq!(soa.serial, 42);
        assert_eq!(soa.mname.to_string(), "ns1.farm.test.");
        assert_eq!(zone.negative_soa.ttl, zone.soa.ttl.min(soa.minimum));
    }
}
