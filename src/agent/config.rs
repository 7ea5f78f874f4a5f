//! `agent.yaml`: raw serde structs (unknown and duplicate keys refused, positions kept) →
//! [`validate`] → the typed [`AgentConfig`] the agent trusts. Every problem is reported as
//! `file:line:column: what is wrong and the fix`, as for `lockstep.yaml`.
//!
//! Reads the config file, the token file (to report a bad one at its line), the hub's CA
//! file and the trusted publisher keys; opens no sockets.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::config::check::Ctx;
use crate::config::error::{ConfigError, ConfigErrors, Pos};
use crate::config::gc;
use crate::config::tls::{FarmTrust, LoadedCert};
use crate::net::client::{ClientError, ClientTls, HttpClient, Remote};
use crate::sync::auth::read_token;
use crate::sync::gc::Gc;
use crate::sync::identity::{Identity, Kind};
use crate::sync::manifest::MAX_BLOB_BYTES;
use crate::sync::protocol::parse_serve;
use crate::sync::sign::TrustedKeys;

type S<T> = Spanned<T>;

/// Default blobs fetched at once while staging.
pub const DEFAULT_FETCH_CONCURRENCY: usize = 8;
/// Most blobs fetched at once.
pub const MAX_FETCH_CONCURRENCY: usize = 256;
/// Longest agent name (it is a path segment of the sync API and a metrics label).
pub use crate::sync::identity::MAX_NAME_BYTES;
/// The commented example every key is documented in.
pub const EXAMPLE: &str = "deploy/examples/agent.yaml";

/// Default cap on the agent's open connections on `serve`: the local web server's and the
/// proxy's keep-alive pools and the peers, well inside the unit's `LimitNOFILE=65536`.
pub const DEFAULT_AGENT_MAX_CONNECTIONS: usize = 4096;

/// `hub:` as written: one URL or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum HubUrls {
    /// One hub.
    One(String),
    /// Hubs sharing a farm, in order of preference.
    Several(Vec<String>),
}

impl HubUrls {
    fn list(&self) -> Vec<String> {
        match self {
            HubUrls::One(u) => vec![u.trim().to_string()],
            HubUrls::Several(l) => l.iter().map(|u| u.trim().to_string()).collect(),
        }
    }
}

/// The top level of `agent.yaml`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgentConfig {
    /// This agent's name: the backend it serves.
    pub name: S<String>,
    /// The hub's URL, `http://host:port` or `https://host:port`, or a list of hubs of one
    /// farm (`sync.cluster`) in order of preference.
    pub hub: S<HubUrls>,
    /// File holding the agent token.
    pub token_file: Option<S<String>>,
    /// PEM file with the CA that signed an https hub's certificate (without `tls:`).
    pub hub_ca: Option<S<String>>,
    /// The agent's farm-CA identity: mutual TLS with the hub and the peers.
    pub tls: Option<RawAgentTls>,
    /// Directory of the agent's blobs, manifests and state.
    pub store: S<String>,
    /// `ip:port` the active release is served on.
    pub serve: S<String>,
    /// Directory receiving `releases/<id>/` copies and the `current` symlink.
    pub release_dir: Option<S<String>>,
    /// Local change detection.
    pub watch: Option<RawWatch>,
    /// Blobs fetched at once while staging.
    pub fetch_concurrency: Option<S<u32>>,
    /// Other agents' serve URLs for immediate forwarding (default: the hub's registry).
    pub peers: Option<S<Vec<S<String>>>>,
    /// Time between collections of unused releases and blobs in the store (`0s`: never).
    pub gc_interval: Option<S<String>>,
    /// Unused content younger than this is kept.
    pub gc_grace: Option<S<String>>,
    /// Publisher public keys (`.pub` files): only releases one of them signed are staged.
    pub trusted_keys: Option<S<Vec<S<String>>>>,
    /// Agents whose changesets a release the hub built may contain (with `trusted_keys`).
    pub trusted_origins: Option<S<Vec<S<String>>>>,
    /// Most connections open at once on `serve` (the web server, the proxy, peers).
    pub max_connections: Option<S<u32>>,
}

/// `tls:` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgentTls {
    /// The farm CA (`ca.crt` of `lockstep ca init`).
    pub ca: S<String>,
    /// Its revocation list (`crl.pem`).
    pub crl: Option<S<String>>,
    /// This agent's certificate (`lockstep ca issue NAME --role agent`).
    pub cert: S<String>,
    /// Its private key.
    pub key: S<String>,
}

/// `watch:` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWatch {
    /// The directory to watch (absent: only writes through the API are forwarded).
    pub dir: Option<S<String>>,
    /// `scheduled` (default) or `immediate`.
    pub mode: Option<S<WatchMode>>,
    /// Globs of files never forwarded (default: editor temp files).
    pub ignore: Option<S<Vec<String>>>,
    /// Edits within this window become one changeset (default 50ms).
    pub debounce: Option<S<String>>,
    /// A full rescan this often, as a backstop (default 5m).
    pub rescan: Option<S<String>>,
    /// Largest file forwarded (default 64MiB, the most a release file may be).
    pub max_file_size: Option<S<String>>,
}

