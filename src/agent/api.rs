//! The agent's write and peer API, on its serve address. Callers are identified by
//! [`crate::sync::caller`]: over TLS by their farm-CA certificate (a peer's changeset only
//! from the agent that made it; writes from a publisher or this agent's own certificate), and
//! from loopback by the agent token (`Authorization: Bearer …`, compared in constant time; open
//! when the agent has no token). Anything else from the network is refused (401/403, counted
//! in `lockstep_agent_refused_total{what="caller"}`).
//!
//! | request | answer |
//! |---|---|
//! | `PUT /content/{path}` (the file's bytes) | 200 `{"changeset": "name/seq"}`, or `null` when unchanged; 400 bad path (or a symlink on its way in `watch.dir`: never followed), 413 over `watch.max_file_size`; 503 until the agent has heard from the hub (its clock and its record of this agent), without which a change cannot be numbered |
//! | `DELETE /content/{path}` | 200 as above; 404 no such file |
//! | `POST /.lockstep/changesets` (a frame of [`super::frame::encode`]) | 202 installed in the background; 400 malformed, damaged, or numbered ahead of this agent's estimate of hub time; 403 unsigned or not verifying by its origin's farm certificate (an agent with `tls:`), or from an origin `trusted_origins` does not list (with `trusted_keys`, without `tls:`); 503 before that estimate exists; 200 `echo` for our own |
//!
//! A write is a local edit like one made in `watch.dir` (it is written there too, and
//! forwarded by the `watch.mode`). A changeset from a peer is verified whole — every blob
//! against its hash — before any of it is stored or installed; installing it never forwards it
//! again, and one whose origin is this agent is dropped (nothing comes back to its origin).

use crate::net::body::read_body;
use crate::net::respond;
use std::sync::Arc;

use crate::net::body::ClientBody;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::frame::{self, PEER_PATH};
use super::messages::{Input, Install, Stored, WriteError, INSTALL_QUEUE};
use super::metrics::AgentMetrics;
use super::release::{decode_path, MAX_INLINE_BYTES};
use crate::net::body::{stream_into, StreamError};
use crate::net::file_body::Body;
use crate::net::tls::PeerCertificate;
use crate::sync::auth::{Role, Tokens};
use crate::sync::caller::{self, Caller, Refusal};
use crate::sync::identity::Kind;
use crate::sync::provenance::ChangesetAuthority;
use crate::sync::store::FsStore;

/// Prefix of the write API.
pub const CONTENT_PREFIX: &str = "/content/";

/// What the API needs.
pub struct AgentApi {
    /// This agent's name.
    pub name: String,
    /// Accepted token (the agent token).
    pub tokens: Tokens,
    /// Revoked certificates (the farm CA's list).
    pub revoked: crate::sync::identity::Revocations,
    /// The agent's store.
    pub store: Arc<FsStore>,
    /// Changesets to install.
    pub installs: mpsc::Sender<Install>,
    /// The local-edit thread (absent without `watch:`).
    pub local: Option<mpsc::UnboundedSender<Input>>,
    /// Largest file a `PUT` may carry.
    pub max_file_bytes: u64,
    /// Hub time now (µs) as this agent estimates it; `None` until the clock is measured.
    pub hub_now: super::messages::HubNow,
    /// Metrics.
    pub metrics: Arc<AgentMetrics>,
    /// Which peers' changesets may be installed (see [`super::verify::changeset_authority`]).
    pub changesets: Option<Arc<dyn ChangesetAuthority>>,
    /// Peer frames being read at once ([`FRAMES_AT_ONCE`]).
    pub frames: Arc<tokio::sync::Semaphore>,
}

/// Peer frames read at once: a frame is held whole (up to [`frame::MAX_INLINE_BYTES`] of
/// blobs and its JSON) while it is checked, so this bounds what peers can make the agent
/// hold. A frame beyond it is answered 503: the edit arrives with the hub's release.
pub const FRAMES_AT_ONCE: usize = 4;

/// Whether a request is for this API (else it is served from the release).
pub fn is_api(method: &Method, path: &str) -> bool {
    (method == Method::POST && path == PEER_PATH)
        || ((method == Method::PUT || method == Method::DELETE) && path.starts_with(CONTENT_PREFIX))
}

