//! The request path: route → pool → pick a backend → forward → stream the answer back.
//!
//! Faults are told apart: a backend that refuses or cannot be reached is a 502 (and an
//! idempotent request without a body is retried once per `retries` on a *different*
//! backend), a backend too slow to answer is a 504, no available backend is a 503, and a
//! client that sends a broken body gets a 400 — each with a short plain-text body and a log
//! line saying which side failed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use tracing::{debug, warn};

use crate::net::body::{local, RequestBody, ResponseBody};
use super::headers::{self, Forwarded};
use super::{access_log, upgrade};
use crate::config::{HashKey, Listener};
use crate::live::Shared;
use crate::router::balance::hash_key;
use crate::pools::table::{PoolLoad, PoolState};

/// What a connection knows while it serves requests.
pub struct ConnCtx {
    /// The listener it arrived on.
    pub listener: Arc<Listener>,
    /// The client's address.
    pub peer: SocketAddr,
    /// Whether the peer is a trusted proxy (decided once per connection).
    pub trusted: bool,
    /// The peer's address as a header value, for `X-Forwarded-For`.
    pub peer_value: HeaderValue,
    /// Whether TLS terminated here.
    pub tls: bool,
    /// The live state.
    pub live: Shared,
}

/// Serves one request. Never fails: every error becomes a response.
pub async fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let start = Instant::now();
    let live = ctx.live.load_full();
    let log_fields =
        (ctx.listener.access_log != crate::config::AccessLog::Off).then(|| LogFields::of(&req));

    // A refcounted view of the host (no copy): it outlives `req`, which `forward` consumes.
    let host_ref = Host::of(&req);
    let host = host_ref.as_ref().and_then(Host::as_str);
    let Some(pool_idx) = live.table.routes.find(host, req.uri().path()) else {
        debug!(client.addr = %ctx.peer, host = host.unwrap_or(""), path = req.uri().path(), "no route");
        let resp = plain(StatusCode::NOT_FOUND, "no route for this host and path\n");
        finish(&ctx, start, log_fields, &resp, None, None);
        return Ok(resp);
    };
    // Routes are validated to point at existing pools, and clients are built per pool.
    let (Some(pool), Some(client)) = (live.table.pools.get(pool_idx), live.clients.get(pool_idx))
    else {
        return Ok(plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "routing table inconsistent\n",
        ));
    };

    let host_value = host_ref.as_ref().and_then(Host::to_value);
    let (resp, backend) = forward(&ctx, pool, client, req, host_value).await;
    pool.latency.observe(start.elapsed().as_secs_f64());
    finish(&ctx, start, log_fields, &resp, Some(pool), backend);
    Ok(resp)
}

