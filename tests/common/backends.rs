//! Backends the proxy under test talks to, all real sockets on `127.0.0.1:0`: demo backends
//! ([`DemoBackend`], or [`DemoBackends`] on a runtime of their own for tests that are not
//! async), a counting one, a silent one, a WebSocket-style upgrade echo, and a
//! [`DeadAddress`] nothing accepts on. Also their lines in a pool's `backends:` YAML.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use lockstep::demo::{self, BackendControl};

use super::wait;

/// Binds a fresh loopback listener on an ephemeral port.
pub async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0")
}

/// An address nothing accepts on, held for as long as it lives: a socket bound to
/// `127.0.0.1:0` that never listens, so a connect to it is refused and no other process can
/// take its port meanwhile (a port bound and released could be taken by anyone).
pub struct DeadAddress {
    /// The address.
    pub addr: SocketAddr,
    _socket: socket2::Socket,
}

/// A fresh [`DeadAddress`].
pub fn dead_address() -> DeadAddress {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("create a socket");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind 127.0.0.1:0");
    let addr = socket
        .local_addr()
        .expect("local addr")
        .as_socket()
        .expect("an IP address");
    DeadAddress {
        addr,
        _socket: socket,
    }
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
        wait::until(
            &format!("{} to refuse connections after being stopped", self.name),
            Duration::from_secs(2),
            || refuses(self.addr),
        )
        .await;
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

/// Demo backends on a runtime of their own, for tests that are not async (they drive
/// `lockstep serve` as a process from a plain thread).
pub struct DemoBackends {
    /// The backends, in the order of their names.
    pub webs: Vec<DemoBackend>,
    rt: tokio::runtime::Runtime,
}

impl DemoBackends {
    /// Starts one demo backend per name.
    pub fn start(names: &[&str]) -> DemoBackends {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the backends");
        let webs = rt.block_on(async {
            let mut webs = Vec::new();
            for name in names {
                webs.push(DemoBackend::start(name).await);
            }
            webs
        });
        DemoBackends { webs, rt }
    }

    /// The address of the `i`-th.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.webs[i].addr
    }
}

/// The `backends:` entries of `backends`.
pub fn backends_yaml<'a>(backends: impl IntoIterator<Item = &'a DemoBackend>) -> String {
    backends.into_iter().map(|b| b.yaml()).collect()
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

/// A backend that answers every request `ok: …` (57 bytes) after `delay` (its body is read first), on
/// hyper's HTTP/1.1 server.
pub async fn delayed_backend(delay: Duration) -> SocketAddr {
    let socket = bind().await;
    let addr = socket.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    tokio::time::sleep(delay).await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"ok: a delayed answer, long enough for every h2spec case\n",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
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
