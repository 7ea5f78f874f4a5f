//! What bounds the DNS responder under abuse, as clients meet it over real sockets: response-rate
//! limiting of UDP answers per client prefix (a flood from one /24 gets mostly silence and some
//! truncated answers, other prefixes and TCP are unaffected) and the cap on DNS-over-TCP
//! connections (the excess closed at once, counted, a freed slot serving again). The TCP idle
//! timeout is tested in `src/dns/tcp.rs` with a short one.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hickory_server::proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_server::proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use common::{h1_client, scrape, wait};
use lockstep::appliance::Appliance;

/// How long a test waits for one answer, or for the server to catch up.
const WAIT: Duration = Duration::from_secs(5);

/// An appliance serving `lb.farm.test` (3 addresses), with `dns_extra` (indented keys of the
/// `dns:` section) and an admin listener for the metrics.
async fn start(dns_extra: &str) -> Appliance {
    common::start(&format!(
        r#"dns:
  bind: "127.0.0.1:0"
{dns_extra}  zones:
    - name: farm.test
      records:
        - {{ name: lb, addresses: ["192.0.2.1", "192.0.2.2", "192.0.2.3"] }}
admin:
  bind: "127.0.0.1:0"
"#
    ))
    .await
}

fn lb_query(id: u16) -> Message {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_ascii("lb.farm.test.").unwrap(),
        RecordType::A,
    ));
    m
}

/// Asserts `m` is the whole answer to `lb.farm.test A`.
#[track_caller]
fn assert_full(m: &Message) {
    assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{m:?}");
    assert!(!m.metadata.truncation, "{m:?}");
    assert_eq!(m.answers.len(), 3, "{m:?}");
}

/// The metrics as `name{labels}` → value.
async fn metrics(app: &Appliance) -> BTreeMap<String, f64> {
    scrape(&h1_client(), app.admin_addr().expect("admin")).await
}

fn get(m: &BTreeMap<String, f64>, key: &str) -> u64 {
    m.get(key).copied().unwrap_or(0.0) as u64
}

const ANSWERED: &str = "lockstep_dns_queries_total{qtype=\"A\",rcode=\"NOERROR\"}";
const DROPPED: &str = "lockstep_dns_rrl_total{action=\"dropped\"}";
const SLIPPED: &str = "lockstep_dns_rrl_total{action=\"slipped\"}";

// ---------------------------------------------------------------------------------------------
// Response-rate limiting