async fn forward(
    ctx: &ConnCtx,
    pool: &PoolState,
    client: &crate::net::upstream::Clients,
    mut req: Request<Incoming>,
    host: Option<HeaderValue>,
) -> (Response<ResponseBody>, Option<usize>) {
    let cfg = &pool.config;
    let key = match &cfg.hash_key {
        None => None,
        Some(HashKey::ClientIp) => Some(hash_key(ctx.peer.ip().to_string().as_bytes())),
        Some(HashKey::Header(name)) => req.headers().get(name).map(|v| hash_key(v.as_bytes())),
        Some(HashKey::Cookie(name)) => {
            headers::cookie(req.headers(), name).map(|v| hash_key(v.as_bytes()))
        }
    };

    let wants_upgrade = req.version() == Version::HTTP_11 && headers::is_upgrade(req.headers());
    let client_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let via = if parts.version == Version::HTTP_2 {
        "2 lockstep"
    } else {
        "1.1 lockstep"
    };
    headers::strip_hop_by_hop(&mut parts.headers, wants_upgrade);
    if !parts.headers.contains_key(header::HOST) {
        if let Some(h) = host.clone() {
            parts.headers.insert(header::HOST, h);
        }
    }
    headers::add_forwarded(
        &mut parts.headers,
        Forwarded {
            peer: &ctx.peer_value,
            trusted: ctx.trusted,
            proto: if ctx.tls { "https" } else { "http" },
            host,
            via,
        },
    );
    // Only requests whose replay cannot change anything, and whose body we do not have to
    // keep (bodies are streamed, not buffered), are retried.
    let bodyless = http_body::Body::is_end_stream(&body);
    let retryable = is_idempotent(&parts.method) && bodyless && !wants_upgrade;
    let client_failed = (!bodyless).then(|| Arc::new(AtomicBool::new(false)));
    let mut body = Some(match &client_failed {
        None => RequestBody::Empty,
        Some(flag) => RequestBody::Stream {
            inner: body,
            client_failed: flag.clone(),
        },
    });

    let attempts = 1 + if retryable { cfg.retries as usize } else { 0 };
    // Backends already tried by this request; retries are few, so a short inline list.
    let mut tried = Tried::default();
    let mut last_error = None;
    for attempt in 0..attempts {
        let now = Instant::now();
        let health = pool.health.load();
        let load = PoolLoad {
            backends: &pool.backends,
            now,
        };
        let random = rand::random::<u64>();
        let pick = pool.balancer.pick(
            &load,
            &|i| health.available(i, now) && !tried.contains(&i),
            key,
            random,
        );
        let Some(i) = pick else { break };
        tried.push(i);
        let backend = &pool.backends[i];
        if attempt > 0 {
            pool.retries.inc();
        }

        let mut target = http::uri::Parts::default();
        target.scheme = Some(http::uri::Scheme::HTTP);
        target.authority = Some(backend.authority.clone());
        target.path_and_query = Some(path_and_query.clone());
        let Ok(uri) = Uri::from_parts(target) else {
            return (plain(StatusCode::BAD_REQUEST, "bad request target\n"), None);
        };
        let mut up = Request::new(body.take().unwrap_or(RequestBody::Empty));
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        *up.version_mut() = Version::HTTP_11;
        // The last possible attempt takes the headers; earlier ones copy them for a retry.
        *up.headers_mut() = if attempt + 1 == attempts {
            std::mem::take(&mut parts.headers)
        } else {
            parts.headers.clone()
        };

        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        let result = tokio::time::timeout(cfg.response_timeout, client.request(up)).await;
        backend.in_flight.fetch_sub(1, Ordering::Relaxed);
        let done = Instant::now();

        match result {
            Ok(Ok(mut resp)) => {
                backend.ewma.observe(done - sent, done);
                pool.record_outcome(i, !resp.status().is_server_error(), done);
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(client_upgrade) = client_upgrade {
                        let backend_upgrade = hyper::upgrade::on(&mut resp);
                        upgrade::bridge(
                            client_upgrade,
                            backend_upgrade,
                            ctx.peer,
                            backend.config.name.clone(),
                        );
                        let (mut rparts, _) = resp.into_parts();
                        headers::strip_hop_by_hop(&mut rparts.headers, true);
                        return (
                            Response::from_parts(rparts, local(bytes::Bytes::new())),
                            Some(i),
                        );
                    }
                }
                let (mut rparts, rbody) = resp.into_parts();
                headers::strip_hop_by_hop(&mut rparts.headers, false);
                return (
                    Response::from_parts(rparts, http_body_util::Either::Left(rbody)),
                    Some(i),
                );
            }
            Ok(Err(e)) => {
                if client_failed
                    .as_ref()
                    .is_some_and(|f| f.load(Ordering::Relaxed))
                {
                    debug!(client.addr = %ctx.peer, error = %e, "client sent a broken request body");
                    let mut r = plain(StatusCode::BAD_REQUEST, "malformed request body\n");
                    r.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    return (r, Some(i));
                }
                pool.record_outcome(i, false, done);
                let connect = e.is_connect();
                warn!(
                    pool = %cfg.name, backend = %backend.config.name, backend.addr = %backend.config.address,
                    error = %error_chain(&e), fault = "upstream",
                    "{}", if connect { "backend connect failed" } else { "backend request failed" }
                );
                last_error = Some(StatusCode::BAD_GATEWAY);
                // No answer came back. A request whose replay cannot change anything (and
                // whose body we do not hold) goes to another backend, as nginx's
                // `proxy_next_upstream error` does; anything else is never replayed.
                if !retryable {
                    break;
                }
            }
            Err(_) => {
                pool.record_outcome(i, false, done);
                warn!(
                    pool = %cfg.name, backend = %backend.config.name, timeout = ?cfg.response_timeout,
                    fault = "upstream", "backend response timed out"
                );
                return (
                    plain(
                        StatusCode::GATEWAY_TIMEOUT,
                        "backend did not answer in time\n",
                    ),
                    Some(i),
                );
            }
        }
        if body.is_none() && !retryable {
            break;
        }
    }
    match last_error {
        Some(status) => (plain(status, "backend unavailable\n"), tried.last()),
        None => {
            warn!(pool = %cfg.name, fault = "upstream", "no healthy backend");
            (
                plain(StatusCode::SERVICE_UNAVAILABLE, "no healthy backend\n"),
                None,
            )
        }
    }
}

