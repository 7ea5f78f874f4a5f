//! `lockstep publish` and `lockstep status`: the publisher's side of the sync API.
//!
//! Publishing hashes a directory into a manifest, uploads the manifest, then only the blobs
//! the hub lacks (a one-file change moves one file), then commits: the hub stages the release
//! for the next activation. An interrupted publish loses nothing — blobs already uploaded stay,
//! and the release is not staged until its commit. With `--sign-key`, the commit carries the
//! publisher's signature of the release id computed here (never the hub's word for it): what
//! agents with `trusted_keys` require.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::Method;
use tokio::task::JoinSet;

use crate::admin::view::{PoolView, PoolsView};
use crate::hub::fleet::last_flip_skew;
use crate::net::client::{ok, ClientError, HttpClient, Remote, REQUEST_TIMEOUT};
use crate::sync::manifest::{Hash, Manifest, ReleaseId};
use crate::sync::protocol::{Commit, CommitState, Committed, Fleet, Schedule, Uploaded};
use crate::sync::sign::{KeyId, SecretKey, Signature};
use crate::sync::tree::{scan, Tree, TreeError};

/// Blob uploads in flight at once by default.
pub const DEFAULT_CONCURRENCY: usize = 8;

/// When the release should activate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// The hub's next activation on its grid.
    Next,
    /// This hub time, µs since the epoch.
    Absolute(u64),
    /// This long after the hub's clock now.
    In(Duration),
}

/// Parses `--at`: an RFC 3339 time (`2026-11-22T10:00:00Z`), `+DURATION` from now on the hub's
/// clock (`+30s`), or `@UNIX_SECONDS`.
pub fn parse_at(s: &str) -> Result<At, String> {
    let s = s.trim();
    if let Some(d) = s.strip_prefix('+') {
        return crate::config::duration::parse(d).map(At::In);
    }
    if let Some(secs) = s.strip_prefix('@') {
        let secs: f64 = secs
            .parse()
            .map_err(|_| format!("`{s}`: after @ write Unix seconds, e.g. @1767225600"))?;
        return Ok(At::Absolute((secs * 1e6) as u64));
    }
    humantime::parse_rfc3339_weak(s)
        .map(|t| {
            At::Absolute(
                t.duration_since(UNIX_EPOCH)
                    .map(|d| d.as_micros() as u64)
                    .unwrap_or(0),
            )
        })
        .map_err(|e| {
            format!(
                "`{s}`: {e}; write an RFC 3339 time (2026-11-22T10:00:00Z), +30s, or @UNIX_SECONDS"
            )
        })
}

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The directory cannot become a release.
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// The hub refused or could not be reached.
    #[error(transparent)]
    Hub(#[from] ClientError),
    /// An upload task failed (a bug: it panicked).
    #[error("an upload task failed: {0}")]
    Task(String),
    /// The hub named the uploaded manifest by another id than its hash.
    #[error("the hub answered release {hub} for the manifest whose id is {ours}: not signing it")]
    WrongId {
        /// The id computed here.
        ours: ReleaseId,
        /// The hub's answer.
        hub: ReleaseId,
    },
    /// A blob's source changed while it was being published.
    #[error("{path} changed while it was being published: publish again")]
    Changed {
        /// The file.
        path: PathBuf,
    },
}

/// What a publish did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The hub's answer to the commit.
    pub committed: Committed,
    /// Files in the release.
    pub files: usize,
    /// Distinct blobs in the release.
    pub blobs: usize,
    /// Their total size.
    pub bytes: u64,
    /// Blobs uploaded (the ones the hub lacked).
    pub uploaded_blobs: usize,
    /// Their total size.
    pub uploaded_bytes: u64,
    /// The keys that signed it.
    pub signed_by: Vec<KeyId>,
}

/// Publishes `dir` through `client`: scan it, send the manifest, upload the blobs the hub
/// lacks (`concurrency` at a time), commit for `at` with a signature by each of `keys`.
pub async fn publish(
    client: &HttpClient,
    dir: &Path,
    at: At,
    concurrency: usize,
    keys: &[SecretKey],
) -> Result<Outcome, PublishError> {
    let tree = scan_dir(dir).await?;
    let id = tree.manifest.id();
    let uploaded = upload_manifest(client, &tree.manifest).await?;
    if uploaded.id != id {
        return Err(PublishError::WrongId {
            ours: id,
            hub: uploaded.id,
        });
    }
    let sources = Arc::new(tree.sources);
    let uploaded_bytes = upload_missing(client, &uploaded.missing, &sources, concurrency).await?;
    let at_us = activation_us(client, at).await?;
    let signatures: Vec<Signature> = keys.iter().map(|k| k.sign_release(&id)).collect();
    let signed_by = signatures.iter().map(|s| s.key.id()).collect();
    let committed: Committed = client
        .json(
            Method::POST,
            &format!("/sync/v1/releases/{id}/commit"),
            Some(&Commit { at_us, signatures }),
            REQUEST_TIMEOUT,
        )
        .await?;
    Ok(Outcome {
        signed_by,
        files: tree.manifest.files().len(),
        blobs: sources.len(),
        bytes: tree.manifest.total_bytes(),
        uploaded_blobs: uploaded.missing.len(),
        uploaded_bytes,
        committed,
    })
}

