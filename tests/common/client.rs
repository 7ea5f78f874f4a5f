//! HTTP as the tests speak it: the one [`Reply`] type every client returns, hyper clients for
//! the in-process tests ([`h1_client`], [`h2c_client`], [`get`], [`get_with`], [`tally`]), the
//! one hand-written blocking client for tests that drive processes from a plain thread
//! ([`request`]: one request per connection, `Connection: close`), and [`raw_exchange`] for
//! bytes no client would send.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A whole response, read to its end.
pub struct Reply {
    /// Status (compares with a plain number too: `r.status == 200`).
    pub status: StatusCode,
    /// Protocol version it came with.
    pub version: Version,
    /// Headers.
    pub headers: HeaderMap,
    /// Body as text (lossy UTF-8).
    pub body: String,
    /// Body as it came, byte for byte.
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("status", &self.status)
            .field("version", &self.version)
            .field("headers", &self.headers)
            .field("body", &self.body)
            .finish()
    }
}

impl Reply {
    fn new(status: StatusCode, version: Version, headers: HeaderMap, bytes: Vec<u8>) -> Reply {
        Reply {
            status,
            version,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
        }
    }

    /// Header `name` as text, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The backend that answered (`x-backend`), if any.
    pub fn backend(&self) -> Option<String> {
        self.header("x-backend").map(str::to_owned)
    }

    /// The body of `/echo-headers` as (name, value) pairs, names lowercase.
    pub fn echoed_headers(&self) -> Vec<(String, String)> {
        self.body
            .lines()
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
            .collect()
    }

    /// Values of echoed header `name`.
    pub fn echoed(&self, name: &str) -> Vec<String> {
        self.echoed_headers()
            .into_iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v)
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// hyper clients (async)

/// A pooled HTTP/1.1 client.
pub type HttpClient = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// An HTTP/1.1 client (keep-alive).
pub fn h1_client() -> HttpClient {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// An h2c client (HTTP/2 with prior knowledge over plain TCP).
pub fn h2c_client() -> HttpClient {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Sends GET `path` to `addr` with the given extra headers; `Err` on a transport failure.
pub async fn get_with(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let mut req = Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .map_err(|_| "no response within 5s".to_string())?
        .map_err(|e| format!("request failed: {e:?}"))?;
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .map_err(|_| "body not complete within 5s".to_string())?
        .map_err(|e| format!("body failed: {e}"))?
        .to_bytes();
    Ok(Reply::new(
        parts.status,
        parts.version,
        parts.headers,
        body.to_vec(),
    ))
}

/// GET `path`; panics on a transport failure.
pub async fn get(client: &HttpClient, addr: SocketAddr, path: &str) -> Reply {
    match get_with(client, addr, path, &[]).await {
        Ok(r) => r,
        Err(e) => panic!("GET http://{addr}{path}: {e}"),
    }
}

/// Sends `n` sequential GETs and counts the answering backends (`x-backend`); panics on a
/// non-200 answer.
pub async fn tally(client: &HttpClient, addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let r = get(client, addr, "/").await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {r:?}");
        let b = r
            .backend()
            .unwrap_or_else(|| panic!("request {i} has no x-backend: {r:?}"));
        *counts.entry(b).or_insert(0) += 1;
    }
    counts
}

// ---------------------------------------------------------------------------------------------
// The blocking client

/// Sends `method path` to `addr` over a fresh connection (`Host: 127.0.0.1`, `Connection:
/// close`, `Authorization: Bearer TOKEN` when `token` is set, `body` with its length) and
/// reads the response to the connection's end (a chunked body is decoded). `Err` on a
/// transport failure or bytes that are not an HTTP/1.x response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> std::io::Result<Reply> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not an HTTP response: {:?}", String::from_utf8_lossy(&raw)),
        )
    })
}

/// One whole HTTP/1.x response (the connection closed after it).
fn parse_response(raw: &[u8]) -> Option<Reply> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let mut status_line = lines.next()?.split(' ');
    let version = match status_line.next()? {
        "HTTP/1.0" => Version::HTTP_10,
        "HTTP/1.1" => Version::HTTP_11,
        _ => return None,
    };
    let status = StatusCode::from_u16(status_line.next()?.parse().ok()?).ok()?;
    let mut headers = HeaderMap::new();
    for (k, v) in lines.filter_map(|l| l.split_once(':')) {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.trim().as_bytes()),
            HeaderValue::from_str(v.trim()),
        ) {
            headers.append(k, v);
        }
    }
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("chunked")));
    if chunked {
        body = dechunk(&body)?;
    }
    Some(Reply::new(status, version, headers, body))
}

/// Decodes a chunked body; `None` when it is cut short or malformed.
fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let i = b.windows(2).position(|w| w == b"\r\n")?;
        let line = String::from_utf8_lossy(&b[..i]);
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(i + 2..i + 2 + size)?);
        b = b.get(i + 2 + size + 2..)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Raw bytes

/// What came back on a raw TCP connection.
#[derive(Debug)]
pub struct RawOutcome {
    /// Every byte read.
    pub bytes: Vec<u8>,
    /// Whether the server closed the connection (EOF or reset) before the wait ran out.
    pub closed: bool,
}

impl RawOutcome {
    /// The bytes as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// Status codes of every response found in the bytes, in order.
    pub fn statuses(&self) -> Vec<u16> {
        let text = self.text();
        text.match_indices("HTTP/1.1 ")
            .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
            .collect()
    }
}

/// Writes `request` on a fresh connection to `addr` and reads until the server closes the
/// connection or `wait` has passed.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> RawOutcome {
    let stream = TcpStream::connect(addr)
        .await
        .expect("connect to the proxy");
    let (mut rd, mut wr) = stream.into_split();
    let request = request.to_vec();
    // Written from its own task so that a server answering (and closing) before reading it
    // all cannot deadlock the test.
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&request).await;
        let _ = wr.flush().await;
        wr
    });
    let deadline = tokio::time::Instant::now() + wait;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 8192];
    let closed = loop {
        match tokio::time::timeout_at(deadline, rd.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) => break true,
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => break true,
        }
    };
    // The task hands the write half back as its output, which keeps it (and the connection
    // open both ways) alive until here: dropping it early would half-close the connection.
    if writer.is_finished() {
        drop(writer.await);
    } else {
        writer.abort();
    }
    RawOutcome { bytes, closed }
}
