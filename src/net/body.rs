//! Body types of the proxy (streamed frame by frame in both directions, never buffered whole)
//! and [`read_body`], the one reader of a whole, bounded request body (the sync hub's and the
//! agent's APIs).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// What goes back to the client: a backend's streamed body or a short local one.
pub type ResponseBody = Either<Incoming, Full<Bytes>>;

/// A short local response body.
pub fn local(text: impl Into<Bytes>) -> ResponseBody {
    Either::Right(Full::new(text.into()))
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
        inner: Incoming,
        /// Raised when reading the client's body failed.
        client_failed: Arc<AtomicBool>,
    },
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
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
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge { limit }),
        Err(e) => Err(BodyError::Read(e.to_string())),
    }
}
