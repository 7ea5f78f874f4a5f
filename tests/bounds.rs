//! Bounded under abuse, over real sockets: every listener (proxy, admin, sync hub, agent)
//! holds at most `max_connections` at once — across worker runtimes too — closes the excess
//! at once and counts it; an upgraded tunnel keeps its connection's place; idle h2c
//! connections are closed.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use common::wait::until;
use common::*;

/// A keep-alive connection that has been answered once (so the listener has admitted it).
async fn admitted(addr: SocketAddr, host: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = vec![0u8; 16 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answered within 5 s")
        .expect("read");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 "),
        "an admitted connection gets an answer: {:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    s
}

/// Whether a new connection to `addr` is closed without an answer (the cap refused it).
async fn refused(addr: SocketAddr, host: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return true;
    };
    let _ = s
        .write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => panic!("a connection over the cap was neither answered nor closed in 5 s"),
    }
}

async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let m = scrape(&h1_client(), admin).await;
    *m.get(series)
        .unwrap_or_else(|| panic!("no series {series} in /metrics"))
}

fn admin_of(app: &lockstep::appliance::Appliance) -> SocketAddr {
    app.admin_addr().expect("admin listener")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_listener_closes_connections_past_its_cap_and_counts_them() {
    let web = DemoBackend::start("web-1").await;
    let app = start(&farm_yaml_with("    max_connections: 3\n", &web.yaml(), "")).await;
    let addr = proxy_addr(&app);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(admitted(addr, "t").await);
    }
    assert!(refused(addr, "t").await, "a 4th connection was served");
    assert!(refused(addr, "t").await, "a 5th connection was served");
    let admin = admin_of(&app);
    assert_eq!(
        metric(
            admin,
            "lockstep_connections_refused_total{listener=\"http\"}"
        )
        .await,
        2.0
    );
    assert_eq!(
        metric(admin, "lockstep_open_connections{listener=\"http\"}").await,
        3.0
    );
    // A place given back is taken again.
    held.pop();
    until(
        "a freed place admits a new connection",
        Duration::from_secs(5),
        || async { !refused(addr, "t").await },
    )
    .await;
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_is_shared_by_every_worker_accepting_on_the_listener() {
    let workers: Vec<tokio::runtime::Runtime> = (0..2)
        .map(|_| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("worker runtime")
        })
        .collect();
    let web = DemoBackend::start("web-1").await;
    let cfg = config(&farm_yaml_with("    max_connections: 2\n", &web.yaml(), ""));
    let handles = workers.iter().map(|r| r.handle().clone()).collect();
    let runtimes = lockstep::appliance::Runtimes {
        workers: handles,
        control: tokio::runtime::Handle::current(),
    };
    let app = lockstep::appliance::Appliance::start_on(cfg, runtimes)
        .await
        .expect("appliance starts");
    let addr = proxy_addr(&app);
    // SO_REUSEPORT spreads connections over both workers' sockets: with a count per worker,
    // four connections would all be admitted.
    let mut answered = Vec::new();
    let mut closed = 0;
    for _ in 0..8 {
        // A refused connection is reset: the connect or the write may fail already.
        let Ok(mut s) = TcpStream::connect(addr).await else {
            closed += 1;
            continue;
        };
        if s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .is_err()
        {
            closed += 1;
            continue;
        }
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("answered or closed within 5 s")
        {
            Ok(n) if n > 0 => answered.push(s),
            _ => closed += 1,
        }
    }
    assert_eq!(
        answered.len(),
        2,
        "two workers admitted more than the cap together"
    );
    assert_eq!(closed, 6);
    app.shutdown(Duration::from_millis(200)).await;
    for r in workers {
        r.shutdown_background();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_tunnel_keeps_its_place_and_is_counted() {
    let stop = CancellationToken::new();
    let ws = upgrade_echo_backend(stop.clone()).await;
    let app = start(&farm_yaml_with(
        "    max_connections: 1\n",
        &backend_yaml("ws-1", ws, 1),
        "",
    ))
    .await;
    let addr = proxy_addr(&app);
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: ws.farm.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .expect("write upgrade request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.expect("read 101 head");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s.write_all(b"ping").await.expect("write in the tunnel");
    let mut back = [0u8; 4];
    s.read_exact(&mut back).await.expect("echo");
    assert_eq!(&back, b"ping");

    let admin = admin_of(&app);
    assert_eq!(
        metric(admin, "lockstep_upgraded_connections{listener=\"http\"}").await,
        1.0
    );
    assert_eq!(
        metric(admin, "lockstep_open_connections{listener=\"http\"}").await,
        1.0,
        "the tunnel still counts as the client's connection"
    );
    assert!(
        refused(addr, "t").await,
        "the tunnel's place was given away"
    );

    drop(s);
    until(
        "the closed tunnel gives its place back",
        Duration::from_secs(5),
        || async {
            metric(admin, "lockstep_upgraded_connections{listener=\"http\"}").await == 0.0
                && metric(admin, "lockstep_open_connections{listener=\"http\"}").await == 0.0
        },
    )
    .await;
    stop.cancel();
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_sync_listeners_have_their_own_caps() {
    let web = DemoBackend::start("web-1").await;
    let store = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        "listeners:\n  - name: http\n    bind: \"127.0.0.1:0\"\n\
         routes:\n  - {{ path_prefix: \"/\", pool: www }}\n\
         pools:\n  - name: www\n    backends:\n{}\
         admin:\n  bind: \"127.0.0.1:0\"\n  max_connections: 2\n\
         sync:\n  bind: \"127.0.0.1:0\"\n  store: {}\n  max_connections: 2\n",
        web.yaml(),
        store.path().display()
    );
    let app = start(&yaml).await;
    let (admin, sync) = (admin_of(&app), app.sync_addr().expect("sync API"));

    let hold_admin = [
        admitted(admin, "127.0.0.1").await,
        admitted(admin, "127.0.0.1").await,
    ];
    assert!(
        refused(admin, "127.0.0.1").await,
        "a 3rd admin connection was served"
    );
    let hold_sync = [
        admitted(sync, "127.0.0.1").await,
        admitted(sync, "127.0.0.1").await,
    ];
    assert!(
        refused(sync, "127.0.0.1").await,
        "a 3rd sync connection was served"
    );
    assert!(refused(sync, "127.0.0.1").await);

    drop(hold_admin);
    until(
        "the admin listener admits again",
        Duration::from_secs(5),
        || async { !refused(admin, "127.0.0.1").await },
    )
    .await;
    let m = scrape(&h1_client(), admin).await;
    assert!(m["lockstep_admin_connections_refused_total"] >= 1.0);
    assert_eq!(m["lockstep_sync_connections_refused_total"], 2.0);
    assert_eq!(m["lockstep_sync_open_connections"], 2.0);
    drop(hold_sync);
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_serve_port_has_a_cap() {
    let store = tempfile::tempdir().expect("tempdir");
    let dead = dead_address();
    let mut cfg = lockstep::agent::AgentConfig::new(
        "web-1",
        &format!("http://{}", dead.addr),
        store.path(),
        "127.0.0.1:0".parse().unwrap(),
    );
    cfg.max_connections = 2;
    let agent = lockstep::agent::start(cfg).await.expect("agent starts");
    let addr = agent.serve_addr();
    let _held = [admitted(addr, "t").await, admitted(addr, "t").await];
    assert!(
        refused(addr, "t").await,
        "a 3rd agent connection was served"
    );
    assert_eq!(agent.metrics().connections.refused.get(), 1);
    agent.shutdown(Duration::from_millis(200)).await;
}

/// The h2 connection preface and an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2c_connection_is_closed_on_control_plane_listeners() {
    use lockstep::net::server::HttpServer;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut server = HttpServer::new("sync");
    server.settings.idle_timeout = Some(Duration::from_millis(300));
    let (stop, tracker) = (
        CancellationToken::new(),
        tokio_util::task::TaskTracker::new(),
    );
    tokio::spawn({
        let (stop, tracker) = (stop.clone(), tracker.clone());
        async move {
            server
                .serve(
                    listener,
                    |_, _| async {
                        lockstep::net::respond::text::<http_body_util::Full<bytes::Bytes>>(
                            http::StatusCode::OK,
                            "ok",
                        )
                    },
                    stop,
                    tracker,
                )
                .await
        }
    });
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(H2_PREFACE).await.expect("preface");
    let quiet = Instant::now();
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue, // the server's SETTINGS and its ACK
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an idle h2c connection stayed open for 5 s");
    assert!(
        quiet.elapsed() < Duration::from_millis(1500),
        "{:?}",
        quiet.elapsed()
    );
    stop.cancel();
}

#[test]
fn the_default_control_plane_idle_timeout_outlasts_a_long_poll() {
    let d = lockstep::net::server::ConnSettings::default();
    let idle = d
        .idle_timeout
        .expect("control-plane connections have an idle timeout");
    assert!(idle > lockstep::sync::protocol::LONG_POLL + Duration::from_secs(10));
}

/// The peak resident memory of process `pid`, bytes (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc status");
    kb * 1024
}

#[test]
fn the_hubs_memory_does_not_grow_with_the_blobs_it_receives_and_serves() {
    use common::farm::{Farm, AGENT_TOKEN, PUBLISH_TOKEN};
    let farm = Farm::new("1s", "1s");
    let pid = farm.hub.as_ref().expect("hub running").child.id();
    let before = peak_rss(pid);

    // A blob near the largest a release may hold, uploaded then fetched by 8 clients at once.
    let data = common::farm::noise(7, 60 << 20);
    let hash = lockstep::sync::manifest::Hash::of(&data);
    let path = format!("/sync/v1/blobs/{hash}");
    let put = request(farm.hub_addr, "PUT", &path, Some(PUBLISH_TOKEN), &data).expect("PUT");
    assert_eq!(put.status, 201, "{}", put.body);
    let addr = farm.hub_addr;
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                let r = request(addr, "GET", &path, Some(AGENT_TOKEN), b"").expect("GET");
                assert_eq!(r.status, 200);
                lockstep::sync::manifest::Hash::of(&r.bytes)
            })
        })
        .collect();
    for r in readers {
        assert_eq!(r.join().expect("reader"), hash, "a reader got other bytes");
    }
    // A wrong body is refused and not stored.
    let other = format!(
        "/sync/v1/blobs/{}",
        lockstep::sync::manifest::Hash::of(b"other")
    );
    let bad = request(
        farm.hub_addr,
        "PUT",
        &other,
        Some(PUBLISH_TOKEN),
        &data[..1 << 20],
    )
    .expect("PUT");
    assert_eq!(bad.status, 400, "{}", bad.body);
    let gone = request(farm.hub_addr, "GET", &other, Some(AGENT_TOKEN), b"").expect("GET");
    assert_eq!(
        gone.status, 404,
        "a blob that did not match its name was stored"
    );

    let grown = peak_rss(pid).saturating_sub(before);
    // Whole bodies in memory would cost 60 MiB for the upload (twice, with its copy) and
    // 60 MiB per reader; streamed, a transfer costs buffers.
    assert!(
        grown < 24 << 20,
        "the hub's peak memory grew by {} MiB moving a 60 MiB blob",
        grown >> 20
    );
}
