//! Buffers a connection borrows only while bytes are in flight, from a pool of this thread.
//!
//! An idle keep-alive connection holds no buffer: it waits for readiness, and a read is made
//! into a buffer taken from the pool at that moment and given back when it read nothing or
//! everything it read has been used. Memory therefore follows the requests in flight, not
//! the connections open (HAProxy's and Pingora's approach; hyper keeps 8 KiB per connection
//! for its life).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Size of a pooled buffer; a request head may grow one up to the head limit.
pub const BUF_SIZE: usize = 16 * 1024;
/// Buffers kept per thread for reuse.
const POOL_MAX: usize = 256;

thread_local! {
    /// Read buffers: `BUF_SIZE` bytes long, zeroed once.
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    /// Write buffers: empty, `BUF_SIZE` bytes of capacity.
    static OUT_POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A zeroed buffer of `BUF_SIZE` bytes (its length is its size; zeroed once, then reused).
fn take() -> Vec<u8> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0; BUF_SIZE])
}

fn give(v: Vec<u8>) {
    if v.len() != BUF_SIZE {
        return;
    }
    let _ = POOL.try_with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(v);
        }
    });
}

/// Bytes read and not yet used: `start..end` of a pooled buffer, or nothing.
#[derive(Default)]
pub struct InBuf {
    buf: Option<Vec<u8>>,
    start: usize,
    end: usize,
}

impl Drop for InBuf {
    fn drop(&mut self) {
        self.release();
    }
}

impl InBuf {
    /// The bytes not yet used.
    pub fn bytes(&self) -> &[u8] {
        match &self.buf {
            Some(v) => &v[self.start..self.end],
            None => &[],
        }
    }

    /// Whether no byte waits.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Marks `n` bytes used; the buffer goes back to the pool once all are.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.release();
        }
    }

    /// Takes every waiting byte out (for a connection handed to another protocol).
    pub fn take_all(&mut self) -> bytes::Bytes {
        let b = bytes::Bytes::copy_from_slice(self.bytes());
        self.release();
        b
    }

    fn release(&mut self) {
        if let Some(v) = self.buf.take() {
            give(v);
        }
        self.start = 0;
        self.end = 0;
    }

    /// Reads once from `io` into free space (growing the buffer up to `max` bytes waiting):
    /// the bytes read, 0 at end of stream. The buffer is only held while it has bytes.
    pub fn poll_read<I: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut I,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        let v = self.buf.get_or_insert_with(take);
        if self.end == v.len() && self.start > 0 {
            v.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == v.len() {
            if self.end >= max {
                return Poll::Ready(Err(io::Error::other("buffer full")));
            }
            let grown = (v.len() * 2).min(max);
            v.resize(grown, 0);
        }
        let mut rb = ReadBuf::new(&mut v[self.end..]);
        let r = Pin::new(io).poll_read(cx, &mut rb);
        let n = rb.filled().len();
        self.end += n;
        if self.start == self.end {
            self.release();
        }
        match r {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(n)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// [`InBuf::poll_read`] as a future.
    pub async fn read<I: AsyncRead + Unpin>(
        &mut self,
        io: &mut I,
        max: usize,
    ) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read(cx, io, max)).await
    }
}

/// A pooled buffer for one response's bytes on their way out.
pub struct OutBuf(pub Vec<u8>);

impl OutBuf {
    /// An empty buffer from the pool.
    pub fn new() -> OutBuf {
        OutBuf(
            OUT_POOL
                .with(|p| p.borrow_mut().pop())
                .unwrap_or_else(|| Vec::with_capacity(BUF_SIZE)),
        )
    }
}

impl Default for OutBuf {
    fn default() -> Self {
        OutBuf::new()
    }
}

impl Drop for OutBuf {
    fn drop(&mut self) {
        let mut v = std::mem::take(&mut self.0);
        if v.capacity() >= BUF_SIZE && v.capacity() <= 2 * BUF_SIZE {
            v.clear();
            let _ = OUT_POOL.try_with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOL_MAX {
                    p.push(v);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_buffer_is_held_only_while_bytes_wait() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let mut buf = InBuf::default();
        tokio::io::AsyncWriteExt::write_all(&mut b, b"hello")
            .await
            .unwrap();
        assert_eq!(buf.read(&mut a, 1024).await.unwrap(), 5);
        assert_eq!(buf.bytes(), b"hello");
        buf.consume(2);
        assert_eq!(buf.bytes(), b"llo");
        buf.consume(3);
        assert!(buf.buf.is_none(), "given back once used");
        // A read that finds nothing leaves no buffer behind either.
        let pending =
            std::future::poll_fn(|cx| Poll::Ready(buf.poll_read(cx, &mut a, 1024).is_pending()))
                .await;
        assert!(pending);
        assert!(buf.buf.is_none());
        drop(b);
        assert_eq!(buf.read(&mut a, 1024).await.unwrap(), 0);
        assert!(buf.buf.is_none());
    }

    #[tokio::test]
    async fn grows_up_to_the_limit_then_refuses() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        tokio::io::AsyncWriteExt::write_all(&mut b, &vec![b'x'; 3 * BUF_SIZE])
            .await
            .unwrap();
        let mut buf = InBuf::default();
        let mut got = 0;
        while got < 2 * BUF_SIZE {
            got += buf.read(&mut a, 2 * BUF_SIZE).await.unwrap();
        }
        assert_eq!(buf.bytes().len(), 2 * BUF_SIZE);
        assert!(buf.read(&mut a, 2 * BUF_SIZE).await.is_err());
    }
}
