//! The control-plane HTTP(S) client: agents, `lockstep publish` and `lockstep status` reach the
//! hub with it, agents reach their peers, `lockstep status --admin` the admin API. Keep-alive
//! HTTP/1.1 connections (a few kept for reuse, so clock samples do not pay for a handshake), the
//! bearer token on every request, rustls for `https://` URLs. Errors name what was called
//! ([`Remote`]) and its URL.
//!
//! The data path's client to backends is [`super::upstream`], which pools per worker thread.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::warn;

use super::respond::ErrorBody;
use crate::config::tls::{FarmTrust, LoadedCert};

/// What a client talks to; its errors say so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remote {
    /// The sync hub.
    Hub,
    /// Another backend's agent.
    Peer,
    /// An appliance's admin API.
    Admin,
    /// An ACME CA (RFC 8555).
    Acme,
}

impl std::fmt::Display for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Remote::Hub => "hub",
            Remote::Peer => "peer",
            Remote::Admin => "admin API",
            Remote::Acme => "ACME CA",
        })
    }
}

/// What every request says it is (RFC 8555 §6.1 asks ACME clients for one).
const USER_AGENT: &str = concat!("lockstep/", env!("CARGO_PKG_VERSION"));

/// Connect timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default limit of a whole request/response exchange (long polls set their own).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest response body read.
const MAX_BODY: usize = 256 * 1024 * 1024;
/// Idle connections kept for reuse.
const KEEP: usize = 16;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The URL is not `http://host:port[/]` or `https://…`.
    #[error("{remote} URL `{url}`: {message}")]
    Url {
        /// What the URL was for.
        remote: Remote,
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        message: String,
    },
    /// Could not connect or the connection broke.
    #[error("{remote} {url}: {message}")]
    Transport {
        /// What was called.
        remote: Remote,
        /// Its URL.
        url: String,
        /// What happened.
        message: String,
    },
    /// The remote answered with an error status.
    #[error("{remote} answered {status}: {message}")]
    Status {
        /// What was called.
        remote: Remote,
        /// The status.
        status: StatusCode,
        /// The remote's `error` text, or the body.
        message: String,
    },
    /// The answer is not the JSON expected.
    #[error("{remote} answered something unexpected: {message}")]
    Decode {
        /// What was called.
        remote: Remote,
        /// What did not decode.
        message: String,
    },
    /// A TLS setting is unusable.
    #[error("{0}")]
    Tls(String),
}

impl ClientError {
    /// The HTTP status, if the remote answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A raw answer.
#[derive(Debug)]
pub struct Answer {
    /// Who answered.
    pub remote: Remote,
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// What an https client trusts and presents: the rustls client config.
#[derive(Clone)]
pub struct ClientTls(Arc<rustls::ClientConfig>);

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl ClientTls {
    /// Trusting the CA certificates in `ca` (PEM), presenting no certificate.
    pub fn ca_file(ca: &Path) -> Result<ClientTls, ClientError> {
        let trust =
            crate::config::tls::load_trust(ca, None).map_err(|(_, m)| ClientError::Tls(m))?;
        ClientTls::farm(&trust, None)
    }

    /// Trusting the farm CA (and its revocation list), presenting `own` when asked.
    pub fn farm(trust: &FarmTrust, own: Option<&LoadedCert>) -> Result<ClientTls, ClientError> {
        super::tls::client_config(trust, own)
            .map(ClientTls)
            .map_err(ClientError::Tls)
    }

    /// Trusting any server: only to fetch what is then checked against a pinned hash (the
    /// farm CA's certificate, when an agent joins).
    pub fn unverified() -> ClientTls {
        ClientTls(super::tls::client_config_unverified())
    }

    /// From files: the farm CA, its optional revocation list, and the party's own
    /// certificate and key (`lockstep publish --cert --key`).
    pub fn files(
        ca: &Path,
        crl: Option<&Path>,
        own: Option<(&Path, &Path)>,
    ) -> Result<ClientTls, ClientError> {
        let trust =
            crate::config::tls::load_trust(ca, crl).map_err(|(_, m)| ClientError::Tls(m))?;
        let own = match own {
            Some((cert, key)) => {
                Some(crate::config::tls::load(cert, key).map_err(|(_, m)| ClientError::Tls(m))?)
            }
            None => None,
        };
        ClientTls::farm(&trust, own.as_ref())
    }
}

struct Target {
    remote: Remote,
    url: String,
    host: String,
    port: u16,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

/// A connection and the index of the target it goes to.
type Conn = (usize, SendRequest<Full<Bytes>>);

/// A client of one hub, peer or admin API — or of the first of several hubs that answers
/// ([`HttpClient::hubs`]): a target that cannot be connected to passes the requests to the
/// next, which they keep using until it fails in turn.
#[derive(Clone)]
pub struct HttpClient {
    targets: Arc<Vec<Target>>,
    /// The target requests go to now.
    current: Arc<AtomicUsize>,
    token: Option<Arc<str>>,
    idle: Arc<Mutex<Vec<Conn>>>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HttpClient({} {})",
            self.target().remote,
            self.target().url
        )
    }
}

impl HttpClient {
    /// A client of the hub at `url`; see [`HttpClient::new`].
    pub fn hub(
        url: &str,
        token: Option<String>,
        tls: Option<&ClientTls>,
    ) -> Result<HttpClient, ClientError> {
        HttpClient::new(Remote::Hub, url, token, tls)
    }

