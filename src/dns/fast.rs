//! The UDP fast path: the common query (one A or AAAA question, class IN, for a name that
//! answers with addresses, with no EDNS or a plain EDNS 0 OPT) answered straight from the raw
//! datagram into a caller buffer, without decoding it into hickory's types and without
//! allocating (the health scratch vector is the caller's and is reused).
//!
//! Anything else — other opcodes, types, classes, several questions, answer or authority
//! records, an OPT with options or another version, odd flags, a name without addresses, an
//! answer that would be empty (NODATA) or not fit (TC) — is [`None`], and the datagram goes to
//! hickory unchanged. The answer means exactly what the slow path's would
//! ([`answer::answer`](super::answer::answer) plus the handler): the same records in the same
//! rotated order, filtered by the same health rule (fail open included) and `max_answers`,
//! and the same header and OPT. Unit tests run both paths on the same queries and compare.
//!
//! Pure: no sockets, no clock; health and the rotation turn come in as in [`super::answer`].

use std::net::IpAddr;

use super::answer::{candidates_in_place, Health, MAX_UDP_PAYLOAD};
use super::zone::{NameEntry, Source, Zones};

/// Size of a DNS header.
const HEADER: usize = 12;
/// Longest name in wire form (RFC 1035 §2.3.4).
const MAX_NAME: usize = 255;
/// Size of the OPT record lockstep sends (root name, type, class, TTL, empty RDATA).
const OPT_LEN: usize = 11;
/// Type codes.
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// The DO bit in the OPT flags.
const DO_BIT: u16 = 0x8000;

/// What the fast path answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fast<'z> {
    /// Length of the response written at the start of the buffer.
    pub len: usize,
    /// The asked type, as a metric label (`A` or `AAAA`).
    pub qtype: &'static str,
    /// The pool whose backends were all listed because none was available (fail open).
    pub fail_open: Option<&'z str>,
}

/// The parts of a query the fast path needs.
struct Parsed {
    /// End of the question section (header + name + type + class).
    question_end: usize,
    /// Length of the name in wire form.
    name_len: usize,
    qtype: u16,
    /// `Some(DO bit)` when the query had an OPT record.
    opt_do: Option<bool>,
    /// The payload size the query advertised (512 without OPT).
    payload: u16,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([*s.first()?, *s.get(1)?]))
}

/// Reads the query when it is the common case; writes its lowercased name into `lower`.
fn parse(q: &[u8], lower: &mut [u8; MAX_NAME]) -> Option<Parsed> {
    let flags_hi = *q.get(2)?;
    let flags_lo = *q.get(3)?;
    // QR=0, opcode QUERY, AA=0, TC=0 (RD is copied).
    if flags_hi & 0xfe != 0 {
        return None;
    }
    // RA, Z and RCODE clear; AD (cleared in the answer) and CD (copied) are allowed.
    if flags_lo & 0xcf != 0 {
        return None;
    }
    let (qd, an, ns, ar) = (u16_at(q, 4)?, u16_at(q, 6)?, u16_at(q, 8)?, u16_at(q, 10)?);
    if qd != 1 || an != 0 || ns != 0 || ar > 1 {
        return None;
    }
    // The name: plain labels only (no compression in a question we take), at most 255 bytes.
    let mut at = HEADER;
    let mut name_len = 0usize;
    loop {
        let len = usize::from(*q.get(at)?);
        if len > 63 {
            return None;
        }
        let label = q.get(at..at.checked_add(len + 1)?)?;
        let dst = lower.get_mut(name_len..name_len.checked_add(len + 1)?)?;
        for (d, s) in dst.iter_mut().zip(label) {
            *d = s.to_ascii_lowercase();
        }
        name_len += len + 1;
        at += len + 1;
        if len == 0 {
            break;
        }
    }
    let qtype = u16_at(q, at)?;
    let qclass = u16_at(q, at + 2)?;
    if (qtype != TYPE_A && qtype != TYPE_AAAA) || qclass != CLASS_IN {
        return None;
    }
    let question_end = at + 4;
    let (opt_do, payload) = if ar == 1 {
        // A plain OPT: root name, type 41, class = payload, extended RCODE 0, version 0,
        // flags, no options, and nothing after it.
        let opt = q.get(question_end..)?;
        if opt.len() != OPT_LEN || *opt.first()? != 0 || u16_at(opt, 1)? != TYPE_OPT {
            return None;
        }
        let payload = u16_at(opt, 3)?;
        if *opt.get(5)? != 0 || *opt.get(6)? != 0 || u16_at(opt, 9)? != 0 {
            return None;
        }
        let flags = u16_at(opt, 7)?;
        (Some(flags & DO_BIT != 0), payload)
    } else {
        if q.len() != question_end {
            return None;
        }
        (None, 512)
    };
    Some(Parsed {
        question_end,
        name_len,
        qtype,
        opt_do,
        payload,
    })
}

