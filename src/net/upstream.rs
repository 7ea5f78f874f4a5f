//! The upstream side: keep-alive HTTP/1.1 connections to backends, pooled per worker thread,
//! spoken by lockstep itself on `httparse` (the same head and chunked rules as
//! [`super::h1`]).
//!
//! A request is written and its response read by the task that serves the client: no
//! connection task, no channel, no wake-up between tasks (with hyper's client connection every
//! exchange crossed two channels and two tasks; that was a third of the proxy's CPU per
//! request). The response body ([`UpstreamBody`]) owns the connection and reads it as it is
//! polled; when the body has been read to its end the connection goes back to this thread's
//! pool, unless either side said `close`. A body dropped before its end drops the connection.
//!
//! A pooled connection the backend has closed is the classic keep-alive race: a request that
//! may be replayed (no body, idempotent method) is sent optimistically and, when the reused
//! connection gives back nothing at all, sent again on a new connection; any other request
//! first checks that the pooled connection is still open (one non-blocking read).
#![allow(clippy::disallowed_methods)] // I/O shell: idle ages of pooled connections

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::debug;

use super::body::{ConnError, RequestBody};
use super::h1::buf::{InBuf, OutBuf, BUF_SIZE};
use super::h1::chunked;
use super::h1::head::{connection_options_only, push_decimal, NameCache, Scan, MAX_HEADERS};
use super::proxy_protocol::{self, ClientAddrs};
use super::server::MAX_HEAD_BYTES;
use crate::config::ProxyVersion;

/// How long an unused keep-alive connection to a backend is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);
/// Idle connections kept per backend and thread.
const POOL_MAX_IDLE: usize = 256;

/// Why a request to a backend failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be opened (refused, unreachable, `connect_timeout`).
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The backend.
        addr: SocketAddr,
        /// What the connect said.
        source: io::Error,
    },
    /// No response head came within the response timeout.
    #[error("no response within {0:?}")]
    TimedOut(Duration),
    /// The connection failed while the request was written or the response head read.
    #[error("backend connection: {0}")]
    Io(#[from] io::Error),
    /// The backend closed the connection without answering.
    #[error("the backend closed the connection without an answer")]
    Closed,
    /// The response head is not HTTP/1.x as RFC 9112 has it (or too large).
    #[error("malformed response from the backend: {0}")]
    Malformed(&'static str),
    /// The request body failed (the client's side).
    #[error("request body: {0}")]
    Body(ConnError),
}

impl UpstreamError {
    /// Whether no connection could be made (nothing reached the backend).
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect { .. })
    }
}

/// The clients of one pool, one connection pool per thread that sends its requests. Cloning
/// shares them (a reload that keeps the pool keeps its connections).
#[derive(Clone, Debug)]
pub struct Clients(Arc<Settings>);

#[derive(Debug)]
struct Settings {
    connect_timeout: Duration,
    /// The PROXY protocol version written first on each connection, if any.
    send_proxy: Option<ProxyVersion>,
}

/// Idle connections to one backend, most recently used last.
struct Idle {
    addr: SocketAddr,
    conns: Vec<Pooled>,
}

/// An idle connection, with when it was checked in and its response timer.
struct Pooled {
    stream: TcpStream,
    since: Instant,
    timer: Timer,
}

/// A connection's response timer, kept with it from request to request: moving a registered
/// timer's deadline later only stores the new deadline (the timer wheel re-files it when the
/// old one comes), where a timer per request was created, registered and removed every time
/// (callgrind: ~1 000 instructions of a proxied request's ~25 000, the wheel's work included).
/// While its connection is idle the timer stays registered with the waker of the last task
/// that used it, until it comes due (one spurious wake-up at most) or the connection is used
/// again: that keeps at most one finished task's memory per pooled connection (at most
/// `POOL_MAX_IDLE` per backend and thread) for up to a response timeout.
type Timer = Pin<Box<tokio::time::Sleep>>;