    /// A client of the hubs at `urls`, in order of preference (see [`HttpClient`]); errors
    /// name the URL they are about.
    pub fn hubs(
        urls: &[String],
        token: Option<String>,
        tls: Option<&ClientTls>,
    ) -> Result<HttpClient, ClientError> {
        let targets = urls
            .iter()
            .map(|u| Target::parse(Remote::Hub, u, tls))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(HttpClient::over(targets, token))
    }

    /// A client of `remote` at `url` (`http://host:port` or `https://host:port`), sending
    /// `token`; for https, `tls` says which CA signed the remote's certificate and which
    /// certificate this party presents.
    pub fn new(
        remote: Remote,
        url: &str,
        token: Option<String>,
        tls: Option<&ClientTls>,
    ) -> Result<HttpClient, ClientError> {
        Ok(HttpClient::over(
            vec![Target::parse(remote, url, tls)?],
            token,
        ))
    }

    fn over(targets: Vec<Target>, token: Option<String>) -> HttpClient {
        assert!(!targets.is_empty(), "a client has a target");
        let mut client = HttpClient {
            targets: Arc::new(targets),
            current: Arc::new(AtomicUsize::new(0)),
            token: None,
            idle: Arc::new(Mutex::new(Vec::new())),
        };
        // A bearer token never leaves the host: off loopback, the farm certificate is the
        // credential, and a token on the wire is one an eavesdropper or a rogue remote keeps.
        if client.is_loopback() {
            client.token = token.map(Arc::from);
        }
        client
    }

    /// The target requests go to now.
    fn target(&self) -> &Target {
        &self.targets[self.current.load(Ordering::Relaxed) % self.targets.len()]
    }
}

impl Target {
    fn parse(remote: Remote, url: &str, tls: Option<&ClientTls>) -> Result<Target, ClientError> {
        let bad = |m: &str| ClientError::Url {
            remote,
            url: url.to_string(),
            message: m.to_string(),
        };
        let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad("must start with http:// or https://")),
        };
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(bad(
                "give only scheme, host and port (the API lives under /sync/v1)",
            ));
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            let config = tls.ok_or_else(|| {
                ClientError::Tls(format!(
                    "{remote} {url} is https: name the CA that signed its certificate (agent `tls.ca`, or --ca-file)"
                ))
            })?;
            let name = ServerName::try_from(host.clone())
                .map_err(|_| bad("host is not a valid TLS server name"))?;
            Some((TlsConnector::from(config.0.clone()), name))
        } else {
            None
        };
        Ok(Target {
            remote,
            url: url.trim_end_matches('/').to_string(),
            host,
            port,
            tls,
        })
    }

    fn is_loopback(&self) -> bool {
        let host = self.host.as_str();
        host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.to_canonical().is_loopback())
    }
}

impl HttpClient {
    /// The URL called now.
    pub fn url(&self) -> &str {
        &self.target().url
    }

