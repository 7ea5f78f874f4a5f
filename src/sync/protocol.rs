//! The messages of the sync API (`/sync/v1/*`), JSON over HTTP/1.1 or h2. Callers are named by
//! their farm-CA client certificate (mutual TLS), or from loopback by
//! `Authorization: Bearer <token>` (see [`super::caller`]). Times are µs since the Unix epoch on the hub's clock.
//!
//! | request | token | answer |
//! |---|---|---|
//! | `GET /sync/v1/time` | agent or publish | [`TimeReply`] |
//! | `GET /sync/v1/schedule[?wait=VERSION]` | agent or publish | [`Schedule`]; with `wait`, held until the version differs (at most [`LONG_POLL`]) |
//! | `GET /sync/v1/releases/{id}` | agent or publish | the manifest (canonical JSON; its blake3 is `id`) |
//! | `GET /sync/v1/releases/{id}/signatures` | agent or publish | [`Signatures`]: the publishers' signatures of the release (empty: unsigned) |
//! | `GET /sync/v1/releases/{id}/provenance` | agent or publish | [`Provenance`]: the base and changesets the hub built the release from; 404 for a publisher's release |
//! | `GET /sync/v1/blobs/{hash}` | agent or publish | the blob's bytes |
//! | `POST /sync/v1/releases` (manifest) | publish | [`Uploaded`]: the id and the blobs the hub lacks |
//! | `PUT /sync/v1/blobs/{hash}` (bytes) | publish | 201/200; 400 if the bytes do not hash to `hash` |
//! | `POST /sync/v1/releases/{id}/commit` ([`Commit`]) | publish | [`Committed`]; 409 while blobs are missing; 400 for a signature that does not verify; 403 when `sync.trusted_keys` is set and none of the release's signatures is a trusted key's |
//! | `POST /sync/v1/rollback` | publish | [`Committed`] for the previous release |
//! | `POST /sync/v1/cycles/{n}/advance` | agent | [`Advanced`] |
//! | `POST /sync/v1/agents/{name}/report` ([`Report`]) | agent | 204; 400 when `serve` is not an `ip:port`; 409 for a new name while the agent table is full of fresh reports |
//! | `GET /sync/v1/agents` | agent or publish | [`Fleet`] |
//! | `PUT /sync/v1/blobs/{hash}` (bytes) | agent | as for publish: the blobs of a changeset |
//! | `POST /sync/v1/changesets` ([`Changeset`]) | agent | [`ChangesetReply`]; 400 when `seq` or `detected_us` is ahead of the hub's receive time by more than [`MAX_AHEAD_US`](super::changeset::MAX_AHEAD_US) |
//! | `GET /sync/v1/ca` | anyone | the farm CA's certificate (PEM), with `sync.tls.ca_dir` |
//! | `POST /sync/v1/join` ([`JoinRequest`]) | anyone with a one-time join token | the agent's certificate, the CA and its revocation list (`ca::Joined`); 403 for an unknown, used or expired token |
//!
//! Errors are `{"error": "..."}` with 400 (malformed), 401 (no or wrong token), 403 (the
//! token's role may not do this, or an untrusted release), 404 (unknown release or blob), 409
//! (not now), 413 (too big).
//!
//! Signatures ([`crate::sync::sign`]) travel with the commit and are kept beside the release;
//! a commit without any (an older publisher's body) parses as before. A rollback stages the
//! previous release with the signatures it was committed with.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use super::changeset::Changeset;
use super::changeset::{Applied, Conflict};
use super::manifest::{Hash, ReleaseId};
pub use super::provenance::Provenance;
use super::sign::Signature;

/// Path prefix of every sync request.
pub const PREFIX: &str = "/sync/v1";
/// Longest a `schedule?wait=` request is held.
pub const LONG_POLL: Duration = Duration::from_secs(25);
/// Largest JSON body accepted (a manifest of many files is the big one).
pub const MAX_JSON_BYTES: usize = 128 * 1024 * 1024;
/// Header naming the release a response of the agent came from.
pub const RELEASE_HEADER: &str = "x-lockstep-release";
/// An agent reports at least this often (and at once on every change).
pub const REPORT_REFRESH: Duration = Duration::from_secs(30);
/// How long the hub counts a report that is not renewed (`sync.report_expiry`): three
/// [`REPORT_REFRESH`] intervals, so one or two reports lost on the way (a hub restart, a
/// network blip) do not make a live agent stale, while a report nobody renews — an agent gone,
/// or a forged `active: null` — stops steering the proxy and DNS within 90 s.
pub const DEFAULT_REPORT_EXPIRY: Duration = Duration::from_secs(90);

