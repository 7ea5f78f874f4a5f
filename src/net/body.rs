//! Body types of the proxy (streamed frame by frame in both directions, never buffered whole),
//! [`read_body`], the one reader of a whole, bounded request body (the sync hub's and the
//! agent's APIs), and [`stream_into`], the one way a large body (a blob) goes to disk: a
//! buffer at a time, whatever its size.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use tokio::sync::mpsc;

/// Error of a connection or a body.
pub type ConnError = Box<dyn std::error::Error + Send + Sync>;

/// A request body as the client sends it: none, read by lockstep's HTTP/1.1 connection
/// ([`crate::net::h1`]), or an HTTP/2 stream's ([`crate::net::h2`]). Every handler takes this
/// one type.
pub enum ClientBody {
    /// No body.
    Empty,
    /// An HTTP/1.1 body, pumped from the connection while the handler runs.
    H1(BodyRx),
    /// An HTTP/2 stream's body.
    H2(H2Body),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ConnError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ConnError>>> {
        match self.get_mut() {
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::H1(b) => Pin::new(b).poll_frame(cx),
            ClientBody::H2(b) => b.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::H1(b) => b.is_end_stream(),
            ClientBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::H1(b) => b.size_hint(),
            ClientBody::H2(b) => b.size_hint(),
        }
    }
}

/// What goes to the backend: nothing, or the client's body streamed through, with a flag
/// raised if the *client's* side failed (bad chunk, early close) so the error is blamed on
/// the right side.
pub enum RequestBody {
    /// No body.
    Empty,
    /// The client's body.
    Stream {
        /// The client's body.
        inner: ClientBody,
        /// Raised when reading the client's body failed.
        client_failed: Arc<AtomicBool>,
    },
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = ConnError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ConnError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Stream {
                inner,
                client_failed,
            } => {
                let r = Pin::new(inner).poll_frame(cx);
                if let Poll::Ready(Some(Err(_))) = &r {
                    client_failed.store(true, Ordering::Relaxed);
                }
                r
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Stream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Stream { inner, .. } => inner.size_hint(),
        }
    }
}

/// One piece of a request body on its way from the connection to the handler.
pub enum Piece {
    /// Some data.
    Data(Bytes),
    /// The last data (maybe empty): the body is complete.
    Last(Bytes),
    /// Reading failed.
    Failed(ConnError),
}

/// A request body read by the connection while its handler runs (HTTP/1.1).
pub struct BodyRx {
    rx: mpsc::Receiver<Piece>,
    /// Bytes still to come, for a body of known length.
    left: Option<u64>,
    ended: bool,
}

impl Body for BodyRx {
    type Data = Bytes;
    type Error = ConnError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ConnError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let piece = std::task::ready!(self.rx.poll_recv(cx));
        Poll::Ready(match piece {
            Some(Piece::Data(b)) => {
                self.spend(b.len());
                Some(Ok(Frame::data(b)))
            }
            Some(Piece::Last(b)) => {
                self.ended = true;
                self.spend(b.len());
                (!b.is_empty()).then(|| Ok(Frame::data(b)))
            }
            Some(Piece::Failed(e)) => {
                self.ended = true;
                Some(Err(e))
            }
            None => {
                self.ended = true;
                Some(Err(
                    "the client's connection closed before the end of its body".into(),
                ))
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl BodyRx {
    /// A body of `left` bytes (unknown: `None`) and the sender of its pieces: room for one
    /// piece, so the connection reads no further ahead than the handler takes.
    pub fn channel(left: Option<u64>) -> (mpsc::Sender<Piece>, BodyRx) {
        let (tx, rx) = mpsc::channel(1);
        (
            tx,
            BodyRx {
                rx,
                left,
                ended: false,
            },
        )
    }

    fn spend(&mut self, n: usize) {
        if let Some(left) = &mut self.left {
            *left = left.saturating_sub(n as u64);
        }
    }
}

/// Why a request body could not be read whole.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// It is longer than the limit.
    #[error("body larger than {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The client's stream failed (bad chunk, early close).
    #[error("reading the body: {0}")]
    Read(String),
}

impl BodyError {
    /// The status answering it: 413 or 400.
    pub fn status(&self) -> http::StatusCode {
        match self {
            BodyError::TooLarge { .. } => http::StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Read(_) => http::StatusCode::BAD_REQUEST,
        }
    }
}

/// A request body read whole, at most `limit` bytes.
pub async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, BodyError>
where
    B: Body<Data = Bytes, Error: Into<ConnError>>,
{
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge { limit }),
        Err(e) => Err(BodyError::Read(e.to_string())),
    }
}

/// Bytes gathered before one write to the sink (one blocking call per this much).
const WRITE_CHUNK: usize = 256 * 1024;

/// Why a body could not be streamed into its sink.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// It is longer than the limit.
    #[error("body larger than {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The sender's stream failed (bad chunk, early close, reset).
    #[error("reading the body: {0}")]
    Read(String),
    /// The sink refused (disk full, …).
    #[error("writing the body: {0}")]
    Write(std::io::Error),
}

