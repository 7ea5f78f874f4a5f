//! Closes client connections that move no bytes either way for a while (keep-alive idle
//! timeout), for HTTP/1.1 and h2 alike.
#![allow(clippy::disallowed_methods)] // I/O shell: the idle timer

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

pin_project! {
    /// An I/O stream that fails reads with `TimedOut` after `idle` without any traffic.
    pub struct IdleIo<T> {
        #[pin]
        inner: T,
        // Boxed so that the wrapper stays `Unpin` like the stream it wraps.
        sleep: Pin<Box<Sleep>>,
        idle: Duration,
        // Set by every read or write that moves bytes; the timer checks and clears it. This
        // keeps clock reads off the data path: a connection closes after `idle` to `2 × idle`
        // of silence.
        active: bool,
    }
}

impl<T> IdleIo<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, idle: Duration) -> Self {
        IdleIo {
            inner,
            sleep: Box::pin(tokio::time::sleep_until(Instant::now() + idle)),
            idle,
            active: false,
        }
    }
}

impl<T> IdleIo<T> {
    /// The stream without the timer.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead> AsyncRead for IdleIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        match this.inner.poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    *this.active = true;
                }
                Poll::Ready(r)
            }
            Poll::Pending => loop {
                ready!(this.sleep.as_mut().poll(cx));
                if !std::mem::take(this.active) {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "idle timeout",
                    )));
                }
                let next = Instant::now() + *this.idle;
                this.sleep.as_mut().reset(next);
            },
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for IdleIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            if *n > 0 {
                *this.active = true;
            }
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            if *n > 0 {
                *this.active = true;
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