/// `POST /join`: a new agent's one-time token and the public key its certificate is made for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The token `lockstep ca join-token` printed.
    pub token: String,
    /// The agent's Ed25519 public key, 32 bytes in hex (its private key stays on the agent).
    pub public_key: String,
}

impl JoinRequest {
    /// The public key's bytes, if it is 64 hex digits.
    pub fn key_bytes(&self) -> Option<[u8; 32]> {
        let s = self.public_key.trim();
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(out)
    }
}

/// `GET /time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeReply {
    /// Hub time the request was received.
    pub receive_us: i64,
    /// Hub time the response was sent.
    pub send_us: i64,
    /// How long, by the hub's own account, the request had already waited for the hub's
    /// thread to get a core when `receive_us` was taken (0: none, or not known; absent from
    /// older hubs). The agent takes at most the exchange's delay of it off the way in.
    #[serde(default)]
    pub queued_us: i64,
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

/// `POST /releases/{id}/replicate`: the release's blobs are all stored on the hub asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replicated {
    /// The release.
    pub id: ReleaseId,
    /// Blobs it fetched from the other hubs for this (the rest it had).
    pub fetched: usize,
}

/// `POST /releases/{id}/commit` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Commit {
    /// An explicit activation time; else the next grid point after `lead`.
    #[serde(default)]
    pub at_us: Option<u64>,
    /// Publishers' signatures of the release, added to those the hub keeps beside it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signatures: Vec<Signature>,
}

/// `GET /releases/{id}/signatures`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signatures {
    /// The signatures kept beside the release (one per key).
    pub signatures: Vec<Signature>,
}

/// What a commit or rollback did with its release (`"state"` of [`Committed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommitState {
    /// Staged for `activation_us`.
    Staged,
    /// Queued behind the staged release, which activates too soon to replace; staged by the
    /// next activation.
    Queued,
    /// Already the active release with nothing staged: nothing to do.
    Active,
}

impl CommitState {
    /// The name on the wire (`staged`, `queued`, `active`).
    pub fn as_str(self) -> &'static str {
        match self {
            CommitState::Staged => "staged",
            CommitState::Queued => "queued",
            CommitState::Active => "active",
        }
    }
}

impl std::fmt::Display for CommitState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Answer to a commit or rollback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// The release.
    pub id: ReleaseId,
    /// What the commit did.
    pub state: CommitState,
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
    pub reason: Option<NotAdvanced>,
}

/// Why an advance that was not refused did not promote anything (`"reason"` of
/// [`Advanced`]); a refused one is an error (409: too early, nothing staged).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NotAdvanced {
    /// Someone else advanced this cycle first.
    #[serde(rename = "already advanced")]
    AlreadyAdvanced,
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
    /// Where it serves its active release (`ip:port`, see [`parse_serve`]).
    #[serde(default)]
    pub serve: Option<String>,
    /// The hub it talks to now (the URL from its `hub:` list; several hubs: `sync.cluster`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<String>,
}

impl Report {
    /// The `serve` address, checked: `None` when absent, an error when it is not an `ip:port`.
    /// The hub refuses a report whose address fails ([`parse_serve`]); binding the address to
    /// the reporting agent's identity is for the caller.
    pub fn serve_addr(&self) -> Result<Option<SocketAddr>, BadServe> {
        self.serve.as_deref().map(parse_serve).transpose()
    }
}

/// A `serve` address that is not an `ip:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("serve `{0}` is not an ip:port address: write e.g. \"127.0.0.1:8081\" or \"[2001:db8::1]:8081\"")]
pub struct BadServe(pub String);

/// Where an agent serves, as its config (`serve:`) and its reports give it: exactly an
/// `ip:port` (peers are sent changesets and the agent token there, so no host name to resolve,
/// no path, no scheme). Shown cut to 80 characters in the error.
pub fn parse_serve(s: &str) -> Result<SocketAddr, BadServe> {
    s.parse()
        .map_err(|_| BadServe(s.chars().take(80).collect()))
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
    /// Whether its active release is the hub's (never for a stale report).
    pub current: bool,
    /// Its report is older than the hub's `report_expiry`: what it said no longer counts (the
    /// agent is neither current nor behind; it is not offered to peers).
    #[serde(default)]
    pub stale: bool,
}

/// `POST /changesets`: what the hub did with a changeset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesetReply {
    /// What the hub did with it.
    pub state: ChangesetState,
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

impl ChangesetReply {
    /// Already applied: nothing done.
    pub fn duplicate() -> ChangesetReply {
        ChangesetReply::empty(ChangesetState::Duplicate)
    }

    /// The hub lacks these blobs: PUT them, then send the changeset again.
    pub fn missing(missing: Vec<Hash>) -> ChangesetReply {
        ChangesetReply {
            missing,
            ..ChangesetReply::empty(ChangesetState::Missing)
        }
    }