/// What a detected local change becomes.
pub use crate::sync::changeset::Mode as WatchMode;

/// Default debounce window.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(50);
/// Default backstop rescan period.
pub const DEFAULT_RESCAN: Duration = Duration::from_secs(300);

/// `watch:`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    /// The directory to watch, if any.
    pub dir: Option<PathBuf>,
    /// What a change becomes.
    pub mode: WatchMode,
    /// Globs of ignored files (the defaults when not configured).
    pub ignore: Vec<String>,
    /// Debounce window.
    pub debounce: Duration,
    /// Backstop rescan period.
    pub rescan: Duration,
    /// Largest file forwarded, bytes.
    pub max_file_bytes: u64,
}

impl Watch {
    /// Watching `dir` (or only the API with `None`) in `mode`, with the defaults.
    pub fn new(dir: Option<&Path>, mode: WatchMode) -> Watch {
        Watch {
            dir: dir.map(Path::to_path_buf),
            mode,
            ignore: crate::agent::detect::Ignore::DEFAULTS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            debounce: DEFAULT_DEBOUNCE,
            rescan: DEFAULT_RESCAN,
            max_file_bytes: MAX_BLOB_BYTES,
        }
    }
}

/// The agent's TLS: the CA it trusts (the farm CA, or an https hub's CA) and, with mutual TLS,
/// its own farm-CA certificate.
#[derive(Debug, Clone)]
pub struct AgentTls {
    /// The farm CA and its revocation list.
    pub trust: FarmTrust,
    /// This agent's certificate (naming `urn:lockstep:agent:<name>`); `None` with `hub_ca`.
    pub own: Option<LoadedCert>,
    /// Signs this agent's changesets with the certificate's key (with `own`).
    pub signer: Option<std::sync::Arc<crate::sync::provenance::ChangesetSigner>>,
}

impl AgentTls {
    /// The client config: trusts the CA, presents the agent's certificate.
    pub fn client(&self) -> Result<ClientTls, ClientError> {
        ClientTls::farm(&self.trust, self.own.as_ref())
    }

    /// The server config of `serve` for peers (TLS and client certificates), if the agent has
    /// a certificate.
    pub fn server(&self) -> Option<std::sync::Arc<rustls::ServerConfig>> {
        let own = self.own.as_ref()?;
        Some(crate::net::tls::server_config_with(
            std::slice::from_ref(own),
            Some(&self.trust),
        ))
    }
}

/// A checked agent configuration. Build it with [`load`]/[`parse`], or with
/// [`AgentConfig::new`] in code (the demo and tests start agents in-process).
#[derive(Clone)]
pub struct AgentConfig {
    /// The file it was read from (empty when built in code).
    pub file: PathBuf,
    /// This agent's name.
    pub name: String,
    /// The hubs' URLs, in order of preference (the agent moves to the next when one does not
    /// answer).
    pub hubs: Vec<String>,
    /// The agent token (read from `token_file`).
    pub token: Option<String>,
    /// How it speaks TLS: to the hub, to peers, and (with its own certificate) on `serve`.
    pub tls: Option<AgentTls>,
    /// The agent's store directory.
    pub store: PathBuf,
    /// Where the active release is served.
    pub serve: SocketAddr,
    /// Where releases are materialised for a web server, with the `current` symlink.
    pub release_dir: Option<PathBuf>,
    /// Local change detection and the write API.
    pub watch: Option<Watch>,
    /// Other agents' serve URLs (`http://ip:port`); empty = ask the hub's registry.
    pub peers: Vec<String>,
    /// Blobs fetched at once while staging.
    pub fetch_concurrency: usize,
    /// Collection of unused releases and blobs in the store.
    pub gc: Gc,
    /// The publisher keys one of which must have signed every release this agent stages and
    /// activates; `None` (only with a hub on loopback): releases are not checked.
    pub trusted_keys: Option<TrustedKeys>,
    /// The agents whose changesets a release the hub built from them may contain (this agent
    /// itself is added when it has `watch:`).
    pub trusted_origins: Vec<String>,
    /// Most connections open at once on `serve`.
    pub max_connections: usize,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("file", &self.file)
            .field("name", &self.name)
            .field("hubs", &self.hubs)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.as_ref().map(|t| t.own.is_some()))
            .field("store", &self.store)
            .field("serve", &self.serve)
            .field("release_dir", &self.release_dir)
            .field("watch", &self.watch)
            .field("peers", &self.peers)
            .field("fetch_concurrency", &self.fetch_concurrency)
            .field("gc", &self.gc)
            .field("trusted_keys", &self.trusted_keys)
            .field("trusted_origins", &self.trusted_origins)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

