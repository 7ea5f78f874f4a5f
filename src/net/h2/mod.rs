//! lockstep's own HTTP/2 server (RFC 9113): frames ([`frame`]), HPACK ([`hpack`],
//! [`huffman`]), stream states and flow control (here); request bodies are
//! `net::body::H2Body`.
//!
//! Why its own: on the `h2` crate (driven by lockstep, one task per connection) an h2c
//! request cost ~36 000 user-space instructions, half of them the crate's per-frame and
//! per-stream work (a locked stream store, its priority queues, its HPACK encoder's table,
//! header checks done twice), and lockstep stayed at 0.93x HAProxy's rate. Here a
//! connection is one task that owns everything: the read buffer, the streams (a `Vec` in
//! stream order), the output (one buffer, one write per turn for every frame the turn
//! made). Each stream is the handler's future, then the response body, polled with a waker
//! of its own that queues the stream's id for the connection (a stream that was not woken is
//! not polled). Request bodies are the only shared state (`net::body::H2Shared`, one lock
//! per DATA frame and per read).
//!
//! What a connection promises, as the `h2` crate under hyper did before: 1 MiB windows for
//! the connection and each stream (given back as the handler reads), 16 KiB frames, the
//! caller's stream and header-list limits, connection-specific fields dropped from responses
//! (§8.2.2), a `Date` when the handler set none, `Content-Length` from an exact body size. A
//! request whose stream the client resets is dropped (so is its backend request). At
//! shutdown, GOAWAY; the streams in flight finish and the connection closes.
//!
//! Bounds (nothing a client sends grows without limit): a header block is at most the
//! header-list limit plus 16 KiB however many CONTINUATION frames carry it; at most
//! `max_concurrent_streams` streams (more are refused, REFUSED_STREAM); the connection's
//! window bounds what request bodies hold (copied into one buffer per stream, whatever the
//! frames' sizes); while the output is over 64 KiB (a client that does not read, a flood of
//! PINGs or SETTINGS) nothing more is read, and the idle timeout, which also counts a write
//! that waits, ends a client that never reads; 1 024 streams reset for the client's errors,
//! or, past the first 256, more streams cancelled by the client (rapid reset,
//! CVE-2023-44487) or more empty DATA frames (CVE-2019-9518) than streams answered, end the
//! connection with ENHANCE_YOUR_CALM. A client that closes its side gets what was queued for
//! it; the streams that wait for its WINDOW_UPDATE are reset, since none can come.
//! Extended CONNECT is not offered (no handler here tunnels over HTTP/2).

pub mod frame;
pub mod hpack;
mod huffman;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use self::frame::{Frame, FrameError, Head, Reason, Setting, HEAD_LEN, MAX_WINDOW, PREFACE};
use self::hpack::Name;
use super::body::{ClientBody, ConnError, H2Body, H2Shared};
use super::tls::PeerCertificate;

/// Initial flow-control window of a stream and of the connection (hyper's default).
const WINDOW: u32 = 1024 * 1024;
/// Largest frame payload either side sends or accepts (the protocol's default).
const MAX_FRAME: usize = 16 * 1024;
/// Past this much output not yet written, nothing more is read and bodies wait.
const HIGH_WATER: usize = 64 * 1024;
/// Most streams this side resets for the client's errors before it closes the connection.
const MAX_ERROR_RESETS: u32 = 1024;
/// Streams the client may cancel before the connection asks that it answer at least as many.
const FREE_CANCELS: u64 = 256;
/// Most CONTINUATION frames one header block may take.
const MAX_CONTINUATIONS: u32 = 64;
/// A connection whose preface had not arrived when the shutdown came gets this long for it
/// (its request was likely on its way), as HTTP/1.1's first head does.
const PREFACE_GRACE: Duration = Duration::from_millis(250);
/// After its last frame, how long a closing connection reads (and drops) what the client
/// still sends (64 KiB at most), so that its close does not reset what it has yet to read.
const LINGER: Duration = Duration::from_secs(1);

/// Limits of one HTTP/2 connection.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Most concurrent streams the client may open.
    pub max_concurrent_streams: u32,
    /// Largest header list (`SETTINGS_MAX_HEADER_LIST_SIZE`).
    pub max_header_list_size: u32,
}

/// Serves HTTP/2 on `io` (whose client preface is still to be read) with `svc` until the
/// connection ends; at `shutdown`, GOAWAY, the streams in flight finish, and it closes.
/// `cert`, the client's TLS certificate, goes with every request.
pub async fn serve<I, S, B>(
    mut io: I,
    opts: Options,
    svc: &S,
    shutdown: &CancellationToken,
    cert: Option<&PeerCertificate>,
) -> Result<(), ConnError>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: hyper::service::Service<Request<ClientBody>, Response = Response<B>, Error = Infallible>,
    B: Body,
    B::Error: Into<ConnError>,
{
    let mut conn: Conn<S::Future, B> = Conn::new(opts);
    let mut stopping = pin!(shutdown.cancelled());
    let mut stopped = false;
    let mut grace: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let ended = poll_fn(|cx| {
        if !stopped && stopping.as_mut().poll(cx).is_ready() {
            stopped = true;
            if conn.preface_done {
                conn.go_away();
            } else {
                grace = Some(Box::pin(tokio::time::sleep(PREFACE_GRACE)));
            }
        }
        if let Some(g) = &mut grace {
            if conn.preface_done {
                grace = None;
                conn.go_away();
            } else if g.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
        }
        conn.poll(cx, &mut io, svc, cert)
    })
    .await;
    drop(conn);
    // The last frames are written: close without a reset of what the client has not read.
    super::h1::linger(&mut io, LINGER).await;
    ended
}

/// A connection's handler: a service whose future is `F` and whose responses have `B` bodies.
trait Handler<F, B>:
    hyper::service::Service<Request<ClientBody>, Response = Response<B>, Error = Infallible, Future = F>
{
}

impl<S, F, B> Handler<F, B> for S where
    S: hyper::service::Service<
        Request<ClientBody>,
        Response = Response<B>,
        Error = Infallible,
        Future = F,
    >
{
}

/// The streams' wake-ups: the ids of the streams to poll, and the connection's waker.
#[derive(Default)]
struct Ready {
    inner: Mutex<ReadyInner>,
}

#[derive(Default)]
struct ReadyInner {
    ids: Vec<u32>,
    conn: Option<Waker>,
}

impl Ready {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReadyInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A stream's waker: queues the stream's id (once until it is polled) and wakes the
/// connection.
struct StreamWaker {
    id: u32,
    queued: AtomicBool,
    ready: Arc<Ready>,
}

impl Wake for StreamWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let conn = {
            let mut g = self.ready.lock();
            g.ids.push(self.id);
            g.conn.take()
        };
        if let Some(w) = conn {
            w.wake();
        }
    }
}

/// What a stream is doing on the sending side.
enum Sending<F, B: Body> {
    /// The handler has not answered.
    Handling(Pin<Box<F>>),
    /// The response's body, and the chunk (`end`: its last) still to go as windows allow.
    Body {
        body: Pin<Box<B>>,
        pending: Option<B::Data>,
        end: bool,
    },
    /// The response is complete.
    Done,
}

struct Stream<F, B: Body> {
    id: u32,
    /// The stream's waker, and its state (`queued`).
    waker: Waker,
    wake_state: Arc<StreamWaker>,
    send: Sending<F, B>,
    /// The client's window for what this side sends.
    send_window: i64,
    /// Waiting for a window or for the output to drain.
    blocked: bool,
    /// The request body's state, while the client may still send it.
    recv: Option<Arc<H2Shared>>,
    /// What the client may still send on this stream (this side's window).
    recv_window: i64,
    /// Taken by the reader and not yet announced to the client.
    recv_unannounced: u32,
    /// DATA handed to the reader and not yet given back to the connection's window: given
    /// back as the reader takes it, and whatever is left when the stream goes.
    recv_held: usize,
    /// What `Content-Length` says is still to come.
    content_left: Option<u64>,
    /// The client has sent END_STREAM.
    remote_closed: bool,
    /// This side reset the stream (its response failed).
    reset_sent: bool,
}