/// Answers `query` into `out` when it is the common case (see the module doc); `None` sends
/// it to the slow path. `scratch` is reused between calls; `turn` takes the name's rotation
/// turn and is called only when the fast path answers.
// Long on purpose: one straight pass over one datagram (parse, look up, select, encode the
// header, question, answers and OPT into `out`), the UDP hot path measured against NSD in
// BENCHMARKS.md; each step is commented where it happens, and its parsing and selection are
// already their own functions (`parse`, `candidates_in_place`).
pub fn answer<'z>(
    query: &[u8],
    zones: &'z Zones,
    health: &impl Health,
    turn: impl FnOnce(&NameEntry) -> usize,
    scratch: &mut Vec<(IpAddr, bool)>,
    out: &mut [u8],
) -> Option<Fast<'z>> {
    let mut lower = [0u8; MAX_NAME];
    let p = parse(query, &mut lower)?;
    let (ttl, entry) = zones.by_wire(lower.get(..p.name_len)?)?;
    let v4 = p.qtype == TYPE_A;

    // The same selection as the slow path's (rotation is applied when writing below).
    let fail_open = candidates_in_place(&entry.source, |ip| ip.is_ipv4() == v4, health, scratch);
    let n = scratch.len();
    if n == 0 {
        // NODATA (with the SOA): the slow path's.
        return None;
    }
    let count = n.min(zones.max_answers);

    // Fits? Otherwise the slow path truncates and sets TC.
    let rdlen: usize = if v4 { 4 } else { 16 };
    let limit = match p.opt_do {
        Some(_) => usize::from(p.payload.clamp(512, MAX_UDP_PAYLOAD)),
        None => 512,
    };
    let opt_len = if p.opt_do.is_some() { OPT_LEN } else { 0 };
    let len = p
        .question_end
        .checked_add(count.checked_mul(12 + rdlen)?)?
        .checked_add(opt_len)?;
    if len > limit || len > out.len() {
        return None;
    }
    let count16 = u16::try_from(count).ok()?;

    // Header: ID copied, QR, opcode QUERY, AA, RD copied; RA and AD clear, CD copied.
    let id = query.get(..2)?;
    let rd = *query.get(2)? & 0x01;
    let cd = *query.get(3)? & 0x10;
    let mut w = Writer { out, at: 0 };
    w.put(id)?;
    w.put(&[0x84 | rd, cd])?;
    w.put(&1u16.to_be_bytes())?;
    w.put(&count16.to_be_bytes())?;
    w.put(&0u16.to_be_bytes())?;
    w.put(&u16::from(p.opt_do.is_some()).to_be_bytes())?;
    // The question as received (its case kept).
    w.put(query.get(HEADER..p.question_end)?)?;
    let start = turn(entry) % n;
    for k in 0..count {
        let &(ip, _) = scratch.get((start + k) % n)?;
        // Owner: a pointer to the question's name.
        w.put(&[0xc0, 0x0c])?;
        w.put(&p.qtype.to_be_bytes())?;
        w.put(&CLASS_IN.to_be_bytes())?;
        w.put(&ttl.to_be_bytes())?;
        match ip {
            IpAddr::V4(a) => {
                w.put(&4u16.to_be_bytes())?;
                w.put(&a.octets())?;
            }
            IpAddr::V6(a) => {
                w.put(&16u16.to_be_bytes())?;
                w.put(&a.octets())?;
            }
        }
    }
    if let Some(dnssec_ok) = p.opt_do {
        let payload = p.payload.clamp(512, MAX_UDP_PAYLOAD);
        let flags: u16 = if dnssec_ok { DO_BIT } else { 0 };
        w.put(&[0])?;
        w.put(&TYPE_OPT.to_be_bytes())?;
        w.put(&payload.to_be_bytes())?;
        w.put(&[0, 0])?; // extended RCODE, version
        w.put(&flags.to_be_bytes())?;
        w.put(&0u16.to_be_bytes())?;
    }
    let fail_open = match (&entry.source, fail_open) {
        (Source::Pool(p), true) => Some(p.as_str()),
        _ => None,
    };
    Some(Fast {
        len: w.at,
        qtype: if v4 { "A" } else { "AAAA" },
        fail_open,
    })
}

