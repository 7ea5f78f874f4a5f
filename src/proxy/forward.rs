//! The upstream phases of one request, named as Pingora's `ProxyHttp` names them, each a
//! function of its own: [`prepare`] (the request as backends get it: hash key, hop-by-hop
//! headers, `X-Forwarded-*`, `Via`; what may be replayed), [`choose`] (which backend: health,
//! tried ones, the pool's policy), [`send`] (one attempt: the exchange under
//! `response_timeout`, counted in flight by a guard, its failure classified),
//! [`crate::proxy::retry::after_failure`] (retry or answer, pure) and [`respond`] (the response
//! as the client gets it, upgrades bridged). [`forward`] runs them in order.
#![allow(clippy::disallowed_methods)] // I/O shell: the request path: latency, the balancer's `now` and random draw

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use tracing::{debug, warn};

use super::conn::ConnCtx;
use super::headers::{self, Forwarded};
use super::retry::{self, Answer, Fault, Next, Tried};
use crate::config::{HashKey, Pool};
use crate::net::body::{ClientBody, RequestBody};
use crate::net::h1::Upgrade;
use crate::net::proxy_protocol::ClientAddrs;
use crate::net::respond;
use crate::net::upstream::{Clients, UpstreamBody, UpstreamError};
use crate::pools::table::{InFlight, PoolLoad, PoolState};
use crate::router::balance::hash_key;
use crate::router::health::admits;

/// A request made ready for backends.
pub struct Prepared {
    /// Method, target (origin form), version and rewritten headers, as every attempt sends
    /// them.
    parts: http::request::Parts,
    /// The forwarding fields, written after `parts`' own by every attempt.
    added: headers::Added,
    /// The body, until an attempt takes it.
    body: Option<RequestBody>,
    /// Raised when reading the client's body failed.
    client_failed: Option<Arc<AtomicBool>>,
    /// Whether the client asked for an `Upgrade` (WebSocket).
    wants_upgrade: bool,
    /// The hash key of a `hash` pool.
    pub key: Option<u64>,
    /// Whether it may be replayed on another backend.
    pub retryable: bool,
}

/// The key a `hash` pool places the request by.
pub fn key_of(cfg: &Pool, peer: std::net::IpAddr, headers: &http::HeaderMap) -> Option<u64> {
    match &cfg.hash_key {
        None => None,
        Some(HashKey::ClientIp) => Some(hash_key(peer.to_string().as_bytes())),
        Some(HashKey::Header(name)) => headers.get(name).map(|v| hash_key(v.as_bytes())),
        Some(HashKey::Cookie(name)) => {
            headers::cookie(headers, name).map(|v| hash_key(v.as_bytes()))
        }
    }
}

/// Phase 1: the request as every backend will get it.
pub fn prepare(
    ctx: &ConnCtx,
    cfg: &Pool,
    req: Request<ClientBody>,
    host: Option<HeaderValue>,
) -> Prepared {
    let key = key_of(cfg, ctx.peer.ip(), req.headers());
    let wants_upgrade = req.version() == Version::HTTP_11 && headers::is_upgrade(req.headers());
    let (mut parts, body) = req.into_parts();
    if parts.uri.authority().is_some() {
        let origin = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        parts.uri = Uri::from(origin);
    }
    let via = if parts.version == Version::HTTP_2 {
        "2 lockstep"
    } else {
        "1.1 lockstep"
    };
    headers::strip_hop_by_hop(&mut parts.headers, wants_upgrade);
    // The host routed on is the host forwarded: with an absolute-form target (or h2's
    // `:authority`) that is the target's authority, whatever `Host` said (RFC 9112 §3.2.2).
    // (Usually it is the `Host` the request has: then nothing is inserted.)
    if let Some(h) = &host {
        if parts.headers.get(header::HOST) != Some(h) {
            parts.headers.insert(header::HOST, h.clone());
        }
    }
    let added = headers::add_forwarded(
        &mut parts.headers,
        Forwarded {
            peer: &ctx.peer_value,
            trusted: ctx.trusted,
            proto: if ctx.tls { "https" } else { "http" },
            host,
            via,
        },
    );
    // A pool that sends the PROXY protocol tells its backends whose connection this is.
    if let (Some(_), Some(local)) = (cfg.send_proxy, ctx.local) {
        parts.extensions.insert(ClientAddrs {
            source: ctx.peer,
            destination: local,
        });
    }
    let bodyless = http_body::Body::is_end_stream(&body);
    let retryable = retry::retryable(&parts.method, bodyless, wants_upgrade);
    let client_failed = (!bodyless).then(|| Arc::new(AtomicBool::new(false)));
    let body = Some(match &client_failed {
        None => RequestBody::Empty,
        Some(flag) => RequestBody::Stream {
            inner: body,
            client_failed: flag.clone(),
        },
    });
    Prepared {
        parts,
        added,
        body,
        client_failed,
        wants_upgrade,
        key,
        retryable,
    }
}