/// A header block being received (HEADERS, then CONTINUATION).
struct Partial {
    stream: u32,
    end_stream: bool,
    depends_on: Option<u32>,
    block: Vec<u8>,
    continuations: u32,
}

/// The output: frames not yet written.
struct Out {
    buf: Vec<u8>,
    /// How much of `buf` is written.
    written: usize,
    /// The connection's window for what this side sends.
    window: i64,
    /// Written but not yet flushed (TLS).
    unflushed: bool,
}

/// One connection's state.
struct Conn<F, B: Body> {
    opts: Options,
    rbuf: BytesMut,
    out: Out,
    decoder: hpack::Decoder,
    streams: Vec<Stream<F, B>>,
    ready: Arc<Ready>,
    /// Streams to poll this turn.
    run: Vec<u32>,
    partial: Option<Partial>,
    preface_done: bool,
    settings_seen: bool,
    /// The highest stream the client opened.
    last_stream: u32,
    /// Recently closed streams, and whether this side reset them.
    closed: VecDeque<(u32, bool)>,
    /// The client's initial window for new streams.
    peer_initial_window: i64,
    /// What the client may still send on the connection.
    recv_window: i64,
    /// Given back by readers and not yet announced.
    recv_unannounced: u32,
    /// GOAWAY sent (shutdown): no new streams, close when the last one ends.
    going_away: bool,
    /// The client sent GOAWAY: no new streams, close when the last one ends.
    peer_gone: bool,
    /// The client closed its side: nothing more is read.
    read_closed: bool,
    /// A connection error: the GOAWAY is queued, the connection closes once it is written.
    failed: Option<String>,
    error_resets: u32,
    cancels: u64,
    answered: u64,
    /// Empty DATA frames that did not end their stream.
    empty_frames: u64,
    /// The last request's `:authority`, raw and parsed.
    last_authority: Option<(Bytes, Authority)>,
}

/// What a frame did wrong: the connection's error, or one stream's.
type FrameResult = Result<(), FrameError>;

