//! One HTTP connection served, and [`HttpServer`]: the accept loop with connection serving that
//! the admin, sync hub, agent and demo listeners share (the proxy listener uses
//! [`serve_connection`] under its own accept callback, which reads its settings per accept).
//!
//! A connection: optional TLS handshake within the header-read deadline (ALPN decides h2 or
//! HTTP/1.1, and only that one is spoken), then HTTP/1.1 by lockstep's own connection
//! ([`super::h1`]: no buffer held while idle) or HTTP/2 by [`super::h2`] (after ALPN `h2`, on
//! an `http2_only` listener, or when a plain connection opens with the h2 preface). Every
//! handler takes a `Request<ClientBody>` whichever protocol carried it. At shutdown the
//! connection finishes the requests in flight and closes; the caller bounds how long through
//! its `TaskTracker`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;

use http::{Request, Response};
use hyper::service::service_fn;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, debug_span, Instrument};

use super::accept::{accept_loop, Accepted};
use super::body::{ClientBody, ConnError};
use super::idle::IdleIo;
use super::limit::{Cap, ConnGate, Permit};
use super::tls::PeerCertificate;
use super::{h1, h2};

/// Default cap on a control-plane listener's open connections (admin, sync, agent).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// A service that answers every request of a connection (never fails: errors are answers).
pub trait Handler<B>:
    hyper::service::Service<
        Request<ClientBody>,
        Response = Response<B>,
        Error = Infallible,
        Future: Send + 'static,
    > + Send
    + Sync
    + 'static
{
}

impl<S, B> Handler<B> for S where
    S: hyper::service::Service<
            Request<ClientBody>,
            Response = Response<B>,
            Error = Infallible,
            Future: Send + 'static,
        > + Send
        + Sync
        + 'static
{
}

/// A response body hyper can send on any runtime thread.
pub trait ResponseBody:
    http_body::Body<Data: Send, Error: Into<ConnError> + Send> + Send + 'static
{
}

impl<B> ResponseBody for B where
    B: http_body::Body<Data: Send, Error: Into<ConnError> + Send> + Send + 'static
{
}

/// Default idle timeout of a control-plane connection: longer than a schedule long poll
/// holds a request without a byte (25 s), short enough that idle or dead clients (h1 and h2
/// alike: every byte counts, so no h2 PING is needed to find a dead peer) give their
/// descriptor back.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(60);

/// Largest request head (request line + headers) accepted; bigger ones get 431.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How connections of one listener are served.
#[derive(Clone, Debug)]
pub struct ConnSettings {
    /// Time a client may take to finish the TLS handshake and to send a request head.
    pub header_read_timeout: Duration,
    /// Close a connection that moves no bytes for this long (none: only the peer closes it).
    pub idle_timeout: Option<Duration>,
    /// Most concurrent h2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Speak HTTP/2 only (h2c by prior knowledge on a plain listener): anything else is a
    /// connection error, answered GOAWAY.
    pub http2_only: bool,
}

impl Default for ConnSettings {
    fn default() -> ConnSettings {
        ConnSettings {
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Some(DEFAULT_IDLE),
            max_concurrent_streams: 256,
            http2_only: false,
        }
    }
}

impl ConnSettings {
    fn h1(&self) -> h1::Options {
        h1::Options {
            idle_timeout: self.idle_timeout,
            max_head: MAX_HEAD_BYTES,
        }
    }

    fn h2(&self) -> h2::Options {
        h2::Options {
            max_concurrent_streams: self.max_concurrent_streams,
            max_header_list_size: MAX_HEAD_BYTES as u32,
        }
    }
}

