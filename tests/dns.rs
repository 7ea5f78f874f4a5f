//! The DNS responder as clients meet it: real UDP and TCP sockets on `127.0.0.1:0`, queries and
//! answers as raw hickory-proto messages, the appliance started from YAML. Rotation fairness,
//! answers following health checks (and failing open), negative answers, the apex, EDNS,
//! `max_answers`, TC over UDP with the whole answer over TCP, malformed packets, reloads, and
//! one end-to-end run of the real `dig` against `lockstep serve`. What bounds it under abuse
//! (rate limiting, the TCP connection cap) is in `dns_limits.rs`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use hickory_server::proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_server::proto::rr::rdata::opt::EdnsOption;
use hickory_server::proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use common::{h1_client, require_tool, scrape, wait, DemoBackend, Proc, BIN};
use lockstep::appliance::Appliance;

// ---------------------------------------------------------------------------------------------
// Helpers

/// How long a test waits for one answer.
const ANSWER_WAIT: Duration = Duration::from_secs(3);

/// Nameservers of the `wide.test` zone: each NS record takes ~28 bytes, so its apex NS answer
/// (~1.4 KB) needs TC over UDP, with or without EDNS.
const WIDE_NS: usize = 50;

/// The test zone: `lb` (3 fixed addresses), `v6`, `ns1` (glue), `big` (100 addresses, answered
/// 8 at a time) and `www` bound to pool `www`; `pool_backends` are its `backends:` lines. And
/// the zone `wide.test`, with [`WIDE_NS`] nameservers. Response-rate limiting is on, at a rate
/// these tests never reach (they ask far faster than a resolver would).
fn dns_yaml(pool_backends: &str, pool_extra: &str, extra_records: &str) -> String {
    let big: Vec<String> = (1..=100)
        .map(|i| format!("\"10.0.{}.{}\"", i / 250, i % 250 + 1))
        .collect();
    let wide: Vec<String> = (0..WIDE_NS)
        .map(|i| format!("ns.provider{i:02}.example"))
        .collect();
    format!(
        r#"pools:
  - name: www
{pool_extra}    backends:
{pool_backends}dns:
  bind: "127.0.0.1:0"
  max_answers: 8
  rrl: {{ rate_limit: 1000000 }}
  zones:
    - name: wide.test
      nameservers: [{wide}]
    - name: farm.test
      ttl: 30
      nameservers: [ns1.farm.test, ns.provider.example]
      records:
        - {{ name: www, pool: www }}
        - {{ name: lb, addresses: ["192.0.2.1", "192.0.2.2", "192.0.2.3"] }}
        - {{ name: ns1, addresses: ["192.0.2.53", "2001:db8::53"] }}
        - {{ name: v6, addresses: ["2001:db8::1", "2001:db8::2"] }}
        - {{ name: big, addresses: [{big}] }}
{extra_records}admin:
  bind: "127.0.0.1:0"
"#,
        big = big.join(", "),
        wide = wide.join(", "),
    )
}

/// Backends lines for `backends`, with DNS addresses 127.0.0.11, .12, ...
fn backends_with_dns(backends: &[DemoBackend]) -> String {
    backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!(
                "      - {{ name: {}, address: \"{}\", dns_address: \"127.0.0.{}\" }}\n",
                b.name,
                b.addr,
                11 + i
            )
        })
        .collect()
}

/// An appliance serving the test zone, its pool over three backends that are never checked
/// (so always up).
async fn start_static() -> Appliance {
    let backends = "      - { name: web-1, address: \"127.0.0.1:9\", dns_address: \"192.0.2.11\" }\n      - { name: web-2, address: \"127.0.0.1:9\", dns_address: \"192.0.2.12\" }\n";
    common::start(&dns_yaml(backends, "", "")).await
}

fn dns_addr(app: &Appliance) -> SocketAddr {
    app.dns_addr().expect("dns is served")
}

/// A query for `name`/`qtype` with RD set, as dig sends it.
fn query(name: &str, qtype: RecordType) -> Message {
    let mut m = Message::new(rand_id(), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m
}

fn rand_id() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0x1234);
    NEXT.fetch_add(7, Ordering::Relaxed)
}

/// `m` with an OPT record: EDNS `version`, payload 4096.
fn with_edns(mut m: Message, version: u8, edit: impl FnOnce(&mut Edns)) -> Message {
    let mut e = Edns::new();
    e.set_version(version);
    e.set_max_payload(4096);
    edit(&mut e);
    m.set_edns(e);
    m
}

/// Sends raw bytes over UDP; the answer's bytes, or `None` when nothing came within `wait`.
async fn udp_raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
    sock.send_to(bytes, addr).await.expect("send");
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// Asks over UDP; panics when no parsable answer comes.
async fn udp(addr: SocketAddr, m: &Message) -> Message {
    let bytes = udp_raw(addr, &m.to_vec().unwrap(), ANSWER_WAIT)
        .await
        .unwrap_or_else(|| panic!("no UDP answer to {:?}", m.queries));
    let answer = Message::from_vec(&bytes).expect("answer parses");
    assert_eq!(answer.metadata.id, m.metadata.id, "answer id");
    answer
}

/// Size of the UDP answer to `m`, and the answer.
async fn udp_sized(addr: SocketAddr, m: &Message) -> (usize, Message) {
    let bytes = udp_raw(addr, &m.to_vec().unwrap(), ANSWER_WAIT)
        .await
        .expect("an answer");
    (
        bytes.len(),
        Message::from_vec(&bytes).expect("answer parses"),
    )
}