impl AgentConfig {
    /// A config with the defaults: no token, no CA, no release dir, no watcher, no trusted
    /// keys (unsigned releases accepted: only for a hub on loopback).
    pub fn new(name: &str, hub: &str, store: &Path, serve: SocketAddr) -> AgentConfig {
        AgentConfig {
            file: PathBuf::new(),
            name: name.to_string(),
            hubs: vec![hub.to_string()],
            token: None,
            tls: None,
            store: store.to_path_buf(),
            serve,
            release_dir: None,
            watch: None,
            peers: Vec::new(),
            fetch_concurrency: DEFAULT_FETCH_CONCURRENCY,
            gc: Gc::default(),
            trusted_keys: None,
            trusted_origins: Vec::new(),
            max_connections: DEFAULT_AGENT_MAX_CONNECTIONS,
        }
    }
}

/// Reads and checks an agent config file, returning every problem found.
pub fn load(path: &Path) -> Result<AgentConfig, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError::at(
            path,
            Pos::default(),
            format!("cannot read the agent config file: {e}"),
        )])
    })?;
    parse(path, &text)
}

/// Checks agent config text as if read from `path` (relative paths resolve against its
/// directory).
pub fn parse(path: &Path, text: &str) -> Result<AgentConfig, ConfigErrors> {
    let raw: RawAgentConfig = crate::config::yaml::parse(path, text, EXAMPLE)?;
    validate(path, raw)
}

pub use crate::sync::identity::valid_name;

/// Checks the raw config, returning the typed one or every problem found.
pub fn validate(file: &Path, raw: RawAgentConfig) -> Result<AgentConfig, ConfigErrors> {
    let mut cx = Ctx::new(file);
    check_name(&mut cx, &raw.name);
    let serve = serve_addr(&mut cx, &raw.serve);
    let (store, release_dir) = directories(&mut cx, &raw);
    let tls = agent_tls(&mut cx, &raw);
    let client_tls = tls.as_ref().and_then(|t| t.client().ok());
    let before = cx.errors.len();
    let hubs = hub_urls(&mut cx, &raw, client_tls.as_ref(), tls.as_ref());
    let hub_ok = cx.errors.len() == before;
    let own = tls.as_ref().is_some_and(|t| t.own.is_some());
    require_certificate_off_loopback(&mut cx, &raw, serve, own);
    let token = raw.token_file.as_ref().and_then(|v| {
        let p = cx.path_at(v, "token_file")?;
        read_token(&p).map_err(|e| cx.err(v, e.to_string())).ok()
    });
    let trusted_keys = trusted_keys(&mut cx, &raw, &hubs, hub_ok);
    let trusted_origins = trusted_origins(&mut cx, &raw);
    let fetch_concurrency = fetch_concurrency(&mut cx, raw.fetch_concurrency.as_ref());
    let max_connections = cx.connections(
        &raw.max_connections,
        DEFAULT_AGENT_MAX_CONNECTIONS,
        "max_connections",
    );
    let watch = raw
        .watch
        .as_ref()
        .map(|w| watch(&mut cx, w, store.as_deref(), release_dir.as_deref()));
    let peers = peers(&mut cx, raw.peers.as_ref(), client_tls.as_ref());
    let (gc, errors) = gc::from_raw(raw.gc_interval.as_ref(), raw.gc_grace.as_ref());
    for (at, e) in errors {
        cx.err(at, e);
    }
    match (serve, store, cx.errors.is_empty()) {
        (Some(serve), Some(store), true) => Ok(AgentConfig {
            file: file.to_path_buf(),
            name: raw.name.value,
            hubs,
            token,
            tls,
            store,
            serve,
            release_dir,
            watch,
            peers,
            fetch_concurrency,
            gc,
            trusted_keys,
            trusted_origins,
            max_connections,
        }),
        _ => {
            cx.errors.sort_by_key(|e| (e.pos.line, e.pos.column));
            Err(ConfigErrors(cx.errors))
        }
    }
}

/// `store` and `release_dir`, which must not overlap.
fn directories(cx: &mut Ctx<'_>, raw: &RawAgentConfig) -> (Option<PathBuf>, Option<PathBuf>) {
    let store = cx.path_at(&raw.store, "store");
    let release_dir = raw
        .release_dir
        .as_ref()
        .and_then(|v| cx.path_at(v, "release_dir"));
    if let (Some(s), Some(r), Some(raw_r)) = (&store, &release_dir, &raw.release_dir) {
        if overlap(s, r) {
            cx.err(
                raw_r,
                "release_dir and store overlap: give each its own directory (the store is the agent's own)",
            );
        }
    }
    (store, release_dir)
}

