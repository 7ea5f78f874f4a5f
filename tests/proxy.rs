//! The HTTP path end to end: the appliance started from YAML on `127.0.0.1:0` in front of
//! real backends, driven by real clients (hyper h1/h2c, rustls, raw TCP).
//!
//! What a user of the farm would notice: how requests spread, that a dying or unhealthy
//! backend costs no failed requests, that TLS presents the right certificate, that upgrades
//! and reloads work under load, that smuggling shapes are refused, that forwarded headers
//! cannot be forged, that errors come back with the right status and promptly, and that
//! `/metrics` counts all of it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use common::*;

const RR: &str = "    balance: round_robin\n";

fn expected(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

// ---------------------------------------------------------------------------------------
// Distribution
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_300_requests_evenly_over_three_backends() {
    let webs = DemoBackend::start_n(3).await;
    let app = start(&farm_yaml(&backends_yaml(&webs), RR)).await;
    let counts = tally(&h1_client(), proxy_addr(&app), 300).await;
    assert_eq!(
        counts,
        expected(&[("web-1", 100), ("web-2", 100), ("web-3", 100)])
    );
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_pool_follows_three_to_one_weights() {
    let webs = DemoBackend::start_n(2).await;
    let backends = webs[0].yaml_weighted(3) + &webs[1].yaml_weighted(1);
    let app = start(&farm_yaml(&backends, "    balance: weighted\n")).await;
    let counts = tally(&h1_client(), proxy_addr(&app), 400).await;
    let (heavy, light) = (
        counts.get("web-1").copied().unwrap_or(0),
        counts.get("web-2").copied().unwrap_or(0),
    );
    assert_eq!(heavy + light, 400, "{counts:?}");
    // 3:1 of 400 is 300:100; allow 5% of the total either way.
    assert!(
        (280..=320).contains(&heavy),
        "web-1 (weight 3) got {heavy} of 400: {counts:?}"
    );
    assert!(
        (80..=120).contains(&light),
        "web-2 (weight 1) got {light} of 400: {counts:?}"
    );
    app.shutdown(Duration::from_millis(200)).await;
}

// ---------------------------------------------------------------------------------------
// Failover and health
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_costs_no_failed_request_and_is_ejected() {
    let webs = DemoBackend::start_n(3).await;
    let pool =
        "    balance: round_robin\n    retries: 1\n    passive: { failures: 3, ejection: 10s }\n";
    let app = start(&farm_yaml(&backends_yaml(&webs), pool)).await;
    let (client, addr) = (h1_client(), proxy_addr(&app));

    let mut failures = Vec::new();
    let mut after_kill: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..150 {
        if i == 30 {
            // Killed between two requests (one in flight is the concurrent test below): its
            // keep-alive connections from the proxy are dropped and its port refuses.
            webs[1].kill().await;
        }
        match get_with(&client, addr, "/", &[]).await {
            Ok(r) if r.status == StatusCode::OK => {
                if i >= 30 {
                    *after_kill
                        .entry(r.backend().unwrap_or_default())
                        .or_insert(0) += 1;
                }
            }
            other => failures.push(format!("request {i}: {other:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "requests failed after a backend died:\n{}",
        failures.join("\n")
    );
    assert_eq!(
        after_kill.get("web-2"),
        None,
        "the dead backend answered? {after_kill:?}"
    );
    assert_eq!(after_kill.values().sum::<usize>(), 120);
    for b in ["web-1", "web-3"] {
        let n = after_kill.get(b).copied().unwrap_or(0);
        assert!(
            (50..=70).contains(&n),
            "{b} got {n} of the 120 requests after the kill: {after_kill:?}"
        );
    }

    // Each connect failure was retried on another backend, until the third one ejected the
    // dead backend: from then on it was not even tried.
    let m = scrape(&client, app.admin_addr().expect("admin listener")).await;
    assert_eq!(
        m.get(r#"lockstep_retries_total{pool="www"}"#),
        Some(&3.0),
        "retries"
    );
    assert_eq!(
        m.get(r#"lockstep_backend_ejections_total{pool="www",backend="web-2"}"#),
        Some(&1.0),
        "ejections"
    );
    assert_eq!(
        m.get(r#"lockstep_backend_up{pool="www",backend="web-2"}"#),
        Some(&0.0)
    );
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_is_retried_around_then_taken_out_by_active_checks() {
    let webs = DemoBackend::start_n(3).await;
    // Passive ejection off: only the active checks can take the dead backend out.
    let pool = "    balance: round_robin\n    retries: 1\n    passive: { failures: 0 }\n    \
                health: { path: /healthz, interval: 100ms, timeout: 500ms, rise: 1, fall: 1 }\n";
    let app = start(&farm_yaml(&backends_yaml(&webs), pool)).await;
    let (client, addr, admin) = (
        h1_client(),
        proxy_addr(&app),
        app.admin_addr().expect("admin listener"),
    );
    const RETRIES: &str = r#"lockstep_retries_total{pool="www"}"#;
    const UP2: &str = r#"lockstep_backend_up{pool="www",backend="web-2"}"#;

    assert!(tally(&client, addr, 30).await.contains_key("web-2"));
    webs[1].kill().await;
    // Requests go on while the checks notice; each must succeed (tally panics otherwise).
    let c = &client;
    wait::until(
        &format!("{UP2} to be 0 after the kill (10 check intervals)"),
        Duration::from_secs(1),
        || async move {
            tally(c, addr, 3).await;
            scrape(c, admin).await.get(UP2) == Some(&0.0)
        },
    )
    .await;
    let retried = scrape(&client, admin)
        .await
        .get(RETRIES)
        .copied()
        .unwrap_or(0.0);

    let counts = tally(&client, addr, 30).await;
    assert_eq!(
        counts,
        expected(&[("web-1", 15), ("web-3", 15)]),
        "after the checks took web-2 out"
    );
    let m = scrape(&client, admin).await;
    assert_eq!(
        m.get(RETRIES).copied().unwrap_or(0.0),
        retried,
        "the dead backend was still tried"
    );
    app.shutdown(Duration::from_millis(200)).await;
}

/// One farm of three backends under three concurrent clients; web-2 is killed mid-run.
/// Returns the failed requests and the number sent.
async fn kill_under_load() -> (Vec<String>, usize) {
    let webs = DemoBackend::start_n(3).await;
    let pool =
        "    balance: round_robin\n    retries: 1\n    passive: { failures: 3, ejection: 10s }\n";
    let app = start(&farm_yaml(&backends_yaml(&webs), pool)).await;
    let addr = proxy_addr(&app);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for _ in 0..3 {
        let (stop, done, failures) = (stop.clone(), done.clone(), failures.clone());
        load.push(tokio::spawn(async move {
            let client = h1_client();
            while !stop.load(Ordering::Relaxed) {
                match get_with(&client, addr, "/", &[]).await {
                    Ok(r) if r.status == StatusCode::OK => {}
                    other => failures.lock().unwrap().push(format!("{other:?}")),
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let d = &done;
    wait::until(
        "the load to get going",
        Duration::from_secs(3),
        || async move { d.load(Ordering::Relaxed) >= 100 },
    )
    .await;
    webs[1].kill().await;
    let before = done.load(Ordering::Relaxed);
    wait::until(
        "the load to go on after the kill",
        Duration::from_secs(3),
        || async move { d.load(Ordering::Relaxed) >= before + 200 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.expect("load task");
    }
    app.shutdown(Duration::from_millis(200)).await;
    let failures = failures.lock().unwrap().clone();
    (failures, done.load(Ordering::Relaxed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_under_concurrent_load_costs_no_failed_request() {
    // The race (a request already on the wire to the backend as it dies) is narrow, so the
    // kill is repeated on a few fresh farms.
    let mut all = Vec::new();
    let mut sent = 0;
    for round in 0..5 {
        let (failures, n) = kill_under_load().await;
        sent += n;
        all.extend(failures.into_iter().map(|f| format!("round {round}: {f}")));
    }
    assert!(
        all.is_empty(),
        "{} of {sent} GETs failed with retries: 1:\n{}",
        all.len(),
        all.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_backend_leaves_rotation_and_comes_back() {
    let webs = DemoBackend::start_n(3).await;
    let pool = "    balance: round_robin\n    health: { path: /healthz, interval: 100ms, timeout: 500ms, rise: 1, fall: 1 }\n";
    let app = start(&farm_yaml(&backends_yaml(&webs), pool)).await;
    let (client, addr) = (h1_client(), proxy_addr(&app));
    assert!(
        tally(&client, addr, 6).await.contains_key("web-2"),
        "web-2 should start in rotation"
    );

    webs[1].set_unhealthy(true);
    let c = &client;
    wait::until(
        "web-2 to get no traffic after failing its checks (10 check intervals)",
        Duration::from_secs(1),
        || async move { !tally(c, addr, 6).await.contains_key("web-2") },
    )
    .await;
    let counts = tally(&client, addr, 30).await;
    assert_eq!(
        counts,
        expected(&[("web-1", 15), ("web-3", 15)]),
        "while web-2 is down"
    );

    webs[1].set_unhealthy(false);
    wait::until(
        "web-2 to get traffic again after passing its checks",
        Duration::from_secs(1),
        || async move { tally(c, addr, 6).await.contains_key("web-2") },
    )
    .await;
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_unhealthy_gives_a_prompt_503() {
    let webs = DemoBackend::start_n(2).await;
    let pool =
        "    health: { path: /healthz, interval: 100ms, timeout: 500ms, rise: 1, fall: 1 }\n";
    let app = start(&farm_yaml(&backends_yaml(&webs), pool)).await;
    let (client, addr) = (h1_client(), proxy_addr(&app));
    for w in &webs {
        w.set_unhealthy(true);
    }
    let c = &client;
    wait::until(
        "a 503 after every backend failed its checks",
        Duration::from_secs(1),
        || async move { get(c, addr, "/").await.status == StatusCode::SERVICE_UNAVAILABLE },
    )
    .await;

    let t = Instant::now();
    let r = get(&client, addr, "/").await;
    let took = t.elapsed();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
    assert!(took < Duration::from_millis(500), "the 503 took {took:?}");
    let ctype = r
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(ctype.starts_with("text/plain"), "content-type {ctype:?}");
    assert!(
        !r.body.trim().is_empty() && r.body.len() < 200,
        "body {:?}",
        r.body
    );
    assert_eq!(r.backend(), None, "a backend answered: {r:?}");
    app.shutdown(Duration::from_millis(200)).await;
}

// ---------------------------------------------------------------------------------------
// Protocols: h2c, h1, TLS with SNI and ALPN, upgrades
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_and_http11_clients_both_reach_a_backend() {
    let webs = DemoBackend::start_n(2).await;
    let app = start(&farm_yaml(&backends_yaml(&webs), RR)).await;
    let addr = proxy_addr(&app);
    for (client, version) in [
        (h2c_client(), Version::HTTP_2),
        (h1_client(), Version::HTTP_11),
    ] {
        let r = get(&client, addr, "/").await;
        assert_eq!(r.status, StatusCode::OK, "{version:?}: {r:?}");
        assert_eq!(r.version, version, "{r:?}");
        let backend = r.backend().unwrap_or_default();
        assert!(
            backend.starts_with("web-"),
            "{version:?}: x-backend {backend:?}"
        );
        assert_eq!(r.body, format!("{backend}\n"), "{version:?}");
    }
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_picks_certificate_by_sni_and_speaks_h2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = [
        TestCert::new(dir.path(), "a.farm.test"),
        TestCert::new(dir.path(), "b.farm.test"),
    ];
    assert_ne!(certs[0].der, certs[1].der);
    let web = DemoBackend::start("web-1").await;
    let yaml = format!(
        "listeners:\n  - name: https\n    bind: \"127.0.0.1:0\"\n    tls:\n      certificates:\n{}{}\
         routes:\n  - {{ path_prefix: \"/\", pool: www }}\n\
         pools:\n  - name: www\n    backends:\n{}",
        certs[0].yaml(),
        certs[1].yaml(),
        web.yaml()
    );
    let app = start(&yaml).await;
    let addr = app.local_addr("https").expect("https listener");

    for (sni, cert) in [("a.farm.test", &certs[0]), ("b.farm.test", &certs[1])] {
        let tls = tls_connect(addr, sni, &cert.der)
            .await
            .unwrap_or_else(|e| panic!("SNI {sni}: {e}"));
        let (_, conn) = tls.get_ref();
        let leaf = conn.peer_certificates().and_then(|c| c.first()).cloned();
        assert_eq!(
            leaf.as_ref(),
            Some(&cert.der),
            "SNI {sni}: wrong leaf certificate"
        );
        assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]), "SNI {sni}: ALPN");

        let (mut sender, h2) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap_or_else(|e| panic!("SNI {sni}: h2 handshake: {e}"));
        tokio::spawn(h2);
        let req = Request::get(format!("https://{sni}/echo-headers"))
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
            .await
            .expect("h2 response within 5s")
            .unwrap_or_else(|e| panic!("SNI {sni}: h2 request: {e}"));
        assert_eq!(resp.status(), StatusCode::OK, "SNI {sni}");
        assert_eq!(resp.version(), Version::HTTP_2);
        assert_eq!(
            resp.headers().get("x-backend").map(|v| v.as_bytes()),
            Some(&b"web-1"[..])
        );
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let body = String::from_utf8_lossy(&body);
        let lines: Vec<&str> = body.lines().collect();
        assert!(
            lines.contains(&"x-forwarded-proto: https"),
            "SNI {sni}: backend saw:\n{body}"
        );
        assert!(
            lines.contains(&format!("x-forwarded-host: {sni}").as_str()),
            "SNI {sni}: backend saw:\n{body}"
        );
    }
    app.shutdown(Duration::from_millis(200)).await;
}

/// h2spec 3.5/2: once ALPN agreed on h2, an invalid connection preface is a connection error
/// (GOAWAY, then close), never an HTTP/1.1 answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_alpn_h2_a_bad_preface_gets_no_http1_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = TestCert::new(dir.path(), "a.farm.test");
    let web = DemoBackend::start("web-1").await;
    let yaml = format!(
        "listeners:\n  - name: https\n    bind: \"127.0.0.1:0\"\n    tls:\n      certificates:\n{}\
         routes:\n  - {{ path_prefix: \"/\", pool: www }}\n\
         pools:\n  - name: www\n    backends:\n{}",
        cert.yaml(),
        web.yaml()
    );
    let app = start(&yaml).await;
    let addr = app.local_addr("https").expect("https listener");
    let mut tls = tls_connect(addr, "a.farm.test", &cert.der).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls.write_all(b"GET / HTTP/1.1\r\nHost: a.farm.test\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut got)).await;
    assert!(
        !got.starts_with(b"HTTP/1.1"),
        "answered in HTTP/1.1 after ALPN h2: {}",
        String::from_utf8_lossy(&got)
    );
    app.shutdown(Duration::from_millis(200)).await;
}

/// Reads from `s` until the end of a response head; returns the head.
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte so that nothing after the head is consumed.
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut byte))
            .await
            .expect("response head within 2s")
            .expect("read");
        assert!(
            n > 0,
            "connection closed mid-head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through_and_echoes_bytes() {
    let stop = CancellationToken::new();
    let ws = upgrade_echo_backend(stop.clone()).await;
    let app = start(&farm_yaml(&backend_yaml("ws-1", ws, 1), "")).await;

    let mut s = TcpStream::connect(proxy_addr(&app)).await.expect("connect");
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: ws.farm.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .expect("write upgrade request");
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "head: {head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("\r\nupgrade: websocket\r\n"), "head: {head}");
    assert!(
        lower.contains("\r\nconnection: upgrade\r\n"),
        "head: {head}"
    );

    for msg in [
        &b"hello through the tunnel"[..],
        &[0u8, 255, 1, 254, 13, 10][..],
    ] {
        s.write_all(msg)
            .await
            .expect("write on the upgraded connection");
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut back))
            .await
            .expect("echo within 2s")
            .expect("read echo");
        assert_eq!(back, msg);
    }
    stop.cancel();
    app.shutdown(Duration::from_millis(200)).await;
}

// ---------------------------------------------------------------------------------------
// Reload
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_change_backends_without_a_failed_request() {
    let webs = DemoBackend::start_n(4).await;
    let yaml_for = |set: &[usize]| farm_yaml(&backends_yaml(set.iter().map(|&i| &webs[i])), RR);
    let mut app = start(&yaml_for(&[0, 1])).await;
    let addr = proxy_addr(&app);

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for _ in 0..3 {
        let (stop, done, failures) = (stop.clone(), done.clone(), failures.clone());
        load.push(tokio::spawn(async move {
            let client = h1_client();
            while !stop.load(Ordering::Relaxed) {
                match get_with(&client, addr, "/", &[]).await {
                    Ok(r) if r.status == StatusCode::OK => {}
                    other => failures.lock().unwrap().push(format!("{other:?}")),
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // Add web-3, drop web-1, add web-4, drop web-2 — each reload under load.
    for set in [&[0, 1, 2][..], &[1, 2], &[1, 2, 3], &[2, 3]] {
        let before = done.load(Ordering::Relaxed);
        app.reload(config(&yaml_for(set)))
            .unwrap_or_else(|e| panic!("reload to {set:?} refused: {e}"));
        let d = &done;
        wait::until(
            &format!("the load to go on after reloading to {set:?}"),
            Duration::from_secs(3),
            || async move { d.load(Ordering::Relaxed) >= before + 100 },
        )
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.expect("load task");
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed across reloads:\n{}",
        failures.len(),
        done.load(Ordering::Relaxed),
        failures.join("\n")
    );
    let counts = tally(&h1_client(), addr, 40).await;
    assert_eq!(
        counts,
        expected(&[("web-3", 20), ("web-4", 20)]),
        "after the last reload"
    );
    app.shutdown(Duration::from_millis(200)).await;
}

// ---------------------------------------------------------------------------------------
// Request smuggling shapes and limits (raw TCP)
// ---------------------------------------------------------------------------------------

const COUNTED_POOL: &str = "    retries: 0\n    timeouts: { response: 1s }\n";
const RAW_WAIT: Duration = Duration::from_millis(1500);

async fn counted_farm() -> (CountingBackend, lockstep::appliance::Appliance) {
    let counter = CountingBackend::start().await;
    let app = start(&farm_yaml(
        &backend_yaml("counter", counter.addr, 1),
        COUNTED_POOL,
    ))
    .await;
    (counter, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_chunked_is_not_forwarded_as_two_requests() {
    let (counter, app) = counted_farm().await;
    // Chunked says the body is empty and a second request follows; Content-Length says the
    // body is 4 bytes. Whichever reading wins, the backend must not see `GET /smuggled`.
    let out = raw_exchange(
        proxy_addr(&app),
        b"POST /first HTTP/1.1\r\nHost: smuggle.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
          0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: smuggle.test\r\n\r\n",
        RAW_WAIT,
    )
    .await;
    let seen = counter.requests.lock().unwrap().clone();
    assert!(
        counter.seen() <= 1,
        "the backend saw {seen:?}; client got:\n{}",
        out.text()
    );
    assert!(
        !seen.iter().any(|r| r.contains("smuggled")),
        "smuggled request reached the backend: {seen:?}"
    );
    assert!(
        out.statuses().len() <= 1,
        "more than one response:\n{}",
        out.text()
    );
    assert!(
        out.closed,
        "connection left open after an ambiguous request; got:\n{}",
        out.text()
    );
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_content_lengths_get_400_and_close() {
    let (counter, app) = counted_farm().await;
    let out = raw_exchange(
        proxy_addr(&app),
        b"POST / HTTP/1.1\r\nHost: smuggle.test\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        RAW_WAIT,
    )
    .await;
    assert_eq!(out.statuses(), [400], "client got:\n{}", out.text());
    assert!(
        out.closed,
        "connection left open after a 400:\n{}",
        out.text()
    );
    assert_eq!(
        counter.seen(),
        0,
        "the backend saw {:?}",
        counter.requests.lock().unwrap()
    );
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chunk_size_never_reaches_the_backend_whole() {
    let (counter, app) = counted_farm().await;
    let out = raw_exchange(
        proxy_addr(&app),
        b"POST /upload HTTP/1.1\r\nHost: smuggle.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        RAW_WAIT,
    )
    .await;
    let statuses = out.statuses();
    assert!(
        statuses == [400] || (statuses.is_empty() && out.closed),
        "expected a 400 or a closed connection, got:\n{}",
        out.text()
    );
    assert!(
        out.closed,
        "connection left open after a broken body:\n{}",
        out.text()
    );
    assert_eq!(
        counter.complete(),
        0,
        "the backend got a complete request: {:?}",
        counter.requests.lock().unwrap()
    );
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_head_over_64_kib_gets_431() {
    let (counter, app) = counted_farm().await;
    let mut req = b"GET / HTTP/1.1\r\nHost: big.test\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 70 * 1024));
    req.extend_from_slice(b"\r\n\r\n");
    let out = raw_exchange(proxy_addr(&app), &req, RAW_WAIT).await;
    assert_eq!(out.statuses(), [431], "client got:\n{}", out.text());
    assert_eq!(counter.seen(), 0);
    app.shutdown(Duration::from_millis(200)).await;
}

// ---------------------------------------------------------------------------------------
// Forwarded headers
// ---------------------------------------------------------------------------------------

const SPOOF: &[(&str, &str)] = &[
    ("host", "www.farm.test"),
    ("x-forwarded-for", "6.6.6.6"),
    ("forwarded", "for=6.6.6.6;proto=https"),
    ("x-real-ip", "6.6.6.6"),
    ("connection", "x-foo"),
    ("x-foo", "secret"),
    ("keep-alive", "timeout=5"),
    ("proxy-connection", "keep-alive"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_client_cannot_forge_forwarded_headers_and_hop_by_hop_is_dropped() {
    let web = DemoBackend::start("web-1").await;
    let client = h1_client();

    // Control: sent straight to the backend, the headers under test do arrive, so their
    // absence below is the proxy's doing.
    let direct = get_with(&client, web.addr, "/echo-headers", SPOOF)
        .await
        .expect("direct");
    for h in ["x-foo", "keep-alive", "proxy-connection", "connection"] {
        assert_eq!(
            direct.echoed(h).len(),
            1,
            "control: {h} not sent by the client:\n{}",
            direct.body
        );
    }

    let app = start(&farm_yaml(&web.yaml(), "")).await;
    let r = get_with(&client, proxy_addr(&app), "/echo-headers", SPOOF)
        .await
        .expect("via proxy");
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(
        r.echoed("x-forwarded-for"),
        ["127.0.0.1"],
        "backend saw:\n{}",
        r.body
    );
    assert_eq!(
        r.echoed("x-forwarded-host"),
        ["www.farm.test"],
        "backend saw:\n{}",
        r.body
    );
    assert_eq!(
        r.echoed("x-forwarded-proto"),
        ["http"],
        "backend saw:\n{}",
        r.body
    );
    assert_eq!(
        r.echoed("via"),
        ["1.1 lockstep"],
        "backend saw:\n{}",
        r.body
    );
    for h in ["x-foo", "keep-alive", "proxy-connection"] {
        assert!(
            r.echoed(h).is_empty(),
            "hop-by-hop {h} reached the backend:\n{}",
            r.body
        );
    }
    // The other ways to claim an address: dropped from an untrusted client.
    for h in ["forwarded", "x-real-ip"] {
        assert!(
            r.echoed(h).is_empty(),
            "a client's {h} reached the backend:\n{}",
            r.body
        );
    }
    assert!(
        !r.echoed("connection").iter().any(|v| v.contains("x-foo")),
        "the client's Connection reached the backend:\n{}",
        r.body
    );
    app.shutdown(Duration::from_millis(200)).await;
}

/// Dot segments are resolved before routing, and the backend is sent the resolved path: a
/// `/public/..` prefix does not reach the pool of `/public` with a path for another one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_cannot_bypass_a_route_prefix() {
    let public = DemoBackend::start("public-1").await;
    let other = DemoBackend::start("other-1").await;
    let yaml = format!(
        "listeners:\n  - {{ name: http, bind: \"127.0.0.1:0\" }}\n\
         routes:\n  - {{ path_prefix: \"/public\", pool: public }}\n  - {{ path_prefix: \"/\", pool: other }}\n\
         pools:\n  - name: public\n    backends:\n{}  - name: other\n    backends:\n{}",
        public.yaml(),
        other.yaml()
    );
    let app = start(&yaml).await;
    for path in ["/public/../echo-headers", "/public/%2e%2e/echo-headers"] {
        let r = get_with(
            &h1_client(),
            proxy_addr(&app),
            path,
            &[("host", "www.farm.test")],
        )
        .await
        .expect("answer");
        assert_eq!(r.backend().as_deref(), Some("other-1"), "{path}: {r:?}");
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{path}: the backend got another path"
        );
    }
    app.shutdown(Duration::from_millis(200)).await;
}

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host`, or with two, is a 400 and reaches no
/// backend; §3.2.2: with an absolute-form target the backend gets the target's authority as
/// `Host`, not the client's own; CONNECT and TRACE are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_rules_absolute_form_and_connect_trace_at_the_edge() {
    let (counter, app) = counted_farm().await;
    let proxy = proxy_addr(&app);
    for (what, req, want) in [
        ("no Host", &b"GET /a HTTP/1.1\r\n\r\n"[..], 400),
        (
            "two Hosts",
            &b"GET /a HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"[..],
            400,
        ),
        (
            "CONNECT",
            &b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"[..],
            405,
        ),
        (
            "TRACE",
            &b"TRACE / HTTP/1.1\r\nHost: a.test\r\n\r\n"[..],
            405,
        ),
    ] {
        let out = raw_exchange(proxy, req, RAW_WAIT).await;
        assert_eq!(out.statuses(), [want], "{what}: {}", out.text());
    }
    assert_eq!(counter.seen(), 0, "a refused request reached the backend");
    app.shutdown(Duration::from_millis(200)).await;

    let web = DemoBackend::start("web-1").await;
    let app = start(&farm_yaml(&web.yaml(), "")).await;
    let out = raw_exchange(
        proxy_addr(&app),
        b"GET http://www.farm.test/echo-headers HTTP/1.1\r\nHost: admin.internal\r\nConnection: close\r\n\r\n",
        RAW_WAIT,
    )
    .await;
    let text = out.text().to_ascii_lowercase();
    assert!(text.contains("host: www.farm.test"), "{text}");
    assert!(
        !text.contains("admin.internal"),
        "the client's Host was forwarded: {text}"
    );
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxy_forwarded_for_is_appended_to() {
    let web = DemoBackend::start("web-1").await;
    let yaml = farm_yaml_with("    trusted_proxies: [\"127.0.0.1/32\"]\n", &web.yaml(), "");
    let app = start(&yaml).await;
    let r = get_with(&h1_client(), proxy_addr(&app), "/echo-headers", SPOOF)
        .await
        .expect("via proxy");
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(
        r.echoed("x-forwarded-for"),
        ["6.6.6.6, 127.0.0.1"],
        "backend saw:\n{}",
        r.body
    );
    assert_eq!(
        r.echoed("via"),
        ["1.1 lockstep"],
        "backend saw:\n{}",
        r.body
    );
    app.shutdown(Duration::from_millis(200)).await;
}

// ---------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_requests_health_and_reloads() {
    let webs = DemoBackend::start_n(2).await;
    webs[1].set_unhealthy(true);
    let pool =
        "    health: { path: /healthz, interval: 100ms, timeout: 500ms, rise: 1, fall: 1 }\n";
    let yaml = farm_yaml(&backends_yaml(&webs), pool);
    let mut app = start(&yaml).await;
    let (client, addr, admin) = (
        h1_client(),
        proxy_addr(&app),
        app.admin_addr().expect("admin listener"),
    );
    const UP2: &str = r#"lockstep_backend_up{pool="www",backend="web-2"}"#;
    const UP1: &str = r#"lockstep_backend_up{pool="www",backend="web-1"}"#;
    const OK1: &str = r#"lockstep_http_requests_total{pool="www",backend="web-1",class="2xx"}"#;
    const RELOADS: &str = r#"lockstep_config_reloads_total{result="ok"}"#;

    let c = &client;
    wait::until(
        &format!("{UP2} to be 0 after web-2 started failing its checks"),
        Duration::from_secs(1),
        || async move { scrape(c, admin).await.get(UP2) == Some(&0.0) },
    )
    .await;

    const N: usize = 7;
    let counts = tally(&client, addr, N).await;
    assert_eq!(counts, expected(&[("web-1", N)]));
    let m = scrape(&client, admin).await;
    assert_eq!(m.get(OK1), Some(&(N as f64)), "{OK1}");
    assert_eq!(m.get(UP1), Some(&1.0), "{UP1}");
    assert_eq!(m.get(UP2), Some(&0.0), "{UP2}");
    assert_eq!(
        m.get(RELOADS).copied().unwrap_or(0.0),
        0.0,
        "{RELOADS} before any reload"
    );

    app.reload(config(&yaml)).expect("reload");
    let m = scrape(&client, admin).await;
    assert_eq!(m.get(RELOADS), Some(&1.0), "{RELOADS} after one reload");
    assert_eq!(m.get(OK1), Some(&(N as f64)), "{OK1} after the reload");
    app.shutdown(Duration::from_millis(200)).await;
}

// ---------------------------------------------------------------------------------------
// Error statuses
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_never_answers_gets_504_after_the_response_timeout() {
    let stop = CancellationToken::new();
    let silent = silent_backend(stop.clone()).await;
    let pool = "    retries: 0\n    timeouts: { response: 300ms }\n";
    let app = start(&farm_yaml(&backend_yaml("silent", silent, 1), pool)).await;
    let t = Instant::now();
    let r = get(&h1_client(), proxy_addr(&app), "/").await;
    let took = t.elapsed();
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{r:?}");
    assert!(
        took >= Duration::from_millis(280),
        "504 after only {took:?}, before the 300ms timeout"
    );
    assert!(took < Duration::from_secs(1), "504 took {took:?}");
    stop.cancel();
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_backend_gets_502() {
    let nobody = dead_address();
    let app = start(&farm_yaml(
        &backend_yaml("gone", nobody.addr, 1),
        "    retries: 0\n",
    ))
    .await;
    let t = Instant::now();
    let r = get(&h1_client(), proxy_addr(&app), "/").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{r:?}");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "502 took {:?}",
        t.elapsed()
    );
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_for_an_unrouted_host_gets_404() {
    let web = DemoBackend::start("web-1").await;
    let yaml = format!(
        "listeners:\n  - name: http\n    bind: \"127.0.0.1:0\"\n\
         routes:\n  - {{ host: \"only.test\", path_prefix: \"/\", pool: www }}\n\
         pools:\n  - name: www\n    backends:\n{}",
        web.yaml()
    );
    let app = start(&yaml).await;
    let (client, addr) = (h1_client(), proxy_addr(&app));
    let routed = get_with(&client, addr, "/", &[("host", "only.test")])
        .await
        .expect("routed");
    assert_eq!(
        routed.status,
        StatusCode::OK,
        "control: the routed host works: {routed:?}"
    );
    let r = get_with(&client, addr, "/", &[("host", "other.test")])
        .await
        .expect("unrouted");
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{r:?}");
    assert_eq!(r.backend(), None, "a backend answered: {r:?}");
    app.shutdown(Duration::from_millis(200)).await;
}

// ---------------------------------------------------------------------------------------
// Hash policy
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_on_header_keeps_each_user_on_one_backend() {
    let webs = DemoBackend::start_n(3).await;
    let pool = "    balance: hash\n    hash_key: \"header:x-user\"\n";
    let app = start(&farm_yaml(&backends_yaml(&webs), pool)).await;
    let (client, addr) = (h1_client(), proxy_addr(&app));

    let backend_of = |user: String| {
        let client = &client;
        async move {
            let r = get_with(client, addr, "/", &[("x-user", user.as_str())])
                .await
                .expect("request");
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
            r.backend().expect("x-backend")
        }
    };
    let alice: BTreeSet<String> = {
        let mut s = BTreeSet::new();
        for _ in 0..50 {
            s.insert(backend_of("alice".into()).await);
        }
        s
    };
    assert_eq!(alice.len(), 1, "alice was spread over {alice:?}");

    let mut by_backend: BTreeMap<String, usize> = BTreeMap::new();
    for u in 0..30 {
        let first = backend_of(format!("user-{u}")).await;
        for _ in 0..2 {
            assert_eq!(
                backend_of(format!("user-{u}")).await,
                first,
                "user-{u} moved"
            );
        }
        *by_backend.entry(first).or_insert(0) += 1;
    }
    assert_eq!(by_backend.len(), 3, "30 users landed on {by_backend:?}");
    app.shutdown(Duration::from_millis(200)).await;
}

// ---------------------------------------------------------------------------------------
// Client timeouts
// ---------------------------------------------------------------------------------------

/// Sends one keep-alive request on a raw connection, then stays silent; returns how long the
/// proxy took to close the connection after the answer (None if it stayed open for 5 s).
async fn silence_until_closed(addr: std::net::SocketAddr, head: &[u8]) -> Option<Duration> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(head).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.expect("read answer");
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "first answer: {}",
        String::from_utf8_lossy(&buf[..n])
    );
    let quiet = Instant::now();
    match tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    {
        Ok(()) => Some(quiet.elapsed()),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let web = DemoBackend::start("web-1").await;
    let yaml = farm_yaml_with(
        "    timeouts: { idle: 300ms, header_read: 10s }\n",
        &web.yaml(),
        "",
    );
    let app = start(&yaml).await;
    let closed = silence_until_closed(proxy_addr(&app), b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let closed = closed.expect("an idle connection stayed open for 5 s despite idle: 300ms");
    assert!(
        closed >= Duration::from_millis(250) && closed < Duration::from_millis(1500),
        "closed after {closed:?}; expected between idle and about twice idle"
    );
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_head_is_cut_off_by_header_read_timeout() {
    let web = DemoBackend::start("web-1").await;
    let yaml = farm_yaml_with(
        "    timeouts: { idle: 10s, header_read: 300ms }\n",
        &web.yaml(),
        "",
    );
    let app = start(&yaml).await;
    // The first request is complete; the wait for the next head is bounded by header_read.
    let closed = silence_until_closed(proxy_addr(&app), b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let closed =
        closed.expect("a silent connection stayed open for 5 s despite header_read: 300ms");
    assert!(
        closed < Duration::from_millis(1500),
        "closed after {closed:?}"
    );
    app.shutdown(Duration::from_millis(200)).await;
}

// ---------------------------------------------------------------------------------------
// Several worker runtimes
// ---------------------------------------------------------------------------------------

/// Proxy on two worker runtimes, admin API on a control runtime of its own (as `lockstep
/// serve` runs them): both serve, a reload reaches the workers, a shutdown stops all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_runtimes_share_the_listener_and_survive_a_reload() {
    let mut workers: Vec<tokio::runtime::Handle> = (0..3)
        .map(|_| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let handle = rt.handle().clone();
            std::thread::spawn(move || rt.block_on(std::future::pending::<()>()));
            handle
        })
        .collect();
    let control = workers.pop().expect("three runtimes");
    let web1 = DemoBackend::start("web-1").await;
    let web2 = DemoBackend::start("web-2").await;
    let mut app = lockstep::appliance::Appliance::start_on(
        config(&farm_yaml(&web1.yaml(), "")),
        lockstep::appliance::Runtimes { workers, control },
    )
    .await
    .expect("start on two workers");
    let addr = proxy_addr(&app);
    // Fresh connections each time, so both SO_REUSEPORT sockets take some.
    for _ in 0..20 {
        let r = get(&h1_client(), addr, "/").await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
    }
    let admin = app.admin_addr().expect("admin listener");
    let r = get(&h1_client(), admin, "/healthz").await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "admin on the control runtime: {r:?}"
    );
    app.reload(config(&farm_yaml(&web2.yaml(), "")))
        .expect("reload");
    let counts = tally(&h1_client(), addr, 20).await;
    assert_eq!(counts, expected(&[("web-2", 20)]), "after the reload");
    app.shutdown(Duration::from_millis(200)).await;
    assert!(
        refuses(addr).await,
        "a worker kept accepting after shutdown"
    );
    assert!(
        refuses(admin).await,
        "the control runtime kept accepting after shutdown"
    );
}

/// A request abandoned while its backend still thinks (an h2 client resets the stream, an
/// HTTP/1.1 client hangs up) stops counting as in flight: a leaked count would skew
/// `least_conn` and `p2c_ewma` against that backend for good.
#[tokio::test]
async fn an_abandoned_request_no_longer_counts_in_flight() {
    let stop = CancellationToken::new();
    let silent = silent_backend(stop.clone()).await;
    let app = start(&farm_yaml(
        &backend_yaml("slow", silent, 1),
        "    balance: least_conn\n    retries: 0\n    timeouts: { response: 60s }\n",
    ))
    .await;
    let proxy = proxy_addr(&app);
    let in_flight = || {
        app.live().load().table.pools[0].backends[0]
            .in_flight
            .load(Ordering::Relaxed)
    };
    for (name, client) in [("h2c", h2c_client()), ("HTTP/1.1", h1_client())] {
        let pending = tokio::spawn(async move { get_with(&client, proxy, "/", &[]).await });
        wait::until(
            &format!("the {name} request to be in flight"),
            Duration::from_secs(10),
            || async { in_flight() == 1 },
        )
        .await;
        // Dropping the client's request: h2 sends RST_STREAM, HTTP/1.1 closes the connection.
        pending.abort();
        let _ = pending.await;
        wait::until(
            &format!("the abandoned {name} request to leave the in-flight count"),
            Duration::from_secs(10),
            || async { in_flight() == 0 },
        )
        .await;
    }
    app.shutdown(Duration::from_secs(1)).await;
    stop.cancel();
}