    /// Moves to the next target, for when the current one answers but cannot serve (a hub
    /// cut off from the others' state); the URL moved to, `None` with a single target.
    pub fn move_on(&self) -> Option<&str> {
        let n = self.targets.len();
        if n < 2 {
            return None;
        }
        let next = (self.current.load(Ordering::Relaxed) + 1) % n;
        self.current.store(next, Ordering::Relaxed);
        Some(&self.targets[next].url)
    }

    /// Whether every remote is on this host (`localhost` or a loopback address): the one
    /// case where plain HTTP and bearer tokens are acceptable.
    pub fn is_loopback(&self) -> bool {
        self.targets.iter().all(Target::is_loopback)
    }

    /// Whether every remote is called over TLS.
    pub fn is_https(&self) -> bool {
        self.targets.iter().all(|t| t.tls.is_some())
    }

    fn transport(&self, message: impl std::fmt::Display) -> ClientError {
        self.transport_to(self.target(), message)
    }

    fn transport_to(&self, t: &Target, message: impl std::fmt::Display) -> ClientError {
        ClientError::Transport {
            remote: t.remote,
            url: t.url.clone(),
            message: message.to_string(),
        }
    }

    /// A new connection to the current target or, when it cannot be reached, to the next
    /// one that can (which becomes the current one).
    async fn connect(&self) -> Result<Conn, ClientError> {
        let n = self.targets.len();
        let start = self.current.load(Ordering::Relaxed) % n;
        let mut failed = Vec::new();
        for k in 0..n {
            let i = (start + k) % n;
            match self.connect_to(&self.targets[i]).await {
                Ok(sender) => {
                    if k > 0 {
                        self.current.store(i, Ordering::Relaxed);
                        warn!(failed = %failed.join("; "), now = %self.targets[i].url, "{} unreachable: moved to the next", self.targets[start].remote);
                    }
                    return Ok((i, sender));
                }
                Err(e) if k + 1 == n => return Err(e),
                Err(e) => failed.push(e.to_string()),
            }
        }
        unreachable!("the loop returns on its last target")
    }