/// One pool's connections on this thread.
struct ThreadPool {
    owner: Weak<Settings>,
    backends: Vec<Idle>,
}

thread_local! {
    /// This thread's pools, by the [`Clients`] they belong to. The `Weak` keeps the key's
    /// address from being reused while the entry exists; entries of dropped pools are
    /// removed when a new one is added.
    static LOCAL: RefCell<Vec<ThreadPool>> = const { RefCell::new(Vec::new()) };
    /// The header names of this thread's last responses ([`NameCache`]).
    static NAMES: RefCell<NameCache> = const { RefCell::new(NameCache::new()) };
}

impl Clients {
    /// Clients whose connects give up after `connect_timeout`, each connection opening with
    /// a PROXY protocol header when `send_proxy` (the client's addresses from the request's
    /// [`ClientAddrs`] extension; none, a check of lockstep's own: `LOCAL`). Such a connection
    /// carries one client's identity, so it serves that request only and is never pooled.
    pub fn new(connect_timeout: Duration, send_proxy: Option<ProxyVersion>) -> Clients {
        Clients(Arc::new(Settings {
            connect_timeout,
            send_proxy,
        }))
    }

    /// Sends the request of `parts` (its target in origin form) and `body` to the backend at
    /// `addr`, on a pooled connection of this thread or a new one, with a `Host` (the
    /// backend's address when the request has none). The head is written from `parts`, then
    /// the `extra` fields (nothing is copied for a retry elsewhere). The response head must
    /// have come `response_timeout` after the connection was had (its connect is bounded by
    /// the connect timeout), or the request fails with [`UpstreamError::TimedOut`]. `now` is
    /// the caller's reading of the clock, a moment ago (a reading saved per request).
    pub async fn request(
        &self,
        addr: SocketAddr,
        parts: &http::request::Parts,
        extra: &[(&HeaderName, HeaderValue)],
        mut body: RequestBody,
        response_timeout: Duration,
        now: Instant,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let mut head = OutBuf::new();
        let framing = write_request_head(&mut head.0, addr, parts, extra, &body);
        let replayable = framing == ReqFraming::None
            && matches!(
                parts.method,
                Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
            );
        let proxy = self.0.send_proxy.map(|v| {
            let addrs = parts.extensions.get::<ClientAddrs>();
            proxy_protocol::encode(v, addrs.map(|a| (a.source, a.destination)))
        });
        let mut pooled = proxy.is_none();
        loop {
            let checkout = pooled.then(|| self.checkout(addr, !replayable, now));
            let (stream, timer, now) = match checkout.flatten() {
                Some((s, timer)) => (s, Some(timer), tokio::time::Instant::from_std(now)),
                // Boxed: connecting is the rare path, its future large.
                None => (
                    Box::pin(self.connect(addr, proxy.as_deref())).await?,
                    None,
                    tokio::time::Instant::now(),
                ),
            };
            let reused = timer.is_some();
            let deadline = now
                .checked_add(response_timeout)
                .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365));
            let mut timer = match timer {
                Some(mut t) => {
                    t.as_mut().reset(deadline);
                    t
                }
                None => Box::pin(tokio::time::sleep_until(deadline)),
            };
            let mut conn = Conn {
                stream,
                buf: InBuf::default(),
            };
            let outcome = {
                let exchange =
                    std::pin::pin!(conn.exchange(&head.0, framing, &mut body, &parts.method));
                within(timer.as_mut(), exchange).await
            };
            let Some(outcome) = outcome else {
                return Err(UpstreamError::TimedOut(response_timeout));
            };
            match outcome {
                Ok((resp, body_framing, keep)) => {
                    return Ok(resp.map(|()| UpstreamBody {
                        state: State::from(body_framing),
                        conn: Some((conn, timer)),
                        keep_alive: keep,
                        back: pooled.then(|| (addr, self.0.clone())),
                        kept: None,
                    }));
                }
                Err((e, nothing)) if reused && nothing && replayable => {
                    debug!(backend.addr = %addr, error = %e, "reused connection closed before an answer; sending again on a new one");
                    pooled = false;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// A new connection to `addr`, `proxy` (a PROXY header) written first.
    async fn connect(
        &self,
        addr: SocketAddr,
        proxy: Option<&[u8]>,
    ) -> Result<TcpStream, UpstreamError> {
        let err = |source| UpstreamError::Connect { addr, source };
        let mut stream = tokio::time::timeout(self.0.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")))?
            .map_err(err)?;
        stream.set_nodelay(true).map_err(err)?;
        if let Some(header) = proxy {
            // Small, on a fresh connection: the socket takes it at once.
            stream.write_all(header).await.map_err(err)?;
        }
        Ok(stream)
    }

    /// The most recently used idle connection to `addr` on this thread (checked to be still
    /// open when `check`), with its timer.
    fn checkout(&self, addr: SocketAddr, check: bool, now: Instant) -> Option<(TcpStream, Timer)> {
        LOCAL.with(|local| {
            let mut local = local.borrow_mut();
            let key = Arc::as_ptr(&self.0);
            let pool = local.iter_mut().find(|p| p.owner.as_ptr() == key)?;
            let idle = pool.backends.iter_mut().find(|b| b.addr == addr)?;
            while let Some(p) = idle.conns.pop() {
                if now.duration_since(p.since) >= POOL_IDLE {
                    continue;
                }
                if check {
                    let mut probe = [0u8; 1];
                    match p.stream.try_read(&mut probe) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        _ => continue, // closed, or bytes nobody asked for
                    }
                }
                return Some((p.stream, p.timer));
            }
            None
        })
    }
}

fn checkin(owner: &Arc<Settings>, addr: SocketAddr, stream: TcpStream, timer: Timer) {
    let _ = LOCAL.try_with(|local| {
        let mut local = local.borrow_mut();
        let key = Arc::as_ptr(owner);
        let i = match local.iter().position(|p| p.owner.as_ptr() == key) {
            Some(i) => i,
            None => {
                local.retain(|p| p.owner.strong_count() > 0);
                local.push(ThreadPool {
                    owner: Arc::downgrade(owner),
                    backends: Vec::new(),
                });
                local.len() - 1
            }
        };
        let pool = &mut local[i];
        let j = match pool.backends.iter().position(|b| b.addr == addr) {
            Some(j) => j,
            None => {
                pool.backends.push(Idle {
                    addr,
                    conns: Vec::new(),
                });
                pool.backends.len() - 1
            }
        };
        let idle = &mut pool.backends[j];
        if idle.conns.len() >= POOL_MAX_IDLE {
            idle.conns.remove(0);
        }
        idle.conns.push(Pooled {
            stream,
            since: Instant::now(),
            timer,
        });
    });
}

/// `fut`'s output, or `None` when `timer` fires first. Both are pinned by the caller, so this
/// future holds two pointers and no copy of `fut`.
fn within<'a, F: Future>(
    mut timer: Pin<&'a mut tokio::time::Sleep>,
    mut fut: Pin<&'a mut F>,
) -> impl Future<Output = Option<F::Output>> + 'a {
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        timer.as_mut().poll(cx).map(|()| None)
    })
}

