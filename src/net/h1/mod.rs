//! lockstep's own HTTP/1.1 server connection (RFC 9112), on `httparse`: the data path's lean
//! side, as Pingora and HAProxy have theirs.
//!
//! Why not hyper's: an idle hyper HTTP/1 connection holds an 8 KiB read buffer, an 8 KiB
//! write buffer and its cached state for its whole life (~35 KiB per idle keep-alive
//! connection measured through lockstep), and its server plus hyper-util's protocol sniffing
//! cost a fifth of the proxy's CPU per request. Here a connection waits for readiness with no
//! buffer ([`buf`]), parses a head ([`head`]), hands the handler a `Request<ClientBody>` whose
//! body is pumped from the socket through a channel of one piece while the handler runs
//! (`Expect: 100-continue` answered on the first read), writes the response head and body
//! from one pooled buffer (a body whose frame is not ready yet flushes what is written), and
//! keeps the connection when both sides allow it. hyper stays for HTTP/2 and for the client.
//!
//! What a connection does besides:
//! - the first bytes of a plain connection may be the HTTP/2 preface (h2c by prior
//!   knowledge): the connection is handed back with what was read, for HTTP/2;
//! - a head must complete within the header-read timeout from the moment the connection
//!   starts waiting for it; silence in a body or a write stalled for the idle timeout ends it;
//! - while the handler runs, a client that hangs up is noticed (the handler's future is
//!   dropped, so an abandoned request stops counting in flight);
//! - a `101` response carrying an [`Upgrade`] turns the connection into a tunnel to the
//!   backend's upgraded connection, still this task (so it keeps its place under the
//!   listener's cap and is drained like a request);
//! - a refused head (malformed, ambiguous framing, too large) is answered and the connection
//!   closed; a request body left unread closes the connection after the response;
//! - at shutdown an idle keep-alive connection closes at once, a busy one after its response
//!   and one accepted but not yet heard from after its first request (given a short grace:
//!   clients do not send a new connection's request again when it closes unanswered);
//! - a close from this side (a refusal, `Connection: close`, a shutdown while idle) ends the
//!   write side first and lingers, reading and dropping what the client still sends, so a
//!   request crossing the close meets the end of the stream (the client may send it again)
//!   rather than a reset (the request failed, and an unread response may be lost).

pub mod buf;
pub mod chunked;
pub mod head;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::header;
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use self::buf::{InBuf, OutBuf, BUF_SIZE};
use self::head::{BodyFraming, Framing, Head, HeadError};
use super::body::{BodyRx, ClientBody, ConnError, Piece};
use super::idle::IdleIo;
use super::tls::PeerCertificate;

/// The HTTP/2 connection preface's first line: a plain connection starting with it speaks h2c.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// How long a connection closed from this side after an answer keeps reading (and dropping)
/// what the client still sends (the rest of a body, a request that crossed the close).
const LINGER_TIME: Duration = Duration::from_secs(1);
/// The same for an idle keep-alive connection closed by a shutdown: the end of the stream is
/// already on its way ahead of anything that could reset it, so the linger only has to keep
/// a request that arrived meanwhile from turning the close into a reset (which would overtake
/// the end of the stream). Short: the drain, and a restart, wait for it.
const STOP_LINGER_TIME: Duration = Duration::from_millis(100);
/// At shutdown, how long a connection accepted but not yet heard from is given to send its
/// first request (it is then answered, with `Connection: close`).
const FIRST_HEAD_GRACE: Duration = Duration::from_millis(250);
/// At most this much is read and dropped while lingering.
const LINGER_BYTES: usize = 64 * 1024;