/// Serves one accepted connection: TLS when `tls` is set, then HTTP until the peer closes or
/// `shutdown` (then gracefully); `permit`, its place under the listener's cap, is given back
/// when it ends. Errors are logged at `debug`: a client going away is normal.
///
/// This is the whole future of an idle keep-alive connection, so it is kept small: it takes
/// everything by value (no wrapping async block keeping copies), the TLS and HTTP/2 paths are
/// boxed, and it is an `async` block rather than an `async fn` (whose arguments the compiler
/// stores twice in the future: as passed and as locals; a block's captures are used in place).
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub fn serve_connection<S, B>(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    settings: ConnSettings,
    svc: S,
    shutdown: CancellationToken,
    permit: Permit,
) -> impl Future<Output = ()> + Send
where
    S: Handler<B>,
    B: ResponseBody,
{
    async move {
        let result = match tls {
            None => serve_io(stream, &settings, svc, &shutdown, None, settings.http2_only).await,
            Some(acceptor) => {
                match Box::pin(serve_tls(stream, acceptor, &settings, svc, &shutdown)).await {
                    Some(r) => r,
                    None => return,
                }
            }
        };
        if let Err(e) = result {
            debug!(error = %e, "connection ended with an error");
        }
        drop(permit);
    }
}

/// The TLS handshake within the header-read deadline, then HTTP as ALPN agreed; `None` when
/// the handshake failed or timed out (logged).
async fn serve_tls<S, B>(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    settings: &ConnSettings,
    svc: S,
    shutdown: &CancellationToken,
) -> Option<Result<(), ConnError>>
where
    S: Handler<B>,
    B: ResponseBody,
{
    let tls =
        match tokio::time::timeout(settings.header_read_timeout, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                debug!(error = %e, "TLS handshake failed");
                return None;
            }
            Err(_) => {
                debug!("TLS handshake timed out");
                return None;
            }
        };
    let alpn = tls.get_ref().1.alpn_protocol();
    if alpn == Some(super::acme::ACME_TLS_ALPN) {
        // A TLS-ALPN-01 validation: the handshake was the answer (RFC 8737 §3).
        debug!("ACME TLS-ALPN-01 validation handshake done");
        return None;
    }
    // ALPN decided the protocol: a client that agreed on h2 and sends anything but the h2
    // preface gets a GOAWAY, not an HTTP/1.1 answer (RFC 9113 §3.4).
    let h2 = settings.http2_only || alpn == Some(b"h2");
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| PeerCertificate(Arc::new(c.clone().into_owned())));
    Some(serve_io(tls, settings, svc, shutdown, cert, h2).await)
}

/// HTTP on an established stream: HTTP/1.1 (h2c when it opens with the preface), or
/// HTTP/2 only when `h2`. (An `async` block for the reason [`serve_connection`] gives.)
#[allow(clippy::manual_async_fn)] // on purpose: see `serve_connection`
fn serve_io<'a, I, S, B>(
    io: I,
    settings: &'a ConnSettings,
    svc: S,
    shutdown: &'a CancellationToken,
    cert: Option<PeerCertificate>,
    h2: bool,
) -> impl Future<Output = Result<(), ConnError>> + Send + 'a
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Handler<B>,
    B: ResponseBody,
{
    async move {
        if h2 {
            return Box::pin(serve_h2(io, Bytes::new(), settings, svc, shutdown, cert)).await;
        }
        let opts = settings.h1();
        let io =
            IdleIo::with_head_deadline(io, settings.idle_timeout, settings.header_read_timeout);
        let ended = match h1::serve(io, &svc, &opts, shutdown, cert.as_ref()).await? {
            h1::Ended::Closed => return Ok(()),
            h1::Ended::H2(io, read) => (io.into_inner(), read),
        };
        Box::pin(serve_h2(ended.0, ended.1, settings, svc, shutdown, cert)).await
    }
}

/// HTTP/2 on `io` (after `read`, bytes already taken from it) until it ends; at `shutdown`,
/// the streams in flight finish and the connection closes (GOAWAY).
async fn serve_h2<I, S, B>(
    io: I,
    read: Bytes,
    settings: &ConnSettings,
    svc: S,
    shutdown: &CancellationToken,
    cert: Option<PeerCertificate>,
) -> Result<(), ConnError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Handler<B>,
    B: ResponseBody,
{
    let io = h1::Rewind::new(io, read);
    let opts = settings.h2();
    match settings.idle_timeout {
        Some(idle) => h2::serve(IdleIo::new(io, idle), opts, &svc, shutdown, cert.as_ref()).await,
        None => h2::serve(io, opts, &svc, shutdown, cert.as_ref()).await,
    }
}

