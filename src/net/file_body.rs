//! A response body of bytes in memory or of a file streamed from disk in chunks, so a large
//! blob never sits in memory whole: the agent serves releases with it, the hub its blobs.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, ReadBuf};

/// Bytes read from disk per body frame for files not kept in memory.
const CHUNK: usize = 64 * 1024;

/// A response body: bytes in memory, or a blob streamed from the store.
#[derive(Debug)]
pub enum Body {
    /// In memory (or empty).
    Bytes(Option<Bytes>),
    /// Read from a blob file in chunks.
    File {
        /// The open blob.
        file: tokio::fs::File,
        /// Bytes still to send.
        remaining: u64,
        /// Read buffer.
        buf: Vec<u8>,
    },
}

impl Body {
    /// No body.
    pub fn empty() -> Body {
        Body::Bytes(None)
    }

    /// Bytes in memory.
    pub fn bytes(b: impl Into<Bytes>) -> Body {
        Body::Bytes(Some(b.into()))
    }

    /// The first `len` bytes of `file`, read a chunk at a time as the client takes them.
    pub fn file(file: std::fs::File, len: u64) -> Body {
        Body::File {
            file: tokio::fs::File::from_std(file),
            remaining: len,
            buf: Vec::new(),
        }
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Body {
        Body::Bytes(Some(b))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            Body::Bytes(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::File {
                file,
                remaining,
                buf,
            } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                let want = (*remaining).min(CHUNK as u64) as usize;
                buf.resize(want, 0);
                let mut rb = ReadBuf::new(&mut buf[..want]);
                match Pin::new(file).poll_read(cx, &mut rb) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
                    Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                        // Shorter than the manifest says: end the response broken rather
                        // than pretend it is whole.
                        Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "blob shorter than its manifest entry",
                        ))))
                    }
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        *remaining -= n as u64;
                        Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(&buf[..n])))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Bytes(b) => b.as_ref().is_none_or(|b| b.is_empty()),
            Body::File { remaining, .. } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Bytes(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::File { remaining, .. } => SizeHint::with_exact(*remaining),
        }
    }
}