/// Appends to a fixed buffer; `None` when it is full (never, after the size check).
struct Writer<'b> {
    out: &'b mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) -> Option<()> {
        let end = self.at.checked_add(bytes.len())?;
        self.out.get_mut(self.at..end)?.copy_from_slice(bytes);
        self.at = end;
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Dns, Record as CfgRecord, Target, Zone};
    use crate::dns::handler::{build, encode_udp, respond};
    use hickory_server::net::xfer::Protocol;
    use hickory_server::proto::op::{Edns, Message, MessageType, OpCode, Query};
    use hickory_server::proto::rr::rdata::opt::EdnsOption;
    use hickory_server::proto::rr::{DNSClass, Name, RecordType};
    use hickory_server::server::Request;
    use std::collections::HashMap;

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
        Table(HashMap::from([
            (
                "www",
                vec![
                    (ip("192.0.2.1"), up[0]),
                    (ip("192.0.2.2"), up[1]),
                    (ip("192.0.2.3"), up[2]),
                    (ip("2001:db8::1"), true),
                    (ip("2001:db8::2"), up[1]),
                    // A second backend on the first host.
                    (ip("192.0.2.1"), false),
                ],
            ),
            ("empty", vec![]),
        ]))
    }

    fn many(n: u8) -> Vec<IpAddr> {
        (1..=n).map(|i| IpAddr::from([10, 0, 0, i])).collect()
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
                zones: vec![
                    Zone {
                        name: "farm.test".into(),
                        ttl: 30,
                        nameservers: vec!["ns1.farm.test".into()],
                        records: vec![
                            rec("www.farm.test", Target::Pool("www".into())),
                            rec("none.farm.test", Target::Pool("empty".into())),
                            rec(
                                "lb.farm.test",
                                Target::Addresses(vec![ip("192.0.2.10"), ip("192.0.2.11")]),
                            ),
                            rec("ns1.farm.test", Target::Addresses(vec![ip("192.0.2.53")])),
                            rec("forty.farm.test", Target::Addresses(many(40))),
                            rec("big.farm.test", Target::Addresses(many(100))),
                            // Shadowed by the more specific zone below.
                            rec("x.sub.farm.test", Target::Addresses(vec![ip("192.0.2.99")])),
                        ],
                    },
                    Zone {
                        name: "sub.farm.test".into(),
                        ttl: 10,
                        nameservers: vec![],
                        records: vec![rec(
                            "y.sub.farm.test",
                            Target::Addresses(vec![ip("192.0.2.77")]),
                        )],
                    },
                ],
            },
            9,
        )
    }

    fn query(name: &str, qtype: RecordType, edns: Option<(u16, bool)>) -> Message {
        let mut m = Message::new(0xbeef, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some((payload, dnssec_ok)) = edns {
            let mut e = Edns::new();
            e.set_max_payload(payload);
            e.set_dnssec_ok(dnssec_ok);
            m.set_edns(e);
        }
        m
    }

    /// The slow path's answer bytes, as the handler sends them over UDP.
    fn slow(bytes: &[u8], z: &Zones, h: &Table, turn: usize) -> Vec<u8> {
        let request = Request::from_bytes(
            bytes.to_vec(),
            "192.0.2.200:5353".parse().unwrap(),
            Protocol::Udp,
        )
        .expect("the slow path decodes what the fast path took");
        let (metadata, edns, outcome) = respond(&request, Some(z), h, |_| turn);
        let response = build(&request, edns.as_ref(), metadata, &outcome);
        encode_udp(response).1
    }

    fn fast(bytes: &[u8], z: &Zones, h: &Table, turn: usize) -> Option<(Vec<u8>, Option<String>)> {
        let mut out = [0u8; 1232];
        let mut scratch = Vec::new();
        let f = answer(bytes, z, h, |_| turn, &mut scratch, &mut out)?;
        Some((out[..f.len].to_vec(), f.fail_open.map(str::to_owned)))
    }

    /// Everything a client sees of a message, names with their case.
    fn seen(bytes: &[u8]) -> String {
        let m = Message::from_vec(bytes).expect("answer decodes");
        let records = |rs: &[hickory_server::proto::rr::Record]| -> Vec<String> {
            rs.iter()
                .map(|r| {
                    format!(
                        "{} {} {:?} {} {:?}",
                        r.name,
                        r.ttl,
                        r.dns_class,
                        r.record_type(),
                        r.data
                    )
                })
                .collect()
        };
        let edns = m.edns.as_ref().map(|e| {
            (
                e.max_payload(),
                e.version(),
                e.flags().dnssec_ok,
                e.flags().z,
                e.options().options.len(),
                e.rcode_high(),
            )
        });
        format!(
            "{:?}\nqueries {:?}\nanswers {:?}\nauthorities {:?}\nadditionals {:?}\nedns {:?}",
            m.metadata,
            m.queries
                .iter()
                .map(|q| format!("{} {} {}", q.name(), q.query_type(), q.query_class()))
                .collect::<Vec<_>>(),
            records(&m.answers),
            records(&m.authorities),
            records(&m.additionals),
            edns,
        )
    }

    /// Runs both paths on `bytes`; asserts they mean the same when the fast path answers.
    /// Returns whether it did, and its fail-open pool.
    fn both(bytes: &[u8], z: &Zones, h: &Table, turn: usize) -> Option<Option<String>> {
        let (fast_bytes, fail_open) = fast(bytes, z, h, turn)?;
        let slow_bytes = slow(bytes, z, h, turn);
        assert_eq!(seen(&fast_bytes), seen(&slow_bytes), "query {bytes:02x?}");
        Some(fail_open)
    }

    fn taken(m: &Message, z: &Zones, h: &Table, turn: usize) -> Option<String> {
        both(&m.to_vec().unwrap(), z, h, turn)
            .unwrap_or_else(|| panic!("fast path declined {:?}", m.queries))
    }

    fn declined(bytes: &[u8], z: &Zones, h: &Table) {
        assert!(
            fast(bytes, z, h, 0).is_none(),
            "fast path took {bytes:02x?}"
        );
    }

    #[test]
    fn common_queries_answer_as_the_slow_path_does() {
        let z = zones(8);
        let h = health([true; 3]);
        let names = [
            "www.farm.test.",
            "WwW.FaRm.TeSt.",
            "lb.farm.test.",
            "LB.FARM.TEST.",
            "ns1.farm.test.",
            "y.sub.farm.test.",
        ];
        let edns = [
            None,
            Some((4096, false)),
            Some((4096, true)),
            Some((100, false)),
            Some((1232, true)),
            Some((512, false)),
        ];
        for name in names {
            for e in edns {
                for rd in [true, false] {
                    for turn in 0..5 {
                        let mut m = query(name, RecordType::A, e);
                        m.metadata.recursion_desired = rd;
                        assert_eq!(taken(&m, &z, &h, turn), None);
                    }
                }
            }
        }
        // AAAA: the v6 addresses only, rotated.
        for turn in 0..4 {
            taken(
                &query("www.farm.test.", RecordType::AAAA, None),
                &z,
                &h,
                turn,
            );
            taken(
                &query("Www.farm.test.", RecordType::AAAA, Some((1232, true))),
                &z,
                &h,
                turn,
            );
        }
    }

    #[test]
    fn the_comparison_sees_the_rotation_and_the_opt() {
        let z = zones(8);
        let h = health([true; 3]);
        let q = query("www.farm.test.", RecordType::A, Some((1232, true)))
            .to_vec()
            .unwrap();
        let (f, _) = fast(&q, &z, &h, 0).unwrap();
        assert_ne!(seen(&f), seen(&slow(&q, &z, &h, 1)));
        let plain = query("www.farm.test.", RecordType::A, None)
            .to_vec()
            .unwrap();
        assert_ne!(seen(&f), seen(&slow(&plain, &z, &h, 0)));
    }

    #[test]
    fn the_answer_bytes_are_as_specified() {
        let z = zones(8);
        let h = health([true; 3]);
        let (b, _) = fast(
            &query("WWW.farm.test.", RecordType::A, None)
                .to_vec()
                .unwrap(),
            &z,
            &h,
            1,
        )
        .unwrap();
        let m = Message::from_vec(&b).unwrap();
        assert_eq!(m.metadata.id, 0xbeef);
        assert!(m.metadata.authoritative && m.metadata.recursion_desired);
        assert!(!m.metadata.recursion_available && !m.metadata.truncation);
        assert_eq!(m.queries[0].name().to_string(), "WWW.farm.test.");
        let got: Vec<String> = m
            .answers
            .iter()
            .map(|r| format!("{} {:?}", r.name, r.data))
            .collect();
        assert_eq!(got.len(), 3);
        assert!(
            got[0].starts_with("WWW.farm.test. A(A(192.0.2.2))"),
            "{got:?}"
        );
        // Owner names are pointers to the question.
        assert_eq!(&b[b.len() - 16..b.len() - 14], &[0xc0, 0x0c]);
    }

    #[test]
    fn health_fail_open_and_max_answers_match() {
        let z = zones(8);
        for up in [
            [true, false, true],
            [false, false, true],
            [false, true, false],
        ] {
            for turn in 0..4 {
                assert_eq!(
                    taken(
                        &query("www.farm.test.", RecordType::A, None),
                        &z,
                        &health(up),
                        turn
                    ),
                    None
                );
                taken(
                    &query("www.farm.test.", RecordType::AAAA, None),
                    &z,
                    &health(up),
                    turn,
                );
            }
        }
        for turn in 0..4 {
            let open = taken(
                &query("www.farm.test.", RecordType::A, Some((1232, false))),
                &z,
                &health([false; 3]),
                turn,
            );
            assert_eq!(open.as_deref(), Some("www"), "fail open reported");
        }
        let z2 = zones(2);
        for turn in 0..6 {
            taken(
                &query("www.farm.test.", RecordType::A, None),
                &z2,
                &health([true; 3]),
                turn,
            );
            taken(
                &query("forty.farm.test.", RecordType::A, None),
                &z2,
                &health([true; 3]),
                turn,
            );
        }
        let z1 = zones(1);
        taken(
            &query("lb.farm.test.", RecordType::A, None),
            &z1,
            &health([true; 3]),
            1,
        );
    }

    #[test]
    fn answers_that_do_not_fit_go_to_the_slow_path() {
        let z = zones(100);
        let h = health([true; 3]);
        // 40 × 16 bytes: over 512, within 1232.
        declined(
            &query("forty.farm.test.", RecordType::A, None)
                .to_vec()
                .unwrap(),
            &z,
            &h,
        );
        declined(
            &query("forty.farm.test.", RecordType::A, Some((512, false)))
                .to_vec()
                .unwrap(),
            &z,
            &h,
        );
        taken(
            &query("forty.farm.test.", RecordType::A, Some((1232, false))),
            &z,
            &h,
            3,
        );
        taken(
            &query("forty.farm.test.", RecordType::A, Some((65000, true))),
            &z,
            &h,
            3,
        );
        declined(
            &query("big.farm.test.", RecordType::A, Some((4096, false)))
                .to_vec()
                .unwrap(),
            &z,
            &h,
        );
    }

    #[test]
    fn everything_else_goes_to_the_slow_path() {
        let z = zones(8);
        let h = health([true; 3]);
        let bytes = |m: &Message| m.to_vec().unwrap();
        let q = || query("www.farm.test.", RecordType::A, None);
        // Other types, names, classes.
        declined(
            &bytes(&query("www.farm.test.", RecordType::MX, None)),
            &z,
            &h,
        );
        declined(
            &bytes(&query("www.farm.test.", RecordType::ANY, None)),
            &z,
            &h,
        );
        declined(&bytes(&query("farm.test.", RecordType::A, None)), &z, &h);
        declined(
            &bytes(&query("nope.farm.test.", RecordType::A, None)),
            &z,
            &h,
        );
        declined(
            &bytes(&query("www.elsewhere.test.", RecordType::A, None)),
            &z,
            &h,
        );
        declined(
            &bytes(&query("x.sub.farm.test.", RecordType::A, None)),
            &z,
            &h,
        );
        // NODATA: a v4-only name asked AAAA; a pool without backends.
        declined(
            &bytes(&query("lb.farm.test.", RecordType::AAAA, None)),
            &z,
            &h,
        );
        declined(
            &bytes(&query("none.farm.test.", RecordType::A, None)),
            &z,
            &h,
        );
        let mut m = q();
        m.queries[0].set_query_class(DNSClass::CH);
        declined(&bytes(&m), &z, &h);
        // Header shapes.
        let mut m = q();
        m.metadata.op_code = OpCode::Notify;
        declined(&bytes(&m), &z, &h);
        let mut m = q();
        m.metadata.message_type = MessageType::Response;
        declined(&bytes(&m), &z, &h);
        let mut m = q();
        m.metadata.truncation = true;
        declined(&bytes(&m), &z, &h);
        let mut m = q();
        m.add_query(Query::query(
            Name::from_ascii("lb.farm.test.").unwrap(),
            RecordType::A,
        ));
        declined(&bytes(&m), &z, &h);
        // EDNS: another version, an option.
        let mut m = query("www.farm.test.", RecordType::A, Some((1232, false)));
        m.edns.as_mut().unwrap().set_version(1);
        declined(&bytes(&m), &z, &h);
        let mut m = query("www.farm.test.", RecordType::A, Some((1232, false)));
        m.edns
            .as_mut()
            .unwrap()
            .options_mut()
            .insert(EdnsOption::Unknown(10, vec![1; 8]));
        declined(&bytes(&m), &z, &h);
        // Trailing bytes; a compressed question name.
        let mut b = bytes(&q());
        b.push(0);
        declined(&b, &z, &h);
        let mut b = bytes(&q())[..12].to_vec();
        b.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        declined(&b, &z, &h);
    }

    #[test]
    fn flags_ad_and_cd_are_handled_as_the_slow_path_does() {
        let z = zones(8);
        let h = health([true; 3]);
        for (ad, cd) in [(true, false), (false, true), (true, true)] {
            let mut m = query("www.farm.test.", RecordType::A, Some((1232, true)));
            m.metadata.authentic_data = ad;
            m.metadata.checking_disabled = cd;
            taken(&m, &z, &h, 0);
        }
    }

    #[test]
    fn truncated_and_garbage_datagrams_are_declined_without_panics() {
        let z = zones(8);
        let h = health([true; 3]);
        for m in [
            query("www.farm.test.", RecordType::A, None),
            query("www.farm.test.", RecordType::AAAA, Some((1232, true))),
        ] {
            let full = m.to_vec().unwrap();
            for cut in 0..full.len() {
                declined(&full[..cut], &z, &h);
            }
            // Every byte set to a few values: whatever the fast path takes, the slow path
            // answers the same way.
            for i in 0..full.len() {
                for v in [0u8, 1, 0x0c, 0x1c, 0x29, 0x3f, 0x40, 0x7f, 0x80, 0xc0, 0xff] {
                    let mut b = full.clone();
                    b[i] = v;
                    let _ = both(&b, &z, &h, i);
                }
            }
        }
        // Random bytes (a fixed xorshift stream, so a failure replays).
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut out = [0u8; 1232];
        let mut scratch = Vec::new();
        for len in 0..600usize {
            let b: Vec<u8> = (0..len % 80)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            assert!(answer(&b, &z, &h, |_| 0, &mut scratch, &mut out).is_none());
        }
        // A name over 255 bytes, and a buffer too small for the answer.
        let mut b = query("www.farm.test.", RecordType::A, None)
            .to_vec()
            .unwrap()[..12]
            .to_vec();
        for _ in 0..5 {
            b.push(63);
            b.extend(std::iter::repeat_n(b'a', 63));
        }
        b.extend_from_slice(&[0, 0, 1, 0, 1]);
        declined(&b, &z, &h);
        let q = query("www.farm.test.", RecordType::A, None)
            .to_vec()
            .unwrap();
        let mut small = [0u8; 40];
        assert!(answer(&q, &z, &h, |_| 0, &mut scratch, &mut small).is_none());
    }
}
