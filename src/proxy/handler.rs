//! The request path: route (its rate limit; a redirect or a fixed response answered here) →
//! pool → [`super::forward`] (pick a backend, forward, retry) → stream the answer back, with
//! the route's response header edits and HSTS → count and log.
//!
//! Faults are told apart: a backend that refuses or cannot be reached is a 502 (and an
//! idempotent request without a body is retried once per `retries` on a *different*
//! backend), a backend too slow to answer is a 504, no available backend is a 503, and a
//! client that sends a broken body gets a 400 — each with a short plain-text body and a log
//! line saying which side failed.
#![allow(clippy::disallowed_methods)] // I/O shell: request timing and the access log's timestamp

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use tracing::debug;

use super::access_log;
use super::conn::ConnCtx;
use super::forward::{forward, local, plain, prepare, Prepared, ResponseBody};
use crate::net::acme::HTTP01_PREFIX;
use crate::net::body::ClientBody;
use crate::pools::table::{PoolState, RouteLimiter};
use crate::router::ratelimit::LimitKey;
use crate::router::route::Route;
use crate::router::rules::{Action, Fixed, Redirect, Rules};

/// The key authorization of an HTTP-01 token this appliance is being checked for (RFC 8555
/// §8.3), for a GET of `/.well-known/acme-challenge/TOKEN`; `None` for anything else.
fn acme_http01(
    live: &crate::live::Live,
    req: &Request<ClientBody>,
) -> Option<Response<ResponseBody>> {
    let token = req.uri().path().strip_prefix(HTTP01_PREFIX)?;
    if req.method() != http::Method::GET {
        return None;
    }
    let answer = live.acme.http01(token)?;
    debug!(token, "answering an ACME HTTP-01 challenge");
    let mut resp = Response::new(local(answer));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Some(resp)
}

/// Serves one request. Never fails: every error becomes a response.
///
/// Everything up to the backend is [`route`], one plain function, so that the future holds
/// the request once, made ready for its pool, rather than also as passed and as a local of
/// each `async fn` it went through. It runs at the first poll, not when the future is made:
/// an HTTP/2 stream reset before it is polled is neither routed, counted nor logged, and its
/// body is looked at once the frames read with its HEADERS are in.
pub async fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<ClientBody>,
) -> Result<Response<ResponseBody>, Infallible> {
    let mut routed = route(&ctx, req);
    // Matched in place: a binding by value would give the forwarding room of its own.
    Ok(match &mut routed {
        Routed::Answered(resp) => std::mem::replace(resp, Response::new(local(Bytes::new()))),
        Routed::Forward(f) => f.run(&ctx).await,
    })
}

/// Where a request goes: answered here, or to a pool's backend.
// Made once per request and never stored: boxing the forward would cost an allocation each
// (measured: the copies it saves are worth about as much).
#[allow(clippy::large_enum_variant)]
enum Routed {
    Answered(Response<ResponseBody>),
    Forward(Forwarding),
}

/// A request on its way to a pool.
struct Forwarding {
    live: Arc<crate::live::Live>,
    route: usize,
    pool: usize,
    p: Prepared,
    start: Instant,
    log_fields: Option<LogFields>,
}

impl Forwarding {
    /// Forwards the request and answers with what the pool gave.
    async fn run(&mut self, ctx: &ConnCtx) -> Response<ResponseBody> {
        // Both indices were looked up in this `live` by [`route`].
        let (pool, client) = (
            &self.live.table.pools[self.pool],
            &self.live.clients[self.pool],
        );
        let (resp, backend) = forward(ctx, pool, client, &mut self.p).await;
        let rules = self.live.table.routes.get(self.route).map(|r| &r.rules);
        let resp = match rules {
            Some(rules) => decorate(ctx, rules, resp),
            None => resp,
        };
        pool.latency.observe(self.start.elapsed().as_secs_f64());
        finish(
            ctx,
            self.start,
            self.log_fields.take(),
            &resp,
            Some(pool),
            backend,
        );
        resp
    }
}