/// Fail closed: an agent other hosts can reach takes peers' changesets and writes, which must
/// come from a party that proves who it is; only a loopback agent may go without a
/// certificate (`own`).
fn require_certificate_off_loopback(
    cx: &mut Ctx<'_>,
    raw: &RawAgentConfig,
    serve: Option<SocketAddr>,
    own: bool,
) {
    if let (Some(addr), false) = (serve, own) {
        if !addr.ip().to_canonical().is_loopback() {
            cx.err(
                &raw.serve,
                format!("serve {addr} is reachable from other hosts, but the agent has no certificate (`tls:`): its peers could not prove who they are, nor it to them. Issue one (`lockstep ca issue {} --role agent --ip {}`) and set `tls: {{ ca, cert, key }}`, or serve on 127.0.0.1", raw.name.value, addr.ip()),
            );
        }
    }
}

/// `trusted_keys`. Fail closed: without them, whoever controls the hub, or the path to it,
/// chooses what this backend serves; only a hub on this host may go without (tests, a farm of
/// one). `hub_ok`: the hub's URL was valid (otherwise its error is the one to fix first).
fn trusted_keys(
    cx: &mut Ctx<'_>,
    raw: &RawAgentConfig,
    hubs: &[String],
    hub_ok: bool,
) -> Option<TrustedKeys> {
    let keys = raw
        .trusted_keys
        .as_ref()
        .map(|list| cx.public_keys(list, "trusted_keys"));
    let remote = hubs.iter().find(|h| !hub_is_loopback(h));
    if let (None, true, Some(hub)) = (&raw.trusted_keys, hub_ok, remote) {
        cx.err(
            &raw.hub,
            format!("hub {hub} is not on this host, but trusted_keys is not set: whoever controls the hub, or the network path to it, would choose what this backend serves. Set trusted_keys to the publishers' public key files (`lockstep keygen` writes KEY.pub; sign with `lockstep publish --sign-key KEY`), or use a hub on 127.0.0.1"),
        );
    }
    keys
}

/// Whether the hub's URL names this host: a loopback address, or `localhost`.
pub fn hub_is_loopback(url: &str) -> bool {
    let Some(host) = url
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_string))
    else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.to_canonical().is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

/// `trusted_origins:`, each a valid agent name; only meaningful with `trusted_keys`.
fn trusted_origins(cx: &mut Ctx, raw: &RawAgentConfig) -> Vec<String> {
    let Some(list) = &raw.trusted_origins else {
        return Vec::new();
    };
    if raw.trusted_keys.is_none() {
        cx.err(
            list,
            "trusted_origins has no effect without trusted_keys (without them every release is accepted): set trusted_keys, or remove trusted_origins",
        );
    }
    list.value
        .iter()
        .filter(|o| {
            let ok = valid_name(&o.value);
            if !ok {
                cx.err(
                    *o,
                    format!("trusted_origins: `{}` cannot name an agent: use the agents' names, e.g. web-1", o.value),
                );
            }
            ok
        })
        .map(|o| o.value.clone())
        .collect()
}

/// Whether one directory is, or is inside, the other.
fn overlap(a: &Path, b: &Path) -> bool {
    a == b || a.starts_with(b) || b.starts_with(a)
}

fn check_name(cx: &mut Ctx, name: &S<String>) {
    if !valid_name(&name.value) {
        cx.err(
            name,
            format!(
                "name `{}` cannot name an agent: use 1 to {MAX_NAME_BYTES} letters, digits, `.`, `_` or `-` (e.g. the backend's name, web-1)",
                name.value
            ),
        );
    }
}

/// `serve:` read as the hub reads a report's (one rule: [`parse_serve`]), at its line and
/// column when it is not an `ip:port`.
fn serve_addr(cx: &mut Ctx, serve: &S<String>) -> Option<SocketAddr> {
    match parse_serve(serve.value.trim()) {
        Ok(a) => Some(a),
        Err(e) => {
            cx.err(serve, e.to_string());
            None
        }
    }
}

/// The hubs' URLs, trimmed; each checked (with the CA) exactly as the client will when the
/// agent starts, and refused in plain HTTP or without the agent's certificate unless the hub
/// is on this host.
fn hub_urls(
    cx: &mut Ctx,
    raw: &RawAgentConfig,
    client: Option<&ClientTls>,
    tls: Option<&AgentTls>,
) -> Vec<String> {
    let hubs = raw.hub.value.list();
    if hubs.is_empty() {
        cx.err(&raw.hub, "hub is an empty list: give the hub's URL, or the URLs of the farm's hubs, e.g. [\"https://10.0.0.11:7700\", \"https://10.0.0.12:7700\"]");
    }
    for hub in &hubs {
        hub_url(cx, raw, hub, client, tls);
    }
    hubs
}