    /// Applied, into `release`, resolving `conflicts`.
    pub fn applied(release: ReleaseId, conflicts: Vec<Conflict>) -> ChangesetReply {
        ChangesetReply {
            release: Some(release),
            conflicts,
            ..ChangesetReply::empty(ChangesetState::Applied)
        }
    }

    fn empty(state: ChangesetState) -> ChangesetReply {
        ChangesetReply {
            state,
            missing: Vec::new(),
            release: None,
            conflicts: Vec::new(),
        }
    }
}

/// What the hub did with a changeset (`"state"` of [`ChangesetReply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangesetState {
    /// Applied: `release` holds it.
    Applied,
    /// Already applied (its sequence is not above the origin's last): nothing done.
    Duplicate,
    /// The hub lacks the blobs in `missing`: PUT them, then send the changeset again.
    Missing,
}

impl std::fmt::Display for ChangesetState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChangesetState::Applied => "applied",
            ChangesetState::Duplicate => "duplicate",
            ChangesetState::Missing => "missing",
        })
    }
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
    /// The hubs sharing the farm's state (`sync.cluster`), as the answering hub sees them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterView>,
}

/// An agent's report as one hub shares it with the others (`sync.cluster`), so every hub's
/// fleet view, and every appliance's "behind" view, is the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedReport {
    /// The agent.
    pub agent: String,
    /// Its report.
    pub report: Report,
    /// Hub time it arrived, µs.
    pub at_us: u64,
}

/// A backend drained or enabled through one appliance's admin API, shared with the others
/// (`sync.cluster`) so that every appliance routes alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedDrain {
    /// The pool.
    pub pool: String,
    /// The backend.
    pub backend: String,
    /// Drained (true) or back in rotation.
    pub drained: bool,
}

/// What the appliances of a farm share of ACME (`sync.cluster`): the leading one orders, the
/// others answer its challenges (the CA may reach any of them) and serve what it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SharedAcme {
    /// A listener's certificate: the chain and its key, PEM.
    Certificate {
        /// The listener.
        listener: String,
        /// The chain, leaf first.
        cert: String,
        /// Its private key.
        key: String,
    },
    /// An HTTP-01 answer of an open order, until `until` (seconds since the epoch).
    Http01 {
        /// The token.
        token: String,
        /// Its key authorization.
        key_authorization: String,
        /// When to stop answering it.
        until: u64,
    },
    /// A TLS-ALPN-01 answer of an open order: the name and the SHA-256 of the key
    /// authorization (hex), until `until`.
    TlsAlpn01 {
        /// The name validated.
        name: String,
        /// SHA-256 of the key authorization, hex.
        digest: String,
        /// When to stop answering it.
        until: u64,
    },
}