/// TLS of an [`HttpServer`].
#[derive(Clone)]
pub struct ServerTls {
    /// The rustls config, read at each accept: a reload swaps it (new certificates, a new
    /// revocation list) without a restart.
    pub config: Arc<ArcSwap<rustls::ServerConfig>>,
    /// Also serve plain HTTP on the same port, told apart by the first byte (a TLS handshake
    /// starts with 0x16, an HTTP request with a letter): an agent serves its content in plain
    /// HTTP to the local web server and speaks TLS with its peers.
    pub plaintext_too: bool,
}

impl ServerTls {
    /// TLS only, with `config`.
    pub fn only(config: Arc<rustls::ServerConfig>) -> ServerTls {
        ServerTls {
            config: Arc::new(ArcSwap::new(config)),
            plaintext_too: false,
        }
    }

    /// The acceptor for a connection starting now: `None` for a plain-HTTP one.
    async fn acceptor(&self, stream: &TcpStream, deadline: Duration) -> Option<TlsAcceptor> {
        if self.plaintext_too {
            let mut first = [0u8; 1];
            match tokio::time::timeout(deadline, stream.peek(&mut first)).await {
                Ok(Ok(1)) if first[0] == 0x16 => {}
                _ => return None,
            }
        }
        Some(TlsAcceptor::from(self.config.load_full()))
    }
}

/// An HTTP listener: the accept loop and [`serve_connection`] for every connection, all
/// answered by one handler.
#[derive(Clone)]
pub struct HttpServer {
    /// Names the listener in logs ("admin", "sync", "agent", …).
    pub name: &'static str,
    /// TLS, when the listener terminates it.
    pub tls: Option<ServerTls>,
    /// Timeouts and limits of each connection.
    pub settings: ConnSettings,
    /// Most connections open at once (more are closed at accept and counted), with the
    /// open-connection count and refusals (metrics registered by the owner).
    pub cap: Cap,
    /// Its connections pass [`super::slice::checkpoint`]s (on a thread on short slices, a
    /// flood of them leaves the core to the proxy's workers). Not for a listener whose
    /// connections carry bulk transfers, which the pauses would halve (the hub's blobs).
    pub sliced: bool,
}

impl HttpServer {
    /// A plain-HTTP listener named `name` with default settings.
    pub fn new(name: &'static str) -> HttpServer {
        HttpServer {
            name,
            tls: None,
            settings: ConnSettings::default(),
            cap: Cap::new(DEFAULT_MAX_CONNECTIONS, ConnGate::default()),
            sliced: false,
        }
    }