/// Closes `io` from this side without a reset (HTTP/1.1's and HTTP/2's closes): the write
/// side first (the client reads the end of the stream), then what the client still sends is
/// read and dropped until it closes too, for at most `time` and [`LINGER_BYTES`]. Closing a
/// socket with unread bytes sends a reset instead of the end of the stream, and a reset can
/// destroy the response not yet read and tells a client whose next keep-alive request crossed
/// the close that the request failed, where an end of stream tells it the request was never
/// taken and may be sent again (RFC 9112 §9.6, §9.3.1).
pub(crate) async fn linger<I: AsyncRead + AsyncWrite + Unpin>(io: &mut I, time: Duration) {
    let close = async {
        // Within the time too: over TLS the shutdown writes, to a client that may not read.
        let _ = io.shutdown().await;
        let mut sink = [0u8; 2048];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match tokio::io::AsyncReadExt::read(io, &mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(time, close).await;
}

/// How one connection is served.
#[derive(Debug, Clone)]
pub struct Options {
    /// A write stalled (or a body silent) this long ends the connection.
    pub idle_timeout: Option<Duration>,
    /// Largest request head.
    pub max_head: usize,
}

/// How a connection ended.
pub enum Ended<I> {
    /// Closed (by either side, a timeout, a refusal or a shutdown).
    Closed,
    /// It spoke the HTTP/2 preface: the stream and the bytes read from it so far.
    H2(I, Bytes),
}

/// An upgraded connection to a backend (bytes both ways).
pub trait Tunnel: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Tunnel for T {}

/// Put in a `101 Switching Protocols` response's extensions: the backend's side of the
/// upgrade, joined with the client's connection once the 101 is written.
#[derive(Clone)]
pub struct Upgrade {
    /// The backend's upgraded connection (taken once).
    pub backend: Arc<std::sync::Mutex<Option<Box<dyn Tunnel>>>>,
    /// Tunnels open now (counted while this one is).
    pub open: Gauge,
}

impl Upgrade {
    /// An upgrade to `backend`, counted in `open`.
    pub fn new(backend: impl Tunnel + 'static, open: Gauge) -> Upgrade {
        Upgrade {
            backend: Arc::new(std::sync::Mutex::new(Some(Box::new(backend)))),
            open,
        }
    }
}

/// Serves requests on `io` with `svc` until either side closes; at `shutdown` an idle
/// keep-alive connection closes at once, a busy one after its response and a new one after
/// its first (given [`FIRST_HEAD_GRACE`] to send it), each lingering.
///
/// Every idle keep-alive connection holds this future, so it is an `async` block over a
/// connection built beforehand: an `async fn` would store its arguments twice (as passed and
/// as locals), and the stream a third time inside the connection.
pub fn serve<'a, I, S, B>(
    io: IdleIo<I>,
    svc: &'a S,
    opts: &'a Options,
    shutdown: &'a CancellationToken,
    cert: Option<&'a PeerCertificate>,
) -> impl Future<Output = Result<Ended<IdleIo<I>>, ConnError>> + 'a
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'a,
    S: hyper::service::Service<Request<ClientBody>, Response = Response<B>, Error = Infallible>,
    B: Body<Error: Into<ConnError>> + 'a,
{
    let mut conn = Conn {
        io,
        buf: InBuf::default(),
        idle: opts.idle_timeout,
    };
    async move {
        // The header-read deadline is the stream's own lazy timer (no timer per request).
        let mut stop = pin!(shutdown.clone().cancelled_owned());
        let mut first = true;
        loop {
            // Every idle connection holds this future, so no value is kept across an await
            // beside the head being read: a local held across two awaits gets room of its own
            // in every state (the head read and its `Result` took ~500 bytes that way, and a
            // task over 1 KiB is allocated on mimalloc's slower, larger path). So what the
            // read ends in is taken whole (`HeadRead::Head` gives the head; the block ends the
            // rest), and every future awaited is handed its values whole.
            let head = {
                let read = conn.read_head(opts, stop.as_mut(), first).await;
                match read {
                    Ok(HeadRead::Head(h)) => h,
                    Ok(HeadRead::Closed) => return Ok(Ended::Closed),
                    Ok(HeadRead::H2) => {
                        let read = conn.buf.take_all();
                        return Ok(Ended::H2(conn.io, read));
                    }
                    Err(Refused::Io(e)) => return Err(e.into()),
                    other => {
                        Box::pin(conn.end(other)).await;
                        return Ok(Ended::Closed);
                    }
                }
            };
            first = false;
            let keep = Box::pin(conn.exchange(head, svc, shutdown, cert)).await?;
            if !keep {
                Box::pin(linger(&mut conn.io, LINGER_TIME)).await;
                return Ok(Ended::Closed);
            }
        }
    }
}

// Returned once per request and never stored: boxing the head would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum HeadRead {
    Head(Head),
    Closed,
    /// The shutdown came while the connection waited for a head.
    Stopped,
    H2,
}

enum Refused {
    Head(HeadError),
    Io(io::Error),
}

