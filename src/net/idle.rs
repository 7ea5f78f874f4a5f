//! Closes client connections that move no bytes either way for a while (keep-alive idle
//! timeout), for HTTP/1.1 and h2 alike, and HTTP/1.1 connections that take too long to send
//! a request head (the header-read timeout), on one lazy timer per connection.
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
    /// An I/O stream that fails reads with `TimedOut` after `idle` without any traffic, and
    /// (for HTTP/1.1) when a request head is awaited for longer than the head deadline.
    pub struct IdleIo<T> {
        #[pin]
        inner: T,
        timer: Timer,
    }
}

/// The timer of an [`IdleIo`]: polled whenever a read, a write, a flush or a shutdown waits,
/// so a connection that waits on the client either way (an HTTP/2 connection that stopped
/// reading for a client that does not read, a TLS close the client never takes) ends too.
struct Timer {
    // Boxed so that the wrapper stays `Unpin` like the stream it wraps.
    sleep: Pin<Box<Sleep>>,
    // The timer's period: the idle time, or the head deadline when that is shorter.
    period: Duration,
    // Periods of silence that end the connection (`u32::MAX`: never).
    idle_periods: u32,
    // Consecutive periods without a byte.
    silent: u32,
    // Set by every read or write that moves bytes; the timer checks and clears it. This
    // keeps clock reads and timer updates off the data path: a connection closes after
    // `idle` to `idle + period` of silence.
    active: bool,
    // A request head is awaited: since before the last tick (`Seen`) or since after it.
    head: Head,
}

impl Timer {
    /// Ready with the error that ends the connection when the timer says so; else the timer
    /// is armed for its next tick.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            ready!(self.sleep.as_mut().poll(cx));
            match self.head {
                Head::Seen => {
                    return Poll::Ready(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request head within the header-read timeout",
                    ))
                }
                Head::Waiting => self.head = Head::Seen,
                Head::None => {}
            }
            if std::mem::take(&mut self.active) {
                self.silent = 0;
            } else {
                self.silent = self.silent.saturating_add(1);
                if self.silent >= self.idle_periods {
                    return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"));
                }
            }
            let next = Instant::now() + self.period;
            self.sleep.as_mut().reset(next);
        }
    }

    /// `r`, a write's result: bytes moved count as traffic; a wait is checked against the
    /// timer.
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.active = true;
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => self.poll_expired(cx).map(Err),
            r => r,
        }
    }

    /// `r`, a flush's or a shutdown's result: a wait is checked against the timer.
    fn waited(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<()>>) -> Poll<io::Result<()>> {
        match r {
            Poll::Pending => self.poll_expired(cx).map(Err),
            r => r,
        }
    }
}

/// Where the wait for a request head stands, as the timer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    None,
    Waiting,
    Seen,
}

impl<T> IdleIo<T> {
    /// Wraps `inner`: silence for `idle` ends it.
    pub fn new(inner: T, idle: Duration) -> Self {
        Self::with_head_deadline(inner, Some(idle), idle)
    }

    /// Wraps `inner` for an HTTP/1.1 connection: silence for `idle` (if any) ends it, and so
    /// does a wait for a request head ([`IdleIo::head_started`]) longer than `head`: it is
    /// cut between `head` and twice `head`, with one timer per connection that is never
    /// touched per request.
    pub fn with_head_deadline(inner: T, idle: Option<Duration>, head: Duration) -> Self {
        let head = head.max(Duration::from_millis(1));
        let period = idle.map_or(head, |i| i.min(head));
        let idle_periods = idle.map_or(u32::MAX, |i| {
            u32::try_from(i.as_nanos().div_ceil(period.as_nanos())).unwrap_or(u32::MAX)
        });
        IdleIo {
            inner,
            timer: Timer {
                sleep: Box::pin(tokio::time::sleep_until(Instant::now() + period)),
                period,
                idle_periods,
                silent: 0,
                active: false,
                head: Head::None,
            },
        }
    }

    /// The stream without the timer.
    pub fn into_inner(self) -> T {
        self.inner
    }

    /// A request head is now awaited.
    pub fn head_started(&mut self) {
        self.timer.head = Head::Waiting;
    }

    /// The request head arrived.
    pub fn head_done(&mut self) {
        self.timer.head = Head::None;
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
                    this.timer.active = true;
                }
                Poll::Ready(r)
            }
            Poll::Pending => this.timer.poll_expired(cx).map(Err),
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
        this.timer.wrote(cx, r)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let r = this.inner.poll_flush(cx);
        this.timer.waited(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let r = this.inner.poll_shutdown(cx);
        this.timer.waited(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        this.timer.wrote(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