/// One hub's URL, checked (see [`hub_urls`]).
fn hub_url(
    cx: &mut Ctx,
    raw: &RawAgentConfig,
    hub: &str,
    client: Option<&ClientTls>,
    tls: Option<&AgentTls>,
) {
    match HttpClient::hub(hub, None, client) {
        Ok(c) if c.is_loopback() => {}
        Ok(c) if !c.is_https() => cx.err(
            &raw.hub,
            format!("hub {hub} is not on this host, but plain HTTP: the agent's requests and the content would cross the network in clear. Use https:// with `tls: {{ ca, cert, key }}` (the hub's sync.tls)"),
        ),
        Ok(_) if tls.is_none_or(|t| t.own.is_none()) => cx.err(
            &raw.hub,
            format!("hub {hub} is not on this host, but the agent has no certificate to prove who it is: issue one (`lockstep ca issue {} --role agent`) and set `tls: {{ ca, cert, key }}`", raw.name.value),
        ),
        Ok(_) => {}
        Err(ClientError::Tls(m)) => match (&raw.tls, &raw.hub_ca) {
            (Some(t), _) => cx.err(&t.ca, m),
            (None, Some(ca)) => cx.err(ca, m),
            (None, None) => cx.err(&raw.hub, m),
        },
        Err(e) => cx.err(
            &raw.hub,
            format!("{e}: write e.g. \"https://10.0.0.1:7700\""),
        ),
    }
}

/// `tls:` (or the older `hub_ca:`): the CA files read, the certificate checked to name this
/// agent.
fn agent_tls(cx: &mut Ctx, raw: &RawAgentConfig) -> Option<AgentTls> {
    use crate::config::tls::{load, load_trust, Part};
    if let (Some(_), Some(ca)) = (&raw.tls, &raw.hub_ca) {
        cx.err(
            ca,
            "hub_ca and tls: both set: tls.ca (the farm CA) replaces hub_ca",
        );
        return None;
    }
    if let Some(ca) = &raw.hub_ca {
        let path = cx.path_at(ca, "hub_ca")?;
        return match load_trust(&path, None) {
            Ok(trust) => Some(AgentTls {
                trust,
                own: None,
                signer: None,
            }),
            Err((_, e)) => {
                cx.err(ca, e);
                None
            }
        };
    }
    let t = raw.tls.as_ref()?;
    let ca = cx.path_at(&t.ca, "tls.ca");
    let crl = t.crl.as_ref().and_then(|c| cx.path_at(c, "tls.crl"));
    let cert = cx.path_at(&t.cert, "tls.cert");
    let key = cx.path_at(&t.key, "tls.key");
    let trust = match load_trust(&ca?, crl.as_deref()) {
        Ok(trust) => Some(trust),
        Err((Part::Cert, e)) => {
            cx.err(&t.ca, e);
            None
        }
        Err((Part::Key, e)) => {
            if let Some(c) = &t.crl {
                cx.err(c, e);
            }
            None
        }
    };
    let own = match load(&cert?, key.as_ref()?) {
        Ok(own) => Some(own),
        Err((Part::Cert, e)) => {
            cx.err(&t.cert, e);
            None
        }
        Err((Part::Key, e)) => {
            cx.err(&t.key, e);
            None
        }
    }?;
    let leaf = &own.key.cert[0];
    let want = Identity::new(Kind::Agent, &raw.name.value);
    match Identity::of_cert(leaf) {
        Ok(id) if Some(&id) == want.as_ref() => {}
        Ok(id) => cx.err(
            &t.cert,
            format!("tls.cert names {id}, not agent {}: issue this agent its own certificate (`lockstep ca issue {} --role agent`)", raw.name.value, raw.name.value),
        ),
        Err(e) => cx.err(&t.cert, format!("tls.cert: {e}")),
    }
    let signer = match crate::sync::sign::SecretKey::from_pem(
        &std::fs::read(key?).unwrap_or_default(),
        "tls.key",
    ) {
        Ok(k) => Some(std::sync::Arc::new(
            crate::sync::provenance::ChangesetSigner::new(k, leaf),
        )),
        Err(_) => {
            cx.err(&t.key, "tls.key is not an Ed25519 key: the agent signs its changesets with it (`lockstep ca issue` and `lockstep agent join` make Ed25519 keys)");
            None
        }
    };
    Some(AgentTls {
        trust: trust?,
        own: Some(own),
        signer,
    })
}

fn fetch_concurrency(cx: &mut Ctx, v: Option<&S<u32>>) -> usize {
    match v {
        None => DEFAULT_FETCH_CONCURRENCY,
        Some(v) if v.value == 0 || v.value as usize > MAX_FETCH_CONCURRENCY => {
            cx.err(
                v,
                format!("fetch_concurrency must be between 1 and {MAX_FETCH_CONCURRENCY} (default {DEFAULT_FETCH_CONCURRENCY})"),
            );
            DEFAULT_FETCH_CONCURRENCY
        }
        Some(v) => v.value as usize,
    }
}