/// How a request body goes to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReqFraming {
    None,
    Length,
    Chunked,
}

/// The request line and fields in origin form, then the `extra` fields; `Host` added when
/// missing; the framing field added when the body needs one. Returns how the body is framed.
fn write_request_head(
    out: &mut Vec<u8>,
    addr: SocketAddr,
    parts: &http::request::Parts,
    extra: &[(&HeaderName, HeaderValue)],
    body: &RequestBody,
) -> ReqFraming {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut host = false;
    let mut length = false;
    for (name, value) in parts
        .headers
        .iter()
        .chain(extra.iter().map(|(n, v)| (*n, v)))
    {
        if *name == header::TRANSFER_ENCODING {
            continue;
        }
        host |= *name == header::HOST;
        length |= *name == header::CONTENT_LENGTH;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !host {
        out.extend_from_slice(format!("host: {addr}\r\n").as_bytes());
    }
    let framing = if body.is_end_stream() {
        ReqFraming::None
    } else if length {
        ReqFraming::Length
    } else if let Some(n) = body.size_hint().exact() {
        out.extend_from_slice(b"content-length: ");
        push_decimal(out, n);
        out.extend_from_slice(b"\r\n");
        ReqFraming::Length
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        ReqFraming::Chunked
    };
    out.extend_from_slice(b"\r\n");
    framing
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RespFraming {
    None,
    Length(u64),
    Chunked,
    Close,
}

struct Conn {
    stream: TcpStream,
    buf: InBuf,
}

/// A failed exchange, and whether nothing at all came back (so a replay is safe).
type Failed = (UpstreamError, bool);

impl Conn {
    /// Writes the request and reads the response head: the response, its body's framing and
    /// whether the connection may be reused after it.
    async fn exchange(
        &mut self,
        head: &[u8],
        framing: ReqFraming,
        body: &mut RequestBody,
        method: &Method,
    ) -> Result<(Response<()>, RespFraming, bool), Failed> {
        let fresh = |e: io::Error| (UpstreamError::Io(e), true);
        if framing == ReqFraming::None {
            self.stream.write_all(head).await.map_err(fresh)?;
        } else {
            Box::pin(self.send_body(head, framing, body)).await?;
        }
        loop {
            if !self.buf.is_empty() {
                match parse_response(self.buf.bytes(), method) {
                    Ok(Some((resp, framing, keep, n))) => {
                        self.buf.consume(n);
                        if resp.status().is_informational()
                            && resp.status() != StatusCode::SWITCHING_PROTOCOLS
                        {
                            continue; // 100 Continue, 103 Early Hints: not passed on
                        }
                        return Ok((resp, framing, keep));
                    }
                    Ok(None) => {}
                    Err(why) => return Err((UpstreamError::Malformed(why), false)),
                }
            }
            let nothing = self.buf.is_empty();
            match self.buf.read(&mut self.stream, MAX_HEAD_BYTES).await {
                Ok(0) => {
                    return Err((
                        if nothing {
                            UpstreamError::Closed
                        } else {
                            UpstreamError::Malformed("connection closed inside the response head")
                        },
                        nothing,
                    ))
                }
                Ok(_) => {}
                Err(e) if self.buf.bytes().len() >= MAX_HEAD_BYTES => {
                    let _ = e;
                    return Err((UpstreamError::Malformed("response head too large"), false));
                }
                Err(e) => return Err((UpstreamError::Io(e), nothing)),
            }
        }
    }

    /// The head, then the body as it comes (chunked when its length is unknown).
    async fn send_body(
        &mut self,
        head: &[u8],
        framing: ReqFraming,
        body: &mut RequestBody,
    ) -> Result<(), Failed> {
        let io = |e: io::Error| (UpstreamError::Io(e), false);
        let mut out = OutBuf::new();
        out.0.extend_from_slice(head);
        loop {
            let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await;
            let data = match frame {
                None => break,
                Some(Err(e)) => return Err((UpstreamError::Body(e), false)),
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => d,
                    Err(_) => continue, // trailers are not forwarded
                },
            };
            if data.is_empty() {
                continue;
            }
            if framing == ReqFraming::Chunked {
                push_hex(&mut out.0, data.len());
                out.0.extend_from_slice(b"\r\n");
            }
            if out.0.len() + data.len() <= BUF_SIZE {
                out.0.extend_from_slice(&data);
            } else {
                self.stream.write_all(&out.0).await.map_err(io)?;
                out.0.clear();
                self.stream.write_all(&data).await.map_err(io)?;
            }
            if framing == ReqFraming::Chunked {
                out.0.extend_from_slice(b"\r\n");
            }
        }
        if framing == ReqFraming::Chunked {
            out.0.extend_from_slice(b"0\r\n\r\n");
        }
        self.stream.write_all(&out.0).await.map_err(io)
    }
}

fn push_hex(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(format!("{n:x}").as_bytes());
}

/// A response head: the response (without body), its body's framing, whether the connection
/// may serve another request, and the bytes it took.
type ParsedHead = (Response<()>, RespFraming, bool, usize);

/// Parses a response head; `Ok(None)` while incomplete.
fn parse_response(buf: &[u8], method: &Method) -> Result<Option<ParsedHead>, &'static str> {
    let mut fields =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut r,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Err("response head too large")
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err("too many header fields"),
        Err(_) => return Err("malformed response head"),
    };
    let status = r
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or("bad status code")?;
    let version = if r.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let shared = Bytes::copy_from_slice(&buf[..len]);
    let mut headers = HeaderMap::with_capacity(r.headers.len());
    let mut scan = Scan::default();
    NAMES.with_borrow_mut(|names| {
        for (i, f) in r.headers.iter().enumerate() {
            let name = names
                .name(i, f.name.as_bytes())
                .map_err(|_| "bad header name")?;
            let at = f.value.as_ptr() as usize - buf.as_ptr() as usize;
            let value = HeaderValue::from_maybe_shared(shared.slice(at..at + f.value.len()))
                .map_err(|_| "bad header value")?;
            scan.field(&name, f.value)
                .map_err(|e| e.reason().trim_end())?;
            // `Connection: keep-alive` (or `close`) concerns this connection alone (RFC 9110
            // §7.6.1): read above, it is not handed on, so nobody has to find and remove it
            // (~2 % of a proxied request's instructions). A 101's fields go on with the upgrade,
            // and a `Connection` naming other fields stays for them to be removed by.
            if name == header::CONNECTION
                && status != StatusCode::SWITCHING_PROTOCOLS
                && connection_options_only(f.value)
            {
                continue;
            }
            headers.append(name, value);
        }
        Ok::<(), &'static str>(())
    })?;
    let framing = resp_framing(method, status, &scan);
    let keep = !scan.close
        && framing != RespFraming::Close
        && (version == Version::HTTP_11 || scan.keep_alive)
        && status != StatusCode::SWITCHING_PROTOCOLS;
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    *resp.version_mut() = version;
    *resp.headers_mut() = headers;
    Ok(Some((resp, framing, keep, len)))
}