#[tokio::test]
async fn a_flood_from_one_prefix_gets_its_rate_and_slips_while_other_prefixes_get_full_answers() {
    const RATE: u64 = 20;
    const SOURCES: u8 = 4;
    const PER_SOURCE: u16 = 25;
    const OTHER: u64 = 10;
    let app = start("  rrl: { rate_limit: 20, slip: 3 }\n").await;
    let addr = app.dns_addr().expect("dns");

    // The flood: four addresses of 127.0.0.0/24 (one prefix), 100 queries back to back.
    let mut flood = Vec::new();
    for i in 1..=SOURCES {
        flood.push(
            UdpSocket::bind(format!("127.0.0.{i}:0"))
                .await
                .expect("bind a flood source"),
        );
    }
    let started = Instant::now();
    let mut id = 0u16;
    for _ in 0..PER_SOURCE {
        for s in &flood {
            id += 1;
            s.send_to(&lb_query(id).to_vec().unwrap(), addr)
                .await
                .expect("send");
        }
    }
    let sent = u64::from(SOURCES) * u64::from(PER_SOURCE);

    // Meanwhile a client of another /24 (127.1.0.0/24, loopback too) gets every answer whole.
    let other = UdpSocket::bind("127.1.0.1:0")
        .await
        .expect("bind 127.1.0.1 (Linux routes all of 127.0.0.0/8 to loopback)");
    let mut buf = vec![0u8; 4096];
    for i in 0..OTHER {
        let q = lb_query(0x8000 + i as u16);
        other.send_to(&q.to_vec().unwrap(), addr).await.unwrap();
        let (n, _) = tokio::time::timeout(WAIT, other.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("other prefix: answer {i} missing"))
            .unwrap();
        let m = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(m.metadata.id, q.metadata.id);
        assert_full(&m);
    }
    // And TCP from the limited prefix is not limited: where slipped clients retry.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let bytes = lb_query(0x7000).to_vec().unwrap();
    tcp.write_all(&[(bytes.len() as u16).to_be_bytes().as_slice(), &bytes].concat())
        .await
        .unwrap();
    let len = tokio::time::timeout(WAIT, tcp.read_u16())
        .await
        .unwrap()
        .unwrap();
    let mut answer = vec![0u8; usize::from(len)];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_full(&Message::from_vec(&answer).unwrap());

    // Every flood query decided: answered, dropped or slipped.
    let decided = |m: &BTreeMap<String, f64>| get(m, ANSWERED) + get(m, DROPPED) + get(m, SLIPPED);
    wait::until("the server to decide every query", WAIT, || async {
        decided(&metrics(&app).await) == sent + OTHER + 1
    })
    .await;
    let m = metrics(&app).await;
    let elapsed = started.elapsed().as_secs_f64();
    let answered = get(&m, ANSWERED) - OTHER - 1;
    let (dropped, slipped) = (get(&m, DROPPED), get(&m, SLIPPED));
    // One second's burst, and what refilled while the flood was read.
    let most = RATE + (RATE as f64 * elapsed).ceil() as u64;
    assert!(
        (RATE..=most).contains(&answered),
        "{answered} of {sent} answered in {elapsed:.3} s at {RATE}/s"
    );
    let limited = sent - answered;
    assert_eq!(slipped, limited / 3, "every 3rd limited one slipped");
    assert_eq!(dropped, limited - slipped);

    // What reached the flood's sources: exactly the answers and the truncated slips.
    let mut full = 0u64;
    let mut truncated = 0u64;
    wait::until("the flood's answers and slips to arrive", WAIT, || {
        for s in &flood {
            while let Ok((n, _)) = s.try_recv_from(&mut buf) {
                let m = Message::from_vec(&buf[..n]).expect("a reply parses");
                if m.metadata.truncation {
                    assert!(m.answers.is_empty(), "a slip carries no records: {m:?}");
                    assert_eq!(m.queries.len(), 1, "a slip echoes the question");
                    assert_eq!(m.queries[0].name().to_string(), "lb.farm.test.");
                    truncated += 1;
                } else {
                    assert_full(&m);
                    full += 1;
                }
            }
        }
        let done = full + truncated >= answered + slipped;
        async move { done }
    })
    .await;
    assert_eq!((full, truncated), (answered, slipped));
    assert!(
        full + truncated < sent / 2 && truncated > 0,
        "mostly no answer, some truncated: {full} whole and {truncated} truncated replies to {sent} queries"
    );
}

#[tokio::test]
async fn rate_limit_zero_turns_it_off() {
    let app = start("  rrl: { rate_limit: 0 }\n").await;
    let addr = app.dns_addr().expect("dns");
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = vec![0u8; 4096];
    // Five rounds of 50 back to back: far over any rate, every one answered.
    for round in 0..5u16 {
        for i in 0..50 {
            s.send_to(&lb_query(round * 100 + i).to_vec().unwrap(), addr)
                .await
                .unwrap();
        }
        for i in 0..50 {
            let (n, _) = tokio::time::timeout(WAIT, s.recv_from(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("round {round}: answer {i} missing"))
                .unwrap();
            assert_full(&Message::from_vec(&buf[..n]).unwrap());
        }
    }
    let m = metrics(&app).await;
    assert_eq!(get(&m, DROPPED) + get(&m, SLIPPED), 0);
}

// ---------------------------------------------------------------------------------------------
// The TCP connection cap

/// Asks `lb.farm.test A` on `s`; the answer.
async fn tcp_ask(s: &mut TcpStream, id: u16) -> Message {
    let bytes = lb_query(id).to_vec().unwrap();
    s.write_all(&[(bytes.len() as u16).to_be_bytes().as_slice(), &bytes].concat())
        .await
        .expect("tcp write");
    let read = async {
        let len = s.read_u16().await?;
        let mut buf = vec![0u8; usize::from(len)];
        s.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(WAIT, read)
        .await
        .expect("answer in time")
        .expect("answer read");
    Message::from_vec(&buf).expect("answer parses")
}

/// Asserts the server closes `s` well before its 10 s idle time.
async fn assert_closed_at_once(s: &mut TcpStream, what: &str) {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(2), s.read(&mut byte)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(_)) => panic!("{what}: bytes from a refused connection"),
        Err(_) => panic!("{what}: still open"),
    }
}