struct Conn<I> {
    io: IdleIo<I>,
    buf: InBuf,
    idle: Option<Duration>,
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send> Conn<I> {
    /// Waits for a whole request head within the header-read timeout (the stream's timer
    /// cuts the wait between one and two times the timeout).
    async fn read_head(
        &mut self,
        opts: &Options,
        stop: Pin<&mut tokio_util::sync::WaitForCancellationFutureOwned>,
        first: bool,
    ) -> Result<HeadRead, Refused> {
        self.io.head_started();
        let r = self.wait_head(opts, stop, first).await;
        self.io.head_done();
        r
    }

    async fn wait_head(
        &mut self,
        opts: &Options,
        mut stop: Pin<&mut tokio_util::sync::WaitForCancellationFutureOwned>,
        first: bool,
    ) -> Result<HeadRead, Refused> {
        let mut stopped = false;
        loop {
            if !self.buf.is_empty() {
                let bytes = self.buf.bytes();
                if first && bytes.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(bytes) {
                    // Maybe h2c: wait for the whole preface line.
                } else if first && bytes.starts_with(H2_PREFACE) {
                    return Ok(HeadRead::H2);
                } else {
                    match head::parse_request(bytes, opts.max_head) {
                        Ok(Some((h, n))) => {
                            self.buf.consume(n);
                            return Ok(HeadRead::Head(h));
                        }
                        Ok(None) => {}
                        Err(e) => return Err(Refused::Head(e)),
                    }
                }
            }
            let waiting = self.buf.is_empty();
            let n = tokio::select! {
                biased;
                r = self.buf.read(&mut self.io, opts.max_head) => match r {
                    Ok(n) => n,
                    Err(e) if waiting || e.kind() == io::ErrorKind::TimedOut => {
                        debug!(error = %e, partial = !waiting, "connection closed while waiting for a request head");
                        return Ok(HeadRead::Closed);
                    }
                    Err(e) => return Err(Refused::Io(e)),
                },
                _ = stop.as_mut(), if waiting && !stopped => {
                    if !first {
                        return Ok(HeadRead::Stopped);
                    }
                    // Accepted before the shutdown and not heard from yet: its first request
                    // is on its way (a client sends it right behind its handshake), and a
                    // client does not send a new connection's request again when the
                    // connection closes unanswered. It gets a short grace.
                    stopped = true;
                    continue;
                }
                // Boxed: the sleep's space would otherwise sit in every idle connection.
                _ = async { Box::pin(tokio::time::sleep(FIRST_HEAD_GRACE)).await }, if waiting && stopped => {
                    return Ok(HeadRead::Stopped);
                }
            };
            if n == 0 {
                return Ok(HeadRead::Closed);
            }
        }
    }

    /// Answers a refused request head and closes.
    async fn refuse(&mut self, e: HeadError) {
        debug!(
            status = e.status().as_u16(),
            why = e.reason().trim_end(),
            "request head refused"
        );
        let mut out = OutBuf::new();
        head::write_refusal(&mut out.0, e, &super::date::date());
        let _ = self.write_all(&out.0).await;
        Box::pin(linger(&mut self.io, LINGER_TIME)).await;
    }

    /// Ends a connection whose read gave no request to serve: the shutdown came while it
    /// waited (it lingers) or its head was refused (answered, then it lingers).
    async fn end(&mut self, read: Result<HeadRead, Refused>) {
        match read {
            Ok(HeadRead::Stopped) => linger(&mut self.io, STOP_LINGER_TIME).await,
            Err(Refused::Head(e)) => self.refuse(e).await,
            Ok(HeadRead::Head(_) | HeadRead::Closed | HeadRead::H2) | Err(Refused::Io(_)) => {}
        }
    }

    /// One request and its response; whether the connection may serve another.
    ///
    /// Boxed per request, so copied whole at each: the request is built before the future
    /// (an argument or a moved-from local of an `async fn` keeps its room in every state), and
    /// the handler's call is a future of its own, awaited in one place, so that the response's
    /// writing reuses its room (the handler's future, awaited in a loop, got room of its own).
    fn exchange<'s, S, B>(
        &'s mut self,
        head: Head,
        svc: &'s S,
        shutdown: &'s CancellationToken,
        cert: Option<&PeerCertificate>,
    ) -> impl Future<Output = Result<bool, ConnError>> + 's
    where
        S: hyper::service::Service<Request<ClientBody>, Response = Response<B>, Error = Infallible>,
        B: Body<Error: Into<ConnError>> + 's,
    {
        let Head {
            parts,
            framing,
            keep_alive,
            expect_continue,
        } = head;
        let method = parts.method.clone();
        let version = parts.version;
        let (body, pump) = Pump::new(framing, expect_continue);
        let mut req = Request::from_parts(parts, body);
        if let Some(cert) = cert {
            req.extensions_mut().insert(cert.clone());
        }
        async move {
            let mut pump = pump;
            let Some(resp) = self.call(svc, req, &mut pump).await else {
                return Ok(false);
            };
            let close = !keep_alive || !pump.finished() || shutdown.is_cancelled();
            self.respond(resp, &method, version, close).await
        }
    }