/// Everything a request needs before a backend: refused at the edge, its path normalised,
/// an ACME challenge answered, routed, rate-limited, redirected or answered by its route, or
/// made ready for its pool.
fn route(ctx: &ConnCtx, mut req: Request<ClientBody>) -> Routed {
    let start = Instant::now();
    let live = ctx.live.load_full();
    let log_fields =
        (ctx.listener.access_log != crate::config::AccessLog::Off).then(|| LogFields::of(&req));
    let answer = |resp: Response<ResponseBody>, log_fields| {
        finish(ctx, start, log_fields, &resp, None, None);
        Routed::Answered(resp)
    };

    if let Some((status, why)) = super::headers::refuse(req.version(), req.method(), req.headers())
    {
        debug!(client.addr = %ctx.peer, method = %req.method(), why, "refused at the edge");
        return answer(plain(status, why), log_fields);
    }
    // Dot segments resolved: the path routed on is the path forwarded (no prefix bypassed).
    if let std::borrow::Cow::Owned(path) = crate::router::route::normalize_path(req.uri().path()) {
        let mut parts = req.uri().clone().into_parts();
        let pq = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        parts.path_and_query = pq.parse().ok();
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    // An ACME CA checking a token of an open order (HTTP-01): answered here, before any route
    // (whose redirect or backend knows nothing of it).
    if let Some(resp) = acme_http01(&live, &req) {
        return answer(resp, log_fields);
    }
    // A refcounted view of the host (no copy): it outlives `req`, which `prepare` consumes.
    let host_ref = Host::of(&req);
    let host = host_ref.as_ref().and_then(Host::as_str);
    let Some((ri, route)) = live
        .table
        .routes
        .find(&ctx.listener.name, host, req.uri().path())
    else {
        debug!(client.addr = %ctx.peer, host = host.unwrap_or(""), path = req.uri().path(), "no route");
        return answer(
            plain(StatusCode::NOT_FOUND, "no route for this host and path\n"),
            log_fields,
        );
    };
    if let Some(limited) = live
        .table
        .limiters
        .get(ri)
        .and_then(Option::as_ref)
        .and_then(|l| refuse_over_limit(ctx, l, &req, start))
    {
        return answer(decorate(ctx, &route.rules, limited), log_fields);
    }
    let pool_idx = match &route.action {
        Action::Pool(i) => *i,
        Action::Redirect(r) => {
            let resp = decorate(ctx, &route.rules, redirect(ctx, r, host, &req, route));
            return answer(resp, log_fields);
        }
        Action::Respond(f) => return answer(decorate(ctx, &route.rules, fixed(f)), log_fields),
    };
    // Routes are validated to point at existing pools, and clients are built per pool.
    let Some(pool) = live
        .table
        .pools
        .get(pool_idx)
        .filter(|_| pool_idx < live.clients.len())
    else {
        return Routed::Answered(plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "routing table inconsistent\n",
        ));
    };
    route.rules.request_headers.apply(req.headers_mut());
    if let Some(to) = &route.rules.rewrite_prefix {
        rewrite(&mut req, &route.path_prefix, to);
    }
    let host_value = host_ref.as_ref().and_then(Host::to_value);
    let p = prepare(ctx, &pool.config, req, host_value);
    Routed::Forward(Forwarding {
        live,
        route: ri,
        pool: pool_idx,
        p,
        start,
        log_fields,
    })
}

/// A 429 with `Retry-After` when the route's limit refuses this request's client.
fn refuse_over_limit(
    ctx: &ConnCtx,
    l: &RouteLimiter,
    req: &Request<ClientBody>,
    now: Instant,
) -> Option<Response<ResponseBody>> {
    let by = &l.limiter.limit().key;
    let value = match by {
        LimitKey::Header(n) => req.headers().get(n).map(HeaderValue::as_bytes),
        LimitKey::ClientIp => None,
    };
    let wait = l
        .limiter
        .check(l.limiter.key(ctx.peer.ip(), value), now)
        .err()?;
    l.refused.inc();
    let mut resp = plain(
        StatusCode::TOO_MANY_REQUESTS,
        "too many requests: slow down (see Retry-After)\n",
    );
    // Whole seconds, rounded up: a client that waits that long finds a token.
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    Some(resp)
}

/// The route's redirect for this request (400 when it has no host to redirect to).
fn redirect(
    ctx: &ConnCtx,
    r: &Redirect,
    host: Option<&str>,
    req: &Request<ClientBody>,
    route: &Route,
) -> Response<ResponseBody> {
    let uri = req.uri();
    let Some(location) = r.location(ctx.tls, host, uri.path(), uri.query(), &route.path_prefix)
    else {
        return plain(
            StatusCode::BAD_REQUEST,
            "no Host to redirect to: send a Host header\n",
        );
    };
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            let mut resp = plain(r.status, "redirecting\n");
            resp.headers_mut().insert(header::LOCATION, v);
            resp
        }
        Err(_) => plain(StatusCode::BAD_REQUEST, "cannot redirect this URL\n"),
    }
}

/// The route's fixed response.
fn fixed(f: &Fixed) -> Response<ResponseBody> {
    let mut resp = Response::new(local(f.body.clone()));
    *resp.status_mut() = f.status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, f.content_type.clone());
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(f.body.len()));
    resp
}

/// The route's prefix replaced by `to` in the request's path (the query kept).
fn rewrite(req: &mut Request<ClientBody>, prefix: &str, to: &str) {
    let path = crate::router::rules::rewrite_prefix(req.uri().path(), prefix, to);
    let pq = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = pq.parse().ok();
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// The route's response header edits, and HSTS over TLS.
fn decorate(
    ctx: &ConnCtx,
    rules: &Rules,
    mut resp: Response<ResponseBody>,
) -> Response<ResponseBody> {
    rules.response_headers.apply(resp.headers_mut());
    if let (Some(v), true) = (&rules.hsts, ctx.tls) {
        resp.headers_mut()
            .insert(header::STRICT_TRANSPORT_SECURITY, v.clone());
    }
    resp
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
            b.requests[crate::metrics::class_index(status)].inc();
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
