//! The upstream side: keep-alive HTTP/1.1 connections to backends, pooled per worker thread,
//! each driven by hyper's client connection (`hyper::client::conn::http1`).
//!
//! A pool's [`Clients`] hold, on each thread that sends its requests, a list of idle
//! connections per backend address. A request takes the most recently used idle connection
//! (or opens one within `connect_timeout`), and its connection comes back when the response
//! body has been read to its end ([`UpstreamBody`]); a body dropped before its end drops the
//! connection. A connection the backend closed while idle is found closed and dropped; a
//! request that could not be written on it (the backend closed it just then) is sent again on
//! a new connection, as nothing of it reached the backend. Requests, their connections and
//! responses stay on one thread, as in nginx's workers: no wake-up crosses threads.
#![allow(clippy::disallowed_methods)] // I/O shell: idle ages of pooled connections

use std::cell::RefCell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use super::body::RequestBody;

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
        source: std::io::Error,
    },
    /// The request target names no backend address.
    #[error("the request names no backend address")]
    NoAddress,
    /// The exchange failed once the connection was open.
    #[error(transparent)]
    Request(#[from] hyper::Error),
}

impl UpstreamError {
    /// Whether no connection could be made (nothing reached the backend).
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. } | UpstreamError::NoAddress
        )
    }
}

/// The clients of one pool, one connection pool per thread that sends its requests. Cloning
/// shares them (a reload that keeps the pool keeps its connections).
#[derive(Clone, Debug)]
pub struct Clients(Arc<Settings>);

#[derive(Debug)]
struct Settings {
    connect_timeout: Duration,
}

/// Idle connections to one backend, most recently used last.
struct Idle {
    addr: SocketAddr,
    conns: Vec<(SendRequest<RequestBody>, Instant)>,
}

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
}

impl Clients {
    /// Clients whose connects give up after `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Clients {
        Clients(Arc::new(Settings { connect_timeout }))
    }

    /// Sends `req` (its URI's authority is the backend's address) on a pooled connection of
    /// this thread or a new one.
    pub async fn request(
        &self,
        mut req: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let addr: SocketAddr = req
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse().ok())
            .ok_or(UpstreamError::NoAddress)?;
        // A pooled connection, while one takes the request; then a new one.
        while let Some(mut sender) = self.checkout(addr) {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.pooled(resp, sender, addr)),
                Err(mut e) => match e.take_message() {
                    // Not written: the backend had closed the connection. Try another.
                    Some(back) => {
                        debug!(backend.addr = %addr, error = %e.error(), "pooled connection closed; request not sent, trying another");
                        req = back;
                    }
                    None => return Err(UpstreamError::Request(e.into_error())),
                },
            }
        }
        let mut sender = self.connect(addr).await?;
        let resp = sender.send_request(req).await?;
        Ok(self.pooled(resp, sender, addr))
    }

    fn pooled(
        &self,
        resp: Response<Incoming>,
        sender: SendRequest<RequestBody>,
        addr: SocketAddr,
    ) -> Response<UpstreamBody> {
        resp.map(|inner| UpstreamBody {
            inner,
            back: Some(Back {
                sender,
                addr,
                owner: self.0.clone(),
            }),
        })
    }

    async fn connect(&self, addr: SocketAddr) -> Result<SendRequest<RequestBody>, UpstreamError> {
        let err = |source| UpstreamError::Connect { addr, source };
        let stream = tokio::time::timeout(self.0.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ))
            })?
            .map_err(err)?;
        stream.set_nodelay(true).map_err(err)?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(backend.addr = %addr, error = %e, "backend connection ended");
            }
        });
        Ok(sender)
    }

    /// The most recently used idle connection to `addr` on this thread that is still open.
    fn checkout(&self, addr: SocketAddr) -> Option<SendRequest<RequestBody>> {
        LOCAL.with(|local| {
            let mut local = local.borrow_mut();
            let key = Arc::as_ptr(&self.0);
            let pool = local.iter_mut().find(|p| p.owner.as_ptr() == key)?;
            let idle = pool.backends.iter_mut().find(|b| b.addr == addr)?;
            let now = Instant::now();
            while let Some((sender, since)) = idle.conns.pop() {
                if !sender.is_closed() && now.duration_since(since) < POOL_IDLE {
                    return Some(sender);
                }
            }
            None
        })
    }
}

/// What returns a connection to its pool.
struct Back {
    sender: SendRequest<RequestBody>,
    addr: SocketAddr,
    owner: Arc<Settings>,
}

impl Back {
    fn checkin(self) {
        let Back {
            sender,
            addr,
            owner,
        } = self;
        if sender.is_closed() {
            return;
        }
        let _ = LOCAL.try_with(|local| {
            let mut local = local.borrow_mut();
            let key = Arc::as_ptr(&owner);
            let i = match local.iter().position(|p| p.owner.as_ptr() == key) {
                Some(i) => i,
                None => {
                    local.retain(|p| p.owner.strong_count() > 0);
                    local.push(ThreadPool {
                        owner: Arc::downgrade(&owner),
                        backends: Vec::new(),
                    });
                    local.len() - 1
                }
            };
            let pool = &mut local[i];
            let idle = match pool.backends.iter().position(|b| b.addr == addr) {
                Some(j) => &mut pool.backends[j],
                None => {
                    pool.backends.push(Idle {
                        addr,
                        conns: Vec::new(),
                    });
                    pool.backends.last_mut().expect("just pushed")
                }
            };
            if idle.conns.len() >= POOL_MAX_IDLE {
                idle.conns.remove(0);
            }
            idle.conns.push((sender, Instant::now()));
        });
    }
}

/// A backend's response body; its connection goes back to the pool once the body has been
/// read to its end (also when it is dropped then: a HEAD or 304 answer has an empty one).
pub struct UpstreamBody {
    inner: Incoming,
    back: Option<Back>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("pooled", &self.back.is_some())
            .finish()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some(back) = self.back.take() {
            if self.inner.is_end_stream() {
                back.checkin();
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => {
                if let Some(back) = self.back.take() {
                    back.checkin();
                }
            }
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl UpstreamBody {
    /// The backend's upgraded connection after a `101` (the connection leaves the pool).
    pub fn on_upgrade(resp: &mut Response<UpstreamBody>) -> hyper::upgrade::OnUpgrade {
        resp.body_mut().back = None;
        hyper::upgrade::on(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend answering `n` keep-alive requests per connection with "ok"; counts accepts.
    async fn backend() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let a = accepts.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
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
                            seen.drain(..end + 4);
                            if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepts)
    }

    fn get(addr: SocketAddr) -> Request<RequestBody> {
        Request::get(format!("http://{addr}/"))
            .body(RequestBody::Empty)
            .unwrap()
    }

    #[tokio::test]
    async fn a_read_response_gives_its_connection_back() {
        use http_body_util::BodyExt;
        let (addr, accepts) = backend().await;
        let clients = Clients::new(Duration::from_secs(1));
        for _ in 0..5 {
            let resp = clients.request(get(addr)).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "ok");
        }
        assert_eq!(
            accepts.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one connection reused"
        );
        // A body dropped before its end takes its connection with it.
        let resp = clients.request(get(addr)).await.unwrap();
        drop(resp);
        let resp = clients.request(get(addr)).await.unwrap();
        let _ = resp.into_body().collect().await.unwrap();
        assert!(accepts.load(std::sync::atomic::Ordering::SeqCst) <= 2);
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = Clients::new(Duration::from_secs(1))
            .request(get(addr))
            .await
            .unwrap_err();
        assert!(e.is_connect(), "{e}");
    }
}
