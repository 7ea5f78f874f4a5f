//! The sync API over HTTP/1.1 and h2 (h2c, or ALPN over TLS): parses each request once into
//! an endpoint (`route`), checks its bearer token against the endpoint's roles, bounds
//! bodies, calls the [`Hub`] and maps every failure to a status with a JSON `{"error": …}`
//! (see [`crate::sync::protocol`] for the table). One small function per endpoint.

use crate::net::file_body::Body;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::net::body::ClientBody;
use http::{header, Request, Response, StatusCode};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::metrics::ReasonLabels;
use super::route::Endpoint;
use super::{Hub, HubError};
use crate::net::body::read_body;
use crate::net::limit::Cap;
use crate::net::respond;
use crate::net::server::{HttpServer, ServerTls};
use crate::net::tls::PeerCertificate;
use crate::sync::auth::Role;
use crate::sync::caller::{self, Caller, Refusal};
use crate::sync::cycle::Advancer;
use crate::sync::manifest::{Hash, ReleaseId, MAX_BLOB_BYTES};
use crate::sync::protocol::{Commit, JoinRequest, Report, TimeReply, LONG_POLL, MAX_JSON_BYTES};
use crate::sync::provenance::SignedChangeset;

type Answer = Response<Body>;

/// Serves the sync API on `socket` (TLS when `tls` is set) until `shutdown`.
pub async fn serve(
    socket: TcpListener,
    tls: Option<ServerTls>,
    cap: Cap,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let server = HttpServer {
        tls,
        cap,
        ..HttpServer::new("sync")
    };
    let stop = shutdown.clone();
    server
        .serve(
            socket,
            move |peer: SocketAddr, req| {
                let (hub, shutdown) = (hub.clone(), shutdown.clone());
                let loopback = peer.ip().to_canonical().is_loopback();
                async move { handle(&hub, req, loopback, &shutdown).await }
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
    immutable(respond::bytes(StatusCode::OK, ctype, body))
}

/// Releases and blobs are named by their hash: they never change.
fn immutable(mut r: Answer) -> Answer {
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
        HubError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        HubError::Untrusted(_) => StatusCode::FORBIDDEN,
        HubError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        HubError::Full(_) => StatusCode::INSUFFICIENT_STORAGE,
        HubError::Store(_) => {
            warn!(error = %e, "sync store failed");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    error(status, e.to_string())
}

/// A whole, bounded JSON body (blobs are streamed instead: [`Hub::receive_blob`]).
async fn body(req: Request<ClientBody>, limit: usize) -> Result<bytes::Bytes, Answer> {
    read_body(req.into_body(), limit)
        .await
        .map_err(|e| error(e.status(), e.to_string()))
}

/// Answers one request; `loopback`: whether it came from a loopback address.
pub async fn handle(
    hub: &Arc<Hub>,
    req: Request<ClientBody>,
    loopback: bool,
    shutdown: &CancellationToken,
) -> Answer {
    // Taken first, for the clock exchange.
    let receive_us = hub.now_us() as i64;
    let endpoint = Endpoint::parse(req.method(), req.uri().path(), req.uri().query());
    // And, for the clock exchange only (a read of schedstat), how long the request has waited
    // for this thread.
    let queued = match endpoint {
        Ok(Endpoint::Time) => crate::net::slice::queued(),
        _ => std::time::Duration::ZERO,
    };
    let roles = match &endpoint {
        Ok(e) => e.roles(),
        Err(e) => match e.roles() {
            Some(roles) => roles,
            None => return error(e.status(), e.to_string()),
        },
    };
    let caller = match authorize(hub, &req, loopback, roles) {
        Ok(c) => c,
        Err(refused) => return refused,
    };
    let endpoint = match endpoint {
        Ok(e) => e,
        Err(e) => return error(e.status(), e.to_string()),
    };
    let received = Received {
        at_us: receive_us,
        queued_us: i64::try_from(queued.as_micros()).unwrap_or(i64::MAX),
    };
    match dispatch(hub, &caller, endpoint, req, shutdown, received).await {
        Ok(a) | Err(a) => a,
    }
}

/// Who the request comes from, if it may use an endpoint open to `roles`.
// The error is the ready answer; boxing it would buy nothing on this path.
#[allow(clippy::result_large_err)]
fn authorize(
    hub: &Hub,
    req: &Request<ClientBody>,
    loopback: bool,
    roles: &[Role],
) -> Result<Caller, Answer> {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let cert = req.extensions().get::<PeerCertificate>().map(|c| &*c.0);
    let settings = hub.settings();
    caller::identify(
        cert,
        &settings.revoked,
        loopback,
        &settings.tokens,
        auth,
        roles,
    )
    .map_err(|r| refused(hub, r))
}

/// The answer to a refused request: counted, and logged with what was tried.
fn refused(hub: &Hub, r: Refusal) -> Answer {
    match r {
        Refusal::Unauthenticated(message) => {
            hub.metrics.refused(ReasonLabels {
                reason: "unauthenticated",
            });
            error(StatusCode::UNAUTHORIZED, message)
        }
        Refusal::Forbidden { message, reason } => {
            warn!(reason, "sync request refused: {message}");
            hub.metrics.refused(ReasonLabels { reason });
            error(StatusCode::FORBIDDEN, message)
        }
    }
}

/// When a request reached the hub: its time on the hub's clock, and how long it had waited
/// for the hub's thread before that ([`crate::net::slice::queued`]).
#[derive(Debug, Clone, Copy)]
struct Received {
    at_us: i64,
    queued_us: i64,
}

async fn dispatch(
    hub: &Arc<Hub>,
    caller: &Caller,
    endpoint: Endpoint,
    req: Request<ClientBody>,
    shutdown: &CancellationToken,
    received: Received,
) -> Result<Answer, Answer> {
    match endpoint {
        Endpoint::Time => Ok(time(hub, received)),
        Endpoint::Schedule { wait } => Ok(schedule(hub, wait, shutdown).await),
        Endpoint::Fleet => Ok(json(StatusCode::OK, &hub.fleet())),
        Endpoint::Release(id) => release(hub, id).await,
        Endpoint::Signatures(id) => Ok(json(
            StatusCode::OK,
            &hub.signatures(id).await.map_err(hub_error)?,
        )),
        Endpoint::Provenance(id) => Ok(json(
            StatusCode::OK,
            &hub.provenance(id).await.map_err(hub_error)?,
        )),
        Endpoint::Blob(hash) => blob(hub, hash).await,
        Endpoint::Upload => upload(hub, req).await,
        Endpoint::PutBlob(hash) => put_blob(hub, hash, req).await,
        Endpoint::Commit(id) => commit(hub, id, req).await,
        Endpoint::Replicate(id) => Ok(json(
            StatusCode::OK,
            &hub.replicate(id).await.map_err(hub_error)?,
        )),
        Endpoint::Rollback => Ok(json(
            StatusCode::OK,
            &hub.rollback().await.map_err(hub_error)?,
        )),
        Endpoint::Advance(cycle) => Ok(json(
            StatusCode::OK,
            &hub.advance(cycle, Advancer::Agent)
                .await
                .map_err(hub_error)?,
        )),
        Endpoint::Report(name) => {
            caller.act_as_agent(&name).map_err(|r| refused(hub, r))?;
            report(hub, &name, req).await
        }
        Endpoint::Changeset => changeset(hub, caller, req, received.at_us).await,
        Endpoint::CaCert => ca_cert(hub).await,
        Endpoint::Join => join(hub, req).await,
    }
}

fn time(hub: &Hub, received: Received) -> Answer {
    let reply = TimeReply {
        receive_us: received.at_us,
        send_us: hub.now_us() as i64,
        queued_us: received.queued_us,
    };
    json(StatusCode::OK, &reply)
}

async fn schedule(hub: &Hub, wait: Option<u64>, shutdown: &CancellationToken) -> Answer {
    // A hub cut off from the others' state may be behind it: agents ask another hub.
    if let Some(c) = hub.cluster().filter(|c| !c.connected) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "hub {} is cut off from etcd ({}): its schedule may be behind; ask another hub",
                c.hub,
                c.error.as_deref().unwrap_or("no lease renewed")
            ),
        );
    }
    match wait {
        None => json(StatusCode::OK, &hub.schedule()),
        Some(v) => json(
            StatusCode::OK,
            &hub.wait_schedule(v, LONG_POLL, shutdown).await,
        ),
    }
}