fn answer(status: StatusCode, json: serde_json::Value) -> Response<Body> {
    respond::json(status, &json)
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<Body> {
    if status == StatusCode::UNAUTHORIZED {
        return respond::unauthorized("lockstep-agent", message.to_string());
    }
    respond::error(status, message.to_string())
}

async fn read(req: Request<ClientBody>, limit: u64) -> Result<Bytes, Response<Body>> {
    read_body(
        req.into_body(),
        usize::try_from(limit).unwrap_or(usize::MAX),
    )
    .await
    .map_err(|e| error(e.status(), e))
}

/// A `PUT`'s body streamed into the store (memory: a buffer, whatever the size), at most
/// `max_file_bytes`.
async fn receive(api: &AgentApi, req: Request<ClientBody>) -> Result<Stored, Response<Body>> {
    let max = api.max_file_bytes;
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over watch.max_file_size ({max} bytes)"),
        )
    };
    if http_body::Body::size_hint(req.body()).lower() > max {
        return Err(too_large());
    }
    let store_error = |e: &dyn std::fmt::Display| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the agent's store: {e}"),
        )
    };
    let store = api.store.clone();
    let sink = tokio::task::spawn_blocking(move || store.blob_sink(max))
        .await
        .map_err(|e| store_error(&e))?
        .map_err(|e| store_error(&e))?;
    let sink = match stream_into(req.into_body(), sink, max).await {
        Ok(s) => s,
        Err(StreamError::TooLarge { .. }) => return Err(too_large()),
        Err(StreamError::Read(e)) => return Err(error(StatusCode::BAD_REQUEST, e)),
        Err(e) => return Err(store_error(&e)),
    };
    let (hash, size) = (sink.hash(), sink.len());
    let store = api.store.clone();
    tokio::task::spawn_blocking(move || store.adopt_blob(sink, &hash))
        .await
        .map_err(|e| store_error(&e))?
        .map_err(|e| store_error(&e))?;
    Ok(Stored { hash, size })
}

/// Answers one API request; `loopback`: whether it came from a loopback address.
pub async fn handle(api: &AgentApi, req: Request<ClientBody>, loopback: bool) -> Response<Body> {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let cert = req.extensions().get::<PeerCertificate>().map(|c| &*c.0);
    let peer = req.uri().path() == PEER_PATH;
    // Peers send changesets; writes come from this backend's own users (loopback, with the
    // agent token), a publisher, or this agent's own certificate.
    // (The agent has no publish token: a loopback writer holds the agent token.)
    let roles: &[Role] = if peer || cert.is_none() {
        &[Role::Agent]
    } else {
        &[Role::Agent, Role::Publish]
    };
    let caller = match caller::identify(cert, &api.revoked, loopback, &api.tokens, auth, roles) {
        Ok(c) => c,
        Err(r) => return refused(api, r),
    };
    if peer {
        return from_peer(api, &caller, req).await;
    }
    if let Caller::Party(id) = &caller {
        if id.kind == Kind::Agent {
            if let Err(r) = caller.act_as_agent(&api.name) {
                return refused(api, r);
            }
        }
    }
    write(api, req).await
}

/// The answer to a refused request: counted and logged.
fn refused(api: &AgentApi, r: Refusal) -> Response<Body> {
    api.metrics.refused("caller");
    match r {
        Refusal::Unauthenticated(m) => error(StatusCode::UNAUTHORIZED, m),
        Refusal::Forbidden { message, .. } => {
            warn!("agent API request refused: {message}");
            error(StatusCode::FORBIDDEN, message)
        }
    }
}

/// A changeset frame from a peer: admitted ([`admit`]), its large blobs stored
/// ([`store_large`]), then queued for install ([`queue_install`]).
async fn from_peer(api: &AgentApi, caller: &Caller, req: Request<ClientBody>) -> Response<Body> {
    let Ok(_reading) = api.frames.clone().try_acquire_owned() else {
        api.metrics.refused("busy");
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{FRAMES_AT_ONCE} changesets are being received here already; this one arrives with the hub's release"),
        );
    };
    // Peers inline at most frame::MAX_INLINE_BYTES of blobs; the rest is the JSON.
    let frame = match read(req, frame::MAX_INLINE_BYTES + 32 * 1024 * 1024).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (cs, blobs) = match admit(api, caller, &frame) {
        Ok(v) => v,
        Err(r) => return r,
    };
    // Large files are served from the store: they must be on disk before the install. Small
    // ones are served from memory at once and written by the agent's disk worker.
    let (large, small): (Vec<_>, Vec<_>) = blobs
        .into_iter()
        .partition(|(_, b)| b.len() as u64 > MAX_INLINE_BYTES);
    if let Err(r) = store_large(api, large).await {
        return r;
    }
    queue_install(api, cs, small)
}

/// Blobs as a frame carries them.
type FrameBlobs = Vec<(crate::sync::manifest::Hash, Bytes)>;

