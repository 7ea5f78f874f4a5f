//! lockstep's own HTTP/1.1, both sides, end to end over real sockets: what a client sends
//! (pipelining, `Expect: 100-continue`, chunked uploads, HTTP/1.0, transfer codings it does not
//! know) and what a backend receives (origin-form targets, a `Host`, re-framed bodies, the
//! health checks' requests), and that a backend's answer is framed right for each client.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;

const WAIT: Duration = Duration::from_millis(1500);

/// A backend that records every request head (raw text) and the body bytes after it, and
/// answers each request head `200 ok` (keep-alive, `content-length`).
async fn recording_backend() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let socket = bind().await;
    let addr = socket.local_addr().expect("addr");
    let heads = Arc::new(Mutex::new(Vec::new()));
    let h = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = socket.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut seen = Vec::new();
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    // One answer per complete head; bodies are recorded with the next head's
                    // text (the test reads them from the recorded stream as a whole).
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&seen[..end]).into_owned();
                        seen.drain(..end + 4);
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length: ")
                                    .map(str::to_owned)
                            })
                            .and_then(|v| v.trim().parse::<usize>().ok());
                        let chunked = head
                            .to_ascii_lowercase()
                            .contains("transfer-encoding: chunked");
                        let mut body = Vec::new();
                        if let Some(len) = length {
                            while seen.len() < len {
                                let Ok(n) = s.read(&mut buf).await else {
                                    return;
                                };
                                if n == 0 {
                                    return;
                                }
                                seen.extend_from_slice(&buf[..n]);
                            }
                            body = seen.drain(..len).collect();
                        } else if chunked {
                            while !seen.windows(5).any(|w| w == b"0\r\n\r\n") {
                                let Ok(n) = s.read(&mut buf).await else {
                                    return;
                                };
                                if n == 0 {
                                    return;
                                }
                                seen.extend_from_slice(&buf[..n]);
                            }
                            let end = seen.windows(5).position(|w| w == b"0\r\n\r\n").unwrap() + 5;
                            body = seen.drain(..end).collect();
                        }
                        h.lock()
                            .unwrap()
                            .push(format!("{head}\r\n\r\n{}", String::from_utf8_lossy(&body)));
                        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, heads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_get_origin_form_a_host_and_rewritten_framing() {
    let (backend, heads) = recording_backend().await;
    let app = start(&farm_yaml(
        &backend_yaml("rec", backend, 1),
        "    health: { path: /healthz, interval: 100ms, timeout: 1s }\n",
    ))
    .await;
    let proxy = proxy_addr(&app);
    // Absolute form from the client: the backend gets origin form and the target's authority.
    let out = raw_exchange(
        proxy,
        b"GET http://www.farm.test/a/b?c=d HTTP/1.1\r\nHost: www.farm.test\r\n\r\n\
          POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n",
        WAIT,
    )
    .await;
    assert_eq!(out.statuses(), [200, 200], "client got:\n{}", out.text());
    let heads = heads.lock().unwrap().clone();
    let get = heads
        .iter()
        .find(|h| h.starts_with("GET /a/b"))
        .unwrap_or_else(|| panic!("no GET reached the backend: {heads:#?}"));
    assert!(get.starts_with("GET /a/b?c=d HTTP/1.1\r\n"), "{get}");
    assert!(
        get.to_ascii_lowercase()
            .contains("\r\nhost: www.farm.test\r\n"),
        "{get}"
    );
    let post = heads
        .iter()
        .find(|h| h.starts_with("POST /up"))
        .unwrap_or_else(|| panic!("no POST reached the backend: {heads:#?}"));
    let lower = post.to_ascii_lowercase();
    assert!(
        lower.contains("transfer-encoding: chunked") && post.ends_with("5\r\nhello\r\n0\r\n\r\n"),
        "re-chunked without the extension and the trailer: {post:?}"
    );
    // The health checks are requests like any other: origin form, with a Host.
    let check = heads
        .iter()
        .find(|h| h.starts_with("GET /healthz"))
        .unwrap_or_else(|| panic!("no health check reached the backend: {heads:#?}"));
    assert!(check.starts_with("GET /healthz HTTP/1.1\r\n"), "{check}");
    assert!(check.to_ascii_lowercase().contains("\r\nhost: "), "{check}");
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let web = DemoBackend::start("web-1").await;
    let app = start(&farm_yaml(&web.yaml(), "")).await;
    let out = raw_exchange(
        proxy_addr(&app),
        b"GET /one HTTP/1.1\r\nHost: t\r\n\r\nGET /two HTTP/1.1\r\nHost: t\r\n\r\nGET /three HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        WAIT,
    )
    .await;
    assert_eq!(
        out.statuses(),
        [200, 200, 200],
        "client got:\n{}",
        out.text()
    );
    assert!(
        out.closed,
        "Connection: close was not honoured:\n{}",
        out.text()
    );
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_gets_an_interim_answer_before_the_body_is_sent() {
    let web = DemoBackend::start("web-1").await;
    let app = start(&farm_yaml(&web.yaml(), "")).await;
    let mut s = TcpStream::connect(proxy_addr(&app)).await.expect("connect");
    s.write_all(
        b"POST /x HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("an interim answer before the body")
        .unwrap();
    let interim = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n\r\n"),
        "{interim}"
    );
    s.write_all(b"hello").await.unwrap();
    let mut answer = interim["HTTP/1.1 100 Continue\r\n\r\n".len()..].to_owned();
    while !answer.contains("web-1\nhello") {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("the answer")
            .unwrap();
        assert!(n > 0, "closed early: {answer}");
        answer.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_clients_get_close_delimited_or_kept_alive_answers() {
    let web = DemoBackend::start("web-1").await;
    let app = start(&farm_yaml(&web.yaml(), "")).await;
    let proxy = proxy_addr(&app);
    let out = raw_exchange(proxy, b"GET / HTTP/1.0\r\n\r\n", WAIT).await;
    assert_eq!(out.statuses(), [200], "{}", out.text());
    assert!(
        out.closed,
        "an HTTP/1.0 request without keep-alive left the connection open"
    );
    let out = raw_exchange(
        proxy,
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        WAIT,
    )
    .await;
    assert_eq!(out.statuses(), [200, 200], "{}", out.text());
    assert!(
        out.text()
            .to_ascii_lowercase()
            .contains("connection: keep-alive"),
        "{}",
        out.text()
    );
    assert!(!out.closed, "a kept-alive HTTP/1.0 connection was closed");
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_codings_folded_lines_and_bare_line_feeds_are_refused() {
    let counter = CountingBackend::start().await;
    let app = start(&farm_yaml(
        &backend_yaml("counter", counter.addr, 1),
        "    retries: 0\n",
    ))
    .await;
    let proxy = proxy_addr(&app);
    for (what, request, status) in [
        (
            "gzip then chunked",
            &b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"[..],
            501,
        ),
        (
            "chunked in HTTP/1.0",
            b"POST / HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "obs-fold",
            b"GET / HTTP/1.1\r\nHost: t\r\nX-A: 1\r\n  folded\r\n\r\n",
            400,
        ),
        (
            "Content-Length with a sign",
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: +3\r\n\r\nabc",
            400,
        ),
        (
            "HTTP/2.0 on the wire as text",
            b"GET / HTTP/2.0\r\nHost: t\r\n\r\n",
            505,
        ),
    ] {
        let out = raw_exchange(proxy, request, WAIT).await;
        assert_eq!(
            out.statuses(),
            [status],
            "{what}: client got:\n{}",
            out.text()
        );
        assert!(out.closed, "{what}: connection left open");
    }
    // A chunk line ended by a bare LF: the body is cut there, never forwarded whole.
    let out = raw_exchange(
        proxy,
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
        WAIT,
    )
    .await;
    assert!(out.closed, "bare LF: connection left open:\n{}", out.text());
    assert_eq!(counter.complete(), 0, "a request reached the backend whole");
    app.shutdown(Duration::from_millis(200)).await;
}