/// Asks over TCP (2-byte length prefix, RFC 1035 §4.2.2) on `stream`.
async fn tcp_on(stream: &mut TcpStream, m: &Message) -> Message {
    let bytes = m.to_vec().unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    stream.write_all(&framed).await.expect("tcp write");
    let read = async {
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        stream.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(ANSWER_WAIT, read)
        .await
        .expect("TCP answer in time")
        .expect("TCP answer read");
    Message::from_vec(&buf).expect("answer parses")
}

/// Asks over a fresh TCP connection.
async fn tcp(addr: SocketAddr, m: &Message) -> Message {
    let mut s = TcpStream::connect(addr).await.expect("tcp connect");
    tcp_on(&mut s, m).await
}

/// The addresses in the answer section, in order.
fn addrs(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

fn soa_serial(m: &Message) -> u32 {
    match m.answers.first().map(|r| &r.data) {
        Some(RData::SOA(s)) => s.serial,
        _ => panic!("no SOA answer: {m:?}"),
    }
}

/// Asserts `m` is a negative answer (`rcode`) with the zone's SOA in authority at the
/// negative TTL.
#[track_caller]
fn assert_negative(m: &Message, rcode: ResponseCode) {
    assert_eq!(m.metadata.response_code, rcode, "{m:?}");
    assert!(m.metadata.authoritative, "AA: {m:?}");
    assert!(m.answers.is_empty(), "{m:?}");
    assert_eq!(m.authorities.len(), 1, "{m:?}");
    let soa = &m.authorities[0];
    let RData::SOA(data) = &soa.data else {
        panic!("authority is not an SOA: {m:?}")
    };
    assert_eq!(soa.name.to_string(), "farm.test.");
    assert_eq!(soa.ttl, 30u32.min(data.minimum), "negative TTL");
}

// ---------------------------------------------------------------------------------------------
// Answers

#[tokio::test]
async fn answer_is_authoritative_without_recursion_and_lists_every_address() {
    let app = start_static().await;
    let m = udp(dns_addr(&app), &query("lb.farm.test.", RecordType::A)).await;
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative, "AA set");
    assert!(!m.metadata.recursion_available, "RA clear");
    assert!(m.metadata.recursion_desired, "RD copied");
    assert_eq!(m.queries.len(), 1, "question echoed");
    let mut got = addrs(&m);
    got.sort();
    assert_eq!(got, ["192.0.2.1", "192.0.2.2", "192.0.2.3"]);
    assert!(m.answers.iter().all(|r| r.ttl == 30));
    assert!(m.edns.is_none(), "no OPT without one in the query");
}

#[tokio::test]
async fn rotation_puts_each_address_first_equally_often() {
    let app = start_static().await;
    let addr = dns_addr(&app);
    let mut firsts: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..300 {
        let m = udp(addr, &query("lb.farm.test.", RecordType::A)).await;
        assert_eq!(m.answers.len(), 3, "query {i}: {m:?}");
        *firsts.entry(addrs(&m)[0].clone()).or_default() += 1;
    }
    assert_eq!(firsts.len(), 3, "{firsts:?}");
    for (a, n) in &firsts {
        assert!(
            (95..=105).contains(n),
            "{a} first {n} times of 300: {firsts:?}"
        );
    }
}

#[tokio::test]
async fn pool_name_answers_its_backends_and_aaaa_by_family() {
    let app = start_static().await;
    let addr = dns_addr(&app);
    let m = udp(addr, &query("www.farm.test.", RecordType::A)).await;
    let got: BTreeSet<String> = addrs(&m).into_iter().collect();
    assert_eq!(
        got,
        BTreeSet::from(["192.0.2.11".into(), "192.0.2.12".into()])
    );

    let m = udp(addr, &query("v6.farm.test.", RecordType::AAAA)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    let got: BTreeSet<String> = addrs(&m).into_iter().collect();
    assert_eq!(
        got,
        BTreeSet::from(["2001:db8::1".into(), "2001:db8::2".into()])
    );
    assert!(m
        .answers
        .iter()
        .all(|r| r.record_type() == RecordType::AAAA));

    // A name with only IPv4 addresses has no AAAA: NODATA.
    let m = udp(addr, &query("www.farm.test.", RecordType::AAAA)).await;
    assert_negative(&m, ResponseCode::NoError);
}

#[tokio::test]
async fn negative_answers_refused_and_notimp() {
    let app = start_static().await;
    let addr = dns_addr(&app);
    assert_negative(
        &udp(addr, &query("nope.farm.test.", RecordType::A)).await,
        ResponseCode::NXDomain,
    );
    assert_negative(
        &udp(addr, &query("www.farm.test.", RecordType::MX)).await,
        ResponseCode::NoError,
    );
    let m = udp(addr, &query("www.example.com.", RecordType::A)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(!m.metadata.authoritative && m.answers.is_empty() && m.authorities.is_empty());

    let mut status = query("www.farm.test.", RecordType::A);
    status.metadata.op_code = OpCode::Status;
    let m = udp(addr, &status).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
    assert!(m.answers.is_empty());
}

#[tokio::test]
async fn apex_has_soa_and_ns_with_glue_for_the_in_zone_nameserver() {
    let app = start_static().await;
    let addr = dns_addr(&app);
    let m = udp(addr, &query("farm.test.", RecordType::SOA)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    let RData::SOA(soa) = &m.answers[0].data else {
        panic!("{m:?}")
    };
    assert_eq!(soa.mname.to_string(), "ns1.farm.test.");
    assert!(
        soa.serial > 1_600_000_000,
        "unix-time serial: {}",
        soa.serial
    );

    let m = udp(addr, &query("farm.test.", RecordType::NS)).await;
    let ns: BTreeSet<String> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::NS(n) => Some(n.0.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(
        ns,
        BTreeSet::from(["ns1.farm.test.".into(), "ns.provider.example.".into()])
    );
    let glue: BTreeSet<(String, String)> = m
        .additionals
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((r.name.to_string(), a.0.to_string())),
            RData::AAAA(a) => Some((r.name.to_string(), a.0.to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(
        glue,
        BTreeSet::from([
            ("ns1.farm.test.".into(), "192.0.2.53".into()),
            ("ns1.farm.test.".into(), "2001:db8::53".into()),
        ])
    );
    // No address at the apex: NODATA.
    assert_negative(
        &udp(addr, &query("farm.test.", RecordType::A)).await,
        ResponseCode::NoError,
    );
}

// ---------------------------------------------------------------------------------------------
// Health

/// Three demo backends checked every 100 ms (one failure takes a backend down, one success
/// brings it back), `www` bound to them with DNS addresses 127.0.0.11..13.
async fn start_checked() -> (Appliance, Vec<DemoBackend>) {
    let backends = DemoBackend::start_n(3).await;
    let yaml = dns_yaml(
        &backends_with_dns(&backends),
        "    health: { path: /healthz, interval: 100ms, timeout: 500ms, rise: 1, fall: 1 }\n",
        "",
    );
    (common::start(&yaml).await, backends)
}

async fn www_set(addr: SocketAddr) -> BTreeSet<String> {
    addrs(&udp(addr, &query("www.farm.test.", RecordType::A)).await)
        .into_iter()
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn backend_taken_down_leaves_the_answers_and_comes_back_when_it_recovers() {
    let (app, backends) = start_checked().await;
    let addr = dns_addr(&app);
    let all = set(&["127.0.0.11", "127.0.0.12", "127.0.0.13"]);
    wait::until(
        "all three backends in the answers",
        Duration::from_secs(2),
        || async { www_set(addr).await == all },
    )
    .await;
    backends[1].set_unhealthy(true);
    // A few check intervals (100 ms each, fall 1): well under a second.
    let without = set(&["127.0.0.11", "127.0.0.13"]);
    wait::until(
        "web-2 to leave the answers",
        Duration::from_secs(1),
        || async { www_set(addr).await == without },
    )
    .await;
    // And it stays out while down.
    for _ in 0..20 {
        assert_eq!(www_set(addr).await, without);
    }
    backends[1].set_unhealthy(false);
    wait::until(
        "web-2 to come back in the answers",
        Duration::from_secs(1),
        || async { www_set(addr).await == all },
    )
    .await;
}

#[tokio::test]
async fn every_backend_down_fails_open_and_is_counted() {
    let (app, backends) = start_checked().await;
    let addr = dns_addr(&app);
    let admin = app.admin_addr().expect("admin");
    let client = h1_client();
    for b in &backends {
        b.set_unhealthy(true);
    }
    let all_down = || async {
        let m = scrape(&client, admin).await;
        let downs = m
            .iter()
            .filter(|(k, v)| k.starts_with("lockstep_backend_up{") && **v == 0.0)
            .count();
        downs == 3
    };
    wait::until("every backend to go down", Duration::from_secs(2), all_down).await;
    let series = "lockstep_dns_fail_open_answers_total{pool=\"www\"}";
    let before = scrape(&client, admin)
        .await
        .get(series)
        .copied()
        .unwrap_or(0.0);
    let got = www_set(addr).await;
    assert_eq!(got, set(&["127.0.0.11", "127.0.0.12", "127.0.0.13"]));
    let after = scrape(&client, admin)
        .await
        .get(series)
        .copied()
        .unwrap_or(0.0);
    assert_eq!(after, before + 1.0, "fail-open answer counted");
    let m = scrape(&client, admin).await;
    assert!(
        m.get("lockstep_dns_queries_total{qtype=\"A\",rcode=\"NOERROR\"}")
            .is_some_and(|v| *v >= 1.0),
        "queries counted by type and rcode: {m:?}"
    );
}

/// The UDP fast path (plain A/AAAA queries) and the slow path (everything else) share one
/// socket and one set of metrics; fast answers mean what TCP's (always the slow path) do.
#[tokio::test]
async fn fast_path_answers_match_tcp_and_are_counted() {
    let app = start_static().await;
    let addr = dns_addr(&app);
    let admin = app.admin_addr().expect("admin");
    let client = h1_client();
    let before = scrape(&client, admin).await;
    let get = |m: &BTreeMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);

    let mut firsts = BTreeSet::new();
    for edns in [false, true] {
        for _ in 0..3 {
            let q = query("LB.farm.TEST.", RecordType::A);
            let q = if edns { with_edns(q, 0, |_| {}) } else { q };
            let u = udp(addr, &q).await;
            let t = tcp(addr, &q).await;
            for m in [&u, &t] {
                assert_eq!(m.metadata.response_code, ResponseCode::NoError);
                assert!(m.metadata.authoritative && !m.metadata.recursion_available);
                assert!(m.metadata.recursion_desired && !m.metadata.truncation);
                assert!(m
                    .answers
                    .iter()
                    .all(|r| r.name.to_string() == "LB.farm.TEST." && r.ttl == 30));
                assert_eq!(m.queries, q.queries);
            }
            let mut a = addrs(&u);
            let mut b = addrs(&t);
            firsts.insert(a[0].clone());
            a.sort();
            b.sort();
            assert_eq!(a, b);
            assert_eq!(u.edns.is_some(), edns);
            if let Some(e) = &u.edns {
                assert_eq!((e.max_payload(), e.version()), (1232, 0));
            }
        }
    }
    assert_eq!(firsts.len(), 3, "rotation across both paths: {firsts:?}");
    let m = udp(addr, &query("v6.farm.test.", RecordType::AAAA)).await;
    assert_eq!(m.answers.len(), 2);
    // Slow path over UDP, right after fast ones on the same socket.
    assert_negative(
        &udp(addr, &query("nope.farm.test.", RecordType::A)).await,
        ResponseCode::NXDomain,
    );

    let after = scrape(&client, admin).await;
    let a = "lockstep_dns_queries_total{qtype=\"A\",rcode=\"NOERROR\"}";
    let aaaa = "lockstep_dns_queries_total{qtype=\"AAAA\",rcode=\"NOERROR\"}";
    let lat = "lockstep_dns_answer_duration_seconds_count";
    assert_eq!(
        get(&after, a) - get(&before, a),
        12.0,
        "6 UDP + 6 TCP A answers"
    );
    assert_eq!(get(&after, aaaa) - get(&before, aaaa), 1.0);
    assert_eq!(
        get(&after, lat) - get(&before, lat),
        14.0,
        "every answer timed"
    );
}

/// With several worker runtimes (which serve the proxy), DNS answers over UDP, fast path or
/// not, and TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_when_the_appliance_runs_on_worker_runtimes() {
    let workers: Vec<tokio::runtime::Handle> = (0..2)
        .map(|_| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("worker runtime");
            let handle = rt.handle().clone();
            std::thread::spawn(move || rt.block_on(std::future::pending::<()>()));
            handle
        })
        .collect();
    let backends =
        "      - { name: web-1, address: \"127.0.0.1:9\", dns_address: \"192.0.2.11\" }\n";
    let runtimes = lockstep::appliance::Runtimes {
        workers,
        control: tokio::runtime::Handle::current(),
    };
    let app = Appliance::start_on(common::config(&dns_yaml(backends, "", "")), runtimes)
        .await
        .expect("start on two workers");
    let addr = dns_addr(&app);
    for _ in 0..20 {
        let m = udp(addr, &query("lb.farm.test.", RecordType::A)).await;
        assert_eq!(m.answers.len(), 3);
        assert_negative(
            &udp(addr, &query("nope.farm.test.", RecordType::A)).await,
            ResponseCode::NXDomain,
        );
    }
    let m = tcp(addr, &query("www.farm.test.", RecordType::A)).await;
    assert_eq!(addrs(&m), ["192.0.2.11"]);
    app.shutdown(Duration::from_millis(200)).await;
}

// ---------------------------------------------------------------------------------------------
// Bursts (the receive loop reads and answers a batch of datagrams at once)

/// Reads `n` datagrams from `sock`, each within [`ANSWER_WAIT`], parsed.
async fn read_answers(sock: &UdpSocket, n: usize) -> Vec<Message> {
    let mut buf = vec![0u8; 65535];
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (len, _) = tokio::time::timeout(ANSWER_WAIT, sock.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("answer {i} of {n} missing"))
            .expect("recv");
        out.push(Message::from_vec(&buf[..len]).expect("answer parses"));
    }
    out
}

/// Asserts no further datagram reaches any of `socks` within a short while.
async fn assert_silent(socks: &[UdpSocket]) {
    let mut buf = vec![0u8; 65535];
    for s in socks {
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(100), s.recv_from(&mut buf)).await
        {
            panic!("an extra datagram: {r:?}");
        }
    }
}

async fn udp_clients(n: usize) -> Vec<UdpSocket> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(UdpSocket::bind("127.0.0.1:0").await.expect("bind udp"));
    }
    out
}

/// Queries sent back to back from several sockets without reading (the server's task does not
/// run meanwhile, so it finds them all queued and reads them in full batches) each get their
/// own answer, once, in order; each took exactly one rotation turn.
#[tokio::test]
async fn a_burst_from_several_clients_gets_every_answer_once_in_order() {
    let app = start_static().await;
    let addr = dns_addr(&app);
    // 4 rounds of 5 × 25 = 125 queries: each round fits the server socket's default receive
    // buffer (~256 small datagrams on loopback) with room to spare, so none is dropped there.
    const CLIENTS: usize = 5;
    const PER_CLIENT: usize = 25;
    const ROUNDS: usize = 4;
    let clients = udp_clients(CLIENTS).await;
    let lb = ["192.0.2.1", "192.0.2.2", "192.0.2.3"];
    let mut firsts: BTreeMap<String, usize> = BTreeMap::new();
    for round in 0..ROUNDS {
        let mut sent = vec![Vec::new(); CLIENTS];
        for _ in 0..PER_CLIENT {
            for (c, sock) in clients.iter().enumerate() {
                let q = query("lb.farm.test.", RecordType::A);
                sock.send_to(&q.to_vec().unwrap(), addr)
                    .await
                    .expect("send");
                sent[c].push(q.metadata.id);
            }
        }
        for (c, sock) in clients.iter().enumerate() {
            let answers = read_answers(sock, PER_CLIENT).await;
            let ids: Vec<u16> = answers.iter().map(|m| m.metadata.id).collect();
            assert_eq!(
                ids, sent[c],
                "round {round}, client {c}: its answers, in order"
            );
            for m in &answers {
                assert_eq!(m.metadata.response_code, ResponseCode::NoError);
                let got = addrs(m);
                let turn = lb
                    .iter()
                    .position(|a| *a == got[0])
                    .expect("a known address");
                let mut want = lb.map(String::from).to_vec();
                want.rotate_left(turn);
                assert_eq!(got, want, "the configured order, rotated");
                *firsts.entry(got[0].clone()).or_default() += 1;
            }
        }
    }
    assert_silent(&clients).await;
    // 500 consecutive turns over 3 addresses: no query skipped or took two.
    let mut counts: Vec<usize> = firsts.values().copied().collect();
    counts.sort();
    assert_eq!(counts, [166, 167, 167], "{firsts:?}");
}

/// One burst mixing fast-path queries (plain A/AAAA) with slow-path ones (SOA, NXDOMAIN,
/// NODATA, FORMERR) and garbage: every client gets each answer, right, in the order it asked,
/// and nothing for the garbage.
#[tokio::test]
async fn fast_and_slow_queries_in_one_burst_are_answered_in_order_per_client() {
    #[derive(Debug, Clone, Copy)]
    enum Kind {
        A,
        EdnsA,
        Aaaa,
        Soa,
        NxDomain,
        NoData,
        FormErr,
        Garbage,
    }
    use Kind::*;
    let app = start_static().await;
    let addr = dns_addr(&app);
    let clients = udp_clients(4).await;
    let kinds = [
        A, Soa, Aaaa, NxDomain, FormErr, Garbage, EdnsA, NoData, A, A,
    ];
    let datagram = |kind: Kind| -> (Vec<u8>, u16) {
        let asked = |m: Message| (m.to_vec().unwrap(), m.metadata.id);
        match kind {
            A => asked(query("lb.farm.test.", RecordType::A)),
            EdnsA => asked(with_edns(query("lb.farm.test.", RecordType::A), 0, |_| {})),
            Aaaa => asked(query("v6.farm.test.", RecordType::AAAA)),
            Soa => asked(query("farm.test.", RecordType::SOA)),
            NxDomain => asked(query("nope.farm.test.", RecordType::A)),
            NoData => asked(query("www.farm.test.", RecordType::MX)),
            FormErr => {
                // A question cut short: the header parses, the rest does not.
                let id = rand_id();
                let mut p = header(id, 1, 0, 0, 0);
                p.extend_from_slice(&[3, b'w', b'w']);
                (p, id)
            }
            Garbage => (vec![0x12, 0x34, 0x01], 0),
        }
    };
    // 4 clients × 3 passes × 10 kinds = 120 datagrams in one burst; at each step the clients
    // ask different kinds.
    let mut expected = vec![Vec::new(); clients.len()];
    for _ in 0..3 {
        for i in 0..kinds.len() {
            for (c, sock) in clients.iter().enumerate() {
                let kind = kinds[(i + c) % kinds.len()];
                let (bytes, id) = datagram(kind);
                sock.send_to(&bytes, addr).await.expect("send");
                if !matches!(kind, Garbage) {
                    expected[c].push((id, kind));
                }
            }
        }
    }
    for (c, sock) in clients.iter().enumerate() {
        let answers = read_answers(sock, expected[c].len()).await;
        for (m, (id, kind)) in answers.iter().zip(&expected[c]) {
            assert_eq!(
                m.metadata.id, *id,
                "client {c}: the answer to {kind:?}, in order"
            );
            match kind {
                A | EdnsA => {
                    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
                    assert_eq!(m.answers.len(), 3, "{m:?}");
                    assert_eq!(m.edns.is_some(), matches!(kind, EdnsA));
                }
                Aaaa => {
                    assert_eq!(m.answers.len(), 2, "{m:?}");
                    assert!(m
                        .answers
                        .iter()
                        .all(|r| r.record_type() == RecordType::AAAA));
                }
                Soa => assert!(soa_serial(m) > 0),
                NxDomain => assert_negative(m, ResponseCode::NXDomain),
                NoData => assert_negative(m, ResponseCode::NoError),
                FormErr => assert_eq!(m.metadata.response_code, ResponseCode::FormErr),
                Garbage => unreachable!("garbage gets no answer"),
            }
        }
    }
    assert_silent(&clients).await;
}

// ---------------------------------------------------------------------------------------------
// EDNS (the ISC EDNS compliance queries)

#[tokio::test]
async fn edns_compliance() {
    let app = start_static().await;
    let addr = dns_addr(&app);
    let q = || query("lb.farm.test.", RecordType::A);

    // plain: no OPT back.
    let m = udp(addr, &q()).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.edns.is_none());

    // EDNS 0: OPT back, version 0, payload clamped to 1232, no DO.
    let m = udp(addr, &with_edns(q(), 0, |_| {})).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    let e = m.edns.as_ref().expect("OPT echoed");
    assert_eq!(e.version(), 0);
    assert_eq!(e.max_payload(), 1232);
    assert!(!e.flags().dnssec_ok);
    assert_eq!(m.answers.len(), 3);

    // EDNS 1: BADVERS with an OPT of version 0, no answers.
    let m = udp(addr, &with_edns(q(), 1, |_| {})).await;
    // BADVERS and BADSIG share code 16; the decoder names it BADSIG.
    assert_eq!(u16::from(m.metadata.response_code), 16, "BADVERS");
    assert_eq!(m.edns.as_ref().expect("OPT with BADVERS").version(), 0);
    assert!(m.answers.is_empty());

    // Unknown flag: answered, flag not echoed.
    let m = udp(addr, &with_edns(q(), 0, |e| e.flags_mut().z = 0x4000)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(m.edns.as_ref().expect("OPT").flags().z, 0);
    assert_eq!(m.answers.len(), 3);

    // Unknown option: answered, option not echoed.
    let m = udp(
        addr,
        &with_edns(q(), 0, |e| {
            e.options_mut()
                .insert(EdnsOption::Unknown(65001, vec![1, 2, 3]))
        }),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    let e = m.edns.as_ref().expect("OPT");
    assert!(
        e.option(65001.into()).is_none(),
        "unknown option echoed: {e:?}"
    );
    assert_eq!(m.answers.len(), 3);

    // DO: copied.
    let m = udp(
        addr,
        &with_edns(q(), 0, |e| {
            e.set_dnssec_ok(true);
        }),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.edns.as_ref().expect("OPT").flags().dnssec_ok);

    // A small advertised payload is raised to 512, never below.
    let m = udp(
        addr,
        &with_edns(q(), 0, |e| {
            e.set_max_payload(100);
        }),
    )
    .await;
    assert_eq!(m.edns.as_ref().expect("OPT").max_payload(), 512);
}

// ---------------------------------------------------------------------------------------------
// Size: max_answers, TC over UDP, the whole answer over TCP

#[tokio::test]
async fn a_name_with_many_addresses_answers_max_answers_of_them_within_512_bytes() {
    let app = start_static().await;
    let addr = dns_addr(&app);
    let mut firsts = BTreeSet::new();
    for _ in 0..3 {
        let (size, m) = udp_sized(addr, &query("big.farm.test.", RecordType::A)).await;
        assert!(!m.metadata.truncation, "no TC: {m:?}");
        assert_eq!(m.answers.len(), 8, "dns.max_answers");
        assert!(size <= 512, "plain UDP answer of {size} bytes");
        firsts.insert(addrs(&m)[0].clone());
    }
    assert_eq!(firsts.len(), 3, "rotated over all 100: {firsts:?}");
}

#[tokio::test]
async fn too_big_for_udp_sets_tc_and_tcp_gets_the_whole_answer() {
    let app = start_static().await;
    let addr = dns_addr(&app);
    let (size, m) = udp_sized(addr, &query("wide.test.", RecordType::NS)).await;
    assert!(m.metadata.truncation, "TC set: {} answers", m.answers.len());
    assert!(size <= 512, "plain UDP answer of {size} bytes");

    let (size, m) = udp_sized(
        addr,
        &with_edns(query("wide.test.", RecordType::NS), 0, |_| {}),
    )
    .await;
    assert!(m.metadata.truncation, "TC set with EDNS too");
    assert!(size <= 1232, "EDNS UDP answer of {size} bytes");

    let mut stream = TcpStream::connect(addr).await.expect("tcp connect");
    let m = tcp_on(&mut stream, &query("wide.test.", RecordType::NS)).await;
    assert!(!m.metadata.truncation, "TC over TCP");
    assert_eq!(m.answers.len(), WIDE_NS);
    // The connection stays open for further queries (RFC 7766).
    let m = tcp_on(&mut stream, &query("lb.farm.test.", RecordType::A)).await;
    assert_eq!(m.answers.len(), 3);
    let m = tcp(addr, &query("nope.farm.test.", RecordType::A)).await;
    assert_negative(&m, ResponseCode::NXDomain);
}

// ---------------------------------------------------------------------------------------------
// Malformed packets

/// A header: id, flags (RD), and the four counts.
fn header(id: u16, qd: u16, an: u16, ns: u16, ar: u16) -> Vec<u8> {
    let mut h = id.to_be_bytes().to_vec();
    h.extend_from_slice(&[0x01, 0x00]);
    for c in [qd, an, ns, ar] {
        h.extend_from_slice(&c.to_be_bytes());
    }
    h
}

#[tokio::test]
async fn malformed_packets_never_crash_it() {
    let app = start_static().await;
    let addr = dns_addr(&app);
    let short = Duration::from_millis(300);

    // Shorter than a header: silence.
    assert_eq!(udp_raw(addr, &[0x12, 0x34, 0x01], short).await, None);
    assert_eq!(udp_raw(addr, &[], short).await, None);

    // Parsable header, broken body: FORMERR with the same id.
    let formerr = |bytes: Vec<u8>, what: &'static str| async move {
        let reply = udp_raw(addr, &bytes, ANSWER_WAIT).await;
        let reply = reply.unwrap_or_else(|| panic!("{what}: no answer"));
        let m = Message::from_vec(&reply).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(m.metadata.id, 0xbeef, "{what}");
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr, "{what}");
    };
    // A question cut short.
    let mut p = header(0xbeef, 1, 0, 0, 0);
    p.extend_from_slice(&[3, b'w', b'w']);
    formerr(p, "truncated question").await;
    // A compression pointer to itself.
    let mut p = header(0xbeef, 1, 0, 0, 0);
    p.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    formerr(p, "compression pointer loop").await;
    // A label of 64 bytes.
    let mut p = header(0xbeef, 1, 0, 0, 0);
    p.push(64);
    p.extend(std::iter::repeat_n(b'a', 64));
    p.extend_from_slice(&[0, 0, 1, 0, 1]);
    formerr(p, "label over 63").await;
    // A name of 5 × 63-byte labels (over 255).
    let mut p = header(0xbeef, 1, 0, 0, 0);
    for _ in 0..5 {
        p.push(63);
        p.extend(std::iter::repeat_n(b'a', 63));
    }
    p.extend_from_slice(&[0, 0, 1, 0, 1]);
    formerr(p, "name over 255").await;
    // More questions than written.
    let mut p = header(0xbeef, 3, 0, 0, 0);
    p.extend_from_slice(&[0, 0, 1, 0, 1]);
    formerr(p, "missing questions").await;

    // No question at all: FORMERR from the handler.
    let m = Message::from_vec(
        &udp_raw(addr, &header(0xbeef, 0, 0, 0, 0), ANSWER_WAIT)
            .await
            .expect("answer to an empty query"),
    )
    .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);

    // Random bytes (a fixed xorshift stream, so a failure replays): whatever comes back, the
    // server keeps serving.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for len in [12usize, 13, 17, 29, 64, 200, 512, 1500] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = udp_raw(addr, &bytes, Duration::from_millis(50)).await;
        // The same garbage over TCP.
        if let Ok(mut s) = TcpStream::connect(addr).await {
            let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&bytes);
            let _ = s.write_all(&framed).await;
        }
    }
    // A TCP frame that claims more than it sends, then hangs up.
    if let Ok(mut s) = TcpStream::connect(addr).await {
        let _ = s.write_all(&[0xff, 0xff, 1, 2, 3]).await;
    }

    // Still answering, over both transports.
    let m = udp(addr, &query("lb.farm.test.", RecordType::A)).await;
    assert_eq!(m.answers.len(), 3);
    let m = tcp(addr, &query("lb.farm.test.", RecordType::A)).await;
    assert_eq!(m.answers.len(), 3);
}

