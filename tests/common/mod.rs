//! Shared helpers of the integration tests: real backends on `127.0.0.1:0`, the appliance
//! started from YAML text, HTTP and raw-TCP clients, a Prometheus text parser, and
//! [`eventually`] (wait on a condition with a deadline, never on a bare sleep).
//!
//! Nothing here mocks the proxy: every helper opens real sockets on loopback.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use lockstep::appliance::Appliance;
use lockstep::config::Config;
use lockstep::demo::{self, BackendControl};

/// Polls `cond` every 10 ms until it holds or `within` has passed; returns whether it held.
pub async fn eventually<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Binds a fresh loopback listener on an ephemeral port.
pub async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0")
}

/// An address nobody listens on: a port that was bound and released.
pub async fn dead_address() -> SocketAddr {
    let l = bind().await;
    l.local_addr().expect("local addr")
}

/// Whether a TCP connect to `addr` is refused right now.
pub async fn refuses(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await,
        Ok(Err(_))
    )
}

/// A running demo backend (`lockstep::demo::backend`): answers with its name in the body and
/// in `x-backend`, `/healthz` follows `control`, `/echo-headers` echoes the request headers.
pub struct DemoBackend {
    /// Its name.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Flip `control.unhealthy` to fail its health checks.
    pub control: BackendControl,
    stop: CancellationToken,
}

impl DemoBackend {
    /// Starts a demo backend named `name`.
    pub async fn start(name: &str) -> DemoBackend {
        let socket = bind().await;
        let addr = socket.local_addr().expect("local addr");
        let control = BackendControl::default();
        let stop = CancellationToken::new();
        tokio::spawn(demo::backend(
            name.to_string(),
            socket,
            control.clone(),
            stop.clone(),
        ));
        DemoBackend {
            name: name.to_string(),
            addr,
            control,
            stop,
        }
    }

    /// Starts `web-1` .. `web-n`.
    pub async fn start_n(n: usize) -> Vec<DemoBackend> {
        let mut out = Vec::new();
        for i in 1..=n {
            out.push(DemoBackend::start(&format!("web-{i}")).await);
        }
        out
    }

    /// Kills it: open connections are dropped and, once this returns, connects are refused.
    pub async fn kill(&self) {
        self.stop.cancel();
        assert!(
            eventually(Duration::from_secs(2), || refuses(self.addr)).await,
            "{} still accepts connections after being stopped",
            self.name
        );
    }

    /// Marks its `/healthz` as failing (true) or passing (false).
    pub fn set_unhealthy(&self, unhealthy: bool) {
        self.control.unhealthy.store(unhealthy, Ordering::Relaxed);
    }

    /// Its line in a pool's `backends:` list.
    pub fn yaml(&self) -> String {
        backend_yaml(&self.name, self.addr, 1)
    }

    /// Its line with a weight.
    pub fn yaml_weighted(&self, weight: u32) -> String {
        backend_yaml(&self.name, self.addr, weight)
    }
}

impl Drop for DemoBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One `backends:` entry, indented for the pool templates used in the tests.
pub fn backend_yaml(name: &str, addr: SocketAddr, weight: u32) -> String {
    format!("      - {{ name: {name}, address: \"{addr}\", weight: {weight} }}\n")
}

/// The `backends:` entries of `backends`.
pub fn backends_yaml<'a>(backends: impl IntoIterator<Item = &'a DemoBackend>) -> String {
    backends.into_iter().map(|b| b.yaml()).collect()
}

/// Parses YAML config text; panics with every config error when it is refused.
pub fn config(yaml: &str) -> Config {
    match lockstep::config::parse(Path::new("test.yaml"), yaml) {
        Ok(c) => c,
        Err(e) => panic!("test config refused:\n{e}\n--- config ---\n{yaml}"),
    }
}

/// Starts the appliance from YAML text.
pub async fn start(yaml: &str) -> Appliance {
    match Appliance::start(config(yaml)).await {
        Ok(a) => a,
        Err(e) => panic!("appliance did not start: {e}"),
    }
}

