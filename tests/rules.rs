//! Rules per route, end to end: the appliance started from YAML on `127.0.0.1:0` with a plain
//! and a TLS listener in front of a real backend; each rule checked as a request and the
//! response a client gets (and, where it matters, what the backend received).

mod common;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};

use common::tls::{tls_connect, TestCert};
use common::*;
use lockstep::appliance::Appliance;

/// The listeners `http` and `https` (certificate for www.farm.test) and `routes` in front of
/// pool `www` over `backend`.
fn rules_yaml(cert: &TestCert, routes: &str, backend: &DemoBackend) -> String {
    format!(
        "listeners:\n  - name: http\n    bind: \"127.0.0.1:0\"\n  - name: https\n    bind: \"127.0.0.1:0\"\n    tls:\n      certificates:\n{}\
         routes:\n{routes}\
         pools:\n  - name: www\n    backends:\n{}\
         admin:\n  bind: \"127.0.0.1:0\"\n",
        cert.yaml(),
        backend.yaml()
    )
}

async fn get_h(app: &Appliance, path: &str, headers: &[(&str, &str)]) -> Reply {
    get_with(&h1_client(), proxy_addr(app), path, headers)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// GET `path` over TLS (h2) on listener `https` for www.farm.test.
async fn get_tls(app: &Appliance, cert: &TestCert, path: &str) -> http::Response<Bytes> {
    let addr = app.local_addr("https").expect("https listener");
    let tls = tls_connect(addr, "www.farm.test", &cert.der)
        .await
        .expect("TLS");
    let (mut sender, h2) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(h2);
    let req = Request::get(format!("https://www.farm.test{path}"))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .expect("answer within 5 s")
        .expect("h2 request");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    http::Response::from_parts(parts, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_redirects_to_https_and_https_gets_hsts() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::new(dir.path(), "www.farm.test");
    let web = DemoBackend::start("web-1").await;
    let routes = "  - { name: to-https, listeners: [http], redirect: { scheme: https, status: 308 } }\n\
                  \x20 - name: site\n    pool: www\n    hsts: { max_age: 365d, include_subdomains: true }\n";
    let app = start(&rules_yaml(&cert, routes, &web)).await;

    let r = get_h(&app, "/a/b?x=1", &[("host", "www.farm.test:8080")]).await;
    assert_eq!(r.status, StatusCode::PERMANENT_REDIRECT, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some("https://www.farm.test/a/b?x=1"),
        "{r:?}"
    );
    assert!(
        r.header("x-backend").is_none(),
        "a redirect forwards nothing"
    );
    // No HSTS over plain HTTP (browsers ignore it there: RFC 6797 §7.2).
    assert!(r.header("strict-transport-security").is_none());

    let r = get_tls(&app, &cert, "/").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-backend"], "web-1");
    assert_eq!(
        r.headers()["strict-transport-security"],
        "max-age=31536000; includeSubDomains"
    );
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_added_set_and_removed_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::new(dir.path(), "www.farm.test");
    let web = DemoBackend::start("web-1").await;
    let routes = "  - pool: www\n    request_headers:\n      set: { X-Env: prod, X-Client: lockstep }\n      \
                  add: { X-Tag: added }\n      remove: [X-Debug]\n    response_headers:\n      \
                  set: { X-Frame-Options: DENY }\n      add: { X-Served-By: lockstep }\n      remove: [X-Backend]\n";
    let app = start(&rules_yaml(&cert, routes, &web)).await;
    let r = get_h(
        &app,
        "/echo-headers",
        &[
            ("x-debug", "1"),
            ("x-client", "forged"),
            ("x-tag", "client"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    // What the backend received.
    assert_eq!(r.echoed("x-env"), ["prod"], "{}", r.body);
    assert_eq!(
        r.echoed("x-client"),
        ["lockstep"],
        "set replaces: {}",
        r.body
    );
    assert_eq!(
        r.echoed("x-tag"),
        ["client", "added"],
        "add appends: {}",
        r.body
    );
    assert!(r.echoed("x-debug").is_empty(), "{}", r.body);
    // What the client got.
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    assert_eq!(r.header("x-served-by"), Some("lockstep"));
    assert!(r.header("x-backend").is_none(), "{r:?}");
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_is_stripped_or_replaced_before_forwarding() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::new(dir.path(), "www.farm.test");
    let web = DemoBackend::start("web-1").await;
    // The demo backend answers `/echo-headers` with the headers it got, anything else with
    // its name: which one came back says which path it was asked for.
    let routes = "  - { path_prefix: /api, pool: www, rewrite_prefix: / }\n\
                  \x20 - { path_prefix: /hdrs, pool: www, rewrite_prefix: /echo-headers }\n\
                  \x20 - { pool: www }\n";
    let app = start(&rules_yaml(&cert, routes, &web)).await;
    let r = get_h(&app, "/api/echo-headers?q=1", &[("x-mark", "1")]).await;
    assert_eq!(r.echoed("x-mark"), ["1"], "/api stripped: {}", r.body);
    let r = get_h(&app, "/hdrs", &[("x-mark", "2")]).await;
    assert_eq!(r.echoed("x-mark"), ["2"], "/hdrs replaced: {}", r.body);
    // Without a rewrite the path goes as it came: the backend answers with its name.
    let r = get_h(&app, "/apix/echo-headers", &[("x-mark", "3")]).await;
    assert!(r.echoed("x-mark").is_empty(), "{}", r.body);
    assert_eq!(r.body, "web-1\n");
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_response_answers_without_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::new(dir.path(), "www.farm.test");
    let page = dir.path().join("maintenance.html");
    std::fs::write(&page, "<h1>back soon</h1>\n").unwrap();
    let web = DemoBackend::start("web-1").await;
    let routes = format!(
        "  - path_prefix: /shop\n    respond: {{ status: 503, body_file: \"{}\", content_type: text/html }}\n    \
         response_headers: {{ set: {{ Retry-After: \"120\" }} }}\n\
         \x20 - {{ path_prefix: /robots.txt, respond: {{ body: \"User-agent: *\\nDisallow: /\\n\" }} }}\n\
         \x20 - {{ pool: www }}\n",
        page.display()
    );
    let app = start(&rules_yaml(&cert, &routes, &web)).await;
    let r = get_h(&app, "/shop/cart", &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.body, "<h1>back soon</h1>\n");
    assert_eq!(r.header("content-type"), Some("text/html"));
    assert_eq!(r.header("retry-after"), Some("120"));
    assert!(r.header("x-backend").is_none());
    let r = get_h(&app, "/robots.txt", &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.body.as_str()),
        (200, "User-agent: *\nDisallow: /\n")
    );
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    // HEAD: the same head, no body.
    let raw = raw_exchange(
        proxy_addr(&app),
        b"HEAD /shop HTTP/1.1\r\nHost: www.farm.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    let text = raw.text();
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("content-length: 19"), "{text}");
    assert!(!text.contains("back soon"), "{text}");
    assert_eq!(
        get_h(&app, "/", &[]).await.backend().as_deref(),
        Some("web-1")
    );
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after_per_client_key() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::new(dir.path(), "www.farm.test");
    let web = DemoBackend::start("web-1").await;
    let routes = "  - name: api\n    path_prefix: /api\n    pool: www\n    \
                  rate_limit: { requests: 3, per: 1m, key: \"header:X-Api-Key\" }\n\
                  \x20 - name: site\n    pool: www\n    rate_limit: { requests: 2, per: 10s, burst: 2 }\n";
    let app = start(&rules_yaml(&cert, routes, &web)).await;
    // By client address: two, then 429 with the seconds until the next token (10 s / 2).
    for _ in 0..2 {
        assert_eq!(get_h(&app, "/", &[]).await.status, 200);
    }
    let r = get_h(&app, "/", &[]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{r:?}");
    assert_eq!(r.header("retry-after"), Some("5"), "{r:?}");
    assert!(
        r.header("x-backend").is_none(),
        "a refused request is not forwarded"
    );

    // By key: each key has its own three a minute.
    for key in ["k1", "k2"] {
        for _ in 0..3 {
            let r = get_h(&app, "/api/x", &[("x-api-key", key)]).await;
            assert_eq!(r.status, 200, "{key}: {r:?}");
        }
    }
    let r = get_h(&app, "/api/x", &[("x-api-key", "k1")]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("20"));
    assert_eq!(
        get_h(&app, "/api/x", &[("x-api-key", "k3")]).await.status,
        200
    );

    let metrics = get(&h1_client(), app.admin_addr().expect("admin"), "/metrics").await;
    assert!(
        metrics
            .body
            .contains("lockstep_rate_limited_total{route=\"site\"} 1")
            && metrics
                .body
                .contains("lockstep_rate_limited_total{route=\"api\"} 1"),
        "{}",
        metrics.body
    );
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_for_one_listener_leaves_the_others_alone() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::new(dir.path(), "www.farm.test");
    let web = DemoBackend::start("web-1").await;
    let routes =
        "  - { listeners: [https], respond: { body: \"tls only\\n\" } }\n  - { pool: www }\n";
    let app = start(&rules_yaml(&cert, routes, &web)).await;
    assert_eq!(
        get_h(&app, "/", &[]).await.backend().as_deref(),
        Some("web-1")
    );
    let r = get_tls(&app, &cert, "/").await;
    assert_eq!(r.body().as_ref(), b"tls only\n");
    app.shutdown(Duration::from_millis(200)).await;
}

/// Every mistake in a route's rules is reported at its line and column, with the fix.
#[test]
fn bad_rules_are_refused_where_written() {
    let yaml = "listeners:\n  - { name: http, bind: \"127.0.0.1:8080\" }\n\
                routes:\n\
                \x20 - { path_prefix: /a, pool: www, redirect: { scheme: https } }\n\
                \x20 - { path_prefix: /b }\n\
                \x20 - { path_prefix: /c, redirect: { status: 200 } }\n\
                \x20 - { path_prefix: /d, redirect: { scheme: gopher } }\n\
                \x20 - { path_prefix: /e, pool: www, request_headers: { set: { Content-Length: \"0\" } } }\n\
                \x20 - { path_prefix: /f, pool: www, rate_limit: { requests: 0, key: \"cookie:x\" } }\n\
                \x20 - { path_prefix: /g, pool: www, hsts: { max_age: 1d, preload: true } }\n\
                \x20 - { path_prefix: /h, respond: { status: 204 } }\n\
                \x20 - { path_prefix: /i, listeners: [htps], pool: www }\n\
                \x20 - { path_prefix: /j, respond: { body_file: /nonexistent/page.html } }\n\
                \x20 - { path_prefix: /k, pool: www, rewrite_prefix: \"no-slash\" }\n\
                \x20 - { name: dup, pool: www }\n\
                \x20 - { name: dup, pool: www }\n\
                \x20 - { path_prefix: /l, redirect: { scheme: https }, request_headers: { set: { X-A: \"1\" } } }\n\
                \x20 - { path_prefix: /m, listeners: [], pool: www }\n\
                pools:\n  - name: www\n    backends:\n      - { name: a, address: \"127.0.0.1:9\" }\n";
    let e = lockstep::config::parse(std::path::Path::new("rules.yaml"), yaml)
        .expect_err("refused")
        .to_string();
    for (line, says) in [
        (4, "more than one of `pool:`, `redirect:` and `respond:`"),
        (
            5,
            "does nothing: give it a `pool:`, a `redirect:` or a `respond:`",
        ),
        (6, "redirect status 200 is not a redirect"),
        (6, "would loop"),
        (7, "redirect scheme `gopher`: write http or https"),
        (8, "may not change `Content-Length`: it frames the message"),
        (9, "rate_limit.requests must be at least 1"),
        (
            9,
            "rate_limit.key `cookie:x`: write client_ip or header:NAME",
        ),
        (10, "hsts preload needs max_age of at least a year"),
        (11, "respond status 204 cannot carry a page"),
        (
            12,
            "listener `htps`, which does not exist: did you mean `http`?",
        ),
        (13, "respond body_file `/nonexistent/page.html`"),
        (
            14,
            "rewrite_prefix `no-slash` must be a path starting with /",
        ),
        (16, "route name `dup` is also used on line 15"),
        (17, "request_headers only apply to a route with a pool"),
        (18, "`listeners: []` matches nothing"),
    ] {
        assert!(
            e.lines()
                .any(|l| l.contains(&format!("rules.yaml:{line}:")) && l.contains(says)),
            "line {line} should say {says:?}:\n{e}"
        );
    }
}