/// The `watch:` section; `store` and `release_dir` as checked, to refuse overlaps.
fn watch(cx: &mut Ctx, w: &RawWatch, store: Option<&Path>, release_dir: Option<&Path>) -> Watch {
    let dir = w.dir.as_ref().and_then(|d| cx.path_at(d, "watch.dir"));
    let mut watch = Watch::new(
        dir.as_deref(),
        w.mode.as_ref().map_or(WatchMode::Scheduled, |m| m.value),
    );
    if let (Some(d), Some(raw_d), Some(s)) = (&dir, &w.dir, store) {
        if overlap(d, s) {
            cx.err(
                raw_d,
                "watch.dir and store overlap: give each its own directory",
            );
        }
    }
    if let (Some(d), Some(raw_d), Some(r)) = (&dir, &w.dir, release_dir) {
        if overlap(d, r) {
            cx.err(
                raw_d,
                "watch.dir and release_dir overlap: edit in a directory of its own (release_dir is written by the agent)",
            );
        }
    }
    if let Some(g) = &w.ignore {
        match crate::agent::detect::Ignore::new(&g.value) {
            Ok(_) => watch.ignore = g.value.clone(),
            Err(e) => cx.err(g, format!("watch.ignore: {e}")),
        }
    }
    watch.debounce = duration(cx, &w.debounce, "watch.debounce", DEFAULT_DEBOUNCE);
    watch.rescan = duration(cx, &w.rescan, "watch.rescan", DEFAULT_RESCAN);
    if let Some(v) = &w.max_file_size {
        match crate::config::size::parse(&v.value) {
            Ok(n) if n > 0 && n <= MAX_BLOB_BYTES => watch.max_file_bytes = n,
            Ok(_) => cx.err(
                v,
                "watch.max_file_size must be between 1 byte and 64MiB (the largest file a release holds)",
            ),
            Err(e) => cx.err(v, format!("watch.max_file_size: {e}")),
        }
    }
    watch
}

/// A duration longer than zero, else `default` (and the problem noted).
fn duration(cx: &mut Ctx, v: &Option<S<String>>, what: &str, default: Duration) -> Duration {
    match v {
        None => default,
        Some(v) => match crate::config::duration::parse(&v.value) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                cx.err(v, format!("{what} must be longer than 0"));
                default
            }
            Err(e) => {
                cx.err(v, format!("{what}: {e}"));
                default
            }
        },
    }
}

