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

/// The connection's window comes back whole from every upload, whether the reader takes a
/// body's last bytes before or after the client's END_STREAM: twelve 200 KiB uploads one after
/// another on one connection (2.4 MB through the server's 1 MiB connection window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_window_comes_back_from_every_upload() {
    let webs = DemoBackend::start_n(1).await;
    let app = start(&farm_yaml(&backends_yaml(&webs), "")).await;
    let (send, _conn) = h2c(proxy_addr(&app), 1 << 20).await;
    for i in 0..12u8 {
        let body = Bytes::from(vec![b'a' + i; 200 * 1024]);
        let mut send = send.clone().ready().await.expect("ready for a stream");
        let req = Request::post(format!("http://farm.test/upload/{i}"))
            .body(())
            .expect("request");
        let (resp, mut tx) = send.send_request(req, false).expect("stream opened");
        let exchange = async {
            send_all(&mut tx, body.clone()).await;
            read_all(resp.await.expect("response").into_body()).await
        };
        let got = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .unwrap_or_else(|_| {
                panic!("upload {i} stalled: the connection's window did not come back")
            });
        assert!(
            got.ends_with(&body),
            "upload {i}: the body came back changed"
        );
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

/// A raw h2c connection: the preface and an empty SETTINGS sent, then frames as the test
/// writes them, so that it can send what no well-behaved client would.
struct Raw {
    tcp: TcpStream,
    buf: Vec<u8>,
}

/// A frame's bytes.
fn raw_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let n = payload.len();
    let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// `GET http://farm.test/` in HPACK: static indexes and a literal `:authority`.
const GET_BLOCK: &[u8] = b"\x82\x86\x84\x01\x09farm.test";
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;

impl Raw {
    async fn connect(addr: std::net::SocketAddr) -> Raw {
        use tokio::io::AsyncWriteExt;
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(raw_frame(4, 0, 0, &[]));
        tcp.write_all(&hello).await.expect("preface");
        Raw {
            tcp,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.tcp.write_all(bytes).await
    }

    /// The next frame (type, flags, stream, payload), or None at the close; 10 s at most.
    async fn frame(&mut self) -> Option<(u8, u8, u32, Vec<u8>)> {
        loop {
            if self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16)
                    | (usize::from(self.buf[1]) << 8)
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let f: Vec<u8> = self.buf.drain(..9 + len).collect();
                    let stream = u32::from_be_bytes([f[5], f[6], f[7], f[8]]) & 0x7fff_ffff;
                    return Some((f[3], f[4], stream, f[9..].to_vec()));
                }
            }
            let mut chunk = [0u8; 16384];
            let n = tokio::time::timeout(Duration::from_secs(10), self.tcp.read(&mut chunk))
                .await
                .expect("the server answers or closes within 10 s")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads until a GOAWAY and returns its error code (None if the connection closed
    /// without one).
    async fn goaway(&mut self) -> Option<u32> {
        while let Some((kind, _, _, payload)) = self.frame().await {
            if kind == GOAWAY {
                return Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]));
            }
        }
        None
    }
}

fn proxy_to(addr: std::net::SocketAddr) -> String {
    format!(
        "listeners:\n  - name: http\n    bind: \"127.0.0.1:0\"\n    http2_only: true\n\
         routes:\n  - {{ path_prefix: \"/\", pool: www }}\n\
         pools:\n  - name: www\n    backends:\n{}",
        backend_yaml("web-1", addr, 1)
    )
}

/// Rapid reset (CVE-2023-44487): each stream opened and cancelled at once, so that every
/// one starts a backend request and none is answered. The connection is shut out
/// (ENHANCE_YOUR_CALM) once its cancellations pass 256 and outnumber its answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_cancels_every_stream_it_opens_is_shut_out() {
    let slow = delayed_backend(Duration::from_millis(200)).await;
    let app = start(&proxy_to(slow)).await;
    let mut raw = Raw::connect(proxy_addr(&app)).await;
    let mut sent = 0;
    let mut batch = Vec::new();
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        batch.extend(raw_frame(HEADERS, END_STREAM | END_HEADERS, id, GET_BLOCK));
        batch.extend(raw_frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
        if batch.len() > 8192 {
            if raw.send(&batch).await.is_err() {
                break; // closed on us: what is checked below
            }
            sent = i + 1;
            batch.clear();
        }
    }
    assert_eq!(
        raw.goaway().await,
        Some(11),
        "GOAWAY ENHANCE_YOUR_CALM after {sent} streams"
    );
    assert!(sent < 2000 || raw.frame().await.is_none());
    // The listener still serves others.
    let (send, _conn) = h2c(proxy_addr(&app), 65_535).await;
    let mut send = send.ready().await.expect("ready");
    let (resp, _) = send
        .send_request(Request::get("http://farm.test/").body(()).unwrap(), true)
        .expect("stream");
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("answered")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    app.shutdown(Duration::from_millis(200)).await;
}