// ---------------------------------------------------------------------------------------------
// Reload

#[tokio::test]
async fn reload_swaps_the_zones_and_bumps_the_serial() {
    let backends =
        "      - { name: web-1, address: \"127.0.0.1:9\", dns_address: \"192.0.2.11\" }\n";
    let mut app = common::start(&dns_yaml(backends, "", "")).await;
    let addr = dns_addr(&app);
    let serial = soa_serial(&udp(addr, &query("farm.test.", RecordType::SOA)).await);
    assert_negative(
        &udp(addr, &query("new.farm.test.", RecordType::A)).await,
        ResponseCode::NXDomain,
    );

    let yaml = dns_yaml(
        backends,
        "",
        "        - { name: new, addresses: [\"198.51.100.7\"] }\n",
    );
    app.reload(common::config(&yaml)).expect("reload");
    let m = udp(addr, &query("new.farm.test.", RecordType::A)).await;
    assert_eq!(addrs(&m), ["198.51.100.7"]);
    let bumped = soa_serial(&udp(addr, &query("farm.test.", RecordType::SOA)).await);
    assert!(bumped > serial, "serial {serial} → {bumped}");

    // And again within the same second: still bumped.
    app.reload(common::config(&yaml)).expect("reload");
    let again = soa_serial(&udp(addr, &query("farm.test.", RecordType::SOA)).await);
    assert!(again > bumped, "serial {bumped} → {again}");
    // Same address: the sockets were kept.
    assert_eq!(app.dns_addr(), Some(addr));
}