async fn release(hub: &Arc<Hub>, id: ReleaseId) -> Result<Answer, Answer> {
    let manifest = hub.release(id).await.map_err(hub_error)?;
    Ok(bytes(manifest, "application/json"))
}

async fn blob(hub: &Arc<Hub>, hash: Hash) -> Result<Answer, Answer> {
    let (file, len) = hub.blob(hash).await.map_err(hub_error)?;
    let mut r = Response::new(Body::file(file, len));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    Ok(immutable(r))
}

async fn upload(hub: &Arc<Hub>, req: Request<ClientBody>) -> Result<Answer, Answer> {
    let b = body(req, MAX_JSON_BYTES).await?;
    let uploaded = hub.upload_manifest(&b).await.map_err(hub_error)?;
    Ok(json(StatusCode::OK, &uploaded))
}

async fn put_blob(hub: &Arc<Hub>, hash: Hash, req: Request<ClientBody>) -> Result<Answer, Answer> {
    // Refused before a byte is read when the sender says it is too large.
    if http_body::Body::size_hint(req.body()).lower() > MAX_BLOB_BYTES {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("blob larger than {MAX_BLOB_BYTES} bytes, the largest a release may hold"),
        ));
    }
    let created = hub
        .receive_blob(hash, req.into_body())
        .await
        .map_err(hub_error)?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(status, &serde_json::json!({ "hash": hash })))
}