/// Phase 2: the backend for the next attempt, among the available ones not yet tried that
/// have room under their `max_connections`. A backend in its slow start is passed over in
/// proportion to how far it still is from its full share, unless no other remains.
pub fn choose(
    pool: &PoolState,
    key: Option<u64>,
    tried: &Tried,
    now: Instant,
    random: u64,
) -> Option<usize> {
    let health = pool.health.load();
    let load = PoolLoad {
        backends: &pool.backends,
        now,
    };
    let open =
        |i: usize| health.available(i, now) && !tried.contains(&i) && pool.backends[i].has_room();
    let Some(ramp) = pool.config.slow_start else {
        return pool.balancer.pick(&load, &open, key, random);
    };
    let warm = |i: usize| {
        let share = health.share(i, now, Some(ramp));
        // Each backend its own draw from the one random number (only while it ramps up).
        let draw =
            || hash_key(&(random ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes());
        open(i) && (share >= 1.0 || admits(share, draw()))
    };
    pool.balancer
        .pick(&load, &warm, key, random)
        .or_else(|| pool.balancer.pick(&load, &open, key, random))
}

/// Whether a request finds no backend only because the available ones are at their
/// `max_connections` (then it waits in the pool's queue).
fn all_busy(pool: &PoolState, tried: &Tried, now: Instant) -> bool {
    let health = pool.health.load();
    (0..pool.backends.len())
        .any(|i| health.available(i, now) && !tried.contains(&i) && !pool.backends[i].has_room())
}

/// Why the queue turned a request away.
#[derive(Debug, Clone, Copy)]
enum Turned {
    Full,
    Timeout,
}

/// Waits in the pool's queue until a request on one of its backends ends, at most until
/// `until` (set at the first wait: the whole wait of a request is bounded by `queue.timeout`).
async fn wait_in_queue(pool: &PoolState, until: &mut Option<Instant>) -> Result<(), Turned> {
    let q = &pool.queue;
    let deadline = *until.get_or_insert_with(|| Instant::now() + pool.config.queue_timeout);
    let Some(_place) = Waiting::join(q, pool.config.queue_max) else {
        q.refused[0].inc();
        return Err(Turned::Full);
    };
    // `_place` leaves the queue however this ends, a client gone (the future dropped) too.
    tokio::time::timeout_at(deadline.into(), q.freed.notified())
        .await
        .map_err(|_| {
            q.refused[1].inc();
            Turned::Timeout
        })
}

/// A request's place in a pool's queue, given back when dropped.
struct Waiting<'a>(&'a crate::pools::table::Queue);

impl<'a> Waiting<'a> {
    /// A place, unless `max` requests already wait.
    fn join(q: &'a crate::pools::table::Queue, max: usize) -> Option<Waiting<'a>> {
        q.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        q.depth.inc();
        Some(Waiting(q))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        self.0.depth.dec();
    }
}

/// Phase 3: sends the request to backend `i` (the body goes with the first attempt that
/// takes it), counted in flight by `slot` for as long as the exchange and then the response's
/// body live (dropping the future, an h2 reset or a client gone, ends the count too), under
/// the pool's `response_timeout`; records latency and the passive-health outcome.
pub async fn send(
    pool: &PoolState,
    i: usize,
    client: &Clients,
    p: &mut Prepared,
    slot: InFlight,
    sent: Instant,
) -> Result<Response<UpstreamBody>, Fault> {
    let body = p.body.take().unwrap_or(RequestBody::Empty);
    let client_failed = p.client_failed.as_deref();
    let backend = &pool.backends[i];
    let cfg = &pool.config;
    let result = {
        let r = client
            .request(
                backend.config.address,
                &p.parts,
                p.added.fields(),
                body,
                cfg.response_timeout,
                sent,
            )
            .await;
        (r, sent, Instant::now())
    };
    match result {
        (Ok(mut resp), sent, done) => {
            backend.ewma.observe(done - sent, done);
            backend.latency.observe((done - sent).as_secs_f64());
            pool.record_outcome(i, !resp.status().is_server_error(), done);
            resp.body_mut().keep(Box::new(slot));
            Ok(resp)
        }
        (Err(UpstreamError::TimedOut(_)), _, done) => {
            pool.record_outcome(i, false, done);
            warn!(
                pool = %cfg.name, backend = %backend.config.name, timeout = ?cfg.response_timeout,
                fault = Fault::Timeout.side(), "backend response timed out"
            );
            Err(Fault::Timeout)
        }
        (Err(e), _, done) => {
            if client_failed.is_some_and(|f| f.load(Ordering::Relaxed)) {
                debug!(error = %e, fault = Fault::ClientBody.side(), "client sent a broken request body");
                return Err(Fault::ClientBody);
            }
            pool.record_outcome(i, false, done);
            let fault = if e.is_connect() {
                Fault::Connect
            } else {
                Fault::Request
            };
            warn!(
                pool = %cfg.name, backend = %backend.config.name, backend.addr = %backend.config.address,
                error = %error_chain(&e), fault = fault.side(),
                "{}", if fault == Fault::Connect { "backend connect failed" } else { "backend request failed" }
            );
            Err(fault)
        }
    }
}

/// Phase 5: the backend's response as the client gets it: hop-by-hop headers gone, body
/// streamed; a `101` to a client that asked for the upgrade bridges the two connections.
pub fn respond(
    resp: Response<UpstreamBody>,
    wants_upgrade: bool,
    ctx: &ConnCtx,
) -> Response<ResponseBody> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS && wants_upgrade {
        let (mut parts, body) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, true);
        if let Some(backend) = body.into_upgraded() {
            parts
                .extensions
                .insert(Upgrade::new(backend, ctx.tunnels.clone()));
        }
        return Response::from_parts(parts, local(Bytes::new()));
    }
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, false);
    Response::from_parts(parts, Either::Left(body))
}