/// How the body of a response with `status` to a `method` request is delimited (RFC 9112
/// §6.3), from what its fields said.
fn resp_framing(method: &Method, status: StatusCode, scan: &Scan) -> RespFraming {
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        RespFraming::None
    } else if scan.codings > 0 {
        if scan.chunked_last && scan.codings == 1 {
            RespFraming::Chunked
        } else {
            // Another coding last: the body runs to the end of the connection (§6.3 ¶4).
            RespFraming::Close
        }
    } else {
        match scan.length {
            Some(0) => RespFraming::None,
            Some(n) => RespFraming::Length(n),
            None => RespFraming::Close,
        }
    }
}

/// Where a response body is.
enum State {
    Length(u64),
    Chunked(chunked::Decoder),
    Close,
    Done,
}

impl From<RespFraming> for State {
    fn from(f: RespFraming) -> State {
        match f {
            RespFraming::None => State::Done,
            RespFraming::Length(n) => State::Length(n),
            RespFraming::Chunked => State::Chunked(chunked::Decoder::default()),
            RespFraming::Close => State::Close,
        }
    }
}

/// A backend's response body, read from its connection as it is polled; the connection goes
/// back to the pool once the body has been read to its end (also when the body is dropped
/// then: a HEAD or 304 answer has none).
pub struct UpstreamBody {
    state: State,
    /// The connection and its response timer, while the body is read from it.
    conn: Option<(Conn, Timer)>,
    keep_alive: bool,
    back: Option<(SocketAddr, Arc<Settings>)>,
    /// What the caller keeps alive as long as the body (a backend's place under its
    /// `max_connections`).
    kept: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("done", &matches!(self.state, State::Done))
            .finish()
    }
}