const OPEN: &str = "lockstep_dns_tcp_connections";
const REFUSED: &str = "lockstep_dns_tcp_refused_total";

#[tokio::test]
async fn tcp_connections_over_the_cap_are_closed_at_once_and_a_freed_slot_serves_again() {
    let app = start("  max_tcp_connections: 4\n").await;
    let addr = app.dns_addr().expect("dns");
    // Four connections, each answered: all admitted.
    let mut held = Vec::new();
    for i in 0..4 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_full(&tcp_ask(&mut s, i).await);
        held.push(s);
    }
    // Three more, idle: closed at once, not after the idle time.
    for i in 0..3 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_closed_at_once(&mut s, &format!("extra connection {i}")).await;
    }
    // One more that sends a query straight away: closed too, never answered.
    let mut eager = TcpStream::connect(addr).await.unwrap();
    let _ = eager.write_all(&[0, 30]).await;
    assert_closed_at_once(&mut eager, "an eager extra connection").await;
    let m = metrics(&app).await;
    assert_eq!((get(&m, OPEN), get(&m, REFUSED)), (4, 4), "{m:?}");

    // The held ones are still served.
    for (i, s) in held.iter_mut().enumerate() {
        assert_full(&tcp_ask(s, 100 + i as u16).await);
    }
    // Two hang up: once they are counted off, a new connection is served.
    held.truncate(2);
    wait::until("two connections counted off", WAIT, || async {
        get(&metrics(&app).await, OPEN) == 2
    })
    .await;
    for i in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_full(&tcp_ask(&mut s, 200 + i).await);
        held.push(s);
    }
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert_closed_at_once(&mut s, "the fifth again").await;
    assert_eq!(get(&metrics(&app).await, REFUSED), 5);
    // UDP is not affected by the TCP cap.
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.send_to(&lb_query(7).to_vec().unwrap(), addr)
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(WAIT, udp.recv_from(&mut buf))
        .await
        .expect("udp answer")
        .unwrap();
    assert_full(&Message::from_vec(&buf[..n]).unwrap());
}

/// The cap follows a reload (it is read at every accept).
#[tokio::test]
async fn a_reload_moves_the_tcp_cap() {
    let yaml = |max: u32| {
        format!(
            "dns:\n  bind: \"127.0.0.1:0\"\n  max_tcp_connections: {max}\n  zones:\n    - name: farm.test\n      records:\n        - {{ name: lb, addresses: [\"192.0.2.1\", \"192.0.2.2\", \"192.0.2.3\"] }}\nadmin:\n  bind: \"127.0.0.1:0\"\n"
        )
    };
    let mut app = common::start(&yaml(1)).await;
    let addr = app.dns_addr().expect("dns");
    let mut first = TcpStream::connect(addr).await.unwrap();
    assert_full(&tcp_ask(&mut first, 1).await);
    let mut second = TcpStream::connect(addr).await.unwrap();
    assert_closed_at_once(&mut second, "second under a cap of 1").await;
    app.reload(common::config(&yaml(2))).expect("reload");
    assert_eq!(app.dns_addr(), Some(addr), "same sockets");
    let mut second = TcpStream::connect(addr).await.unwrap();
    assert_full(&tcp_ask(&mut second, 2).await);
}