#[tokio::test]
async fn reload_moves_dns_and_admin_and_refuses_a_taken_address() {
    let backends =
        "      - { name: web-1, address: \"127.0.0.1:9\", dns_address: \"192.0.2.11\" }\n";
    let base = dns_yaml(backends, "", "");
    let mut app = common::start(&base).await;
    let (old, old_admin) = (dns_addr(&app), app.admin_addr().unwrap());
    let with = |dns_bind: &str, admin_bind: &str| {
        base.replacen(
            "  bind: \"127.0.0.1:0\"\n  max_answers",
            &format!("  bind: \"{dns_bind}\"\n  max_answers"),
            1,
        )
        .replace(
            "admin:\n  bind: \"127.0.0.1:0\"",
            &format!("admin:\n  bind: \"{admin_bind}\""),
        )
    };

    // Moved to another loopback address, port 0 again: a changed bind address, so new
    // sockets (no port is picked in advance, so none can be taken meanwhile).
    let (dns_bind, admin_bind) = ("127.0.0.2:0", "127.0.0.2:0");
    app.reload(common::config(&with(dns_bind, admin_bind)))
        .expect("reload");
    let new = dns_addr(&app);
    assert_eq!(new.ip().to_string(), "127.0.0.2");
    assert_ne!(new, old);
    assert_eq!(
        addrs(&udp(new, &query("www.farm.test.", RecordType::A)).await),
        ["192.0.2.11"]
    );
    assert_eq!(
        tcp(new, &query("lb.farm.test.", RecordType::A))
            .await
            .answers
            .len(),
        3
    );
    let admin = app.admin_addr().unwrap();
    assert_eq!(admin.ip().to_string(), "127.0.0.2");
    assert_ne!(admin, old_admin);
    let healthz = common::raw_exchange(
        admin,
        b"GET /healthz HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        ANSWER_WAIT,
    )
    .await;
    assert_eq!(healthz.statuses(), [200], "{}", healthz.text());
    // The old sockets are closed: no answer there, no admin there.
    let q = query("www.farm.test.", RecordType::A).to_vec().unwrap();
    wait::until(
        "the old DNS socket and admin listener to close",
        ANSWER_WAIT,
        || async {
            udp_raw(old, &q, Duration::from_millis(200)).await.is_none()
                && common::refuses(old_admin).await
        },
    )
    .await;

    // An address another socket holds refuses the whole reload; DNS stays where it was.
    let blocker = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let taken = blocker.local_addr().unwrap().port();
    let e = app
        .reload(common::config(&with(
            &format!("127.0.0.1:{taken}"),
            admin_bind,
        )))
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("127.0.0.1:{taken}")), "{e}");
    assert_eq!(app.dns_addr(), Some(new));
    assert_eq!(
        addrs(&udp(new, &query("www.farm.test.", RecordType::A)).await),
        ["192.0.2.11"]
    );

    // No dns: section any more: DNS stops.
    let moved = with(dns_bind, admin_bind);
    let (head, tail) = moved.split_at(moved.find("dns:\n").unwrap());
    let without = format!("{head}{}", &tail[tail.find("admin:").unwrap()..]);
    app.reload(common::config(&without)).expect("reload");
    assert_eq!(app.dns_addr(), None);
    wait::until(
        "DNS to stop answering without a dns: section",
        ANSWER_WAIT,
        || async { udp_raw(new, &q, Duration::from_millis(200)).await.is_none() },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// End to end: dig against `lockstep serve`

/// Runs `dig` with `args`; its output.
fn dig(args: &[String]) -> String {
    let out = std::process::Command::new("dig")
        .args(args)
        .output()
        .expect("run dig");
    assert!(
        out.status.success(),
        "dig {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dig_against_lockstep_serve() {
    require_tool("dig", "bind9-dnsutils");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("lockstep.yaml");
    // No health checks: the pool's backends count as up, so no backend has to run.
    let backends = "      - { name: web-1, address: \"127.0.0.1:9\", dns_address: \"192.0.2.11\" }\n      - { name: web-2, address: \"127.0.0.1:9\", dns_address: \"192.0.2.12\" }\n      - { name: web-3, address: \"127.0.0.1:9\", dns_address: \"192.0.2.13\" }\n";
    std::fs::write(&cfg, dns_yaml(backends, "", "")).unwrap();
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("serve").arg("-c").arg(&cfg);
    let mut serve = Proc::spawn(cmd, dir.path().join("stderr.log"));
    // DNS binds 127.0.0.1:0 (UDP and TCP on one port); the port is read back from its log.
    let port = serve.bound_addr(&["dns listening"], "addr").port();
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            "@127.0.0.1".to_string(),
            "-p".into(),
            port.to_string(),
            "+time=2".into(),
            "+tries=1".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };

    let first = dig(&args(&["www.farm.test", "+short"]));
    let lines: Vec<&str> = first.lines().collect();
    let got: BTreeSet<&str> = lines.iter().copied().collect();
    assert_eq!(
        got,
        BTreeSet::from(["192.0.2.11", "192.0.2.12", "192.0.2.13"]),
        "{first}"
    );
    let second = dig(&args(&["www.farm.test", "+short"]));
    assert_ne!(
        second.lines().next(),
        lines.first().copied(),
        "rotation: the next answer starts elsewhere"
    );

    let full = dig(&args(&["www.farm.test", "A"]));
    assert!(full.contains("status: NOERROR"), "{full}");
    assert!(
        full.contains("flags: qr aa rd;"),
        "AA set, RA clear: {full}"
    );

    let nx = dig(&args(&["nope.farm.test"]));
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    let refused = dig(&args(&["example.com"]));
    assert!(refused.contains("status: REFUSED"), "{refused}");

    // At most max_answers addresses.
    let big = dig(&args(&["big.farm.test", "+short"]));
    assert_eq!(big.lines().count(), 8, "{big}");
    // dig retries over TCP on TC by itself; +tcp asks over TCP outright.
    let wide = dig(&args(&["wide.test", "NS", "+short", "+ignore", "+noedns"]));
    assert!(
        wide.lines().count() < WIDE_NS,
        "UDP answer without TC retry was complete"
    );
    let wide = dig(&args(&["wide.test", "NS", "+short"]));
    assert_eq!(wide.lines().count(), WIDE_NS, "dig's TCP retry after TC");
    let wide = dig(&args(&["wide.test", "NS", "+short", "+tcp"]));
    assert_eq!(wide.lines().count(), WIDE_NS);

    let soa = dig(&args(&["farm.test", "SOA", "+short"]));
    assert!(
        soa.starts_with("ns1.farm.test. hostmaster.farm.test. "),
        "{soa}"
    );
    let badvers = dig(&args(&["www.farm.test", "+edns=1", "+noednsneg"]));
    assert!(badvers.contains("status: BADVERS"), "{badvers}");
}

// ---------------------------------------------------------------------------------------------
// lockstep demo

#[tokio::test]
async fn demo_serves_www_farm_test_over_its_backends() {
    let dir = tempfile::tempdir().unwrap();
    // Every port 0: any free one.
    let demo = lockstep::demo::start(Default::default(), dir.path())
        .await
        .unwrap();
    let addr = dns_addr(&demo.app);
    let m = udp(addr, &query("www.farm.test.", RecordType::A)).await;
    assert!(m.metadata.authoritative);
    let got: BTreeSet<String> = addrs(&m).into_iter().collect();
    assert_eq!(got, set(&["127.0.0.1", "127.0.0.2", "127.0.0.3"]));
    demo.shutdown().await;
}