/// Decodes and checks a peer's frame: whole and hash-verified, from the caller's own origin,
/// numbered plausibly and verifying by the changeset authority. `Err` is the answer (also for
/// an echo of our own changeset, which is dropped with 200).
// The error is the ready answer; boxing it would buy nothing on this path.
#[allow(clippy::result_large_err)]
fn admit(
    api: &AgentApi,
    caller: &Caller,
    frame: &[u8],
) -> Result<(crate::sync::changeset::Changeset, FrameBlobs), Response<Body>> {
    let (signed, blobs) = frame::decode(frame).map_err(|e| {
        api.metrics.refused("changeset");
        warn!(error = %e, "changeset from a peer refused");
        error(StatusCode::BAD_REQUEST, e)
    })?;
    let cs = &signed.changeset;
    // A peer forwards only its own changesets.
    caller
        .act_as_agent(&cs.origin)
        .map_err(|r| refused(api, r))?;
    if cs.origin == api.name {
        debug!(changeset = %cs.name(), "our own changeset came back; dropped");
        return Err(answer(
            StatusCode::OK,
            serde_json::json!({ "state": "echo" }),
        ));
    }
    // Its numbers are hub time as the peer estimated it: bounded by ours, as the hub bounds
    // them by its clock (a `seq` far ahead would make this agent wait for the hub's release
    // to include it; a `detected_us` far ahead would win conflicts here).
    let Some(now) = (api.hub_now)() else {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this agent has not measured the hub's clock yet, so it cannot check the changeset's numbers; the hub's release brings the edit",
        ));
    };
    cs.check_time(now).map_err(|e| {
        api.metrics.refused("implausible");
        warn!(peer_origin = %cs.origin, error = %e, "changeset from a peer refused");
        error(StatusCode::BAD_REQUEST, e)
    })?;
    // The same authority that decides on the hub's built releases: a changeset it refuses is
    // not installed here either.
    if let Some(authority) = &api.changesets {
        authority.verify(&signed).map_err(|e| {
            api.metrics.refused("signature");
            warn!(error = %e, "changeset from a peer refused");
            error(StatusCode::FORBIDDEN, e)
        })?;
    }
    Ok((signed.changeset, blobs))
}

/// Writes the blobs too large to serve from memory into the store (off the runtime).
async fn store_large(api: &AgentApi, large: FrameBlobs) -> Result<(), Response<Body>> {
    let store = api.store.clone();
    let stored = tokio::task::spawn_blocking(move || {
        for (hash, data) in large {
            if !store.has_blob(&hash) {
                store.write_blob(&hash, &data)?;
            }
        }
        Ok::<_, crate::sync::store::StoreError>(())
    })
    .await;
    match stored {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the agent's store: {e}"),
        )),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e)),
    }
}

/// Hands an admitted changeset to the install queue: 202, or 503 when the queue is full (the
/// edit then arrives with the hub's release).
fn queue_install(
    api: &AgentApi,
    cs: crate::sync::changeset::Changeset,
    small: FrameBlobs,
) -> Response<Body> {
    let name = cs.name();
    let install = Install {
        cs,
        remote: true,
        blobs: small,
    };
    match api.installs.try_send(install) {
        Ok(()) => answer(
            StatusCode::ACCEPTED,
            serde_json::json!({ "state": "accepted", "changeset": name }),
        ),
        Err(mpsc::error::TrySendError::Full(_)) => {
            api.metrics.refused("busy");
            debug!(changeset = %name, "install queue full; the peer's changeset comes with the hub's release");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{INSTALL_QUEUE} changesets are waiting to be installed here; this one arrives with the hub's release"),
            )
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            error(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping")
        }
    }
}

async fn write(api: &AgentApi, req: Request<ClientBody>) -> Response<Body> {
    let Some(local) = &api.local else {
        return error(
            StatusCode::NOT_FOUND,
            "the write API needs `watch:` in agent.yaml (its mode says where writes go)",
        );
    };
    let raw = req.uri().path()[CONTENT_PREFIX.len()..].to_string();
    let Some(path) = decode_path(&raw) else {
        return error(
            StatusCode::BAD_REQUEST,
            "malformed percent-encoding in the path",
        );
    };
    let content = if req.method() == Method::PUT {
        match receive(api, req).await {
            Ok(c) => Some(c),
            Err(r) => return r,
        }
    } else {
        None
    };
    let (tx, rx) = oneshot::channel();
    if local
        .send(Input::Write {
            path,
            content,
            reply: tx,
        })
        .is_err()
    {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping");
    }
    match rx.await {
        Ok(Ok(name)) => answer(StatusCode::OK, serde_json::json!({ "changeset": name })),
        Ok(Err(e)) => {
            let status = match &e {
                WriteError::Bad(_) => StatusCode::BAD_REQUEST,
                WriteError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                WriteError::NotFound(_) => StatusCode::NOT_FOUND,
                WriteError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
                WriteError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            error(status, e)
        }
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping"),
    }
}