    async fn connect_to(&self, t: &Target) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((t.host.as_str(), t.port)),
        )
        .await
        .map_err(|_| self.transport_to(t, "connect timed out"))?
        .map_err(|e| self.transport_to(t, format!("cannot connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        match &t.tls {
            None => self.handshake(t, TokioIo::new(tcp)).await,
            Some((connector, name)) => {
                let tls =
                    tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp))
                        .await
                        .map_err(|_| self.transport_to(t, "TLS handshake timed out"))?
                        .map_err(|e| self.transport_to(t, format!("TLS: {e}")))?;
                self.handshake(t, TokioIo::new(tls)).await
            }
        }
    }

    async fn handshake<I>(&self, t: &Target, io: I) -> Result<SendRequest<Full<Bytes>>, ClientError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| self.transport_to(t, e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Sends one request and reads the whole answer (any status), within `timeout`.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<(Bytes, &'static str)>,
        timeout: Duration,
    ) -> Result<Answer, ClientError> {
        tokio::time::timeout(timeout, self.send_inner(method, path_and_query, body))
            .await
            .map_err(|_| self.transport(format!("no answer within {timeout:?}")))?
    }

    async fn send_inner(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<(Bytes, &'static str)>,
    ) -> Result<Answer, ClientError> {
        let (parts, body, sender) = self.exchange(method, path_and_query, body).await?;
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| self.transport(format!("reading the answer: {e}")))?
            .to_bytes();
        self.put_idle(sender);
        Ok(Answer {
            remote: self.target().remote,
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// GETs `path_and_query` within `timeout` and, if the answer is 2xx, streams its body
    /// into `sink` (at most `limit` bytes, a buffer at a time: see
    /// [`super::body::stream_into`]); other statuses become [`ClientError::Status`]. Returns
    /// the sink for the caller to commit. Memory per download is a buffer, whatever the size.
    pub async fn download<W: std::io::Write + Send + 'static>(
        &self,
        path_and_query: &str,
        timeout: Duration,
        limit: u64,
        sink: W,
    ) -> Result<W, ClientError> {
        let work = async {
            let (parts, body, sender) = self.exchange(Method::GET, path_and_query, None).await?;
            if !parts.status.is_success() {
                // An error answer is short: read it to say what went wrong.
                let body = Limited::new(body, 64 * 1024)
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                return Err(status_error(Answer {
                    remote: self.target().remote,
                    status: parts.status,
                    headers: parts.headers,
                    body,
                }));
            }
            let sink = super::body::stream_into(body, sink, limit)
                .await
                .map_err(|e| self.transport(format!("reading the answer: {e}")))?;
            self.put_idle(sender);
            Ok(sink)
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| self.transport(format!("no whole answer within {timeout:?}")))?
    }

    /// Sends one request (on a kept-alive connection when one is idle) and returns the
    /// answer's head, its unread body and the connection to put back once the body is read.
    async fn exchange(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<(Bytes, &'static str)>,
    ) -> Result<(http::response::Parts, hyper::body::Incoming, Conn), ClientError> {
        // A reused connection may have been closed by the hub meanwhile: then try a fresh one
        // (only requests that cannot have been acted on are resent: hyper reports those as
        // errors before any byte of the answer).
        for attempt in 0..2 {
            let reused = if attempt == 0 { self.take_idle() } else { None };
            let fresh = reused.is_none();
            let (i, mut sender) = match reused {
                Some(s) => s,
                None => self.connect().await?,
            };
            let t = &self.targets[i];
            let mut req = Request::builder()
                .method(method.clone())
                .uri(path_and_query)
                .header(http::header::HOST, format!("{}:{}", t.host, t.port))
                .header(http::header::USER_AGENT, USER_AGENT);
            if let Some(token) = &self.token {
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
            }
            let (bytes, ctype) = body.clone().unwrap_or((Bytes::new(), ""));
            if !ctype.is_empty() {
                req = req.header(http::header::CONTENT_TYPE, ctype);
            }
            let req = req
                .body(Full::new(bytes))
                .map_err(|e| self.transport_to(t, e))?;
            if sender.ready().await.is_err() {
                if fresh {
                    return Err(self.transport_to(t, "connection closed"));
                }
                continue;
            }
            let resp = match sender.send_request(req).await {
                Ok(r) => r,
                Err(e)
                    if !fresh
                        && (e.is_canceled() || e.is_closed() || e.is_incomplete_message()) =>
                {
                    continue
                }
                Err(e) => return Err(self.transport_to(t, e)),
            };
            let (parts, body) = resp.into_parts();
            return Ok((parts, body, (i, sender)));
        }
        Err(self.transport("connection closed"))
    }

    /// An idle connection to the current target.
    fn take_idle(&self) -> Option<Conn> {
        let now = self.current.load(Ordering::Relaxed) % self.targets.len();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Connections to a target left behind are dropped on the way.
        while let Some((i, s)) = idle.pop() {
            if i == now && !s.is_closed() {
                return Some((i, s));
            }
        }
        None
    }

    fn put_idle(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < KEEP && !conn.1.is_closed() {
            idle.push(conn);
        }
    }

    /// A request whose 2xx answer is JSON `T`; other statuses become [`ClientError::Status`].
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&impl Serialize>,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let body = body.map(|b| {
            // Protocol messages are plain structs: they always serialise.
            (
                Bytes::from(serde_json::to_vec(b).expect("message serialises")),
                "application/json",
            )
        });
        let answer = self.send(method, path_and_query, body, timeout).await?;
        let remote = self.target().remote;
        let answer = ok(answer)?;
        serde_json::from_slice(&answer.body).map_err(|e| ClientError::Decode {
            remote,
            message: e.to_string(),
        })
    }
}

/// The answer if 2xx, else its error as [`ClientError::Status`].
pub fn ok(answer: Answer) -> Result<Answer, ClientError> {
    if answer.status.is_success() {
        return Ok(answer);
    }
    Err(status_error(answer))
}

/// A non-2xx answer as [`ClientError::Status`], with the remote's `error` text or the body.
fn status_error(answer: Answer) -> ClientError {
    let message = serde_json::from_slice::<ErrorBody>(&answer.body)
        .map(|e| e.error)
        .unwrap_or_else(|_| {
            String::from_utf8_lossy(&answer.body)
                .chars()
                .take(300)
                .collect()
        });
    ClientError::Status {
        remote: answer.remote,
        status: answer.status,
        message,
    }
}
