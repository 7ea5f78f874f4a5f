//! The sync API over HTTP/1.1 and h2 (h2c, or ALPN over TLS): routes `/sync/v1/*` to the
//! [`Hub`], checks bearer tokens per role, bounds bodies, and maps every failure to a status
//! with a JSON `{"error": …}` (see [`crate::sync::protocol`] for the table).

use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::{Advancer, Hub, HubError};
use crate::net::body::read_body;
use crate::net::respond;
use crate::net::server::HttpServer;
use crate::sync::auth::{Check, Role};
use crate::sync::manifest::{Hash, MAX_BLOB_BYTES};
use crate::sync::protocol::{Commit, Report, TimeReply, LONG_POLL, MAX_JSON_BYTES};

type Answer = Response<Full<Bytes>>;

const READ: &[Role] = &[Role::Agent, Role::Publish];
const PUBLISH: &[Role] = &[Role::Publish];
const AGENT: &[Role] = &[Role::Agent];
/// Blobs come from publishers and from agents forwarding changesets.
const WRITE: &[Role] = &[Role::Agent, Role::Publish];

/// Serves the sync API on `socket` (TLS when `tls` is set) until `shutdown`.
pub async fn serve(
    socket: TcpListener,
    tls: Option<TlsAcceptor>,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let server = HttpServer { tls, ..HttpServer::new("sync") };
    let stop = shutdown.clone();
    server
        .serve(
            socket,
            move |_peer, req| {
                let (hub, shutdown) = (hub.clone(), shutdown.clone());
                async move { handle(&hub, req, &shutdown).await }
            },
            stop,
            tracker,
        )
        .await
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Answer {
    respond::json(status, value)
}

fn error(status: StatusCode, message: impl Into<String>) -> Answer {
    if status == StatusCode::UNAUTHORIZED {
        return respond::unauthorized("lockstep-sync", message);
    }
    respond::error(status, message)
}

fn bytes(body: Vec<u8>, ctype: &'static str) -> Answer {
    let mut r = respond::bytes(StatusCode::OK, ctype, body);
    // Releases and blobs are named by their hash: they never change.
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    r
}

fn hub_error(e: HubError) -> Answer {
    let status = match &e {
        HubError::Bad(_) | HubError::Manifest(_) => StatusCode::BAD_REQUEST,
        HubError::NotFound(_) => StatusCode::NOT_FOUND,
        HubError::Conflict(_) => StatusCode::CONFLICT,
        HubError::Store(_) => {
            warn!(error = %e, "sync store failed");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    error(status, e.to_string())
}

async fn body(req: Request<Incoming>, limit: usize) -> Result<Vec<u8>, Answer> {
    read_body(req.into_body(), limit)
        .await
        .map(|b| b.to_vec())
        .map_err(|e| error(e.status(), e.to_string()))
}

// The error is the ready answer; boxing it would buy nothing on this path.
#[allow(clippy::result_large_err)]
fn parse_hash(s: &str) -> Result<Hash, Answer> {
    s.parse()
        .map_err(|e: crate::sync::manifest::BadHash| error(StatusCode::BAD_REQUEST, e.to_string()))
}

/// Answers one request.
pub async fn handle(
    hub: &Arc<Hub>,
    req: Request<Incoming>,
    shutdown: &CancellationToken,
) -> Answer {
    // Taken first, for the clock exchange.
    let receive_us = hub.now_us() as i64;
    match route(hub, req, shutdown, receive_us).await {
        Ok(a) | Err(a) => a,
    }
}

async fn route(
    hub: &Arc<Hub>,
    req: Request<Incoming>,
    shutdown: &CancellationToken,
    receive_us: i64,
) -> Result<Answer, Answer> {
    let path = req.uri().path().to_string();
    let Some(rest) = path.strip_prefix("/sync/v1/") else {
        return Err(error(
            StatusCode::NOT_FOUND,
            "not a sync API path: see /sync/v1/schedule",
        ));
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let method = req.method().clone();
    let roles = match (&method, segments.as_slice()) {
        (&Method::GET | &Method::HEAD, ["time" | "schedule" | "agents"])
        | (&Method::GET | &Method::HEAD, ["releases" | "blobs", _]) => READ,
        (&Method::PUT, ["blobs", _]) => WRITE,
        (&Method::POST, ["changesets"]) => AGENT,
        (&Method::POST, ["releases"])
        | (&Method::POST, ["releases", _, "commit"])
        | (&Method::POST, ["rollback"]) => PUBLISH,
        (&Method::POST, ["cycles", _, "advance"]) | (&Method::POST, ["agents", _, "report"]) => {
            AGENT
        }
        (
            _,
            ["time" | "schedule" | "agents" | "releases" | "blobs" | "rollback" | "cycles"
            | "changesets", ..],
        ) => {
            return Err(error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {path}"),
            ));
        }
        _ => {
            return Err(error(
                StatusCode::NOT_FOUND,
                format!("no such sync API path {path}"),
            ))
        }
    };
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match hub.settings().tokens.check(auth, roles) {
        Check::Allow => {}
        Check::Unauthenticated => {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "missing or unknown bearer token",
            ))
        }
        Check::Forbidden => return Err(error(StatusCode::FORBIDDEN, "this token may not do that")),
    }
    let segs: Vec<String> = segments.iter().map(|s| s.to_string()).collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let answer = match (method, segs.as_slice()) {
        (_, ["time"]) => json(
            StatusCode::OK,
            &TimeReply {
                receive_us,
                send_us: hub.now_us() as i64,
            },
        ),
        (_, ["schedule"]) => {
            let wait = req.uri().query().and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix("wait="))
                    .map(|v| v.parse::<u64>())
            });
            match wait {
                None => json(StatusCode::OK, &hub.schedule()),
                Some(Ok(v)) => json(
                    StatusCode::OK,
                    &hub.wait_schedule(v, LONG_POLL, shutdown).await,
                ),
                Some(Err(_)) => {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        "wait= takes the schedule version (a number)",
                    ))
                }
            }
        }
        (_, ["agents"]) => json(StatusCode::OK, &hub.fleet()),
        (Method::GET | Method::HEAD, ["releases", id]) => {
            let id = parse_hash(id)?;
            bytes(
                hub.release(id).await.map_err(hub_error)?,
                "application/json",
            )
        }
        (Method::GET | Method::HEAD, ["blobs", hash]) => {
            let hash = parse_hash(hash)?;
            bytes(
                hub.blob(hash).await.map_err(hub_error)?,
                "application/octet-stream",
            )
        }
        (Method::POST, ["releases"]) => {
            let b = body(req, MAX_JSON_BYTES).await?;
            json(
                StatusCode::OK,
                &hub.upload_manifest(b).await.map_err(hub_error)?,
            )
        }
        (Method::PUT, ["blobs", hash]) => {
            let hash = parse_hash(hash)?;
            let b = body(req, MAX_BLOB_BYTES as usize).await?;
            let created = hub.put_blob(hash, b).await.map_err(hub_error)?;
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            json(status, &serde_json::json!({ "hash": hash }))
        }
        (Method::POST, ["releases", id, "commit"]) => {
            let id = parse_hash(id)?;
            let b = body(req, 64 * 1024).await?;
            let commit: Commit = if b.iter().all(u8::is_ascii_whitespace) {
                Commit::default()
            } else {
                serde_json::from_slice(&b)
                    .map_err(|e| error(StatusCode::BAD_REQUEST, format!("commit body: {e}")))?
            };
            json(
                StatusCode::OK,
                &hub.commit(id, commit.at_us).await.map_err(hub_error)?,
            )
        }
        (Method::POST, ["changesets"]) => {
            let b = body(req, MAX_JSON_BYTES).await?;
            let cs: crate::sync::protocol::Changeset = serde_json::from_slice(&b)
                .map_err(|e| error(StatusCode::BAD_REQUEST, format!("changeset body: {e}")))?;
            json(StatusCode::OK, &hub.changeset(cs).await.map_err(hub_error)?)
        }
        (Method::POST, ["rollback"]) => {
            json(StatusCode::OK, &hub.rollback().await.map_err(hub_error)?)
        }
        (Method::POST, ["cycles", n, "advance"]) => {
            let n: u64 = n
                .parse()
                .map_err(|_| error(StatusCode::BAD_REQUEST, "the cycle must be a number"))?;
            json(
                StatusCode::OK,
                &hub.advance(n, Advancer::Agent).await.map_err(hub_error)?,
            )
        }
        (Method::POST, ["agents", name, "report"]) => {
            let name = name.to_string();
            let b = body(req, 64 * 1024).await?;
            let report: Report = serde_json::from_slice(&b)
                .map_err(|e| error(StatusCode::BAD_REQUEST, format!("report body: {e}")))?;
            hub.report(&name, report).map_err(hub_error)?;
            respond::empty(StatusCode::NO_CONTENT)
        }
        // Every (method, path) pair that passed the role table above is handled here.
        _ => error(StatusCode::NOT_FOUND, "no such sync API path"),
    };
    Ok(answer)
}