/// The simplest farm config: listener `http`, every request to pool `www` over `backends`,
/// with `pool_extra` (indented YAML keys such as `    retries: 0\n`) added to the pool.
pub fn farm_yaml(backends: &str, pool_extra: &str) -> String {
    farm_yaml_with("", backends, pool_extra)
}

/// [`farm_yaml`] with `listener_extra` (indented keys such as `    trusted_proxies: [...]\n`)
/// added to the listener.
pub fn farm_yaml_with(listener_extra: &str, backends: &str, pool_extra: &str) -> String {
    format!(
        "listeners:\n  - name: http\n    bind: \"127.0.0.1:0\"\n{listener_extra}\
         routes:\n  - {{ path_prefix: \"/\", pool: www }}\n\
         pools:\n  - name: www\n{pool_extra}    backends:\n{backends}\
         admin:\n  bind: \"127.0.0.1:0\"\n"
    )
}

/// The proxy listener `http` of `app`.
pub fn proxy_addr(app: &Appliance) -> SocketAddr {
    app.local_addr("http").expect("listener `http` is running")
}

/// A pooled HTTP/1.1 client.
pub type HttpClient = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// An HTTP/1.1 client (keep-alive).
pub fn h1_client() -> HttpClient {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// An h2c client (HTTP/2 with prior knowledge over plain TCP).
pub fn h2c_client() -> HttpClient {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A whole response, read to its end.
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Protocol version it came with.
    pub version: Version,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Body as text.
    pub body: String,
}

impl Reply {
    /// The backend that answered (`x-backend`), if any.
    pub fn backend(&self) -> Option<String> {
        self.headers
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// The body of `/echo-headers` as (name, value) pairs, names lowercase.
    pub fn echoed_headers(&self) -> Vec<(String, String)> {
        self.body
            .lines()
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
            .collect()
    }

    /// Values of echoed header `name`.
    pub fn echoed(&self, name: &str) -> Vec<String> {
        self.echoed_headers()
            .into_iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v)
            .collect()
    }
}

/// Sends GET `path` to `addr` with the given extra headers; `Err` on a transport failure.
pub async fn get_with(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let mut req = Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .map_err(|_| "no response within 5s".to_string())?
        .map_err(|e| format!("request failed: {e:?}"))?;
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .map_err(|_| "body not complete within 5s".to_string())?
        .map_err(|e| format!("body failed: {e}"))?
        .to_bytes();
    Ok(Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// GET `path`; panics on a transport failure.
pub async fn get(client: &HttpClient, addr: SocketAddr, path: &str) -> Reply {
    match get_with(client, addr, path, &[]).await {
        Ok(r) => r,
        Err(e) => panic!("GET http://{addr}{path}: {e}"),
    }
}

/// Sends `n` sequential GETs and counts the answering backends (`x-backend`); panics on a
/// non-200 answer.
pub async fn tally(client: &HttpClient, addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let r = get(client, addr, "/").await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {r:?}");
        let b = r
            .backend()
            .unwrap_or_else(|| panic!("request {i} has no x-backend: {r:?}"));
        *counts.entry(b).or_insert(0) += 1;
    }
    counts
}

/// What came back on a raw TCP connection.
#[derive(Debug)]
pub struct RawOutcome {
    /// Every byte read.
    pub bytes: Vec<u8>,
    /// Whether the server closed the connection (EOF or reset) before the wait ran out.
    pub closed: bool,
}

impl RawOutcome {
    /// The bytes as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// Status codes of every response found in the bytes, in order.
    pub fn statuses(&self) -> Vec<u16> {
        let text = self.text();
        text.match_indices("HTTP/1.1 ")
            .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
            .collect()
    }
}

/// Writes `request` on a fresh connection to `addr` and reads until the server closes the
/// connection or `wait` has passed.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> RawOutcome {
    let stream = TcpStream::connect(addr)
        .await
        .expect("connect to the proxy");
    let (mut rd, mut wr) = stream.into_split();
    let request = request.to_vec();
    // Written from its own task so that a server answering (and closing) before reading it
    // all cannot deadlock the test.
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&request).await;
        let _ = wr.flush().await;
        wr
    });
    let deadline = tokio::time::Instant::now() + wait;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 8192];
    let closed = loop {
        match tokio::time::timeout_at(deadline, rd.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) => break true,
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => break true,
        }
    };
    // The task hands the write half back as its output, which keeps it (and the connection
    // open both ways) alive until here: dropping it early would half-close the connection.
    if writer.is_finished() {
        drop(writer.await);
    } else {
        writer.abort();
    }
    RawOutcome { bytes, closed }
}