/// The directory as a manifest and the files holding its blobs (hashing reads every file:
/// off the async threads).
async fn scan_dir(dir: &Path) -> Result<Tree, PublishError> {
    let root = dir.to_path_buf();
    let tree = tokio::task::spawn_blocking(move || scan(&root, &|_| false))
        .await
        .map_err(|e| TreeError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })??;
    Ok(tree)
}

/// `POST /releases`: the hub answers the release id and the blobs it lacks.
async fn upload_manifest(
    client: &HttpClient,
    manifest: &Manifest,
) -> Result<Uploaded, PublishError> {
    let json = Bytes::from(manifest.to_json());
    let a = client
        .send(
            Method::POST,
            "/sync/v1/releases",
            Some((json, "application/json")),
            REQUEST_TIMEOUT,
        )
        .await?;
    let body = ok(a)?.body;
    serde_json::from_slice(&body).map_err(|e| {
        PublishError::Hub(ClientError::Decode {
            remote: Remote::Hub,
            message: e.to_string(),
        })
    })
}

/// Uploads `missing`, `concurrency` at a time; the bytes sent.
async fn upload_missing(
    client: &HttpClient,
    missing: &[Hash],
    sources: &Arc<HashMap<Hash, PathBuf>>,
    concurrency: usize,
) -> Result<u64, PublishError> {
    let mut jobs = JoinSet::new();
    let mut sent = 0u64;
    let mut pending = missing.iter().copied();
    let spawn = |jobs: &mut JoinSet<_>, hash: Hash| {
        jobs.spawn(upload_blob(client.clone(), sources.clone(), hash));
    };
    for hash in pending.by_ref().take(concurrency.max(1)) {
        spawn(&mut jobs, hash);
    }
    while let Some(done) = jobs.join_next().await {
        // A panicking upload task is a bug: report it as a failed publish.
        sent += done.map_err(|e| PublishError::Task(e.to_string()))??;
        if let Some(hash) = pending.next() {
            spawn(&mut jobs, hash);
        }
    }
    Ok(sent)
}

/// `PUT /blobs/{hash}` from the file the scan found it in, checked again against its hash.
async fn upload_blob(
    client: HttpClient,
    sources: Arc<HashMap<Hash, PathBuf>>,
    hash: Hash,
) -> Result<u64, PublishError> {
    let path = sources
        .get(&hash)
        .cloned()
        .ok_or_else(|| ClientError::Decode {
            remote: Remote::Hub,
            message: format!("hub asked for blob {hash}, which is not in this release"),
        })?;
    let data = tokio::fs::read(&path)
        .await
        .map_err(|source| TreeError::Io {
            path: path.clone(),
            source,
        })?;
    if Hash::of(&data) != hash {
        return Err(PublishError::Changed { path });
    }
    let len = data.len() as u64;
    let a = client
        .send(
            Method::PUT,
            &format!("/sync/v1/blobs/{hash}"),
            Some((Bytes::from(data), "application/octet-stream")),
            REQUEST_TIMEOUT,
        )
        .await?;
    ok(a)?;
    Ok(len)
}

/// The hub time to commit for: none for the hub's next grid point; `+D` from the hub's clock.
async fn activation_us(client: &HttpClient, at: At) -> Result<Option<u64>, PublishError> {
    Ok(match at {
        At::Next => None,
        At::Absolute(t) => Some(t),
        At::In(d) => {
            let s: Schedule = client
                .json(
                    Method::GET,
                    "/sync/v1/schedule",
                    None::<&()>,
                    REQUEST_TIMEOUT,
                )
                .await?;
            Some(s.now_us + d.as_micros() as u64)
        }
    })
}

/// Stages the release before the active one.
pub async fn rollback(client: &HttpClient) -> Result<Committed, ClientError> {
    client
        .json(
            Method::POST,
            "/sync/v1/rollback",
            None::<&()>,
            REQUEST_TIMEOUT,
        )
        .await
}

/// The fleet as the hub sees it.
pub async fn fleet(client: &HttpClient) -> Result<Fleet, ClientError> {
    client
        .json(Method::GET, "/sync/v1/agents", None::<&()>, REQUEST_TIMEOUT)
        .await
}