/// A hub's standing among the hubs sharing a farm in etcd (`sync.cluster`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The answering hub's name.
    pub hub: String,
    /// Whether it renewed its lease within the lease's time to live: if not, it is cut off
    /// from etcd and changes nothing until it is back.
    pub connected: bool,
    /// The hub holding the leader key (its own advances, collection), as last seen.
    pub leader: Option<String>,
    /// The live hubs registered in etcd, as last seen (this one included).
    pub hubs: Vec<String>,
    /// Why it is cut off (etcd's last error: unreachable, a refused certificate), while it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::changeset::Stamp;

    #[test]
    fn a_time_reply_from_a_hub_without_the_wait_reads_as_no_wait() {
        let old: TimeReply = serde_json::from_str(r#"{"receive_us":5,"send_us":7}"#).unwrap();
        assert_eq!(old.queued_us, 0);
        let new = TimeReply {
            receive_us: 5,
            send_us: 7,
            queued_us: 900,
        };
        let back: TimeReply = serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!(back, new);
    }

    fn id(n: u8) -> ReleaseId {
        Hash::of(&[n])
    }

    fn schedule() -> Schedule {
        Schedule {
            version: 3,
            cycle: 1,
            active: Some(id(1)),
            staged: None,
            activation_us: None,
            queued: None,
            previous: None,
            now_us: 42,
            applied: Applied::default(),
        }
    }

    /// The typed states keep the JSON agents and publishers of earlier builds send and expect.
    #[test]
    fn changeset_reply_states_keep_their_json() {
        let json = |r: &ChangesetReply| serde_json::to_value(r).unwrap();
        assert_eq!(json(&ChangesetReply::duplicate())["state"], "duplicate");
        let missing = ChangesetReply::missing(vec![id(7)]);
        assert_eq!(json(&missing)["state"], "missing");
        assert_eq!(json(&missing)["missing"][0], id(7).to_hex());
        let conflict = Conflict {
            path: "a.html".into(),
            winner: Stamp {
                at_us: 2,
                origin: "b".into(),
            },
            loser: Stamp {
                at_us: 1,
                origin: "c".into(),
            },
        };
        let applied = ChangesetReply::applied(id(2), vec![conflict]);
        assert_eq!(json(&applied)["state"], "applied");
        assert_eq!(json(&applied)["release"], id(2).to_hex());
        // Byte for byte, as the string field wrote it.
        assert_eq!(
            serde_json::to_string(&ChangesetReply::duplicate()).unwrap(),
            r#"{"state":"duplicate","missing":[],"release":null,"conflicts":[]}"#
        );
        for r in [ChangesetReply::duplicate(), missing, applied] {
            let back: ChangesetReply = serde_json::from_value(json(&r)).unwrap();
            assert_eq!(back, r);
        }
        let unknown = r#"{"state":"maybe","missing":[],"release":null,"conflicts":[]}"#;
        assert!(serde_json::from_str::<ChangesetReply>(unknown).is_err());
    }

    #[test]
    fn serve_addresses_are_exactly_ip_port() {
        for ok in [
            "127.0.0.1:8081",
            "10.0.0.2:80",
            "[::1]:8081",
            "[2001:db8::1]:443",
        ] {
            assert_eq!(parse_serve(ok).unwrap(), ok.parse::<SocketAddr>().unwrap());
        }
        for bad in [
            "",
            "localhost:8081",
            "127.0.0.1",
            "http://127.0.0.1:8081",
            "127.0.0.1:8081/x",
            " 127.0.0.1:8081",
            "evil.example:443",
            "::1:8081",
        ] {
            let e = parse_serve(bad).unwrap_err();
            assert!(e.to_string().contains("is not an ip:port"), "{bad}: {e}");
        }
        let long = "x".repeat(500);
        assert_eq!(parse_serve(&long).unwrap_err().0.len(), 80);
        let report = |serve: Option<&str>| Report {
            serve: serve.map(str::to_string),
            ..Report::default()
        };
        assert_eq!(report(None).serve_addr(), Ok(None));
        assert_eq!(
            report(Some("[::1]:9")).serve_addr(),
            Ok(Some("[::1]:9".parse().unwrap()))
        );
        assert!(report(Some("attacker.example:80")).serve_addr().is_err());
    }

    #[test]
    fn commit_states_keep_their_json() {
        for (state, text) in [
            (CommitState::Staged, "staged"),
            (CommitState::Queued, "queued"),
            (CommitState::Active, "active"),
        ] {
            let c = Committed {
                id: id(1),
                state,
                activation_us: None,
                schedule: schedule(),
            };
            let v = serde_json::to_value(&c).unwrap();
            assert_eq!(v["state"], text);
            assert_eq!(
                (state.as_str(), state.to_string()),
                (text, text.to_string())
            );
            assert_eq!(serde_json::from_value::<Committed>(v).unwrap(), c);
        }
    }

    #[test]
    fn a_commit_body_without_signatures_parses_as_before() {
        let old: Commit = serde_json::from_str(r#"{"at_us":5}"#).unwrap();
        assert_eq!(
            old,
            Commit {
                at_us: Some(5),
                signatures: vec![]
            }
        );
        assert_eq!(serde_json::to_string(&old).unwrap(), r#"{"at_us":5}"#);
        let key = crate::sync::sign::SecretKey::generate(&ring::rand::SystemRandom::new())
            .unwrap()
            .0;
        let signed = Commit {
            at_us: None,
            signatures: vec![key.sign_release(&id(1))],
        };
        let json = serde_json::to_string(&signed).unwrap();
        assert_eq!(serde_json::from_str::<Commit>(&json).unwrap(), signed);
        assert!(serde_json::from_str::<Commit>(r#"{"at_us":5,"sigs":[]}"#).is_err());
    }

    #[test]
    fn advanced_reasons_keep_their_json() {
        let already = Advanced {
            advanced: false,
            cycle: 4,
            reason: Some(NotAdvanced::AlreadyAdvanced),
        };
        assert_eq!(
            serde_json::to_string(&already).unwrap(),
            r#"{"advanced":false,"cycle":4,"reason":"already advanced"}"#
        );
        let won = Advanced {
            advanced: true,
            cycle: 5,
            reason: None,
        };
        assert_eq!(
            serde_json::to_string(&won).unwrap(),
            r#"{"advanced":true,"cycle":5,"reason":null}"#
        );
        let back: Advanced =
            serde_json::from_str(r#"{"advanced":false,"cycle":4,"reason":"already advanced"}"#)
                .unwrap();
        assert_eq!(back, already);
    }
}