/// A backend that counts what reaches it: `seen` counts request heads, `complete` counts
/// requests whose body was read to its end; answers 200 `counted` with `x-backend: counter`.
pub struct CountingBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Request heads received.
    pub seen: Arc<AtomicUsize>,
    /// Requests received whole (head and body).
    pub complete: Arc<AtomicUsize>,
    /// `METHOD path` of every request head received.
    pub requests: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
}

impl CountingBackend {
    /// Starts one.
    pub async fn start() -> CountingBackend {
        let socket = bind().await;
        let addr = socket.local_addr().expect("local addr");
        let seen = Arc::new(AtomicUsize::new(0));
        let complete = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (s, c, r, st) = (
            seen.clone(),
            complete.clone(),
            requests.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = st.cancelled() => return,
                    r = socket.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                };
                let (s, c, r) = (s.clone(), c.clone(), r.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (s, c, r) = (s.clone(), c.clone(), r.clone());
                        async move {
                            s.fetch_add(1, Ordering::SeqCst);
                            r.lock().unwrap().push(format!(
                                "{} {}",
                                req.method(),
                                req.uri().path()
                            ));
                            let status = match req.into_body().collect().await {
                                Ok(_) => {
                                    c.fetch_add(1, Ordering::SeqCst);
                                    StatusCode::OK
                                }
                                Err(_) => StatusCode::BAD_REQUEST,
                            };
                            let mut resp =
                                Response::new(Full::new(Bytes::from_static(b"counted\n")));
                            *resp.status_mut() = status;
                            resp.headers_mut()
                                .insert("x-backend", http::HeaderValue::from_static("counter"));
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        CountingBackend {
            addr,
            seen,
            complete,
            requests,
            stop,
        }
    }

    /// Request heads received so far.
    pub fn seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }

    /// Whole requests received so far.
    pub fn complete(&self) -> usize {
        self.complete.load(Ordering::SeqCst)
    }
}

impl Drop for CountingBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A backend that accepts connections and reads requests but never answers.
pub async fn silent_backend(stop: CancellationToken) -> SocketAddr {
    let socket = bind().await;
    let addr = socket.local_addr().expect("local addr");
    tokio::spawn(async move {
        loop {
            let mut stream = tokio::select! {
                _ = stop.cancelled() => return,
                r = socket.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
            };
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        r = stream.read(&mut buf) => if !matches!(r, Ok(n) if n > 0) { return },
                    }
                }
            });
        }
    });
    addr
}