/// A header block is bounded however many CONTINUATION frames carry it: past the header-list
/// limit (64 KiB) plus a frame, the connection ends (ENHANCE_YOUR_CALM) without the server
/// holding more; a block within that bound whose fields are over the limit is answered 431.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_blocks_are_bounded_however_they_are_split() {
    let web = DemoBackend::start("web-1").await;
    let app = start(&proxy_to(web.addr)).await;
    // CONTINUATION flood: 16 KiB frames of a literal value that never ends.
    let mut raw = Raw::connect(proxy_addr(&app)).await;
    let mut first = GET_BLOCK.to_vec();
    first.extend_from_slice(b"\x00\x05x-big\x7f\xff\xff\xff\x0f"); // a 2^28-byte value
    raw.send(&raw_frame(HEADERS, END_STREAM, 1, &first))
        .await
        .expect("headers");
    let junk = vec![b'a'; 16384];
    let mut frames_sent = 0;
    for _ in 0..64 {
        if raw
            .send(&raw_frame(CONTINUATION, 0, 1, &junk))
            .await
            .is_err()
        {
            break;
        }
        frames_sent += 1;
    }
    assert_eq!(
        raw.goaway().await,
        Some(11),
        "after {frames_sent} CONTINUATION frames"
    );

    // 70 000 bytes of fields in five frames: within the block bound, over the list limit.
    let mut raw = Raw::connect(proxy_addr(&app)).await;
    let mut block = GET_BLOCK.to_vec();
    block.extend_from_slice(b"\x00\x05x-big\x7f");
    let mut n = 70_000 - 127;
    while n >= 0x80 {
        block.push(0x80 | (n & 0x7f) as u8);
        n >>= 7;
    }
    block.push(n as u8);
    block.extend(std::iter::repeat_n(b'v', 70_000));
    let pieces: Vec<&[u8]> = block.chunks(16384).collect();
    let mut bytes = raw_frame(HEADERS, END_STREAM, 3, pieces[0]);
    for (i, p) in pieces[1..].iter().enumerate() {
        let flags = if i + 2 == pieces.len() {
            END_HEADERS
        } else {
            0
        };
        bytes.extend(raw_frame(CONTINUATION, flags, 3, p));
    }
    raw.send(&bytes).await.expect("request");
    loop {
        let (kind, flags, stream, payload) = raw.frame().await.expect("an answer");
        if kind == HEADERS && stream == 3 {
            assert_eq!(
                &payload[..],
                b"\x08\x03431",
                "status 431 (literal, static name)"
            );
            assert_eq!(flags & END_STREAM, END_STREAM);
            break;
        }
        assert_ne!(
            kind, GOAWAY,
            "the connection survives a head over the limit"
        );
    }
    app.shutdown(Duration::from_millis(200)).await;
}

/// A client that floods PINGs and reads nothing gets no more buffered for it than the
/// output's high-water mark: the server stops reading, so the client's writes stall long
/// before 64 MiB (each PING would otherwise queue a 17-byte answer forever); and the idle
/// timeout, which counts a write that waits as silence too, then closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_floods_pings_and_reads_nothing_is_not_buffered_for() {
    let web = DemoBackend::start("web-1").await;
    let yaml = proxy_to(web.addr).replace(
        "    http2_only: true\n",
        "    http2_only: true\n    timeouts: { idle: 1s }\n",
    );
    let app = start(&yaml).await;
    let mut raw = Raw::connect(proxy_addr(&app)).await;
    let pings: Vec<u8> = (0..1000)
        .flat_map(|_| raw_frame(PING, 0, 0, b"12345678"))
        .collect();
    // Written without reading: the writes stall (the server stopped reading) and then fail
    // (the server closed the connection, not having heard from the client for 1-2 s).
    let (mut written, mut stalls) = (0usize, 0);
    let closed = loop {
        if written >= 64 << 20 || stalls >= 8 {
            break false;
        }
        match tokio::time::timeout(Duration::from_secs(2), raw.send(&pings)).await {
            Ok(Ok(())) => written += pings.len(),
            Ok(Err(_)) => break true,
            Err(_) => stalls += 1,
        }
    };
    assert!(
        written < 64 << 20,
        "the server read {written} bytes of PINGs it could not answer"
    );
    assert!(
        closed,
        "a connection stalled on a client that does not read stayed open ({stalls} stalls of 2 s)"
    );
    app.shutdown(Duration::from_millis(200)).await;
}

/// `Expect: 100-continue` (RFC 9110 §10.1.1): a client that holds its body back until an
/// interim answer gets a 100 HEADERS once the backend asks for the body, then the final
/// response after it sends the body; nothing waits for a client timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_expects_100_continue_gets_it_before_it_sends_its_body() {
    const DATA: u8 = 0;
    let web = DemoBackend::start("web-1").await;
    let app = start(&proxy_to(web.addr)).await;
    let mut raw = Raw::connect(proxy_addr(&app)).await;
    // POST http://farm.test/ with `expect: 100-continue` and `content-length: 5` (literal
    // fields named by their static-table index), no END_STREAM: the body is held back.
    let block = b"\x83\x86\x84\x01\x09farm.test\x0f\x14\x0c100-continue\x0f\x0d\x015";
    raw.send(&raw_frame(HEADERS, END_HEADERS, 1, block))
        .await
        .expect("send");
    let interim = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match raw.frame().await {
                Some((HEADERS, flags, 1, payload)) => return (flags, payload),
                Some(_) => continue,
                None => panic!("closed before any answer"),
            }
        }
    })
    .await
    .expect("an interim answer within 3 s, before the body");
    // `:status: 100` as lockstep encodes it (literal, the name `:status` from the table).
    assert_eq!(interim.1, b"\x08\x03100", "a 100 first");
    assert_eq!(
        interim.0 & END_STREAM,
        0,
        "an interim answer does not end the stream"
    );
    raw.send(&raw_frame(DATA, END_STREAM, 1, b"hello"))
        .await
        .expect("send");
    let last = loop {
        match raw.frame().await {
            Some((HEADERS, flags, 1, payload)) => break (flags, payload),
            Some(_) => continue,
            None => panic!("closed before the response"),
        }
    };
    assert_eq!(last.1.first(), Some(&0x88), "then the backend's 200");
    app.shutdown(Duration::from_millis(200)).await;
}