/// `GET /api/pools` of an appliance's admin API.
pub async fn pools(admin: &HttpClient) -> Result<PoolsView, ClientError> {
    admin
        .json(
            Method::GET,
            "/api/pools",
            None::<&()>,
            Duration::from_secs(10),
        )
        .await
}

/// What `lockstep status --json` prints: the hub's fleet, and the pools when `--admin` is given.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StatusView {
    /// The hub's view of the fleet.
    #[serde(flatten)]
    pub fleet: Fleet,
    /// The appliance's pools (`--admin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pools: Option<Vec<PoolView>>,
}

/// What `lockstep publish` prints about a publish that went through.
pub fn render_outcome(o: &Outcome) -> String {
    let signed = match o.signed_by.as_slice() {
        [] => "unsigned (agents with trusted_keys refuse it: publish with --sign-key)".to_string(),
        keys => format!(
            "signed by key {}",
            keys.iter()
                .map(KeyId::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    format!(
        "release {}\nfiles {} ({} bytes); uploaded {} of {} blob(s), {} bytes (the hub already had the others)\n{signed}\n{}\n",
        o.committed.id,
        o.files,
        o.bytes,
        o.uploaded_blobs,
        o.blobs,
        o.uploaded_bytes,
        describe(&o.committed, o.committed.schedule.now_us)
    )
}

/// A hub time as RFC 3339 with microseconds (the unit the flips are scheduled and measured in).
pub fn show_time(us: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(us);
    humantime::format_rfc3339_micros(t).to_string()
}

/// Signed µs as a short human string (`+1.234ms`, `-3600.000s`).
pub fn show_us(us: i64) -> String {
    let a = us.unsigned_abs();
    let sign = if us < 0 { "-" } else { "+" };
    if a < 1_000 {
        format!("{sign}{a}µs")
    } else if a < 1_000_000 {
        format!("{sign}{:.3}ms", a as f64 / 1e3)
    } else {
        format!("{sign}{:.3}s", a as f64 / 1e6)
    }
}

/// What `lockstep publish` prints after a commit.
pub fn describe(c: &Committed, now_us: u64) -> String {
    match c.state {
        CommitState::Staged => {
            let at = c.activation_us.unwrap_or(0);
            format!(
                "staged: activates at {} (in {:.1}s on the hub's clock)",
                show_time(at),
                at.saturating_sub(now_us) as f64 / 1e6
            )
        }
        CommitState::Queued => "queued: the staged release activates too soon to replace; this one is staged right after it".to_string(),
        CommitState::Active => "already the active release: nothing to do".to_string(),
    }
}

/// `lockstep status --admin`: the admin API's pools as a table.
pub fn render_pools(v: &PoolsView) -> String {
    let row = |p: &str,
               b: &str,
               a: &str,
               w: &dyn std::fmt::Display,
               f: &dyn std::fmt::Display,
               s: &str| { format!("{p:<12} {b:<16} {a:<22} {w:>6} {f:>9}  {s}\n") };
    let mut out = row(
        "POOL",
        "BACKEND",
        "ADDRESS",
        &"WEIGHT",
        &"IN FLIGHT",
        "STATE",
    );
    for p in &v.pools {
        for b in &p.backends {
            out.push_str(&row(
                &p.name,
                &b.name,
                &b.address,
                &b.weight,
                &b.in_flight,
                b.state(),
            ));
        }
    }
    out
}

/// `lockstep status`: the fleet as a table.
pub fn render_fleet(f: &Fleet) -> String {
    let s = &f.schedule;
    let short = |h: Option<Hash>| h.map_or("-".to_string(), |h| h.short());
    let mut out = format!(
        "hub time {}  cycle {}  active {}  previous {}\n",
        show_time(s.now_us),
        s.cycle,
        short(s.active),
        short(s.previous)
    );
    match (s.staged, s.activation_us) {
        (Some(id), Some(at)) => out.push_str(&format!(
            "staged {} activates at {} (in {:.1}s)\n",
            id.short(),
            show_time(at),
            at.saturating_sub(s.now_us) as f64 / 1e6
        )),
        _ => out.push_str("nothing staged\n"),
    }
    if let Some(q) = s.queued {
        out.push_str(&format!("queued {}\n", q.short()));
    }
    if let Some(c) = &f.cluster {
        out.push_str(&format!(
            "hub {} of {} ({}), leader {}, etcd {}\n",
            c.hub,
            c.hubs.len(),
            c.hubs.join(", "),
            c.leader.as_deref().unwrap_or("none"),
            match (c.connected, &c.error) {
                (true, _) => "connected".to_string(),
                (false, None) =>
                    "UNREACHABLE: this hub changes nothing until it is back".to_string(),
                (false, Some(e)) =>
                    format!("UNREACHABLE ({e}): this hub changes nothing until it is back"),
            }
        ));
    }
    render_agents(f, &mut out);
    if let Some(k) = last_flip_skew(f) {
        out.push_str(&format!(
            "\nlast flip to {}: {} agent(s), skew {} (lateness from {} to {}, as each agent measured it)\n",
            k.release.short(),
            k.agents,
            show_us(k.spread_us).trim_start_matches('+'),
            show_us(k.min_us),
            show_us(k.max_us)
        ));
    }
    render_conflicts(f, &mut out);
    out
}

/// The agents' table of `lockstep status`.
fn render_agents(f: &Fleet, out: &mut String) {
    let s = &f.schedule;
    let short = |h: Option<Hash>| h.map_or("-".to_string(), |h| h.short());
    // With several hubs, which one each agent talks to (scheme left out).
    let hub = |r: &crate::sync::protocol::Report| match &f.cluster {
        None => String::new(),
        Some(_) => {
            let url = r.hub.as_deref().unwrap_or("-");
            let url = url.split_once("://").map_or(url, |(_, rest)| rest);
            format!("{url:<22} ")
        }
    };
    let hub_head = if f.cluster.is_some() {
        format!("{:<22} ", "HUB")
    } else {
        String::new()
    };
    out.push_str(&format!(
        "\n{:<16} {:<13} {:<13} {:>14} {:>10} {:>12} {:>9}  {hub_head}{}\n",
        "AGENT", "ACTIVE", "STAGED", "OFFSET θ", "ERROR ε", "LAST FLIP", "REPORTED", "STATE"
    ));
    for a in &f.agents {
        let r = &a.report;
        let ago = s.now_us.saturating_sub(a.reported_us) as f64 / 1e6;
        let state = match (a.stale, &r.error, a.current) {
            // What it said no longer counts: neither current nor behind.
            (true, _, _) => "stale (no report within sync.report_expiry)".into(),
            (false, Some(e), _) => format!("error: {e}"),
            (false, None, true) => "current".into(),
            (false, None, false) => "BEHIND".into(),
        };
        out.push_str(&format!(
            "{:<16} {:<13} {:<13} {:>14} {:>10} {:>12} {:>8.0}s  {}{}\n",
            a.name,
            short(r.active),
            short(r.staged),
            r.offset_us.map_or("-".into(), show_us),
            r.error_us.map_or("-".into(), show_us),
            r.last_flip_lateness_us.map_or("-".into(), show_us),
            ago,
            hub(r),
            state
        ));
    }
    if f.agents.is_empty() {
        out.push_str("(no agent has reported yet)\n");
    }
}

/// The concurrent edits the hub resolved, for `lockstep status`.
fn render_conflicts(f: &Fleet, out: &mut String) {
    if f.conflicts.is_empty() {
        return;
    }
    out.push_str("\nconcurrent edits resolved (the later by hub time wins):\n");
    let who = |s: &crate::sync::changeset::Stamp| {
        if s.origin.is_empty() {
            "a publish".to_string()
        } else {
            format!("{} at {}", s.origin, show_time(s.at_us))
        }
    };
    for c in &f.conflicts {
        let c_ = &c.conflict;
        out.push_str(&format!(
            "  conflict {}: kept {}, dropped {}\n",
            c_.path,
            who(&c_.winner),
            who(&c_.loser)
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_accepts_rfc3339_relative_and_unix_seconds() {
        assert_eq!(parse_at("+30s").unwrap(), At::In(Duration::from_secs(30)));
        assert_eq!(
            parse_at("@1767225600").unwrap(),
            At::Absolute(1_767_225_600_000_000)
        );
        assert_eq!(
            parse_at("2026-01-01T00:00:00Z").unwrap(),
            At::Absolute(1_767_225_600_000_000)
        );
        assert!(parse_at("tomorrow").is_err());
        assert!(parse_at("+soon").is_err());
    }

    #[test]
    fn the_last_flip_skew_is_the_spread_of_the_agents_lateness() {
        let (fleet, _, r2) = crate::hub::fleet::sample_fleet();
        let k = last_flip_skew(&fleet).unwrap();
        assert_eq!(
            (k.release, k.agents, k.spread_us, k.min_us, k.max_us),
            (r2, 2, 150, -30, 120)
        );
        assert!(render_fleet(&fleet).contains("2 agent(s), skew 150µs"));
    }

    #[test]
    fn human_numbers() {
        assert_eq!(show_us(-3_600_000_000), "-3600.000s");
        assert_eq!(show_us(1_234), "+1.234ms");
        assert_eq!(show_us(12), "+12µs");
        assert_eq!(
            show_time(1_767_225_600_000_000),
            "2026-01-01T00:00:00.000000Z"
        );
        assert_eq!(
            show_time(1_767_225_600_000_123),
            "2026-01-01T00:00:00.000123Z"
        );
    }
}