/// Writes `body` into `sink`, at most `limit` bytes, a buffer at a time: the writes run on
/// the blocking pool one buffer per call, so no thread waits on a slow sender and memory per
/// transfer stays [`WRITE_CHUNK`] plus one frame. Returns the sink (flushed) for the caller to
/// commit; on an error it is dropped.
pub async fn stream_into<B, W>(body: B, sink: W, limit: u64) -> Result<W, StreamError>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
    W: std::io::Write + Send + 'static,
{
    use http_body_util::BodyExt;
    let mut body = std::pin::pin!(body);
    let mut sink = Some(sink);
    let mut buf: Vec<u8> = Vec::new();
    let mut seen = 0u64;
    loop {
        let frame = body.frame().await;
        let end = frame.is_none();
        if let Some(frame) = frame {
            let frame = frame.map_err(|e| StreamError::Read(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                seen += data.len() as u64;
                if seen > limit {
                    return Err(StreamError::TooLarge { limit });
                }
                buf.extend_from_slice(&data);
            }
        }
        if buf.len() >= WRITE_CHUNK || end {
            let (mut w, mut chunk) = (sink.take().expect("put back after each write"), buf);
            let written = tokio::task::spawn_blocking(move || {
                let r = w
                    .write_all(&chunk)
                    .and_then(|()| if end { w.flush() } else { Ok(()) });
                chunk.clear();
                r.map(|()| (w, chunk))
            })
            .await
            .map_err(|e| StreamError::Write(std::io::Error::other(e)))?;
            let (w, chunk) = written.map_err(|e| match e.kind() {
                std::io::ErrorKind::FileTooLarge => StreamError::TooLarge { limit },
                _ => StreamError::Write(e),
            })?;
            sink = Some(w);
            buf = chunk;
        }
        if end {
            return Ok(sink.take().expect("put back after the last write"));
        }
    }
}

// An HTTP/2 stream's request body: what the connection (`net::h2`) received for the stream,
// handed to the handler through `H2Body`. The connection pushes DATA (within the windows it
// advertised, so at most a window is ever buffered: copied into one buffer per stream, so
// that neither tiny frames nor slices of the connection's read buffer make the memory larger
// than the bytes) and the end; the reader takes it and counts what it took, which the
// connection gives back to the client's windows (WINDOW_UPDATE) when it next looks at the
// stream: a client sends no faster than the backend reads.

/// How the body ended, when it has.
#[derive(Debug)]
enum H2End {
    Open,
    /// END_STREAM, with the trailers if there were some.
    Done(Option<HeaderMap>),
    /// The client reset the stream with NO_ERROR: it needs no more of the body (an early
    /// response, RFC 9113 §8.1), which ends the body rather than failing it.
    Early,
    Failed(String),
}

#[derive(Debug)]
struct H2Inner {
    /// Received, not yet taken.
    data: BytesMut,
    end: H2End,
    /// The reader waiting for the next chunk.
    reader: Option<Waker>,
    /// Bytes the reader took that the connection has not yet given back to the windows.
    taken: usize,
    /// The reader is gone: what comes is given back at once.
    dropped: bool,
    /// The reader waits for a body the client holds back until an interim 100 (it sent
    /// `Expect: 100-continue`): the connection sends one.
    continue_asked: bool,
}

/// The state a stream's body shares between the connection and the reader.
#[derive(Debug)]
pub(super) struct H2Shared(Mutex<H2Inner>);

impl H2Shared {
    pub(super) fn new() -> Arc<H2Shared> {
        Arc::new(H2Shared(Mutex::new(H2Inner {
            data: BytesMut::new(),
            end: H2End::Open,
            reader: None,
            taken: 0,
            dropped: false,
            continue_asked: false,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, H2Inner> {
        // Nothing holding the lock can panic half-way; a poisoned one is still consistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a DATA frame's bytes; false when the reader is gone (the caller gives them
    /// back to the windows itself).
    pub(super) fn push(&self, data: &[u8]) -> bool {
        let mut g = self.lock();
        if g.dropped {
            return false;
        }
        g.data.extend_from_slice(data);
        let w = g.reader.take();
        drop(g);
        if let Some(w) = w {
            w.wake();
        }
        true
    }

    /// Ends the body: the client's END_STREAM (with its trailers), an early end, or a
    /// failure (a reset, a malformed body, the connection's end).
    fn finish(&self, end: H2End) {
        let mut g = self.lock();
        if !matches!(g.end, H2End::Open) {
            return;
        }
        g.end = end;
        let w = g.reader.take();
        drop(g);
        if let Some(w) = w {
            w.wake();
        }
    }

    pub(super) fn end(&self, trailers: Option<HeaderMap>) {
        self.finish(H2End::Done(trailers));
    }

    pub(super) fn end_early(&self) {
        self.finish(H2End::Early);
    }

    pub(super) fn fail(&self, why: String) {
        self.finish(H2End::Failed(why));
    }

    /// Whether the reader asked for an interim 100 since the last call.
    pub(super) fn take_continue(&self) -> bool {
        std::mem::take(&mut self.lock().continue_asked)
    }

    /// What the reader took since the last call, and whether the reader is gone (then
    /// nothing more will be taken: what is still queued is the caller's to give back).
    pub(super) fn take_taken(&self) -> (usize, bool) {
        let mut g = self.lock();
        let taken = std::mem::take(&mut g.taken);
        if g.dropped {
            let queued = g.data.len();
            g.data = BytesMut::new();
            return (taken + queued, true);
        }
        (taken, false)
    }
}

/// An HTTP/2 stream's request body: its DATA, then its trailers.
#[derive(Debug)]
pub struct H2Body {
    shared: Arc<H2Shared>,
    /// The stream's waker in its connection: woken when bytes are taken, so the connection
    /// gives them back to the client's windows.
    stream: Waker,
    /// What `Content-Length` says is still to come.
    remaining: Option<u64>,
    /// The client sent `Expect: 100-continue` and nothing of its body yet: the first wait for
    /// the body asks the connection for an interim 100 (RFC 9110 §10.1.1), as HTTP/1.1's
    /// pump does; a handler that never reads the body sends none.
    expect_continue: bool,
}

impl H2Body {
    pub(super) fn new(
        shared: Arc<H2Shared>,
        stream: Waker,
        content_length: Option<u64>,
        expect_continue: bool,
    ) -> H2Body {
        H2Body {
            shared,
            stream,
            remaining: content_length,
            expect_continue,
        }
    }

    /// The next frame of the body.
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ConnError>>> {
        let mut g = self.shared.lock();
        if !g.data.is_empty() {
            let data = g.data.split().freeze();
            g.taken += data.len();
            drop(g);
            self.expect_continue = false;
            self.stream.wake_by_ref();
            if let Some(r) = &mut self.remaining {
                *r = r.saturating_sub(data.len() as u64);
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if matches!(g.end, H2End::Open) {
            if !g.reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                g.reader = Some(cx.waker().clone());
            }
            if std::mem::take(&mut self.expect_continue) {
                g.continue_asked = true;
                drop(g);
                self.stream.wake_by_ref();
            }
            return Poll::Pending;
        }
        match &mut g.end {
            H2End::Open => Poll::Pending,
            H2End::Done(trailers) => Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t)))),
            H2End::Early => Poll::Ready(None),
            H2End::Failed(why) => Poll::Ready(Some(Err(why.clone().into()))),
        }
    }

    /// Whether nothing more will come.
    pub fn is_end_stream(&self) -> bool {
        let g = self.shared.lock();
        g.data.is_empty() && matches!(g.end, H2End::Done(None) | H2End::Early)
    }

    /// The exact size left when the request declared it.
    pub fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for H2Body {
    fn drop(&mut self) {
        self.shared.lock().dropped = true;
        self.stream.wake_by_ref();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A sink that records each write's size.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<usize>>>);

    impl std::io::Write for Recorder {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(b.len());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A body of data frames of these sizes.
    struct Frames(std::collections::VecDeque<usize>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(
                self.0
                    .pop_front()
                    .map(|n| Ok(Frame::data(Bytes::from(vec![7u8; n])))),
            )
        }
    }

    fn frames(sizes: &[usize]) -> Frames {
        Frames(sizes.iter().copied().collect())
    }

    #[tokio::test]
    async fn writes_whole_buffers_and_the_rest_at_the_end() {
        let rec = Recorder::default();
        let sizes = [100 * 1024; 7];
        let out = stream_into(frames(&sizes), rec.clone(), 1 << 30)
            .await
            .unwrap();
        let writes = out.0.lock().unwrap().clone();
        assert_eq!(writes.iter().sum::<usize>(), 700 * 1024);
        assert!(
            writes.iter().all(|&w| w <= WRITE_CHUNK + 100 * 1024),
            "{writes:?}"
        );
        assert!(writes.len() >= 2, "{writes:?}");
    }

    #[tokio::test]
    async fn refuses_past_the_limit_before_writing_it() {
        let rec = Recorder::default();
        let e = stream_into(frames(&[1000, 1000]), rec.clone(), 1500).await;
        assert!(matches!(e, Err(StreamError::TooLarge { limit: 1500 })));
        assert_eq!(rec.0.lock().unwrap().iter().sum::<usize>(), 0);
    }

    #[tokio::test]
    async fn an_empty_body_is_an_empty_sink() {
        let rec = Recorder::default();
        let out = stream_into(frames(&[]), rec, 10).await.unwrap();
        assert_eq!(out.0.lock().unwrap().iter().sum::<usize>(), 0);
    }

    use std::task::Wake;

    struct Count(std::sync::atomic::AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn bytes_taken_are_counted_and_a_dropped_reader_gives_back_the_rest() {
        let stream = Arc::new(Count(Default::default()));
        let shared = H2Shared::new();
        let mut body = H2Body::new(shared.clone(), Waker::from(stream.clone()), Some(5), false);
        let reader = Waker::from(Arc::new(Count(Default::default())));
        let mut cx = Context::from_waker(&reader);
        assert!(body.poll_frame(&mut cx).is_pending());
        // Two frames received before a read: one piece, in one buffer of the stream's own
        // (not slices of the connection's read buffer).
        let frame = Bytes::from("xabx");
        assert!(shared.push(&frame.slice(1..3)));
        assert!(shared.push(&Bytes::from("c")));
        let Poll::Ready(Some(Ok(f))) = body.poll_frame(&mut cx) else {
            panic!()
        };
        let got = f.into_data().unwrap();
        assert_eq!(got, "abc");
        assert!(!frame.as_ptr_range().contains(&got.as_ptr()));
        assert_eq!(body.size_hint().exact(), Some(2));
        assert!(shared.push(&Bytes::from("de")));
        assert_eq!(stream.0.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(shared.take_taken(), (3, false));
        drop(body);
        // "de" was never taken: it is given back with the news that the reader is gone.
        assert_eq!(shared.take_taken(), (2, true));
        assert!(!shared.push(&Bytes::from("more")));
    }

    #[test]
    fn the_end_trailers_and_failures_reach_the_reader() {
        let w = Waker::from(Arc::new(Count(Default::default())));
        let mut cx = Context::from_waker(&w);
        let shared = H2Shared::new();
        let mut body = H2Body::new(shared.clone(), w.clone(), None, false);
        let mut t = HeaderMap::new();
        t.insert("x-sum", "1".parse().unwrap());
        shared.end(Some(t));
        shared.fail("late".into()); // after the end: ignored
        assert!(!body.is_end_stream());
        let Poll::Ready(Some(Ok(f))) = body.poll_frame(&mut cx) else {
            panic!()
        };
        assert!(f.is_trailers());
        assert!(matches!(body.poll_frame(&mut cx), Poll::Ready(None)));

        let shared = H2Shared::new();
        let mut body = H2Body::new(shared.clone(), w.clone(), None, false);
        shared.fail("reset".into());
        assert!(matches!(
            body.poll_frame(&mut cx),
            Poll::Ready(Some(Err(_)))
        ));

        let shared = H2Shared::new();
        let mut body = H2Body::new(shared.clone(), w.clone(), None, false);
        shared.end_early();
        assert!(body.is_end_stream());
        assert!(matches!(body.poll_frame(&mut cx), Poll::Ready(None)));
    }

    /// `Expect: 100-continue`: the first wait for a body the client holds back asks the
    /// connection for one interim 100, once; a body already arriving asks for none.
    #[test]
    fn a_held_back_body_asks_for_one_interim_100() {
        let w = Waker::from(Arc::new(Count(Default::default())));
        let mut cx = Context::from_waker(&w);
        let stream = Arc::new(Count(Default::default()));
        let shared = H2Shared::new();
        let mut body = H2Body::new(shared.clone(), Waker::from(stream.clone()), Some(2), true);
        assert!(!shared.take_continue());
        assert!(body.poll_frame(&mut cx).is_pending());
        assert_eq!(stream.0.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(shared.take_continue());
        assert!(body.poll_frame(&mut cx).is_pending());
        assert!(!shared.take_continue(), "asked once");

        let shared = H2Shared::new();
        let mut body = H2Body::new(shared.clone(), w.clone(), Some(2), true);
        assert!(shared.push(b"a"));
        assert!(body.poll_frame(&mut cx).is_ready());
        assert!(body.poll_frame(&mut cx).is_pending());
        assert!(!shared.take_continue(), "the body is on its way");

        let shared = H2Shared::new();
        let mut body = H2Body::new(shared.clone(), w.clone(), Some(2), false);
        assert!(body.poll_frame(&mut cx).is_pending());
        assert!(!shared.take_continue(), "no Expect, no 100");
    }
}
