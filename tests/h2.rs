//! HTTP/2 streams through the proxy, driven by the `h2` crate's own client so that every frame
//! and window is the test's choice: request and response bodies larger than the windows on
//! many streams of one connection at once, the headers HTTP/2 forbids, a stream the client
//! resets (its backend request goes too), and a shutdown that lets the streams in flight
//! finish (GOAWAY, then close). `tests/h2spec.rs` checks the frames against RFC 9113.

mod common;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use common::*;

/// An h2c connection to `addr` whose windows are `window` bytes (the server must wait for
/// them), its driver spawned; the driver's handle ends when the connection does.
async fn h2c(
    addr: std::net::SocketAddr,
    window: u32,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(window)
        .initial_connection_window_size(window)
        .handshake(tcp)
        .await
        .expect("h2 handshake");
    (send, tokio::spawn(conn))
}

/// The whole body of `recv`, giving its window back as it reads.
async fn read_all(mut recv: h2::RecvStream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(data) = recv.data().await {
        let data = data.expect("body data");
        let _ = recv.flow_control().release_capacity(data.len());
        out.extend_from_slice(&data);
    }
    out
}

/// Sends `body` on `stream` as the server's window allows, then ends it.
async fn send_all(stream: &mut h2::SendStream<Bytes>, mut body: Bytes) {
    while !body.is_empty() {
        stream.reserve_capacity(body.len());
        let n = std::future::poll_fn(|cx| stream.poll_capacity(cx))
            .await
            .expect("capacity")
            .expect("capacity");
        stream
            .send_data(body.split_to(n.min(body.len())), false)
            .expect("send data");
    }
    stream.send_data(Bytes::new(), true).expect("end stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_larger_than_the_windows_go_both_ways_on_concurrent_streams() {
    let webs = DemoBackend::start_n(2).await;
    let app = start(&farm_yaml(&backends_yaml(&webs), "")).await;
    // 16 KiB windows: every 300 KiB body waits for WINDOW_UPDATEs in both directions.
    let (send, _conn) = h2c(proxy_addr(&app), 16 * 1024).await;
    let mut streams = Vec::new();
    for i in 0..8u8 {
        let body = Bytes::from(vec![b'a' + i; 300 * 1024]);
        let mut send = send.clone().ready().await.expect("ready for a stream");
        let req = Request::post(format!("http://farm.test/upload/{i}"))
            .body(())
            .expect("request");
        let (resp, mut tx) = send.send_request(req, false).expect("stream opened");
        streams.push(tokio::spawn(async move {
            send_all(&mut tx, body.clone()).await;
            let resp = resp.await.expect("response");
            let (head, recv) = resp.into_parts();
            (head, body, read_all(recv).await)
        }));
    }
    for s in streams {
        let (head, sent, got) = tokio::time::timeout(Duration::from_secs(20), s)
            .await
            .expect("every stream answered within 20 s")
            .expect("stream task");
        assert_eq!(head.status, StatusCode::OK);
        let backend = head.headers["x-backend"].to_str().expect("x-backend");
        // The demo backend answers its name, then the body it received.
        let name = format!("{backend}\n");
        assert!(got.starts_with(name.as_bytes()), "{backend}");
        assert_eq!(got.len(), name.len() + sent.len(), "{backend}: length");
        assert!(
            got[name.len()..] == sent[..],
            "{backend}: the body came back changed"
        );
        assert_eq!(
            head.headers[http::header::CONTENT_LENGTH].to_str().unwrap(),
            got.len().to_string()
        );
        assert!(head.headers.contains_key(http::header::DATE));
        for forbidden in ["connection", "keep-alive", "transfer-encoding", "upgrade"] {
            assert!(
                !head.headers.contains_key(forbidden),
                "{forbidden} in an h2 response"
            );
        }
    }
    app.shutdown(Duration::from_millis(200)).await;
}

/// A backend that reads one request head, never answers, and reports when its client (the
/// proxy) closes the connection.
async fn silent_backend() -> (std::net::SocketAddr, tokio::sync::oneshot::Receiver<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("the proxy connects");
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        loop {
            let n = s.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert!(
            got.starts_with(b"GET /slow "),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
        let _ = closed_tx.send(());
    });
    (addr, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reset_by_the_client_ends_its_backend_request_and_not_the_connection() {
    let (silent, backend_closed) = silent_backend().await;
    let web = DemoBackend::start("web-1").await;
    let yaml = format!(
        "listeners:\n  - name: http\n    bind: \"127.0.0.1:0\"\n\
         routes:\n  - {{ path_prefix: \"/slow\", pool: silent }}\n  - {{ path_prefix: \"/\", pool: www }}\n\
         pools:\n  - name: silent\n    timeouts: {{ response: 60s }}\n    backends:\n{}\
         \x20 - name: www\n    backends:\n{}",
        backend_yaml("silent", silent, 1),
        web.yaml()
    );
    let app = start(&yaml).await;
    let (send, conn) = h2c(proxy_addr(&app), 65_535).await;
    let mut send = send.ready().await.expect("ready");
    let (resp, tx) = send
        .send_request(
            Request::get("http://farm.test/slow").body(()).unwrap(),
            true,
        )
        .expect("stream opened");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Dropping both handles of the stream resets it (CANCEL).
    drop((resp, tx));
    tokio::time::timeout(Duration::from_secs(5), backend_closed)
        .await
        .expect("the backend request ended within 5 s of the reset")
        .expect("backend task");
    // The connection still serves.
    let mut send = send.ready().await.expect("ready again");
    let (resp, _) = send
        .send_request(Request::get("http://farm.test/").body(()).unwrap(), true)
        .expect("second stream");
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("answered")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(read_all(resp.into_body()).await, b"web-1\n");
    assert!(!conn.is_finished());
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_shutdown_the_streams_in_flight_finish_and_the_connection_closes() {
    let slow = delayed_backend(Duration::from_millis(500)).await;
    let yaml = format!(
        "listeners:\n  - name: http\n    bind: \"127.0.0.1:0\"\n\
         routes:\n  - {{ path_prefix: \"/\", pool: www }}\n\
         pools:\n  - name: www\n    backends:\n{}",
        backend_yaml("slow", slow, 1)
    );
    let app = start(&yaml).await;
    let (send, conn) = h2c(proxy_addr(&app), 65_535).await;
    let mut answers = Vec::new();
    for _ in 0..3 {
        let mut send = send.clone().ready().await.expect("ready");
        let (resp, _) = send
            .send_request(Request::get("http://farm.test/").body(()).unwrap(), true)
            .expect("stream opened");
        answers.push(resp);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = tokio::spawn(app.shutdown(Duration::from_secs(10)));
    for resp in answers {
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("answered during the drain")
            .expect("a stream in flight is answered, not refused");
        assert_eq!(resp.status(), StatusCode::OK);
        let body = read_all(resp.into_body()).await;
        assert!(body.starts_with(b"ok: a delayed answer"), "{body:?}");
    }
    // GOAWAY: no new stream is taken, and the connection ends.
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the connection closed after its streams")
        .expect("driver task")
        .expect("a graceful close, not a connection error");
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("the drain ended once the streams were answered")
        .expect("shutdown task");
}