/// Forwards the prepared request to a backend of `pool`: the phases after [`prepare`] in
/// order, retrying as [`retry::after_failure`] decides. Returns the answer and the backend that
/// gave it (or the last one tried).
pub async fn forward(
    ctx: &ConnCtx,
    pool: &PoolState,
    client: &Clients,
    p: &mut Prepared,
) -> (Response<ResponseBody>, Option<usize>) {
    let attempts = retry::attempts(p.retryable, pool.config.retries);
    let mut tried = Tried::default();
    let mut failed = false;
    let mut attempt = 0;
    let mut queued_until = None;
    while attempt < attempts {
        let now = Instant::now();
        let i = match choose(pool, p.key, &tried, now, rand::random::<u64>()) {
            Some(i) => i,
            // Every backend it could use is at its max_connections: wait for a place (boxed:
            // the rare path keeps the request's future small).
            None if all_busy(pool, &tried, now) => {
                match Box::pin(wait_in_queue(pool, &mut queued_until)).await {
                    Ok(()) => continue,
                    Err(why) => return (queue_refused(pool, why), None),
                }
            }
            None => break,
        };
        // Another request may have taken the last place since: choose again.
        let Some(slot) = pool.backends[i].start_request(&pool.queue.freed) else {
            continue;
        };
        tried.push(i);
        if attempt > 0 {
            pool.retries.inc();
        }
        attempt += 1;
        match send(pool, i, client, p, slot, now).await {
            Ok(resp) => return (respond(resp, p.wants_upgrade, ctx), Some(i)),
            Err(fault) => match retry::after_failure(fault, p.retryable) {
                Next::Retry => failed = true,
                Next::Answer(a) => return (answer(a), Some(i)),
            },
        }
    }
    if failed {
        return (answer(retry::UNAVAILABLE), tried.last());
    }
    warn!(pool = %pool.config.name, fault = "upstream", "no healthy backend");
    (
        plain(StatusCode::SERVICE_UNAVAILABLE, "no healthy backend\n"),
        None,
    )
}

/// The 503 of a request the pool's queue turned away.
fn queue_refused(pool: &PoolState, why: Turned) -> Response<ResponseBody> {
    let text = match why {
        Turned::Full => "every backend is at its max_connections and the queue is full\n",
        Turned::Timeout => "every backend stayed at its max_connections for queue.timeout\n",
    };
    warn!(pool = %pool.config.name, fault = "queue", reason = ?why, "request turned away by the queue");
    let mut r = plain(StatusCode::SERVICE_UNAVAILABLE, text);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// What goes back to the client: a backend's streamed body or a short local one.
pub type ResponseBody = Either<UpstreamBody, Full<Bytes>>;

/// A short local response body.
pub fn local(text: impl Into<Bytes>) -> ResponseBody {
    Either::Right(Full::new(text.into()))
}

/// A short local plain-text answer.
pub fn plain(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    respond::text::<Full<Bytes>>(status, text).map(Either::Right)
}

fn answer(a: Answer) -> Response<ResponseBody> {
    let mut r = plain(a.status, a.text);
    if a.close {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
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