    /// Runs the handler on `req` while its body flows from the connection; `None` when the
    /// client went away before the response.
    async fn call<S, B>(
        &mut self,
        svc: &S,
        req: Request<ClientBody>,
        pump: &mut Pump,
    ) -> Option<Response<B>>
    where
        S: hyper::service::Service<Request<ClientBody>, Response = Response<B>, Error = Infallible>,
    {
        let mut call = pin!(svc.call(req));
        // The body flows while the handler runs; once it is read (or there is none), a read
        // that finds the client gone ends the exchange.
        let mut watch = true;
        let resp = loop {
            if pump.active() {
                tokio::select! {
                    biased;
                    r = call.as_mut() => break r,
                    r = pump.step(&mut self.io, &mut self.buf) => {
                        if let Err(e) = r {
                            debug!(error = %e, "request body failed");
                            pump.fail(e);
                        }
                    }
                }
            } else if watch {
                tokio::select! {
                    biased;
                    r = call.as_mut() => break r,
                    r = self.buf.read(&mut self.io, BUF_SIZE) => match r {
                        Ok(0) | Err(_) => {
                            debug!("client went away before its response");
                            return None;
                        }
                        Ok(_) => watch = !self.buf_full(),
                    },
                }
            } else {
                break call.as_mut().await;
            }
        };
        let Ok(resp) = resp;
        Some(resp)
    }

    /// Writes the handler's response to a `method` request of `version` (or runs the tunnel it
    /// upgraded to); `close`: the connection closes after it, whatever the response says.
    /// Whether the connection may serve another request.
    async fn respond<B>(
        &mut self,
        resp: Response<B>,
        method: &http::Method,
        version: Version,
        mut close: bool,
    ) -> Result<bool, ConnError>
    where
        B: Body<Error: Into<ConnError>>,
    {
        let (mut parts, body) = resp.into_parts();
        close |= parts
            .headers
            .get(header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(up) = parts.extensions.remove::<Upgrade>() {
                drop(body);
                Box::pin(self.tunnel(&parts, up)).await;
                return Ok(false);
            }
            // A 101 nobody asked for is not passed on.
            parts.status = StatusCode::BAD_GATEWAY;
            close = true;
        }
        let framing =
            head::response_framing(parts.status, method, version, body.size_hint().exact());
        close |= framing == BodyFraming::Close;
        let mut out = OutBuf::new();
        head::write_response_head(
            &mut out.0,
            parts.status,
            &parts.headers,
            framing,
            close,
            version == Version::HTTP_10 && !close,
            &super::date::date(),
        );
        drop(parts);
        let complete = self.write_body(body, framing, out).await?;
        Ok(complete && !close)
    }

    /// Whether the waiting bytes (a pipelined request) fill the buffer: stop reading ahead.
    fn buf_full(&self) -> bool {
        self.buf.bytes().len() >= BUF_SIZE
    }

    /// The next frame of `body`, which had none ready: what `out` holds goes out first (while
    /// the backend thinks), then the frame is awaited within the idle timeout. `None`: the
    /// body stayed silent for the idle timeout.
    async fn wait_frame<B: Body>(
        &mut self,
        body: Pin<&mut B>,
        out: &mut OutBuf,
    ) -> Result<Option<Option<Result<Frame<B::Data>, B::Error>>>, ConnError> {
        if !out.0.is_empty() {
            self.write_all(&out.0).await?;
            out.0.clear();
            self.io.flush().await?;
        }
        let Some(idle) = self.idle else {
            return Ok(Some(next_frame(body).await));
        };
        // Boxed: the timer is only needed on this slow path.
        match Box::pin(tokio::time::timeout(idle, next_frame(body))).await {
            Ok(f) => Ok(Some(f)),
            Err(_) => {
                debug!("response body silent for the idle timeout");
                Ok(None)
            }
        }
    }