/// The `peers:` URLs, trimmed of a trailing `/`; each checked as the client will.
fn peers(cx: &mut Ctx, list: Option<&S<Vec<S<String>>>>, tls: Option<&ClientTls>) -> Vec<String> {
    let Some(list) = list else {
        return Vec::new();
    };
    list.value
        .iter()
        .filter_map(|p| {
            let url = p.value.trim().trim_end_matches('/').to_string();
            match HttpClient::new(Remote::Peer, &url, None, tls) {
                Ok(c) if !c.is_loopback() && !c.is_https() => {
                    cx.err(p, format!("peer {url} is not on this host, but plain HTTP: peers speak TLS with their farm certificates, write \"https://…\""));
                    None
                }
                Ok(_) => Some(url),
                Err(e) => {
                    cx.err(p, format!("peer: {e}: write another agent's serve address, e.g. \"http://10.0.0.2:8081\""));
                    None
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match parse(Path::new("/etc/lockstep/agent.yaml"), text) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(ConfigErrors(e)) => e.iter().map(|e| e.to_string()).collect(),
        }
    }

    const GOOD: &str = r#"
name: web-1
hub: "http://127.0.0.1:7700"
store: /var/lib/lockstep/agent
serve: "127.0.0.1:8081"
release_dir: www
watch: { dir: /srv/www-edit, mode: immediate }
fetch_concurrency: 4
"#;

    #[test]
    fn hub_takes_one_url_or_the_farms_hubs_in_order() {
        let c = parse(Path::new("/etc/lockstep/agent.yaml"), GOOD).unwrap();
        assert_eq!(c.hubs, ["http://127.0.0.1:7700"]);
        let several = GOOD.replace(
            r#"hub: "http://127.0.0.1:7700""#,
            r#"hub: ["http://127.0.0.1:7700", " http://127.0.0.1:7701 "]"#,
        );
        let c = parse(Path::new("/etc/lockstep/agent.yaml"), &several).unwrap();
        assert_eq!(c.hubs, ["http://127.0.0.1:7700", "http://127.0.0.1:7701"]);
        let empty = GOOD.replace(r#"hub: "http://127.0.0.1:7700""#, "hub: []");
        assert!(
            errors(&empty)[0].contains("hub is an empty list"),
            "{:?}",
            errors(&empty)
        );
        // Each URL is checked: one hub off this host in clear is refused.
        let clear = GOOD.replace(
            r#"hub: "http://127.0.0.1:7700""#,
            r#"hub: ["http://127.0.0.1:7700", "http://10.0.0.2:7700"]"#,
        );
        assert!(
            errors(&clear).iter().any(|e| e.contains("hub http://10.0.0.2:7700 is not on this host, but plain HTTP")),
            "{:?}",
            errors(&clear)
        );
    }

    #[test]
    fn a_good_config_is_typed_with_paths_resolved() {
        let c = parse(Path::new("/etc/lockstep/agent.yaml"), GOOD).unwrap();
        assert_eq!(c.name, "web-1");
        assert_eq!(c.serve, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(c.release_dir, Some(PathBuf::from("/etc/lockstep/www")));
        assert_eq!(c.watch.unwrap().mode, WatchMode::Immediate);
        assert_eq!(c.fetch_concurrency, 4);
        assert!(c.token.is_none());
    }

    #[test]
    fn every_problem_is_reported_at_its_line() {
        let e = errors(
            r#"
name: "web 1"
hub: "ftp://hub"
store: /var/lib/a
serve: "localhost"
release_dir: /var/lib/a/www
fetch_concurrency: 0
"#,
        );
        assert_eq!(e.len(), 5, "{e:#?}");
        assert!(e[0].starts_with("/etc/lockstep/agent.yaml:2:7: name `web 1`"));
        assert!(e[1].starts_with("/etc/lockstep/agent.yaml:3:6: hub URL"));
        assert!(e[1].contains("http://"), "{}", e[1]);
        assert!(e[2].contains(":5:8: serve `localhost`"), "{}", e[2]);
        assert!(e[3].contains(":6:14: release_dir and store overlap"));
        assert!(e[4].contains(":7:20: fetch_concurrency must be between 1"));
    }

    #[test]
    fn unknown_keys_missing_keys_and_bad_modes() {
        let e = errors(&GOOD.replace("fetch_concurrency", "fetch_concurency"));
        assert!(
            e[0].contains(
                ":8:1: unknown key `fetch_concurency`: did you mean `fetch_concurrency`?"
            ),
            "{e:?}"
        );
        let e = errors(&GOOD.replace("immediate", "immedate"));
        assert!(e[0].contains("did you mean `immediate`"), "{e:?}");
        let e = errors(&GOOD.replace("name: web-1\n", ""));
        assert!(e[0].contains("name"), "{e:?}");
        let e = errors("# nothing\n");
        assert!(e[0].contains("deploy/examples/agent.yaml"), "{e:?}");
    }

    /// A farm CA in a temporary directory with certificates for `names` (agents).
    fn farm(names: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = crate::ca::Ca::init(&dir.path().join("ca"), "t").unwrap();
        for n in names {
            let id = Identity::new(Kind::Agent, n).unwrap();
            ca.issue_into(&id, &[], &["127.0.0.1".parse().unwrap()], 1, dir.path())
                .unwrap();
        }
        dir
    }

    fn tls_yaml(dir: &Path, who: &str) -> String {
        format!(
            "tls: {{ ca: {0}/ca/ca.crt, crl: {0}/ca/crl.pem, cert: {0}/{who}.crt, key: {0}/{who}.key }}\n",
            dir.display()
        )
    }

    #[test]
    fn off_loopback_everything_is_tls_with_the_agents_own_certificate() {
        let dir = farm(&["web-1", "web-2"]);
        // A hub on another host also needs the publishers' keys (below the lines checked).
        let keys = format!(
            "trusted_keys: [{}]\n",
            public_key(dir.path(), "publisher.key").display()
        );
        let remote = GOOD.replace("http://127.0.0.1:7700", "http://10.0.0.1:7700");
        // Plain HTTP to another host: refused at the hub's line, even with a certificate.
        let e = errors(&format!("{remote}{}", tls_yaml(dir.path(), "web-1")));
        assert!(
            e[0].contains(":3:6:") && e[0].contains("plain HTTP"),
            "{e:?}"
        );
        // https without a certificate of its own (only the CA): refused.
        let https = remote.replace("http://", "https://");
        let e = errors(&format!(
            "{https}hub_ca: {}/ca/ca.crt\n",
            dir.path().display()
        ));
        assert!(
            e[0].contains(":3:6:") && e[0].contains("no certificate"),
            "{e:?}"
        );
        // Another agent's certificate: refused at tls.
        let e = errors(&format!("{https}{}{keys}", tls_yaml(dir.path(), "web-2")));
        assert!(
            e[0].contains(":9:") && e[0].contains("names agent web-2, not agent web-1"),
            "{e:?}"
        );
        // Its own: accepted, and it may serve off loopback and list https peers.
        let ok = format!(
            "{}{}peers: [\"https://10.0.0.2:8081\"]\n{keys}",
            https.replace("127.0.0.1:8081", "0.0.0.0:8081"),
            tls_yaml(dir.path(), "web-1")
        );
        let c = parse(Path::new("agent.yaml"), &ok).unwrap();
        assert!(c.tls.as_ref().unwrap().server().is_some());
        // Plain-HTTP peers on other hosts: refused at the peer.
        let e = errors(&ok.replace("https://10.0.0.2", "http://10.0.0.2"));
        assert!(
            e[0].contains(":10:") && e[0].contains("plain HTTP"),
            "{e:?}"
        );
    }

    #[test]
    fn an_agent_others_can_reach_needs_its_certificate() {
        let open = GOOD.replace("serve: \"127.0.0.1:8081\"", "serve: \"0.0.0.0:8081\"");
        let e = parse(Path::new("agent.yaml"), &open)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("agent.yaml:5:8:"), "at serve: {e}");
        assert!(e.contains("no certificate"), "{e}");
        // Loopback may go without (tests, one host).
        parse(Path::new("agent.yaml"), GOOD).unwrap();
    }

    #[test]
    fn https_needs_a_ca_and_tokens_must_be_private() {
        let e = errors(&GOOD.replace("http://", "https://"));
        assert!(e[0].contains(":3:6:") && e[0].contains("tls.ca"), "{e:?}");
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("agent.token");
        std::fs::write(&token, "secret\n").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = format!("{GOOD}token_file: {}\n", token.display());
        let e = errors(&text);
        assert!(
            e[0].contains(":9:13:") && e[0].contains("chmod 600"),
            "{e:?}"
        );
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = parse(Path::new("a.yaml"), &text).unwrap();
        assert_eq!(c.token.as_deref(), Some("secret"));
        assert!(!format!("{c:?}").contains("secret"));
    }

    /// A public key file in `dir`; its path.
    fn public_key(dir: &Path, name: &str) -> PathBuf {
        let out = dir.join(name);
        crate::sync::sign::write_key_pair(&out, None, &ring::rand::SystemRandom::new()).unwrap();
        crate::sync::sign::public_path(&out)
    }

    #[test]
    fn an_agent_of_a_hub_on_another_host_needs_trusted_keys() {
        // Everything else right for a hub on another host: https, its own certificate.
        let dir = farm(&["web-1"]);
        let remote = format!(
            "{}{}",
            GOOD.replace("http://127.0.0.1:7700", "https://10.0.0.1:7700"),
            tls_yaml(dir.path(), "web-1")
        );
        let e = errors(&remote);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("/etc/lockstep/agent.yaml:3:6: hub https://10.0.0.1:7700 is not on this host, but trusted_keys is not set"), "{e:?}");
        assert!(e[0].contains("lockstep keygen"), "{e:?}");
        for local in [
            "http://localhost:7700",
            "http://[::1]:7700",
            "https://127.0.0.2:7700",
        ] {
            assert!(hub_is_loopback(local), "{local}");
        }
        for remote in [
            "http://10.0.0.1:7700",
            "http://hub.farm:7700",
            "http://127.0.0.1.nip.io:1",
        ] {
            assert!(!hub_is_loopback(remote), "{remote}");
        }
        // With keys, a remote hub is fine; the keys are read.
        let (a, b) = (
            public_key(dir.path(), "a.key"),
            public_key(dir.path(), "b.key"),
        );
        let text = format!(
            "{remote}trusted_keys: [{}, {}]\ntrusted_origins: [web-1, web-2]\n",
            a.display(),
            b.display()
        );
        let c = parse(Path::new("/etc/lockstep/agent.yaml"), &text).unwrap();
        assert_eq!(c.trusted_keys.unwrap().len(), 2);
        assert_eq!(c.trusted_origins, ["web-1", "web-2"]);
        // Loopback and no keys: accepted, unchecked.
        assert!(parse(Path::new("a.yaml"), GOOD)
            .unwrap()
            .trusted_keys
            .is_none());
    }

    #[test]
    fn trusted_keys_and_origins_are_checked_at_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let good = public_key(dir.path(), "good.key");
        let text = format!(
            "{GOOD}trusted_keys:\n  - {}\n  - {}\n  - {}\n",
            good.display(),
            dir.path().join("missing.pub").display(),
            dir.path().join("good.key").display(),
        );
        let e = errors(&text);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].contains(":11:5: trusted_keys: cannot read key file"),
            "{e:?}"
        );
        assert!(
            e[1].contains(":12:5: trusted_keys: ") && e[1].contains("looks like a secret key"),
            "{e:?}"
        );
        let e = errors(&format!("{GOOD}trusted_keys: []\n"));
        assert!(e[0].contains(":9:15: trusted_keys is empty"), "{e:?}");
        let e = errors(&format!("{GOOD}trusted_origins: [web-1]\n"));
        assert!(
            e[0].contains(":9:18: trusted_origins has no effect without trusted_keys"),
            "{e:?}"
        );
        let e = errors(&format!(
            "{GOOD}trusted_keys: [{}]\ntrusted_origins: [web-1, \"a b\"]\n",
            good.display()
        ));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains(":10:26: trusted_origins: `a b` cannot name an agent"),
            "{e:?}"
        );
    }

    #[test]
    fn names() {
        for good in ["web-1", "a", "w.b_c", &"x".repeat(64)] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