impl UpstreamBody {
    /// Keeps `guard` until this body is dropped (the response sent, or the client gone).
    pub fn keep(&mut self, guard: Box<dyn Send + Sync>) {
        self.kept = Some(guard);
    }

    /// After a `101`: the backend's connection, with the bytes it sent after the head first.
    pub fn into_upgraded(mut self) -> Option<super::h1::Rewind<TcpStream>> {
        self.back = None;
        let (mut conn, _) = self.conn.take()?;
        let early = conn.buf.take_all();
        Some(super::h1::Rewind::new(conn.stream, early))
    }

    fn finish(&mut self) {
        self.state = State::Done;
        if let (Some((conn, timer)), Some((addr, owner))) = (self.conn.take(), self.back.take()) {
            if self.keep_alive && conn.buf.is_empty() {
                checkin(&owner, addr, conn.stream, timer);
            }
        }
    }

    /// The frame the bytes already read make: `Some(None)` at the end of the body, `None`
    /// when they held only framing and more must be read.
    fn buffered(&mut self) -> Option<Option<Result<Frame<Bytes>, ConnError>>> {
        let (conn, _) = self.conn.as_mut()?;
        match &mut self.state {
            State::Done => {
                self.finish();
                Some(None)
            }
            State::Length(left) => {
                let n = conn
                    .buf
                    .bytes()
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                let data = Bytes::copy_from_slice(&conn.buf.bytes()[..n]);
                conn.buf.consume(n);
                *left -= n as u64;
                if *left == 0 {
                    self.finish();
                }
                Some(Some(Ok(Frame::data(data))))
            }
            State::Chunked(d) => {
                let r = match d.decode(conn.buf.bytes()) {
                    Ok(r) => r,
                    Err(e) => {
                        self.conn = None;
                        return Some(Some(Err(e.into())));
                    }
                };
                let data = r
                    .data
                    .map(|range| Bytes::copy_from_slice(&conn.buf.bytes()[range]));
                conn.buf.consume(r.consumed);
                if d.is_done() {
                    self.finish();
                }
                match data {
                    Some(data) if !data.is_empty() => Some(Some(Ok(Frame::data(data)))),
                    _ if matches!(self.state, State::Done) => Some(None),
                    _ => None,
                }
            }
            State::Close => Some(Some(Ok(Frame::data(conn.buf.take_all())))),
        }
    }
}