    /// Puts one data frame of a response body into `out` (as one chunk when `chunked`),
    /// writing out what no longer fits.
    async fn put_data(
        &mut self,
        mut data: impl Buf,
        chunked: bool,
        out: &mut OutBuf,
    ) -> io::Result<()> {
        if chunked {
            push_hex(&mut out.0, data.remaining());
            out.0.extend_from_slice(b"\r\n");
        }
        while data.has_remaining() {
            let chunk = data.chunk();
            if out.0.len() + chunk.len() <= BUF_SIZE {
                out.0.extend_from_slice(chunk);
            } else {
                self.write_all(&out.0).await?;
                out.0.clear();
                self.write_all(chunk).await?;
            }
            let n = chunk.len();
            data.advance(n);
        }
        if chunked {
            out.0.extend_from_slice(b"\r\n");
        }
        Ok(())
    }

    /// Streams `body` after the head in `out`: whether it was written whole.
    async fn write_body<B>(
        &mut self,
        body: B,
        framing: BodyFraming,
        mut out: OutBuf,
    ) -> Result<bool, ConnError>
    where
        B: Body<Error: Into<ConnError>>,
    {
        if framing == BodyFraming::NoBody {
            drop(body);
            self.write_all(&out.0).await?;
            self.io.flush().await?;
            return Ok(true);
        }
        let mut body = pin!(body);
        let mut sent = 0u64;
        loop {
            let frame = match poll_once(body.as_mut()).await {
                Some(f) => f,
                None => match self.wait_frame(body.as_mut(), &mut out).await? {
                    Some(f) => f,
                    None => return Ok(false),
                },
            };
            let Some(frame) = frame else { break };
            let frame = match frame {
                Ok(f) => f,
                Err(e) => {
                    let e: ConnError = e.into();
                    debug!(error = %e, "response body failed; closing the connection");
                    return Ok(false);
                }
            };
            let Ok(data) = frame.into_data() else {
                continue; // trailers are not forwarded
            };
            let len = data.remaining();
            if len == 0 {
                continue;
            }
            sent += len as u64;
            self.put_data(data, framing == BodyFraming::Chunked, &mut out)
                .await?;
        }
        if let BodyFraming::Length(n) = framing {
            if sent != n {
                debug!(sent, expected = n, "response body shorter than its length");
                self.write_all(&out.0).await?;
                return Ok(false);
            }
        }
        if framing == BodyFraming::Chunked {
            out.0.extend_from_slice(b"0\r\n\r\n");
        }
        self.write_all(&out.0).await?;
        drop(out);
        self.io.flush().await?;
        Ok(framing != BodyFraming::Close)
    }

    /// Writes `data` whole; a write that makes no progress for the idle timeout fails.
    async fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let io = &mut self.io;
            let now = std::future::poll_fn(|cx| match Pin::new(&mut *io).poll_write(cx, data) {
                Poll::Pending => Poll::Ready(None),
                Poll::Ready(r) => Poll::Ready(Some(r)),
            })
            .await;
            let n = match now {
                Some(r) => r?,
                None => match self.idle {
                    // The client reads slowly: the timer, boxed, only on this path.
                    Some(idle) => Box::pin(tokio::time::timeout(idle, self.io.write(data)))
                        .await
                        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "write stalled"))??,
                    None => self.io.write(data).await?,
                },
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            data = &data[n..];
        }
        Ok(())
    }

    /// After a `101`: the head to the client, then bytes both ways between the client and
    /// the backend's upgraded connection until either closes.
    async fn tunnel(&mut self, parts: &http::response::Parts, up: Upgrade) {
        let mut out = OutBuf::new();
        head::write_response_head(
            &mut out.0,
            parts.status,
            &parts.headers,
            BodyFraming::NoBody,
            false,
            false,
            &super::date::date(),
        );
        if self.write_all(&out.0).await.is_err() || self.io.flush().await.is_err() {
            return;
        }
        drop(out);
        let backend = up.backend.lock().ok().and_then(|mut b| b.take());
        let Some(mut backend) = backend else {
            return;
        };
        // Bytes the client sent after its request head belong to the new protocol.
        let early = self.buf.take_all();
        if !early.is_empty() && backend.write_all(&early).await.is_err() {
            return;
        }
        up.open.inc();
        match tokio::io::copy_bidirectional(&mut self.io, &mut backend).await {
            Ok((up_bytes, down)) => debug!(up = up_bytes, down, "upgraded connection closed"),
            Err(e) => debug!(error = %e, "upgraded connection ended"),
        }
        up.open.dec();
    }
}