async fn commit(hub: &Arc<Hub>, id: ReleaseId, req: Request<ClientBody>) -> Result<Answer, Answer> {
    let b = body(req, 64 * 1024).await?;
    let commit: Commit = if b.iter().all(u8::is_ascii_whitespace) {
        Commit::default()
    } else {
        serde_json::from_slice(&b)
            .map_err(|e| error(StatusCode::BAD_REQUEST, format!("commit body: {e}")))?
    };
    let committed = hub
        .commit(id, commit.at_us, commit.signatures)
        .await
        .map_err(hub_error)?;
    Ok(json(StatusCode::OK, &committed))
}

async fn report(hub: &Hub, name: &str, req: Request<ClientBody>) -> Result<Answer, Answer> {
    let b = body(req, 64 * 1024).await?;
    let report: Report = serde_json::from_slice(&b)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("report body: {e}")))?;
    hub.report(name, report).map_err(hub_error)?;
    Ok(respond::empty(StatusCode::NO_CONTENT))
}

fn no_ca() -> Answer {
    error(
        StatusCode::NOT_FOUND,
        "this hub issues no certificates: set sync.tls.ca_dir (the farm CA of `lockstep ca init`)",
    )
}

async fn ca_cert(hub: &Hub) -> Result<Answer, Answer> {
    let Some(dir) = hub.settings().ca_dir.clone() else {
        return Err(no_ca());
    };
    let path = crate::ca::Ca::cert_path(&dir);
    match tokio::fs::read(&path).await {
        Ok(pem) => Ok(respond::bytes(
            StatusCode::OK,
            "application/x-pem-file",
            pem,
        )),
        Err(e) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{}: {e}", path.display()),
        )),
    }
}

async fn join(hub: &Hub, req: Request<ClientBody>) -> Result<Answer, Answer> {
    let Some(dir) = hub.settings().ca_dir.clone() else {
        return Err(no_ca());
    };
    let b = body(req, 4096).await?;
    let j: JoinRequest = serde_json::from_slice(&b)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("join body: {e}")))?;
    let key = j.key_bytes().map(crate::ca::Ed25519Public).ok_or_else(|| {
        error(
            StatusCode::BAD_REQUEST,
            "public_key must be the 32 bytes of an Ed25519 key, hex",
        )
    })?;
    // One redemption at a time: the CA's state file is read, changed and written whole.
    static JOINS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = JOINS.lock().await;
    let redeemed = tokio::task::spawn_blocking(move || {
        crate::ca::Ca::open(&dir).and_then(|mut ca| ca.redeem(&j.token, &key))
    })
    .await
    .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match redeemed {
        Ok(joined) => {
            tracing::info!(agent = %joined.name, "an agent joined with a token and got its certificate");
            Ok(json(StatusCode::OK, &joined))
        }
        Err(crate::ca::CaError::Bad(m)) => Err(refused(
            hub,
            Refusal::Forbidden {
                message: m,
                reason: "join",
            },
        )),
        Err(e) => {
            warn!(error = %e, "the farm CA failed");
            Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
        }
    }
}

async fn changeset(
    hub: &Arc<Hub>,
    caller: &Caller,
    req: Request<ClientBody>,
    receive_us: i64,
) -> Result<Answer, Answer> {
    let b = body(req, MAX_JSON_BYTES).await?;
    // Signed by its origin (kept with it, for the provenance agents check), or bare.
    let signed = SignedChangeset::from_json(&b)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("changeset body: {e}")))?;
    caller
        .act_as_agent(&signed.changeset.origin)
        .map_err(|r| refused(hub, r))?;
    // Bounded by the time the request arrived, not the time its body finished: a slow body
    // must not widen the allowance.
    let reply = hub
        .signed_changeset(signed, receive_us.max(0) as u64)
        .await
        .map_err(hub_error)?;
    Ok(json(StatusCode::OK, &reply))
}
