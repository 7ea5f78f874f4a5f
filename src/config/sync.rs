//! The `sync:` section: raw → checked [`Sync`] that the sync hub trusts. Token files are read
//! (and refused when every user may read them) here, so `lockstep check` catches them.

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
    /// Certificates when the sync API is served over TLS.
    pub tls: Option<Vec<tls::LoadedCert>>,
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
    let report_expiry = cx.duration(
        &raw.report_expiry,
        DEFAULT_REPORT_EXPIRY,
        "sync.report_expiry",
    );
    let (gc, errors) = gc::from_raw(raw.gc_interval.as_ref(), raw.gc_grace.as_ref());
    for (at, e) in errors {
        cx.err(at, format!("sync.{e}"));
    }
    let mut token = |v: &Option<Spanned<String>>| {
        let v = v.as_ref()?;
        match read_token(&cx.path(&v.value)) {
            Ok(t) => Some(t),
            Err(e) => {
                cx.err(v, e.to_string());
                None
            }
        }
    };
    let tokens = Tokens {
        agent: token(&raw.agent_token_file),
        publish: token(&raw.publish_token_file),
    };
    // Fail closed: a sync API other hosts can reach writes what every backend serves, so it
    // needs both credentials; only a loopback one may go without (tests, a farm of one).
    let open_roles: Vec<&str> = [
        (raw.agent_token_file.is_none(), "agent_token_file"),
        (raw.publish_token_file.is_none(), "publish_token_file"),
    ]
    .into_iter()
    .filter_map(|(missing, key)| missing.then_some(key))
    .collect();
    if let (Some(b), false) = (bind, open_roles.is_empty()) {
        if !b.ip().to_canonical().is_loopback() {
            cx.err(
                &raw.bind,
                format!(
                    "sync.bind {b} is reachable from other hosts, but {} is not set: anyone who reaches it could publish or change what every backend serves. Set both token files (the package creates /etc/lockstep/agent.token and publish.token), or bind the sync API to 127.0.0.1",
                    open_roles.join(" and ")
                ),
            );
        }
    }
    let tls = raw.tls.as_ref().map(|t| {
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
        certs
    });
    Some(Sync {
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