/// Polls `body` for a frame once: `None` when none is ready yet.
async fn poll_once<B: Body>(
    mut body: Pin<&mut B>,
) -> Option<Option<Result<Frame<B::Data>, B::Error>>> {
    std::future::poll_fn(|cx| match body.as_mut().poll_frame(cx) {
        Poll::Ready(f) => Poll::Ready(Some(f)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

async fn next_frame<B: Body>(mut body: Pin<&mut B>) -> Option<Result<Frame<B::Data>, B::Error>> {
    std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await
}

fn push_hex(out: &mut Vec<u8>, n: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut d = [0u8; 16];
    let (mut i, mut n) = (d.len(), n);
    loop {
        i -= 1;
        d[i] = HEX[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&d[i..]);
}

enum Decoding {
    Length(u64),
    Chunked(chunked::Decoder),
}

/// The connection's side of a request body: reads, decodes, hands pieces over.
struct Pump {
    tx: Option<mpsc::Sender<Piece>>,
    decoding: Decoding,
    expect_continue: bool,
    finished: bool,
}

impl Pump {
    fn new(framing: Framing, expect_continue: bool) -> (ClientBody, Pump) {
        let decoding = match framing {
            Framing::None => {
                let pump = Pump {
                    tx: None,
                    decoding: Decoding::Length(0),
                    expect_continue: false,
                    finished: true,
                };
                return (ClientBody::Empty, pump);
            }
            Framing::Length(n) => Decoding::Length(n),
            Framing::Chunked => Decoding::Chunked(chunked::Decoder::default()),
        };
        let (tx, rx) = BodyRx::channel(match decoding {
            Decoding::Length(n) => Some(n),
            Decoding::Chunked(_) => None,
        });
        let body = ClientBody::H1(rx);
        (
            body,
            Pump {
                tx: Some(tx),
                decoding,
                expect_continue,
                finished: false,
            },
        )
    }

    /// Whether pieces are still to be handed over.
    fn active(&self) -> bool {
        self.tx.is_some()
    }

    /// Whether the whole body was read from the connection.
    fn finished(&self) -> bool {
        self.finished
    }

    fn fail(&mut self, e: ConnError) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.try_send(Piece::Failed(e));
        }
    }

    /// Hands over the next piece, reading from the connection as needed. Cancel-safe: bytes
    /// read stay in `buf`, the decoder only moves when a piece is handed over.
    async fn step<I: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut I,
        buf: &mut InBuf,
    ) -> Result<(), ConnError> {
        let Some(tx) = &self.tx else { return Ok(()) };
        let Ok(permit) = tx.reserve().await else {
            // The handler dropped the body: the rest stays unread.
            self.tx = None;
            return Ok(());
        };
        loop {
            if !buf.is_empty() {
                match &mut self.decoding {
                    Decoding::Length(left) => {
                        let n = buf
                            .bytes()
                            .len()
                            .min(usize::try_from(*left).unwrap_or(usize::MAX));
                        let data = Bytes::copy_from_slice(&buf.bytes()[..n]);
                        buf.consume(n);
                        *left -= n as u64;
                        if *left == 0 {
                            self.finished = true;
                            permit.send(Piece::Last(data));
                            self.tx = None;
                        } else {
                            permit.send(Piece::Data(data));
                        }
                        return Ok(());
                    }
                    Decoding::Chunked(d) => {
                        let r = d.decode(buf.bytes())?;
                        let data = r
                            .data
                            .map(|range| Bytes::copy_from_slice(&buf.bytes()[range]))
                            .unwrap_or_default();
                        buf.consume(r.consumed);
                        if d.is_done() {
                            self.finished = true;
                            permit.send(Piece::Last(data));
                            self.tx = None;
                            return Ok(());
                        }
                        if !data.is_empty() {
                            permit.send(Piece::Data(data));
                            return Ok(());
                        }
                        if r.consumed > 0 && !buf.is_empty() {
                            continue;
                        }
                    }
                }
            }
            if std::mem::take(&mut self.expect_continue) {
                io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
                io.flush().await?;
            }
            if buf.read(io, BUF_SIZE).await? == 0 {
                return Err("the client closed its connection before the end of its body".into());
            }
        }
    }
}

/// A stream whose first reads return `prefix` (bytes already read from it).
pub struct Rewind<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Rewind<I> {
    /// `inner`, with `prefix` read again first.
    pub fn new(inner: I, prefix: Bytes) -> Rewind<I> {
        Rewind { prefix, inner }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_sizes() {
        let mut v = Vec::new();
        push_hex(&mut v, 0);
        push_hex(&mut v, 255);
        push_hex(&mut v, 16384);
        assert_eq!(v, b"0ff4000");
    }
}