/// Backend indexes a request has tried, without allocating for the usual few.
#[derive(Default)]
struct Tried {
    inline: [usize; 4],
    len: usize,
    more: Vec<usize>,
}

impl Tried {
    fn push(&mut self, i: usize) {
        match self.inline.get_mut(self.len) {
            Some(slot) => *slot = i,
            None => self.more.push(i),
        }
        self.len += 1;
    }

    fn contains(&self, i: &usize) -> bool {
        self.inline[..self.len.min(4)].contains(i) || self.more.contains(i)
    }

    fn last(&self) -> Option<usize> {
        match self.len {
            0 => None,
            n if n <= 4 => Some(self.inline[n - 1]),
            _ => self.more.last().copied(),
        }
    }
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The host the client asked for: `:authority` (h2, absolute-form) or `Host`. Both variants
/// share the request's buffer, so keeping one costs a reference count, not a copy.
enum Host {
    Authority(http::uri::Authority),
    Header(HeaderValue),
}

impl Host {
    fn of<B>(req: &Request<B>) -> Option<Host> {
        match req.uri().authority() {
            Some(a) => Some(Host::Authority(a.clone())),
            None => req.headers().get(header::HOST).cloned().map(Host::Header),
        }
    }

    /// As a header value (shared, not copied, when it came from `Host`).
    fn to_value(&self) -> Option<HeaderValue> {
        match self {
            Host::Header(v) => Some(v.clone()),
            Host::Authority(a) => HeaderValue::from_str(a.as_str()).ok(),
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Host::Authority(a) => Some(a.as_str()),
            Host::Header(v) => v.to_str().ok(),
        }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut r = Response::new(local(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Request fields kept for the access log (only when it is on).
struct LogFields {
    time: SystemTime,
    method: String,
    target: String,
    version: &'static str,
    referer: Option<String>,
    user_agent: Option<String>,
    host: Option<String>,
}

impl LogFields {
    fn of<B>(req: &Request<B>) -> Self {
        let h = |n: header::HeaderName| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        LogFields {
            time: SystemTime::now(),
            method: req.method().to_string(),
            target: req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "/".into()),
            version: match req.version() {
                Version::HTTP_2 => "HTTP/2.0",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            referer: h(header::REFERER),
            user_agent: h(header::USER_AGENT),
            host: Host::of(req)
                .as_ref()
                .and_then(Host::as_str)
                .map(str::to_owned),
        }
    }
}

/// Counts the outcome and writes the access log line (when on).
fn finish(
    ctx: &ConnCtx,
    start: Instant,
    log: Option<LogFields>,
    resp: &Response<ResponseBody>,
    pool: Option<&PoolState>,
    backend: Option<usize>,
) {
    let status = resp.status().as_u16();
    if let (Some(pool), Some(i)) = (pool, backend) {
        if let Some(b) = pool.backends.get(i) {
            let class = (status / 100).clamp(1, 5) as usize - 1;
            b.requests[class].inc();
        }
    }
    if let Some(f) = log {
        let backend_name = pool
            .zip(backend)
            .and_then(|(p, i)| p.backends.get(i))
            .map(|b| b.config.name.as_str());
        let bytes = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let entry = access_log::Entry {
            client: ctx.peer.ip(),
            time: f.time,
            method: &f.method,
            target: &f.target,
            version: f.version,
            status,
            bytes,
            referer: f.referer.as_deref(),
            user_agent: f.user_agent.as_deref(),
            host: f.host.as_deref(),
            pool: pool.map(|p| p.config.name.as_str()),
            backend: backend_name,
            duration: start.elapsed(),
            listener: &ctx.listener.name,
        };
        if let Some(line) = access_log::format(ctx.listener.access_log, &entry) {
            access_log::write(line);
        }
    }
}