/// A backend that answers `Connection: upgrade` + `Upgrade: websocket` with 101 and then
/// echoes every byte on the upgraded connection; other requests get 400.
pub async fn upgrade_echo_backend(stop: CancellationToken) -> SocketAddr {
    let socket = bind().await;
    let addr = socket.local_addr().expect("local addr");
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = stop.cancelled() => return,
                r = socket.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
            };
            tokio::spawn(async move {
                let svc = service_fn(|mut req: Request<Incoming>| async move {
                    let wants = req
                        .headers()
                        .get(http::header::UPGRADE)
                        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
                    let mut resp = Response::new(Full::new(Bytes::new()));
                    if !wants {
                        *resp.status_mut() = StatusCode::BAD_REQUEST;
                        return Ok::<_, Infallible>(resp);
                    }
                    let on_upgrade = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let Ok(upgraded) = on_upgrade.await else {
                            return;
                        };
                        let mut io = TokioIo::new(upgraded);
                        let mut buf = [0u8; 4096];
                        loop {
                            match io.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if io.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    });
                    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                    resp.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("upgrade"),
                    );
                    resp.headers_mut().insert(
                        http::header::UPGRADE,
                        http::HeaderValue::from_static("websocket"),
                    );
                    Ok(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// Parses the Prometheus text format: every non-comment, non-empty line must be
/// `name{labels} value` (or `name value`) with a float value. Returns series → value, the
/// series written exactly as in the text (`name{a="1",b="2"}`).
pub fn parse_metrics(text: &str) -> Result<BTreeMap<String, f64>, String> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("line {}: no value: {line:?}", n + 1))?;
        let value: f64 = value
            .parse()
            .map_err(|_| format!("line {}: value is not a float: {line:?}", n + 1))?;
        let (name, labels) = match series.split_once('{') {
            None => (series, None),
            Some((name, rest)) => {
                let labels = rest
                    .strip_suffix('}')
                    .ok_or_else(|| format!("line {}: unclosed labels: {line:?}", n + 1))?;
                (name, Some(labels))
            }
        };
        let name_ok = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        if !name_ok {
            return Err(format!("line {}: bad metric name {name:?}", n + 1));
        }
        if let Some(labels) = labels {
            for pair in split_labels(labels) {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| format!("line {}: label without `=`: {line:?}", n + 1))?;
                let k_ok =
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                let v_ok = v.len() >= 2 && v.starts_with('"') && v.ends_with('"');
                if !k_ok || !v_ok {
                    return Err(format!("line {}: bad label {pair:?}: {line:?}", n + 1));
                }
            }
        }
        out.insert(series.to_string(), value);
    }
    Ok(out)
}

/// Splits `a="1",b="x,y"` at the commas outside quotes.
fn split_labels(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

/// GETs the admin listener's `/metrics` and parses it.
pub async fn scrape(client: &HttpClient, admin: SocketAddr) -> BTreeMap<String, f64> {
    let r = get(client, admin, "/metrics").await;
    assert_eq!(r.status, StatusCode::OK, "/metrics: {r:?}");
    match parse_metrics(&r.body) {
        Ok(m) => m,
        Err(e) => panic!("/metrics does not parse: {e}\n{}", r.body),
    }
}

/// A self-signed certificate for `name` (its own key, `CN=name`), written as PEM files
/// `name.pem` and `name.key` into `dir`.
pub struct TestCert {
    /// The certificate, DER.
    pub der: rustls_pki_types::CertificateDer<'static>,
    /// PEM certificate file.
    pub cert_path: std::path::PathBuf,
    /// PEM private key file.
    pub key_path: std::path::PathBuf,
}

impl TestCert {
    /// Generates and writes one.
    pub fn new(dir: &Path, name: &str) -> TestCert {
        let key = rcgen::KeyPair::generate().expect("generate a key pair");
        let mut params =
            rcgen::CertificateParams::new(vec![name.to_string()]).expect("certificate params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("self-sign");
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        TestCert {
            der: cert.der().clone(),
            cert_path,
            key_path,
        }
    }

    /// Its entry in a listener's `tls.certificates`.
    pub fn yaml(&self) -> String {
        format!(
            "        - {{ cert: \"{}\", key: \"{}\" }}\n",
            self.cert_path.display(),
            self.key_path.display()
        )
    }
}

/// Connects with TLS to `addr` asking for `sni`, trusting only `root`, offering ALPN h2 and
/// http/1.1.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    root: &rustls_pki_types::CertificateDer<'static>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(root.clone())
        .map_err(|e| format!("root certificate refused: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name =
        rustls_pki_types::ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .map_err(|_| "TLS handshake did not finish within 5s".to_string())?
        .map_err(|e| format!("TLS handshake failed: {e}"))
}