impl<F, B> Conn<F, B>
where
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: Body,
    B::Error: Into<ConnError>,
{
    fn new(opts: Options) -> Conn<F, B> {
        let mut out = Out {
            buf: Vec::with_capacity(4096),
            written: 0,
            window: 65_535,
            unflushed: false,
        };
        // The server's preface: its settings, then the connection's window raised to WINDOW.
        frame::put_settings(
            &mut out.buf,
            &[
                (3, opts.max_concurrent_streams),
                (4, WINDOW),
                (6, opts.max_header_list_size),
            ],
        );
        frame::put_window_update(&mut out.buf, 0, WINDOW - 65_535);
        Conn {
            opts,
            rbuf: BytesMut::new(),
            out,
            decoder: hpack::Decoder::default(),
            streams: Vec::new(),
            ready: Arc::new(Ready::default()),
            run: Vec::new(),
            partial: None,
            preface_done: false,
            settings_seen: false,
            last_stream: 0,
            closed: VecDeque::new(),
            peer_initial_window: 65_535,
            recv_window: i64::from(WINDOW),
            recv_unannounced: 0,
            going_away: false,
            peer_gone: false,
            read_closed: false,
            failed: None,
            error_resets: 0,
            cancels: 0,
            answered: 0,
            empty_frames: 0,
            last_authority: None,
        }
    }

    /// Shutdown: GOAWAY naming the last stream taken; the streams in flight finish.
    fn go_away(&mut self) {
        if !self.going_away && self.failed.is_none() {
            self.going_away = true;
            frame::put_goaway(&mut self.out.buf, self.last_stream, Reason::NO_ERROR);
        }
    }

    /// A connection error: GOAWAY with `reason`, every stream dropped.
    fn fail(&mut self, reason: Reason, why: String) {
        if self.failed.is_some() {
            return;
        }
        debug!(%reason, %why, "h2 connection error");
        frame::put_goaway(&mut self.out.buf, self.last_stream, reason);
        for s in self.streams.drain(..) {
            if let Some(r) = &s.recv {
                r.fail(format!("connection error: {reason}"));
            }
        }
        self.failed = Some(format!("{reason}: {why}"));
    }

    fn poll<I, S>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut I,
        svc: &S,
        cert: Option<&PeerCertificate>,
    ) -> Poll<Result<(), ConnError>>
    where
        I: AsyncRead + AsyncWrite + Unpin,
        S: Handler<F, B>,
    {
        // A turn cap: a stream that wakes itself at once every time must not keep the task
        // (and its worker) forever; the task is rescheduled instead.
        for _ in 0..64 {
            let mut progress = false;
            if self.failed.is_none() && !self.read_closed && self.pending_out() < HIGH_WATER {
                match self.poll_read(cx, io, svc, cert) {
                    Poll::Ready(Ok(())) => progress = true,
                    Poll::Ready(Err(e)) => {
                        // The client is gone (closed, reset, idle too long): nothing to write.
                        for s in self.streams.drain(..) {
                            if let Some(r) = &s.recv {
                                r.fail("the connection closed".into());
                            }
                        }
                        return Poll::Ready(match e {
                            Some(e) => Err(e),
                            None => Ok(()),
                        });
                    }
                    Poll::Pending => {}
                }
            }
            self.run_streams();
            if self.read_closed {
                self.reset_starved();
            }
            match self.poll_write(cx, io) {
                Poll::Ready(Ok(wrote)) => progress |= wrote,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => {}
            }
            let idle_out = self.pending_out() == 0 && !self.out.unflushed;
            if idle_out {
                if let Some(why) = &self.failed {
                    return Poll::Ready(Err(why.clone().into()));
                }
                if (self.going_away || self.peer_gone || self.read_closed)
                    && self.streams.is_empty()
                {
                    return Poll::Ready(Ok(()));
                }
            }
            if progress {
                continue;
            }
            let mut g = self.ready.lock();
            if !g.ids.is_empty() {
                continue;
            }
            if self.streams.is_empty() && self.rbuf.is_empty() && self.pending_out() == 0 {
                // Idle: the buffers go until the next bytes (~20 KiB an idle connection
                // would otherwise hold).
                self.rbuf = BytesMut::new();
                self.out.buf = Vec::new();
            }
            if !g.conn.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                g.conn = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn pending_out(&self) -> usize {
        self.out.buf.len() - self.out.written
    }

    /// Reads once and handles every whole frame read. `Err(None)`: the client closed;
    /// `Err(Some(e))`: a read error.
    fn poll_read<I, S>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut I,
        svc: &S,
        cert: Option<&PeerCertificate>,
    ) -> Poll<Result<(), Option<ConnError>>>
    where
        I: AsyncRead + Unpin,
        S: Handler<F, B>,
    {
        if self.rbuf.capacity() - self.rbuf.len() < HEAD_LEN + MAX_FRAME {
            self.rbuf.reserve(HEAD_LEN + MAX_FRAME);
        }
        match tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut self.rbuf) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(Some(e.into()))),
            Poll::Ready(Ok(0)) => {
                if !self.preface_done {
                    return Poll::Ready(Err(None));
                }
                // Half-closed by the client: the streams in flight may still answer, and what
                // is queued is still written before the connection closes.
                self.read_closed = true;
                for s in &self.streams {
                    if let Some(r) = &s.recv {
                        r.fail("the client closed the connection".into());
                    }
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Ok(_)) => {}
        }
        if let Err(e) = self.read_frames(svc, cert) {
            match e {
                FrameError::Connection(reason) => self.fail(reason, "frame".into()),
                FrameError::Stream(id, reason) => self.reset(id, reason),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Handles the whole frames in the read buffer.
    fn read_frames<S>(&mut self, svc: &S, cert: Option<&PeerCertificate>) -> FrameResult
    where
        S: Handler<F, B>,
    {
        if !self.preface_done {
            if self.rbuf.len() < PREFACE.len() {
                return if PREFACE.starts_with(&self.rbuf) {
                    Ok(())
                } else {
                    Err(FrameError::Connection(Reason::PROTOCOL_ERROR))
                };
            }
            if &self.rbuf[..PREFACE.len()] != PREFACE {
                return Err(FrameError::Connection(Reason::PROTOCOL_ERROR));
            }
            self.rbuf.advance(PREFACE.len());
            self.preface_done = true;
        }
        while self.failed.is_none() && self.rbuf.len() >= HEAD_LEN {
            let head = Head::parse(&self.rbuf);
            if head.len > MAX_FRAME {
                return Err(FrameError::Connection(Reason::FRAME_SIZE_ERROR));
            }
            if self.rbuf.len() < HEAD_LEN + head.len {
                break;
            }
            if let Some(p) = &self.partial {
                if !(head.is_continuation() && head.stream == p.stream) {
                    return Err(FrameError::Connection(Reason::PROTOCOL_ERROR));
                }
            }
            self.rbuf.advance(HEAD_LEN);
            let payload = self.rbuf.split_to(head.len).freeze();
            if !self.settings_seen {
                // The client's preface ends with its SETTINGS (§3.4).
                if !head.is_settings() {
                    return Err(FrameError::Connection(Reason::PROTOCOL_ERROR));
                }
                self.settings_seen = true;
            }
            let handled = frame::parse(head, payload).and_then(|f| self.on_frame(f, svc, cert));
            if let Err(e) = handled {
                match e {
                    FrameError::Connection(_) => return Err(e),
                    FrameError::Stream(id, reason) => self.reset(id, reason),
                }
            }
        }
        Ok(())
    }

    fn on_frame<S>(&mut self, f: Frame, svc: &S, cert: Option<&PeerCertificate>) -> FrameResult
    where
        S: Handler<F, B>,
    {
        use FrameError::{Connection as ConnErr, Stream as StreamErr};
        match f {
            Frame::Data {
                stream,
                end_stream,
                data,
                flow_len,
            } => self.on_data(stream, end_stream, data, flow_len),
            Frame::Headers {
                stream,
                end_stream,
                end_headers,
                depends_on,
                fragment,
            } => {
                if end_headers {
                    return self
                        .on_header_block(stream, end_stream, depends_on, fragment, svc, cert);
                }
                if fragment.len() > self.max_block() {
                    return Err(ConnErr(Reason::ENHANCE_YOUR_CALM));
                }
                self.partial = Some(Partial {
                    stream,
                    end_stream,
                    depends_on,
                    block: fragment.to_vec(),
                    continuations: 0,
                });
                Ok(())
            }
            Frame::Continuation {
                stream,
                end_headers,
                fragment,
            } => {
                let max_block = self.max_block();
                let Some(p) = &mut self.partial else {
                    return Err(ConnErr(Reason::PROTOCOL_ERROR));
                };
                p.continuations += 1;
                if p.block.len() + fragment.len() > max_block || p.continuations > MAX_CONTINUATIONS
                {
                    return Err(ConnErr(Reason::ENHANCE_YOUR_CALM));
                }
                p.block.extend_from_slice(&fragment);
                if !end_headers {
                    return Ok(());
                }
                let p = self.partial.take().expect("checked above");
                debug_assert_eq!(p.stream, stream);
                self.on_header_block(
                    stream,
                    p.end_stream,
                    p.depends_on,
                    Bytes::from(p.block),
                    svc,
                    cert,
                )
            }
            Frame::Priority { stream, depends_on } => {
                if depends_on == stream {
                    return Err(StreamErr(stream, Reason::PROTOCOL_ERROR));
                }
                Ok(())
            }
            Frame::RstStream { stream, reason } => {
                if stream > self.last_stream {
                    return Err(ConnErr(Reason::PROTOCOL_ERROR));
                }
                if let Ok(i) = self.find(stream) {
                    let s = self.remove_stream(i);
                    if let Some(r) = &s.recv {
                        if reason == Reason::NO_ERROR && s.content_left.is_none_or(|l| l == 0) {
                            r.end_early();
                        } else {
                            r.fail(format!("stream reset by the client: {reason}"));
                        }
                    }
                    if !matches!(s.send, Sending::Done) {
                        debug!(stream, %reason, "h2 stream reset by the client before its answer");
                        self.cancels += 1;
                        if self.cancels > FREE_CANCELS && self.cancels > self.answered {
                            return Err(ConnErr(Reason::ENHANCE_YOUR_CALM));
                        }
                    }
                    self.remember_closed(stream, false);
                }
                Ok(())
            }
            Frame::Settings { ack: true, .. } => Ok(()),
            Frame::Settings {
                ack: false,
                settings,
            } => {
                // The last INITIAL_WINDOW_SIZE of the frame is the one that holds: applied
                // once, whatever the number of entries (each would walk every stream).
                let window = settings.iter().rev().find_map(|s| match s {
                    Setting::InitialWindowSize(v) => Some(i64::from(*v)),
                    _ => None,
                });
                if let Some(v) = window {
                    let delta = v - self.peer_initial_window;
                    self.peer_initial_window = v;
                    for st in &mut self.streams {
                        st.send_window += delta;
                        if st.send_window > MAX_WINDOW {
                            return Err(ConnErr(Reason::FLOW_CONTROL_ERROR));
                        }
                    }
                    if delta > 0 {
                        self.unblock_all();
                    }
                }
                frame::put_settings_ack(&mut self.out.buf);
                Ok(())
            }
            Frame::Ping { ack, payload } => {
                if !ack {
                    frame::put_ping_ack(&mut self.out.buf, &payload);
                }
                Ok(())
            }
            Frame::GoAway { reason, .. } => {
                debug!(%reason, "h2 GOAWAY from the client");
                self.peer_gone = true;
                Ok(())
            }
            Frame::WindowUpdate {
                stream: 0,
                increment,
            } => {
                if increment == 0 {
                    return Err(ConnErr(Reason::PROTOCOL_ERROR));
                }
                self.out.window += i64::from(increment);
                if self.out.window > MAX_WINDOW {
                    return Err(ConnErr(Reason::FLOW_CONTROL_ERROR));
                }
                self.unblock_all();
                Ok(())
            }
            Frame::WindowUpdate { stream, increment } => {
                let Ok(i) = self.find(stream) else {
                    if stream > self.last_stream {
                        return Err(ConnErr(Reason::PROTOCOL_ERROR));
                    }
                    return Ok(()); // a closed stream: late, harmless
                };
                if increment == 0 {
                    return Err(StreamErr(stream, Reason::PROTOCOL_ERROR));
                }
                let s = &mut self.streams[i];
                s.send_window += i64::from(increment);
                if s.send_window > MAX_WINDOW {
                    return Err(StreamErr(stream, Reason::FLOW_CONTROL_ERROR));
                }
                if s.blocked {
                    s.blocked = false;
                    self.run.push(stream);
                }
                Ok(())
            }
            Frame::Unknown => Ok(()),
        }
    }

    /// The largest header block taken, however many frames carry it.
    fn max_block(&self) -> usize {
        self.opts.max_header_list_size as usize + MAX_FRAME
    }

    fn on_data(&mut self, id: u32, end_stream: bool, data: Bytes, flow_len: usize) -> FrameResult {
        use FrameError::{Connection as ConnErr, Stream as StreamErr};
        self.recv_window -= flow_len as i64;
        if self.recv_window < 0 {
            return Err(ConnErr(Reason::FLOW_CONTROL_ERROR));
        }
        let Ok(i) = self.find(id) else {
            if id > self.last_stream {
                return Err(ConnErr(Reason::PROTOCOL_ERROR));
            }
            self.give_back(flow_len);
            if self.closed_by_us(id) {
                return Ok(()); // frames in flight when this side reset the stream
            }
            return Err(StreamErr(id, Reason::STREAM_CLOSED)); // §6.1
        };
        // Padding is not the reader's: it goes back at once, to both windows.
        let pad = flow_len - data.len();
        self.give_back(pad);
        let s = &mut self.streams[i];
        if s.remote_closed {
            self.give_back(data.len());
            return Err(StreamErr(id, Reason::STREAM_CLOSED));
        }
        s.recv_window -= flow_len as i64;
        if s.recv_window < 0 {
            self.give_back(data.len());
            return Err(StreamErr(id, Reason::FLOW_CONTROL_ERROR));
        }
        if pad > 0 {
            stream_give_back(s, pad, &mut self.out.buf);
        }
        if data.is_empty() && !end_stream {
            // Empty DATA costs the client nothing and this side a lock and a wake-up
            // (CVE-2019-9518): a budget, as for cancellations.
            self.empty_frames += 1;
            if self.empty_frames > FREE_CANCELS && self.empty_frames > self.answered {
                return Err(ConnErr(Reason::ENHANCE_YOUR_CALM));
            }
            return Ok(());
        }
        if let Some(left) = &mut s.content_left {
            match left.checked_sub(data.len() as u64) {
                Some(l) if !end_stream || l == 0 => *left = l,
                _ => {
                    self.give_back(data.len());
                    return Err(StreamErr(id, Reason::PROTOCOL_ERROR)); // not Content-Length
                }
            }
        }
        let len = data.len();
        let kept = match &s.recv {
            Some(r) => r.push(&data),
            None => false,
        };
        if kept {
            s.recv_held += len;
        }
        if end_stream {
            s.remote_closed = true;
            if let Some(r) = &s.recv {
                r.end(None);
            }
        }
        if !kept {
            self.give_back(len);
        }
        if end_stream {
            self.maybe_finish(id);
        }
        Ok(())
    }

    /// `n` bytes of the connection's window given back (announced once half the window is).
    fn give_back(&mut self, n: usize) {
        self.recv_window += n as i64;
        self.recv_unannounced += n as u32;
        if self.recv_unannounced >= WINDOW / 2 {
            frame::put_window_update(&mut self.out.buf, 0, self.recv_unannounced);
            self.recv_unannounced = 0;
        }
    }

    /// A complete header block on `id`: a new request, or a stream's trailers.
    fn on_header_block<S>(
        &mut self,
        id: u32,
        end_stream: bool,
        depends_on: Option<u32>,
        block: Bytes,
        svc: &S,
        cert: Option<&PeerCertificate>,
    ) -> FrameResult
    where
        S: Handler<F, B>,
    {
        use FrameError::{Connection as ConnErr, Stream as StreamErr};
        let mut head = RequestHead::new(self.opts.max_header_list_size as usize);
        self.decoder
            .decode(&block, |name, value| head.field(name, value))
            .map_err(|e| {
                debug!(error = %e, "h2 header block");
                ConnErr(Reason::COMPRESSION_ERROR)
            })?;
        if let Ok(i) = self.find(id) {
            // Trailers: they end the stream and carry no pseudo-header (§8.1).
            let s = &mut self.streams[i];
            if s.remote_closed {
                return Err(StreamErr(id, Reason::STREAM_CLOSED));
            }
            if !end_stream || head.pseudo_seen || head.malformed || head.too_large {
                return Err(StreamErr(id, Reason::PROTOCOL_ERROR));
            }
            if s.content_left.is_some_and(|l| l != 0) {
                return Err(StreamErr(id, Reason::PROTOCOL_ERROR));
            }
            s.remote_closed = true;
            if let Some(r) = &s.recv {
                r.end(Some(head.headers));
            }
            self.maybe_finish(id);
            return Ok(());
        }
        if id <= self.last_stream {
            return match self.closed.iter().find(|(c, _)| *c == id) {
                Some((_, true)) => Ok(()), // reset by this side; the client had sent it already
                Some((_, false)) => Err(ConnErr(Reason::STREAM_CLOSED)),
                None => Err(ConnErr(Reason::PROTOCOL_ERROR)), // below a stream already opened
            };
        }
        if id.is_multiple_of(2) {
            return Err(ConnErr(Reason::PROTOCOL_ERROR));
        }
        self.last_stream = id;
        if depends_on == Some(id) {
            return Err(StreamErr(id, Reason::PROTOCOL_ERROR));
        }
        if self.going_away || self.peer_gone {
            frame::put_rst(&mut self.out.buf, id, Reason::REFUSED_STREAM);
            self.remember_closed(id, true);
            return Ok(());
        }
        if self.streams.len() >= self.opts.max_concurrent_streams as usize {
            return Err(StreamErr(id, Reason::REFUSED_STREAM));
        }
        if head.too_large {
            // Answered rather than reset, so the client can tell why (RFC 6585 §5).
            let at = self.out.buf.len();
            hpack::encode_status(431, &mut self.out.buf);
            frame::put_headers(&mut self.out.buf, at, id, true, MAX_FRAME);
            if !end_stream {
                frame::put_rst(&mut self.out.buf, id, Reason::NO_ERROR);
            }
            self.remember_closed(id, true);
            return Ok(());
        }
        let Some(parts) = head.into_request(&mut self.last_authority) else {
            return Err(StreamErr(id, Reason::PROTOCOL_ERROR));
        };
        let wake_state = Arc::new(StreamWaker {
            id,
            queued: AtomicBool::new(true),
            ready: self.ready.clone(),
        });
        let waker = Waker::from(wake_state.clone());
        let (body, recv) = if end_stream {
            if parts.content_length.is_some_and(|n| n != 0) {
                return Err(StreamErr(id, Reason::PROTOCOL_ERROR));
            }
            (ClientBody::Empty, None)
        } else {
            let shared = H2Shared::new();
            let expect_continue = parts
                .headers
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
            let body = H2Body::new(
                shared.clone(),
                waker.clone(),
                parts.content_length,
                expect_continue,
            );
            (ClientBody::H2(body), Some(shared))
        };
        let mut req = Request::new(body);
        *req.method_mut() = parts.method;
        *req.uri_mut() = parts.uri;
        *req.version_mut() = Version::HTTP_2;
        *req.headers_mut() = parts.headers;
        if let Some(cert) = cert {
            req.extensions_mut().insert(cert.clone());
        }
        self.streams.push(Stream {
            id,
            waker,
            wake_state,
            // Boxed: the handler's future is large, and the stream is moved as the Vec grows.
            send: Sending::Handling(Box::pin(svc.call(req))),
            send_window: self.peer_initial_window,
            blocked: false,
            recv,
            recv_window: i64::from(WINDOW),
            recv_unannounced: 0,
            recv_held: 0,
            content_left: if end_stream {
                None
            } else {
                parts.content_length
            },
            remote_closed: end_stream,
            reset_sent: false,
        });
        self.run.push(id);
        Ok(())
    }

    fn find(&self, id: u32) -> Result<usize, usize> {
        self.streams.binary_search_by_key(&id, |s| s.id)
    }

    fn remember_closed(&mut self, id: u32, by_us: bool) {
        remember(&mut self.closed, &self.opts, id, by_us);
    }

    fn closed_by_us(&self, id: u32) -> bool {
        self.closed.iter().any(|&(c, us)| c == id && us)
    }

    /// A stream error: RST_STREAM, the stream dropped; too many end the connection.
    fn reset(&mut self, id: u32, reason: Reason) {
        debug!(stream = id, %reason, "h2 stream error");
        frame::put_rst(&mut self.out.buf, id, reason);
        if let Ok(i) = self.find(id) {
            let s = self.remove_stream(i);
            if let Some(r) = &s.recv {
                r.fail(format!("stream error: {reason}"));
            }
        }
        self.remember_closed(id, true);
        self.error_resets += 1;
        if self.error_resets > MAX_ERROR_RESETS {
            self.fail(Reason::ENHANCE_YOUR_CALM, "too many stream errors".into());
        }
    }

    /// Ends stream `id` if both sides are done with it.
    fn maybe_finish(&mut self, id: u32) {
        if let Ok(i) = self.find(id) {
            let s = &self.streams[i];
            if s.remote_closed && matches!(s.send, Sending::Done) {
                self.remove_stream(i);
                self.answered += 1;
                self.remember_closed(id, false);
            }
        }
    }

    /// Removes stream `i`; what its reader held goes back to the connection's window (the
    /// reader may still take it, but nothing counts it any more).
    fn remove_stream(&mut self, i: usize) -> Stream<F, B> {
        let s = self.streams.remove(i);
        self.give_back(s.recv_held);
        s
    }

    /// The client has closed its side, so no WINDOW_UPDATE will come: the streams waiting for
    /// one are reset (CANCEL) rather than held until the idle timeout.
    fn reset_starved(&mut self) {
        let conn_starved = self.out.window <= 0;
        let mut i = 0;
        while i < self.streams.len() {
            let s = &self.streams[i];
            let starved = matches!(s.send, Sending::Body { .. })
                && s.blocked
                && (conn_starved || s.send_window <= 0);
            if !starved {
                i += 1;
                continue;
            }
            let id = s.id;
            frame::put_rst(&mut self.out.buf, id, Reason::CANCEL);
            self.remove_stream(i);
            self.remember_closed(id, true);
        }
    }

    fn unblock_all(&mut self) {
        for s in &mut self.streams {
            if s.blocked {
                s.blocked = false;
                self.run.push(s.id);
            }
        }
    }

    /// Polls the streams that were woken (or unblocked, or are new).
    fn run_streams(&mut self) {
        {
            let mut g = self.ready.lock();
            self.run.append(&mut g.ids);
        }
        if self.run.is_empty() {
            return;
        }
        let mut run = std::mem::take(&mut self.run);
        let mut finished = false;
        for &id in &run {
            let Ok(i) = self.find(id) else { continue };
            let s = &mut self.streams[i];
            s.wake_state.queued.store(false, Ordering::Release);
            // What the reader took goes back to the client's windows.
            if let Some(r) = &s.recv {
                if r.take_continue() && matches!(s.send, Sending::Handling(_)) {
                    // The handler waits for the body the client holds back (Expect).
                    let at = self.out.buf.len();
                    hpack::encode_status(100, &mut self.out.buf);
                    frame::put_headers(&mut self.out.buf, at, s.id, false, MAX_FRAME);
                }
                let (taken, gone) = r.take_taken();
                if gone {
                    s.recv = None;
                }
                if taken > 0 {
                    s.recv_held -= taken;
                    if !gone {
                        stream_give_back(s, taken, &mut self.out.buf);
                    }
                    self.give_back(taken);
                }
            }
            let s = &mut self.streams[i];
            if poll_stream(s, &mut self.out) {
                finished = true;
            }
        }
        run.clear();
        self.run = run;
        if finished {
            let out = &mut self.out.buf;
            let (mut answered, mut held, closed, opts) = (0, 0, &mut self.closed, &self.opts);
            self.streams.retain(|s| {
                if !matches!(s.send, Sending::Done) {
                    return true;
                }
                held += s.recv_held;
                if !s.remote_closed && !s.reset_sent {
                    // Answered before the client finished its body: it may stop (§8.1).
                    frame::put_rst(out, s.id, Reason::NO_ERROR);
                    if let Some(r) = &s.recv {
                        r.end_early();
                    }
                }
                answered += 1;
                remember(closed, opts, s.id, !s.remote_closed || s.reset_sent);
                false
            });
            self.answered += answered;
            self.give_back(held);
        }
    }

    /// Writes what is queued; `Ok(true)` when something was written.
    fn poll_write<I: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut I,
    ) -> Poll<std::io::Result<bool>> {
        let mut wrote = false;
        while self.out.written < self.out.buf.len() {
            match Pin::new(&mut *io).poll_write(cx, &self.out.buf[self.out.written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => {
                    self.out.written += n;
                    self.out.unflushed = true;
                    wrote = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        if self.out.written == self.out.buf.len() {
            self.out.buf.clear();
            self.out.written = 0;
            if self.out.buf.capacity() > 4 * HIGH_WATER {
                self.out.buf = Vec::with_capacity(4096);
            }
            if wrote {
                // Room again for the bodies that waited on the output.
                self.unblock_all();
            }
        }
        if self.out.unflushed {
            match Pin::new(&mut *io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.out.unflushed = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if wrote {
            Poll::Ready(Ok(true))
        } else {
            Poll::Pending
        }
    }
}

/// Records stream `id` as closed (`by_us`: reset by this side). As many are remembered as
/// twice the streams a connection may have open, so that a late frame on one is told apart
/// from one on a stream that never existed, and the DATA still in flight to streams this
/// side ended early is ignored, not an error.
fn remember(closed: &mut VecDeque<(u32, bool)>, opts: &Options, id: u32, by_us: bool) {
    if closed.len() >= 2 * opts.max_concurrent_streams.max(32) as usize {
        closed.pop_front();
    }
    closed.push_back((id, by_us));
}

/// `n` bytes of a stream's window given back, announced once half the window is (and only
/// while the client may still send on it).
fn stream_give_back<F, B: Body>(s: &mut Stream<F, B>, n: usize, out: &mut Vec<u8>) {
    s.recv_window += n as i64;
    s.recv_unannounced += n as u32;
    if !s.remote_closed && s.recv_unannounced >= WINDOW / 2 {
        frame::put_window_update(out, s.id, s.recv_unannounced);
        s.recv_unannounced = 0;
    }
}

/// Polls one stream: its handler, then its body into DATA frames as the windows allow.
/// True when the stream has sent all it will.
fn poll_stream<F, B>(s: &mut Stream<F, B>, out: &mut Out) -> bool
where
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: Body,
    B::Error: Into<ConnError>,
{
    let mut cx = Context::from_waker(&s.waker);
    loop {
        match &mut s.send {
            Sending::Done => return true,
            Sending::Handling(handling) => {
                let Poll::Ready(Ok(res)) = handling.as_mut().poll(&mut cx) else {
                    return false;
                };
                let (mut head, body) = res.into_parts();
                let end = body.is_end_stream();
                strip_connection_headers(&mut head.headers);
                if !head.headers.contains_key(header::DATE) {
                    head.headers.insert(header::DATE, super::date::date_value());
                }
                if !end && !head.headers.contains_key(header::CONTENT_LENGTH) {
                    if let Some(n) = body.size_hint().exact() {
                        head.headers
                            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
                    }
                }
                let at = out.buf.len();
                hpack::encode_status(head.status.as_u16(), &mut out.buf);
                for (name, value) in &head.headers {
                    hpack::encode_field(name, value, &mut out.buf);
                }
                frame::put_headers(&mut out.buf, at, s.id, end, MAX_FRAME);
                s.send = if end {
                    Sending::Done
                } else {
                    Sending::Body {
                        body: Box::pin(body),
                        pending: None,
                        end: false,
                    }
                };
            }
            Sending::Body { body, pending, end } => {
                if let Some(data) = pending {
                    loop {
                        let left = data.remaining();
                        let n = left
                            .min(MAX_FRAME)
                            .min(s.send_window.max(0) as usize)
                            .min(out.window.max(0) as usize);
                        if n == 0 && left > 0 {
                            s.blocked = true;
                            return false;
                        }
                        let last = n == left;
                        put_data(out, s.id, data, n, last && *end);
                        s.send_window -= n as i64;
                        out.window -= n as i64;
                        if last {
                            break;
                        }
                        if out.buf.len() - out.written >= HIGH_WATER {
                            s.blocked = true;
                            return false;
                        }
                    }
                    *pending = None;
                    if *end {
                        s.send = Sending::Done;
                        return true;
                    }
                }
                if out.buf.len() - out.written >= HIGH_WATER {
                    s.blocked = true;
                    return false;
                }
                match body.as_mut().poll_frame(&mut cx) {
                    Poll::Pending => return false,
                    Poll::Ready(None) => {
                        frame::put_data(&mut out.buf, s.id, &[], true);
                        s.send = Sending::Done;
                    }
                    Poll::Ready(Some(Err(e))) => {
                        let e: ConnError = e.into();
                        debug!(error = %e, "h2 response body ended early");
                        frame::put_rst(&mut out.buf, s.id, Reason::INTERNAL_ERROR);
                        s.send = Sending::Done;
                        // The client's body, if any, is of no use now.
                        if let Some(r) = &s.recv {
                            r.fail("the response failed".into());
                        }
                        s.reset_sent = true;
                    }
                    Poll::Ready(Some(Ok(f))) => match f.into_data() {
                        Ok(data) => {
                            *end = body.is_end_stream();
                            if data.has_remaining() || *end {
                                *pending = Some(data);
                            }
                        }
                        Err(f) => {
                            if let Ok(mut trailers) = f.into_trailers() {
                                strip_connection_headers(&mut trailers);
                                let at = out.buf.len();
                                for (name, value) in &trailers {
                                    hpack::encode_field(name, value, &mut out.buf);
                                }
                                frame::put_headers(&mut out.buf, at, s.id, true, MAX_FRAME);
                                s.send = Sending::Done;
                            }
                        }
                    },
                }
            }
        }
    }
}

/// A DATA frame of the next `n` bytes of `data`.
fn put_data(out: &mut Out, stream: u32, data: &mut impl Buf, n: usize, end: bool) {
    let at = out.buf.len();
    frame::put_data(&mut out.buf, stream, &[], end);
    let mut left = n;
    while left > 0 {
        let chunk = data.chunk();
        let take = chunk.len().min(left);
        out.buf.extend_from_slice(&chunk[..take]);
        data.advance(take);
        left -= take;
    }
    let len = (n as u32).to_be_bytes();
    out.buf[at..at + 3].copy_from_slice(&len[1..]);
}

/// A request's head as its fields are decoded.
struct RequestHead {
    method: Option<Bytes>,
    scheme: Option<Bytes>,
    authority: Option<Bytes>,
    path: Option<Bytes>,
    headers: HeaderMap,
    /// A pseudo-header was seen (trailers may have none).
    pseudo_seen: bool,
    regular_seen: bool,
    malformed: bool,
    size: usize,
    limit: usize,
    too_large: bool,
}

/// What a well-formed request head gives.
struct RequestParts {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    content_length: Option<u64>,
}

impl RequestHead {
    fn new(limit: usize) -> RequestHead {
        RequestHead {
            method: None,
            scheme: None,
            authority: None,
            path: None,
            headers: HeaderMap::new(),
            pseudo_seen: false,
            regular_seen: false,
            malformed: false,
            size: 0,
            limit,
            too_large: false,
        }
    }

    fn field(&mut self, name: &Name, value: &Bytes) {
        let name_len = match name {
            Name::Method | Name::Scheme => 7,
            Name::Authority => 10,
            Name::Path => 5,
            Name::Protocol | Name::Invalid => 9,
            Name::Field(n) => n.as_str().len(),
        };
        self.size += name_len + value.len() + 32;
        self.too_large |= self.size > self.limit;
        let mut pseudo = |slot: &mut Option<Bytes>| {
            self.pseudo_seen = true;
            // Pseudo-headers come first, once each (§8.3).
            if self.regular_seen || slot.is_some() {
                return false;
            }
            *slot = Some(value.clone());
            true
        };
        let ok = match name {
            Name::Method => pseudo(&mut self.method),
            Name::Scheme => pseudo(&mut self.scheme),
            Name::Authority => pseudo(&mut self.authority),
            Name::Path => pseudo(&mut self.path),
            Name::Protocol | Name::Invalid => {
                self.pseudo_seen = true;
                false
            }
            Name::Field(n) => {
                self.regular_seen = true;
                self.regular(n, value)
            }
        };
        self.malformed |= !ok;
    }

    /// A regular field: kept unless HTTP/2 forbids it (§8.2.2) or its value is not one.
    fn regular(&mut self, name: &HeaderName, value: &Bytes) -> bool {
        if self.too_large {
            return true; // answered 431 whatever it holds; nothing more is kept
        }
        if name == header::CONNECTION
            || name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name.as_str() == "keep-alive"
            || name.as_str() == "proxy-connection"
            || (name == header::TE && value.as_ref() != b"trailers")
        {
            return false;
        }
        match HeaderValue::from_maybe_shared(value.clone()) {
            Ok(v) => {
                self.headers.append(name.clone(), v);
                true
            }
            Err(_) => false,
        }
    }

    /// The request, if its head is well formed (§8.3.1).
    /// `last` is the connection's last authority, raw and parsed: a client names the same one
    /// in request after request (from its HPACK table), so it is parsed once.
    fn into_request(self, last: &mut Option<(Bytes, Authority)>) -> Option<RequestParts> {
        if self.malformed {
            return None;
        }
        let method = Method::from_bytes(&self.method?).ok()?;
        let authority = match self.authority {
            Some(a) => match last {
                Some((raw, parsed)) if *raw == a => Some(parsed.clone()),
                _ => {
                    // Kept as a copy: a slice would keep the read buffer it came from alive.
                    let owned = Bytes::copy_from_slice(&a);
                    let parsed = Authority::from_maybe_shared(owned.clone()).ok()?;
                    *last = Some((owned, parsed.clone()));
                    Some(parsed)
                }
            },
            None => None,
        };
        let uri = if method == Method::CONNECT {
            if self.scheme.is_some() || self.path.is_some() {
                return None;
            }
            Uri::from_parts({
                let mut p = http::uri::Parts::default();
                p.authority = Some(authority?);
                p
            })
            .ok()?
        } else {
            let scheme = Scheme::try_from(&self.scheme?[..]).ok()?;
            let path = self.path.filter(|p| !p.is_empty())?;
            let path = PathAndQuery::from_maybe_shared(path).ok()?;
            let mut p = http::uri::Parts::default();
            if let Some(a) = authority {
                p.scheme = Some(scheme);
                p.authority = Some(a);
            }
            p.path_and_query = Some(path);
            Uri::from_parts(p).ok()?
        };
        let mut lengths = self.headers.get_all(header::CONTENT_LENGTH).iter();
        let content_length = match lengths.next() {
            None => None,
            Some(first) => {
                // HTTP/1.1's rule (1*DIGIT), so the backend is never handed "+5" or " 5".
                let parse = |v: &HeaderValue| super::h1::head::content_length(v.as_bytes()).ok();
                let n = parse(first)?;
                if !lengths.all(|v| parse(v) == Some(n)) {
                    return None;
                }
                Some(n)
            }
        };
        let mut headers = self.headers;
        join_cookies(&mut headers);
        Some(RequestParts {
            method,
            uri,
            headers,
            content_length,
        })
    }
}

/// Cookie fields a client split (HTTP/2 lets it, for compression) joined into one with "; "
/// before the request goes on to an HTTP/1.1 backend (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    if values.next().is_none() || values.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for v in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// Headers HTTP/2 forbids in a response (RFC 9113 §8.2.2), and those `Connection` names.
/// Usually there are none (the proxy has removed them already): one pass over the names finds
/// that, where a removal per name would hash each of them for every response.
fn strip_connection_headers(headers: &mut HeaderMap) {
    let specific = |n: &header::HeaderName| {
        n == header::CONNECTION
            || n == header::TRANSFER_ENCODING
            || n == header::UPGRADE
            || n == header::TE
            || n.as_str() == "keep-alive"
            || n.as_str() == "proxy-connection"
    };
    if !headers.keys().any(specific) {
        return;
    }
    if let Some(connection) = headers.remove(header::CONNECTION) {
        if let Ok(names) = connection.to_str() {
            for name in names.split(',') {
                headers.remove(name.trim());
            }
        }
    }
    for name in [
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
        header::HeaderName::from_static("keep-alive"),
        header::HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_specific_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "close, x-hop".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        strip_connection_headers(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::CONTENT_TYPE));
        // Each alone is found too (the pass over the names that skips the removals).
        for name in [
            "keep-alive",
            "proxy-connection",
            "te",
            "upgrade",
            "transfer-encoding",
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::SERVER, "x".parse().unwrap());
            h.insert(header::HeaderName::from_static(name), "1".parse().unwrap());
            strip_connection_headers(&mut h);
            assert_eq!(h.len(), 1, "{name}: {h:?}");
        }
    }

    fn head(fields: &[(&str, &str)]) -> RequestHead {
        let mut h = RequestHead::new(64 * 1024);
        for (n, v) in fields {
            let name = match *n {
                ":method" => Name::Method,
                ":scheme" => Name::Scheme,
                ":authority" => Name::Authority,
                ":path" => Name::Path,
                ":protocol" => Name::Protocol,
                n if n.starts_with(':') || n.bytes().any(|b| b.is_ascii_uppercase()) => {
                    Name::Invalid
                }
                n => Name::Field(HeaderName::from_bytes(n.as_bytes()).unwrap()),
            };
            h.field(&name, &Bytes::copy_from_slice(v.as_bytes()));
        }
        h
    }

    const GET: [(&str, &str); 4] = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "farm.test"),
        (":path", "/a?b"),
    ];

    #[test]
    fn a_well_formed_request_head_becomes_a_request() {
        let mut f = GET.to_vec();
        f.extend([
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("te", "trailers"),
            ("content-length", "3"),
        ]);
        let r = head(&f).into_request(&mut None).unwrap();
        assert_eq!(r.method, Method::GET);
        assert_eq!(r.uri, "https://farm.test/a?b");
        assert_eq!(r.headers["cookie"], "a=1; b=2");
        assert_eq!(r.content_length, Some(3));
        // No :authority: the path alone (the Host field names the site).
        let r = head(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            ("host", "h"),
        ])
        .into_request(&mut None)
        .unwrap();
        assert_eq!(r.uri, "/");
        let r = head(&[(":method", "CONNECT"), (":authority", "h:443")])
            .into_request(&mut None)
            .unwrap();
        assert_eq!(r.uri.authority().unwrap(), "h:443");
    }

    #[test]
    fn the_last_authority_is_parsed_once_and_replaced_when_another_comes() {
        let mut last = None;
        let a = head(&GET).into_request(&mut last).unwrap();
        assert_eq!(a.uri.authority().unwrap(), "farm.test");
        assert_eq!(last.as_ref().unwrap().0, "farm.test");
        let mut f = GET.to_vec();
        f[2] = (":authority", "other.test:8443");
        let b = head(&f).into_request(&mut last).unwrap();
        assert_eq!(b.uri, "https://other.test:8443/a?b");
        assert_eq!(last.as_ref().unwrap().0, "other.test:8443");
        // One that does not parse is refused and replaces nothing.
        f[2] = (":authority", "bad host");
        assert!(head(&f).into_request(&mut last).is_none());
        assert_eq!(last.unwrap().0, "other.test:8443");
    }

    /// A server connection on one end of an in-memory pipe of `pipe` bytes, answering every
    /// request with `body_len` bytes; the test drives the other end frame by frame.
    fn pipe_server(pipe: usize, body_len: usize) -> tokio::io::DuplexStream {
        pipe_serve(pipe, move |_req| async move {
            Response::new(http_body_util::Full::new(Bytes::from(vec![b'x'; body_len])))
        })
    }

    /// A server connection on one end of an in-memory pipe, answering with `answer`.
    fn pipe_serve<A, Fut>(pipe: usize, answer: A) -> tokio::io::DuplexStream
    where
        A: Fn(Request<ClientBody>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<http_body_util::Full<Bytes>>> + Send + 'static,
    {
        let (client, server) = tokio::io::duplex(pipe);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let answer = answer(req);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let opts = Options {
                max_concurrent_streams: 16,
                max_header_list_size: 16 * 1024,
            };
            let _ = serve(server, opts, &svc, &CancellationToken::new(), None).await;
        });
        client
    }

    /// Frames from the server until one `until` accepts (returned), within 5 s.
    async fn frame_where(
        io: &mut tokio::io::DuplexStream,
        buf: &mut Vec<u8>,
        until: impl Fn(&(u8, u8, u32, Vec<u8>)) -> bool,
    ) -> (u8, u8, u32, Vec<u8>) {
        use tokio::io::AsyncReadExt;
        loop {
            while buf.len() >= HEAD_LEN && buf.len() >= HEAD_LEN + Head::parse(buf).len {
                let h = Head::parse(buf);
                let f = (
                    h.kind,
                    h.flags,
                    h.stream,
                    buf[HEAD_LEN..HEAD_LEN + h.len].to_vec(),
                );
                buf.drain(..HEAD_LEN + h.len);
                if until(&f) {
                    return f;
                }
            }
            let mut chunk = [0u8; 65536];
            let n = tokio::time::timeout(Duration::from_secs(5), io.read(&mut chunk))
                .await
                .expect("the awaited frame within 5 s")
                .expect("read");
            assert!(n > 0, "the server closed before the awaited frame");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The preface and SETTINGS, then `POST /` on stream 1 (its body to follow).
    fn post_hello() -> Vec<u8> {
        let mut b = PREFACE.to_vec();
        frame::put_settings(&mut b, &[]);
        let at = b.len();
        b.extend_from_slice(b"\x83\x86\x84\x01\x09farm.test");
        frame::put_headers(&mut b, at, 1, false, MAX_FRAME);
        b
    }

    #[tokio::test]
    async fn padding_goes_back_to_the_streams_window_at_once() {
        // 8 192 DATA frames of one byte and 255 of padding: 2 MiB against a 1 MiB window,
        // 8 KiB of it data. The handler reads the whole body and answers its length.
        let mut io = pipe_serve(8 << 20, |req: Request<ClientBody>| async move {
            let body = http_body_util::BodyExt::collect(req.into_body()).await;
            let n = body.map(|b| b.to_bytes().len()).unwrap_or(0);
            Response::new(http_body_util::Full::new(Bytes::from(n.to_string())))
        });
        use tokio::io::AsyncWriteExt;
        let mut b = post_hello();
        for i in 0..8192 {
            let mut payload = vec![254u8, b'd'];
            payload.extend_from_slice(&[0; 254]);
            let flags = if i == 8191 { 0x8 | 0x1 } else { 0x8 };
            b.extend_from_slice(&[0, 1, 0, 0, flags, 0, 0, 0, 1]);
            b.extend_from_slice(&payload);
        }
        io.write_all(&b).await.unwrap();
        let mut buf = Vec::new();
        let f = frame_where(&mut io, &mut buf, |f| f.2 == 1 && (f.0 == 0 || f.0 == 3)).await;
        assert_eq!(
            (f.0, &f.3[..]),
            (0, &b"8192"[..]),
            "the body, not a RST_STREAM"
        );
    }

    #[tokio::test]
    async fn a_flood_of_empty_data_frames_ends_the_connection() {
        let mut io = pipe_server(1 << 20, 10);
        use tokio::io::AsyncWriteExt;
        let mut b = post_hello();
        for _ in 0..300 {
            b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 1]);
        }
        io.write_all(&b).await.unwrap();
        let mut buf = Vec::new();
        let f = frame_where(&mut io, &mut buf, |f| f.0 == 7).await;
        assert_eq!(&f.3[4..], &Reason::ENHANCE_YOUR_CALM.0.to_be_bytes());
    }

    #[tokio::test]
    async fn a_malformed_frame_on_one_stream_does_not_hold_the_frames_after_it() {
        let mut io = pipe_server(1 << 20, 10);
        use tokio::io::AsyncWriteExt;
        let mut b = PREFACE.to_vec();
        frame::put_settings(&mut b, &[]);
        // PRIORITY of 4 bytes on stream 3 (a stream error), then a GET on stream 1.
        b.extend_from_slice(&[0, 0, 4, 2, 0, 0, 0, 0, 3, 0, 0, 0, 0]);
        let at = b.len();
        b.extend_from_slice(b"\x82\x86\x84\x01\x09farm.test");
        frame::put_headers(&mut b, at, 1, true, MAX_FRAME);
        io.write_all(&b).await.unwrap();
        let mut buf = Vec::new();
        let rst = frame_where(&mut io, &mut buf, |f| f.0 == 3).await;
        assert_eq!(
            (rst.2, &rst.3[..]),
            (3, &Reason::FRAME_SIZE_ERROR.0.to_be_bytes()[..])
        );
        let answer = frame_where(&mut io, &mut buf, |f| f.0 == 1).await;
        assert_eq!(
            answer.2, 1,
            "stream 1 answered without more bytes from the client"
        );
    }

    /// The preface, SETTINGS with `initial_window`, the connection's window raised by
    /// `conn_window`, then `GET /` on stream 1.
    fn hello(initial_window: u32, conn_window: u32) -> Vec<u8> {
        let mut b = PREFACE.to_vec();
        frame::put_settings(&mut b, &[(4, initial_window)]);
        if conn_window > 0 {
            frame::put_window_update(&mut b, 0, conn_window);
        }
        let at = b.len();
        b.extend_from_slice(b"\x82\x86\x84\x01\x09farm.test");
        frame::put_headers(&mut b, at, 1, true, MAX_FRAME);
        b
    }

    /// Every frame until the server closes: (type, flags, stream, payload length).
    async fn frames_until_close(io: &mut tokio::io::DuplexStream) -> Vec<(u8, u8, u32, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut all))
            .await
            .expect("the server closes within 5 s")
            .expect("read");
        let mut frames = Vec::new();
        let mut at = 0;
        while all.len() - at >= HEAD_LEN {
            let h = Head::parse(&all[at..]);
            let end = (at + HEAD_LEN + h.len).min(all.len());
            frames.push((h.kind, h.flags, h.stream, all[at + HEAD_LEN..end].to_vec()));
            at += HEAD_LEN + h.len;
        }
        frames
    }

    #[tokio::test]
    async fn a_client_that_closes_its_side_still_gets_what_was_queued_for_it() {
        // 60 000 bytes fit the output (the stream is done and gone) but not the 4 KiB pipe:
        // most of the answer is still queued when the client's end of stream arrives.
        let mut io = pipe_server(4096, 60_000);
        use tokio::io::AsyncWriteExt;
        io.write_all(&hello(1 << 20, 1 << 20)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        io.shutdown().await.unwrap();
        let frames = frames_until_close(&mut io).await;
        let data: usize = frames
            .iter()
            .filter(|f| f.0 == 0 && f.2 == 1)
            .map(|f| f.3.len())
            .sum();
        assert_eq!(data, 60_000);
        assert!(
            frames.iter().any(|f| f.0 == 0 && f.2 == 1 && f.1 & 1 == 1),
            "END_STREAM"
        );
    }

    #[tokio::test]
    async fn a_stream_waiting_for_a_window_the_closed_client_cannot_give_is_reset() {
        // The client's windows are 0 and it has closed its side: no WINDOW_UPDATE can come.
        let mut io = pipe_server(1 << 20, 10);
        use tokio::io::AsyncWriteExt;
        io.write_all(&hello(0, 0)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        io.shutdown().await.unwrap();
        let frames = frames_until_close(&mut io).await;
        let rst = frames.iter().find(|f| f.0 == 3).expect("a RST_STREAM");
        assert_eq!(
            (rst.2, &rst.3[..]),
            (1, &Reason::CANCEL.0.to_be_bytes()[..])
        );
    }

    #[test]
    fn split_cookies_are_joined_for_the_backend() {
        let mut f = GET.to_vec();
        f.extend([
            ("cookie", "a=1"),
            ("x-other", "y"),
            ("cookie", "b=2"),
            ("cookie", "c=3"),
        ]);
        let r = head(&f).into_request(&mut None).unwrap();
        let cookies: Vec<_> = r.headers.get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);
        let mut one = GET.to_vec();
        one.push(("cookie", "a=1"));
        let r = head(&one).into_request(&mut None).unwrap();
        assert_eq!(r.headers[header::COOKIE], "a=1");
    }

    #[test]
    fn malformed_request_heads_are_refused() {
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut f = GET.to_vec();
            f.extend_from_slice(extra);
            f
        };
        let cases: Vec<Vec<(&str, &str)>> = vec![
            vec![(":scheme", "https"), (":path", "/")], // no method
            vec![(":method", "GET"), (":path", "/")],   // no scheme
            vec![(":method", "GET"), (":scheme", "https")], // no path
            vec![(":method", "GET"), (":scheme", "https"), (":path", "")], // empty path
            vec![
                (":method", "CONNECT"),
                (":authority", "h:1"),
                (":path", "/"),
            ],
            with(&[(":method", "GET")]), // twice
            with(&[(":status", "200")]), // a response's
            with(&[(":protocol", "websocket")]),
            vec![
                ("x-a", "1"),
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
            ],
            with(&[("Upper", "1")]),
            with(&[("connection", "close")]),
            with(&[("keep-alive", "1")]),
            with(&[("proxy-connection", "1")]),
            with(&[("transfer-encoding", "chunked")]),
            with(&[("upgrade", "h2c")]),
            with(&[("te", "gzip")]),
            with(&[("x-bad", "a\nb")]),
            with(&[("content-length", "1"), ("content-length", "2")]),
            with(&[("content-length", "-1")]),
            with(&[("content-length", "+5")]),
            with(&[("content-length", " 5")]),
            vec![(":method", "G T"), (":scheme", "http"), (":path", "/")],
        ];
        for f in cases {
            assert!(head(&f).into_request(&mut None).is_none(), "{f:?}");
        }
    }

    #[test]
    fn a_head_past_the_limit_is_flagged_and_not_kept() {
        let mut h = RequestHead::new(200);
        for (n, v) in GET {
            let _ = (n, v);
        }
        let name = Name::Field(HeaderName::from_static("x-big"));
        h.field(&name, &Bytes::from(vec![b'a'; 150]));
        assert!(!h.too_large);
        h.field(&name, &Bytes::from(vec![b'a'; 150]));
        assert!(h.too_large);
        h.field(&name, &Bytes::from(vec![b'a'; 150]));
        assert_eq!(h.headers.len(), 1);
    }
}