impl Drop for UpstreamBody {
    /// A body dropped unread whose rest has already arrived (a health check's, a short
    /// answer the client no longer wants) still gives its connection back.
    fn drop(&mut self) {
        if let Some((conn, _)) = &mut self.conn {
            let rest = conn.buf.bytes();
            let complete = match &mut self.state {
                State::Done => true,
                State::Length(left) => rest.len() as u64 == *left,
                State::Chunked(d) => d
                    .decode(rest)
                    .is_ok_and(|r| d.is_done() && r.consumed == rest.len()),
                State::Close => false,
            };
            if complete {
                let n = rest.len();
                conn.buf.consume(n);
                self.finish();
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = ConnError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ConnError>>> {
        let this = &mut *self;
        loop {
            let Some((conn, _)) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if !conn.buf.is_empty() {
                match this.buffered() {
                    Some(frame) => return Poll::Ready(frame),
                    None => continue,
                }
            }
            if matches!(this.state, State::Done) {
                this.finish();
                return Poll::Ready(None);
            }
            match std::task::ready!(conn.buf.poll_read(cx, &mut conn.stream, BUF_SIZE)) {
                Ok(0) => {
                    if matches!(this.state, State::Close) {
                        this.state = State::Done;
                        this.conn = None;
                        return Poll::Ready(None);
                    }
                    this.conn = None;
                    return Poll::Ready(Some(Err(
                        "the backend closed the connection before the end of the body".into(),
                    )));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;

    /// The fields of the response head `raw` as parsed for a GET, and whether the
    /// connection is kept.
    fn head_fields(raw: &str) -> (Vec<(String, String)>, bool) {
        let (resp, _, keep, _) = parse_response(raw.as_bytes(), &Method::GET)
            .unwrap()
            .unwrap();
        let fields = resp
            .headers()
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        (fields, keep)
    }

    #[test]
    fn connection_options_are_used_up_and_other_named_fields_kept() {
        let pair = |n: &str, v: &str| (n.to_owned(), v.to_owned());
        // Only the connection's own options: read, not handed on.
        let (f, keep) =
            head_fields("HTTP/1.1 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(f, [pair("content-length", "0")]);
        assert!(keep);
        let (f, keep) = head_fields("HTTP/1.1 200 OK\r\nConnection: close\r\nX-A: 1\r\n\r\n");
        assert_eq!(f, [pair("x-a", "1")]);
        assert!(!keep, "close is still honoured");
        let (_, keep) =
            head_fields("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n");
        assert!(keep, "keep-alive is still read for HTTP/1.0");
        // A field naming others stays, for the proxy to remove what it names.
        let (f, _) = head_fields(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(
            f,
            [
                pair("connection", "keep-alive, X-Hop"),
                pair("x-hop", "1"),
                pair("content-length", "0")
            ]
        );
        // A switch of protocols keeps its fields for the upgrade.
        let (f, keep) = head_fields(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        );
        assert_eq!(
            f,
            [pair("connection", "upgrade"), pair("upgrade", "websocket")]
        );
        assert!(!keep);
    }

    /// A backend answering each request head with `answer`; records request heads, counts
    /// accepts.
    async fn backend(
        answer: &'static [u8],
    ) -> (
        SocketAddr,
        Arc<AtomicUsize>,
        Arc<std::sync::Mutex<Vec<String>>>,
    ) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (a, h) = (accepts.clone(), heads.clone());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                let h = h.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let Ok(n) = s.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            h.lock()
                                .unwrap()
                                .push(String::from_utf8_lossy(&seen[..end]).into_owned());
                            seen.drain(..end + 4);
                            if s.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepts, heads)
    }

    async fn get(
        clients: &Clients,
        addr: SocketAddr,
        method: Method,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        get_within(clients, addr, method, Duration::from_secs(5)).await
    }

    async fn get_within(
        clients: &Clients,
        addr: SocketAddr,
        method: Method,
        response_timeout: Duration,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let parts = Request::builder()
            .method(method)
            .uri("/p?q=1")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        clients
            .request(
                addr,
                &parts,
                &[],
                RequestBody::Empty,
                response_timeout,
                Instant::now(),
            )
            .await
    }

    #[tokio::test]
    async fn the_response_timer_goes_with_the_pooled_connection() {
        // Answers the first two requests on a connection, then reads and never answers.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let a = accepts.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    let mut answered = 0;
                    while let Ok(n @ 1..) = s.read(&mut buf).await {
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            if answered < 2 {
                                answered += 1;
                                let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                                if s.write_all(ok).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        let clients = Clients::new(Duration::from_secs(1), None);
        let timeout = Duration::from_millis(300);
        let body = |r: Response<UpstreamBody>| r.into_body().collect();
        let first = get_within(&clients, addr, Method::GET, timeout)
            .await
            .unwrap();
        assert_eq!(body(first).await.unwrap().to_bytes(), "ok");
        // The connection's timer comes due while it waits in the pool: the next request on
        // it is not failed by it.
        tokio::time::sleep(timeout + Duration::from_millis(200)).await;
        let second = get_within(&clients, addr, Method::GET, timeout)
            .await
            .unwrap();
        assert_eq!(body(second).await.unwrap().to_bytes(), "ok");
        assert_eq!(
            accepts.load(Ordering::SeqCst),
            1,
            "the pooled connection reused"
        );
        // Unanswered: fails a whole timeout after it was sent, not at an earlier deadline.
        let sent = std::time::Instant::now();
        let e = get_within(&clients, addr, Method::GET, timeout)
            .await
            .unwrap_err();
        let waited = sent.elapsed();
        assert!(
            matches!(e, UpstreamError::TimedOut(t) if t == timeout),
            "{e}"
        );
        assert!(waited >= timeout && waited < timeout * 5, "{waited:?}");
        assert_eq!(accepts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn reads_bodies_reuses_connections_and_sends_origin_form_with_host() {
        let (addr, accepts, heads) =
            backend(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        let clients = Clients::new(Duration::from_secs(1), None);
        for _ in 0..5 {
            let resp = get(&clients, addr, Method::GET).await.unwrap();
            assert_eq!(resp.status(), 200);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "ok");
        }
        assert_eq!(accepts.load(Ordering::SeqCst), 1, "one connection reused");
        let head = heads.lock().unwrap()[0].clone();
        assert!(head.starts_with("GET /p?q=1 HTTP/1.1\r\n"), "{head}");
        assert!(head.contains(&format!("host: {addr}")), "{head}");
        // A body dropped unread whose bytes have all arrived still gives the connection back.
        let resp = get(&clients, addr, Method::GET).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(resp);
        let _ = get(&clients, addr, Method::GET).await.unwrap();
        assert_eq!(accepts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn chunked_and_close_delimited_bodies() {
        let (addr, accepts, _) = backend(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .await;
        let clients = Clients::new(Duration::from_secs(1), None);
        for _ in 0..2 {
            let resp = get(&clients, addr, Method::GET).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "abcde");
        }
        assert_eq!(accepts.load(Ordering::SeqCst), 1);
        let (addr, accepts, _) = backend(b"HTTP/1.0 200 OK\r\n\r\nuntil the end").await;
        let resp = get(&clients, addr, Method::GET).await;
        // The backend keeps the connection open: read what came, then the test ends.
        let mut body = resp.unwrap().into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "until the end");
        assert_eq!(accepts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_and_head_has_no_body() {
        let (addr, _, _) =
            backend(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
                .await;
        let clients = Clients::new(Duration::from_secs(1), None);
        let resp = get(&clients, addr, Method::HEAD).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.body().is_end_stream());
    }

    #[tokio::test]
    async fn malformed_answers_are_errors() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: -2\r\n\r\nok",
            b"NOT HTTP\r\n\r\n",
        ] {
            let answer: &'static [u8] = Box::leak(answer.to_vec().into_boxed_slice());
            let (addr, _, _) = backend(answer).await;
            let e = get(
                &Clients::new(Duration::from_secs(1), None),
                addr,
                Method::GET,
            )
            .await
            .unwrap_err();
            assert!(matches!(e, UpstreamError::Malformed(_)), "{e}");
        }
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = get(
            &Clients::new(Duration::from_secs(1), None),
            addr,
            Method::GET,
        )
        .await
        .unwrap_err();
        assert!(e.is_connect(), "{e}");
    }

    #[tokio::test]
    async fn a_pooled_connection_the_backend_closed_is_replaced_for_a_replayable_request() {
        // Answers one request per connection, then closes (without saying so).
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            }
        });
        let clients = Clients::new(Duration::from_secs(1), None);
        for _ in 0..3 {
            let resp = get(&clients, addr, Method::GET).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "ok");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
