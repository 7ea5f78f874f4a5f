//! The `sync:` section: raw → checked [`Sync`] that the sync hub trusts. Token files are read
//! (and refused when every user may read them) here, so `lockstep check` catches them; so are
//! the trusted publisher keys (shared with `agent.yaml`'s `trusted_keys`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_saphyr::Spanned;

use super::check::Ctx;
use super::gc;
use super::raw::RawSync;
use super::tls;
use crate::sync::auth::{read_token, Tokens};
use crate::sync::gc::Gc;
use crate::sync::protocol::DEFAULT_REPORT_EXPIRY;
use crate::sync::schedule::{DEFAULT_CADENCE, DEFAULT_LEAD};
use crate::sync::sign::TrustedKeys;

/// Default cap on the sync API's open connections: a farm of a thousand agents with their
/// long polls, uploads and fetches, and publishers beside them.
pub const DEFAULT_SYNC_MAX_CONNECTIONS: usize = 4096;

/// Default [`Sync::upload_quota`]: room for a large release uploaded before its commit.
pub const DEFAULT_UPLOAD_QUOTA: u64 = 16 << 30;

/// Shortest activation grid.
pub const MIN_CADENCE: Duration = Duration::from_millis(100);

/// The checked `sync:` section.
#[derive(Debug, Clone)]
pub struct Sync {
    /// Address of the sync API.
    pub bind: SocketAddr,
    /// Directory of the hub's store.
    pub store: PathBuf,
    /// Activation grid.
    pub cadence: Duration,
    /// Least time from a publish to its activation.
    pub lead: Duration,
    /// Collection of unused releases and blobs in the store.
    pub gc: Gc,
    /// How long an agent's report counts after it arrived (then: stale, not behind).
    pub report_expiry: Duration,
    /// The agent and publish tokens (a role without one is open).
    pub tokens: Tokens,
    /// TLS of the sync API.
    pub tls: Option<SyncTls>,
    /// Publisher keys one of which must sign every committed release (`None`: not checked
    /// at commit).
    pub trusted_keys: Option<TrustedKeys>,
    /// Most connections open at once on the sync API (agents hold about two each).
    pub max_connections: usize,
    /// Most bytes of uploaded blobs that no commit or applied changeset has named yet.
    pub upload_quota: u64,
    /// The etcd cluster the state is shared in with other hubs (`None`: the store holds it).
    pub cluster: Option<super::cluster::Cluster>,
}

/// The sync API's TLS: its certificates and, for mutual TLS, the farm CA of its clients.
#[derive(Debug, Clone)]
pub struct SyncTls {
    /// The hub's certificates.
    pub certs: Vec<tls::LoadedCert>,
    /// The farm CA and revocation list client certificates are checked against; `None`: no
    /// client certificates (bearer tokens from loopback only).
    pub clients: Option<tls::FarmTrust>,
    /// The farm CA's directory, for agents joining with a token.
    pub ca_dir: Option<PathBuf>,
}

pub(super) fn sync(cx: &mut Ctx<'_>, raw: &RawSync) -> Option<Sync> {
    let bind = cx.socket_addr(&raw.bind, "sync bind");
    if raw.store.value.trim().is_empty() {
        cx.err(
            &raw.store,
            "sync.store is empty: name a directory, e.g. /var/lib/lockstep/hub",
        );
    }
    let store = cx.path(&raw.store.value);
    let (cadence, lead) = timing(cx, raw);
    let report_expiry = cx.duration(
        &raw.report_expiry,
        DEFAULT_REPORT_EXPIRY,
        "sync.report_expiry",
    );
    let (gc, errors) = gc::from_raw(raw.gc_interval.as_ref(), raw.gc_grace.as_ref());
    for (at, e) in errors {
        cx.err(at, format!("sync.{e}"));
    }
    let tokens = tokens(cx, raw);
    let tls = raw.tls.as_ref().map(|t| sync_tls(cx, t));
    if let Some(b) = bind {
        require_mutual_tls_off_loopback(cx, raw, b);
    }
    let trusted_keys = raw
        .trusted_keys
        .as_ref()
        .map(|list| cx.public_keys(list, "sync.trusted_keys"));
    let max_connections = cx.connections(
        &raw.max_connections,
        DEFAULT_SYNC_MAX_CONNECTIONS,
        "sync.max_connections",
    );
    let upload_quota = upload_quota(cx, raw.upload_quota.as_ref());
    let cluster = raw
        .cluster
        .as_ref()
        .map(|c| super::cluster::cluster(cx, c, bind, raw.tls.is_some()));
    Some(Sync {
        cluster,
        upload_quota,
        max_connections,
        trusted_keys,
        bind: bind?,
        store,
        cadence,
        lead,
        gc,
        report_expiry,
        tokens,
        tls,
    })
}