    /// Accepts on `listener` until `shutdown`, answering every request with
    /// `handler(peer, request)`; connections run on `tracker` and finish their requests in
    /// flight when `shutdown` fires.
    pub async fn serve<H, Fut, B>(
        &self,
        listener: TcpListener,
        handler: H,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) where
        H: Fn(SocketAddr, Request<ClientBody>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<B>> + Send + 'static,
        B: ResponseBody,
    {
        let sliced = self.sliced;
        accept_loop(&listener, self.name, &shutdown, &tracker, |stream, peer| {
            let Some(permit) = self.cap.admit() else {
                return Accepted::refuse(stream);
            };
            let (handler, tls, settings, shutdown) = (
                handler.clone(),
                self.tls.clone(),
                self.settings.clone(),
                shutdown.clone(),
            );
            let svc = service_fn(move |req| {
                let f = handler(peer, req);
                async move { Ok::<_, Infallible>(f.await) }
            });
            let conn = async move {
                let tls = match &tls {
                    Some(t) => t.acceptor(&stream, settings.header_read_timeout).await,
                    None => None,
                };
                serve_connection(stream, tls, settings, svc, shutdown, permit).await;
            };
            let span = debug_span!("conn", client.addr = %peer, listener = self.name);
            if sliced {
                Accepted::Serve(Either::Left(super::slice::sliced(conn).instrument(span)))
            } else {
                Accepted::Serve(Either::Right(conn.instrument(span)))
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    /// Every idle keep-alive connection holds this future: the TLS and HTTP/2 paths and a
    /// request in flight are boxed, so an idle plain connection carries only what waits for
    /// its next head (11 KiB with hyper-util's auto server and TLS inline; 3.7 with TLS boxed).
    #[tokio::test]
    async fn a_plain_connections_future_stays_small() {
        let settings = super::ConnSettings::default();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let svc = hyper::service::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                bytes::Bytes,
            >::new()))
        });
        let permit = super::ConnGate::default().admit(1).unwrap();
        let f = super::serve_connection(c, None, settings, svc, shutdown, permit);
        let size = std::mem::size_of_val(&f);
        assert!(size <= 1280, "{size} bytes");
    }

    /// A client connected over loopback to a connection served with `settings` (every request
    /// answered `200 ok`), the serving task, and its shutdown token.
    async fn served_pair(
        settings: super::ConnSettings,
    ) -> (
        tokio::net::TcpStream,
        tokio::task::JoinHandle<()>,
        tokio_util::sync::CancellationToken,
    ) {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (s, _) = l.accept().await.unwrap();
        let svc = hyper::service::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                bytes::Bytes::from_static(b"ok"),
            )))
        });
        let permit = super::ConnGate::default().admit(1).unwrap();
        let served = tokio::spawn(super::serve_connection(
            s,
            None,
            settings,
            svc,
            shutdown.clone(),
            permit,
        ));
        (c, served, shutdown)
    }

    /// A connection closed from this side (here an idle keep-alive one at shutdown) ends its
    /// stream first and then reads and drops what the client still sends: a request that
    /// crossed the close must not be answered with a reset (which fails it, where the end of
    /// the stream tells the client to send it again on a new connection). The old code closed
    /// the socket, so the client's second write after the late request met the reset.
    #[tokio::test]
    async fn a_request_crossing_the_close_at_shutdown_meets_no_reset() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut c, served, shutdown) = served_pair(super::ConnSettings::default()).await;
        let req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        c.write_all(req).await.unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n\r\nok") {
            let mut b = [0u8; 512];
            let n = c.read(&mut b).await.unwrap();
            assert!(n > 0, "closed before the response: {got:?}");
            got.extend_from_slice(&b[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
        // Idle now: the shutdown closes it, and the client reads the end of the stream.
        shutdown.cancel();
        let mut b = [0u8; 64];
        assert_eq!(c.read(&mut b).await.unwrap(), 0, "the end of the stream");
        // The next request, sent as if it had crossed the close; then more bytes: a socket
        // closed under the first would have answered it with a reset, failing the second.
        c.write_all(req).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        c.write_all(req)
            .await
            .expect("no reset: the late request was read and dropped");
        drop(c);
        tokio::time::timeout(std::time::Duration::from_secs(5), served)
            .await
            .expect("the connection ends once the client closes")
            .unwrap();
    }

    /// A connection accepted just before the shutdown, whose request was still on its way,
    /// is answered (with `Connection: close`) rather than closed unanswered: a client does not
    /// send a new connection's request again ("Empty reply from server"; the systemd test's
    /// upgrade failed one request in ~5 000 so). The old code closed it at once.
    #[tokio::test]
    async fn a_connection_accepted_before_the_shutdown_gets_its_first_request_answered() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut c, served, shutdown) = served_pair(super::ConnSettings::default()).await;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        shutdown.cancel();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        let got = String::from_utf8_lossy(&got).to_ascii_lowercase();
        assert!(got.starts_with("http/1.1 200"), "{got:?}");
        assert!(got.contains("connection: close\r\n"), "{got:?}");
        assert!(got.ends_with("\r\n\r\nok"), "{got:?}");
        tokio::time::timeout(std::time::Duration::from_secs(5), served)
            .await
            .expect("the connection ends after its answer")
            .unwrap();
    }

    /// The grace is short: a connection that says nothing does not hold the drain.
    #[tokio::test]
    async fn a_silent_new_connection_is_closed_after_the_grace_at_shutdown() {
        use tokio::io::AsyncReadExt;
        let mut settings = super::ConnSettings::default();
        settings.header_read_timeout = std::time::Duration::from_secs(60);
        let (mut c, served, shutdown) = served_pair(settings).await;
        shutdown.cancel();
        let mut b = [0u8; 16];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), c.read(&mut b))
            .await
            .expect("closed within the grace, not the 60 s header timeout")
            .unwrap();
        assert_eq!(n, 0);
        drop(c);
        tokio::time::timeout(std::time::Duration::from_secs(5), served)
            .await
            .expect("the connection ends")
            .unwrap();
    }
}
