//! The messages of the sync API (`/sync/v1/*`), JSON over HTTP/1.1 or h2 with
//! `Authorization: Bearer <token>`. Times are µs since the Unix epoch on the hub's clock.
//!
//! | request | token | answer |
//! |---|---|---|
//! | `GET /sync/v1/time` | agent or publish | [`TimeReply`] |
//! | `GET /sync/v1/schedule[?wait=VERSION]` | agent or publish | [`Schedule`]; with `wait`, held until the version differs (at most [`LONG_POLL`]) |
//! | `GET /sync/v1/releases/{id}` | agent or publish | the manifest (canonical JSON; its blake3 is `id`) |
//! | `GET /sync/v1/blobs/{hash}` | agent or publish | the blob's bytes |
//! | `POST /sync/v1/releases` (manifest) | publish | [`Uploaded`]: the id and the blobs the hub lacks |
//! | `PUT /sync/v1/blobs/{hash}` (bytes) | publish | 201/200; 400 if the bytes do not hash to `hash` |
//! | `POST /sync/v1/releases/{id}/commit` ([`Commit`]) | publish | [`Committed`]; 409 while blobs are missing |
//! | `POST /sync/v1/rollback` | publish | [`Committed`] for the previous release |
//! | `POST /sync/v1/cycles/{n}/advance` | agent | [`Advanced`] |
//! | `POST /sync/v1/agents/{name}/report` ([`Report`]) | agent | 204 |
//! | `GET /sync/v1/agents` | agent or publish | [`Fleet`] |
//! | `PUT /sync/v1/blobs/{hash}` (bytes) | agent | as for publish: the blobs of a changeset |
//! | `POST /sync/v1/changesets` ([`Changeset`]) | agent | [`ChangesetReply`] |
//!
//! Errors are `{"error": "..."}` with 400 (malformed), 401 (no or wrong token), 403 (the
//! token's role may not do this), 404 (unknown release or blob), 409 (not now), 413 (too big).

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use super::changeset::Changeset;
use super::changeset::{Applied, Conflict};
use super::manifest::{Hash, ReleaseId};

/// Path prefix of every sync request.
pub const PREFIX: &str = "/sync/v1";
/// Longest a `schedule?wait=` request is held.
pub const LONG_POLL: Duration = Duration::from_secs(25);
/// Largest JSON body accepted (a manifest of many files is the big one).
pub const MAX_JSON_BYTES: usize = 128 * 1024 * 1024;
/// Header naming the release a response of the agent came from.
pub const RELEASE_HEADER: &str = "x-lockstep-release";

/// `GET /time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeReply {
    /// Hub time the request was received.
    pub receive_us: i64,
    /// Hub time the response was sent.
    pub send_us: i64,
}

/// `GET /schedule`: the hub's state as agents see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// Changes with every publish and activation; pass it back as `wait`.
    pub version: u64,
    /// The current cycle (what `advance` takes).
    pub cycle: u64,
    /// The release to serve now.
    pub active: Option<ReleaseId>,
    /// The release to stage, if any.
    pub staged: Option<ReleaseId>,
    /// When `staged` activates.
    pub activation_us: Option<u64>,
    /// Published behind `staged`, staged by the next activation.
    pub queued: Option<ReleaseId>,
    /// The release before `active`.
    pub previous: Option<ReleaseId>,
    /// Hub time of this answer.
    pub now_us: u64,
    /// Highest changeset sequence applied per origin agent (the releases above include them).
    #[serde(default)]
    pub applied: Applied,
}

/// `POST /releases`: what the hub needs to commit the release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uploaded {
    /// The release id (the manifest's hash).
    pub id: ReleaseId,
    /// Blobs to `PUT` before the commit.
    pub missing: Vec<Hash>,
}

/// `POST /releases/{id}/commit` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Commit {
    /// An explicit activation time; else the next grid point after `lead`.
    #[serde(default)]
    pub at_us: Option<u64>,
}

/// Answer to a commit or rollback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// The release.
    pub id: ReleaseId,
    /// `staged`, `queued` or `active` (already active: nothing to do).
    pub state: String,
    /// When it activates (staged only).
    pub activation_us: Option<u64>,
    /// The schedule after the commit.
    pub schedule: Schedule,
}

/// Answer to `POST /cycles/{n}/advance`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advanced {
    /// Whether this call promoted the staged release.
    pub advanced: bool,
    /// The hub's cycle after the call.
    pub cycle: u64,
    /// Why not, when not.
    #[serde(default)]
    pub reason: Option<String>,
}

/// `POST /agents/{name}/report` body: an agent's view of itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// The release it serves.
    pub active: Option<ReleaseId>,
    /// A release fully staged and waiting for its activation.
    pub staged: Option<ReleaseId>,
    /// Measured offset θ (hub − agent), µs.
    pub offset_us: Option<i64>,
    /// Its error bound ε, µs.
    pub error_us: Option<i64>,
    /// How late the last flip was against its activation time (µs, on the hub's clock as the
    /// agent estimates it; negative = early).
    pub last_flip_lateness_us: Option<i64>,
    /// The release the last flip activated.
    pub last_flip: Option<ReleaseId>,
    /// The last problem, if staging or activation is failing.
    #[serde(default)]
    pub error: Option<String>,
    /// Where it serves its active release (`ip:port`).
    #[serde(default)]
    pub serve: Option<String>,
}

/// One agent as the hub last heard of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentView {
    /// Its name (the backend it serves).
    pub name: String,
    /// What it reported.
    pub report: Report,
    /// Hub time of the report.
    pub reported_us: u64,
    /// Whether its active release is the hub's.
    pub current: bool,
}

/// `POST /changesets`: what the hub did with a changeset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesetReply {
    /// `applied`, `duplicate` (already applied: nothing done) or `missing` (PUT the blobs in
    /// `missing`, then send it again).
    pub state: String,
    /// Blobs the hub lacks.
    #[serde(default)]
    pub missing: Vec<Hash>,
    /// The release the changeset went into (active for immediate, staged or queued for
    /// scheduled).
    #[serde(default)]
    pub release: Option<ReleaseId>,
    /// Concurrent writes it met, resolved (the later by hub time won).
    #[serde(default)]
    pub conflicts: Vec<Conflict>,
}

/// A resolved conflict as the hub recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictView {
    /// The conflict.
    #[serde(flatten)]
    pub conflict: Conflict,
    /// Hub time it was resolved.
    pub resolved_us: u64,
}

/// `GET /agents`: the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fleet {
    /// The schedule.
    pub schedule: Schedule,
    /// Agents by name.
    pub agents: Vec<AgentView>,
    /// The latest concurrent edits resolved (newest last).
    #[serde(default)]
    pub conflicts: Vec<ConflictView>,
}