/// `sync.cadence` (at least [`MIN_CADENCE`]: activations happen on this grid) and `sync.lead`.
fn timing(cx: &mut Ctx<'_>, raw: &RawSync) -> (Duration, Duration) {
    let cadence = cx.any_duration(&raw.cadence, DEFAULT_CADENCE, "sync.cadence");
    if cadence < MIN_CADENCE {
        if let Some(c) = &raw.cadence {
            cx.err(
                c,
                "sync.cadence must be at least 100ms (activations happen on this grid)",
            );
        }
    }
    let lead = cx.any_duration(&raw.lead, DEFAULT_LEAD, "sync.lead");
    (cadence, lead)
}

/// The agent and publisher tokens, read from their files.
fn tokens(cx: &mut Ctx<'_>, raw: &RawSync) -> Tokens {
    let mut token = |v: &Option<Spanned<String>>| {
        let v = v.as_ref()?;
        read_token(&cx.path(&v.value))
            .map_err(|e| cx.err(v, e.to_string()))
            .ok()
    };
    Tokens {
        agent: token(&raw.agent_token_file),
        publish: token(&raw.publish_token_file),
    }
}

/// Fail closed: a sync API other hosts can reach writes what every backend serves, so every
/// caller must prove who it is with a farm-CA certificate over TLS; only a loopback one may do
/// without (bearer tokens: tests, the demo, a farm of one).
fn require_mutual_tls_off_loopback(cx: &mut Ctx<'_>, raw: &RawSync, bind: SocketAddr) {
    let mutual = raw.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    if !bind.ip().to_canonical().is_loopback() && !mutual {
        let fix = "Make a farm CA (`lockstep ca init`), issue the hub a certificate (`lockstep ca issue NAME --role hub --ip ADDRESS`) and set `sync.tls: { certificates: [{ cert: FILE, key: FILE }], client_ca: ca.crt, crl: crl.pem }`, or bind the sync API to 127.0.0.1";
        cx.err(
            &raw.bind,
            format!(
                "sync.bind {bind} is reachable from other hosts, but sync.tls.client_ca is not set: anyone on the network could publish or change what every backend serves, and tokens would cross it in clear. {fix}"
            ),
        );
    }
}

/// `sync.upload_quota`: a size of at least the largest blob, so any release can be uploaded.
fn upload_quota(cx: &mut Ctx<'_>, raw: Option<&Spanned<String>>) -> u64 {
    let Some(v) = raw else {
        return DEFAULT_UPLOAD_QUOTA;
    };
    match super::size::parse(&v.value) {
        Ok(n) if n >= crate::sync::manifest::MAX_BLOB_BYTES => n,
        Ok(_) => {
            cx.err(v, format!("sync.upload_quota must be at least {} (the largest blob) so that any release can be uploaded; default 16GiB", crate::sync::manifest::MAX_BLOB_BYTES));
            DEFAULT_UPLOAD_QUOTA
        }
        Err(e) => {
            cx.err(v, format!("sync.upload_quota: {e}"));
            DEFAULT_UPLOAD_QUOTA
        }
    }
}

fn sync_tls(cx: &mut Ctx<'_>, t: &super::raw::RawSyncTls) -> SyncTls {
    if t.certificates.is_empty() {
        cx.errors.push(super::ConfigError::at(
            cx.file,
            super::Pos::default(),
            "sync.tls has no certificates: add `certificates: [{ cert: FILE, key: FILE }]`",
        ));
    }
    let mut certs = Vec::new();
    for c in &t.certificates {
        match tls::load(&cx.path(&c.cert.value), &cx.path(&c.key.value)) {
            Ok(l) => certs.push(l),
            Err((tls::Part::Cert, e)) => cx.err(&c.cert, e),
            Err((tls::Part::Key, e)) => cx.err(&c.key, e),
        }
    }
    if let (None, Some(crl)) = (&t.client_ca, &t.crl) {
        cx.err(
            crl,
            "sync.tls.crl needs sync.tls.client_ca (the CA whose revocations it lists)",
        );
    }
    let clients = t.client_ca.as_ref().and_then(|ca| {
        let crl = t.crl.as_ref().map(|c| cx.path(&c.value));
        match tls::load_trust(&cx.path(&ca.value), crl.as_deref()) {
            Ok(trust) => Some(trust),
            Err((tls::Part::Cert, e)) => {
                cx.err(ca, e);
                None
            }
            Err((tls::Part::Key, e)) => {
                if let Some(c) = &t.crl {
                    cx.err(c, e);
                }
                None
            }
        }
    });
    let ca_dir = t.ca_dir.as_ref().and_then(|d| {
        let dir = cx.path_at(d, "sync.tls.ca_dir")?;
        if t.client_ca.is_none() {
            cx.err(d, "sync.tls.ca_dir needs sync.tls.client_ca (its ca.crt): the certificates it issues must be accepted");
        }
        match crate::ca::Ca::open(&dir) {
            Ok(_) => Some(dir),
            Err(e) => {
                cx.err(d, format!("sync.tls.ca_dir: {e}"));
                None
            }
        }
    });
    SyncTls {
        certs,
        clients,
        ca_dir,
    }
}
