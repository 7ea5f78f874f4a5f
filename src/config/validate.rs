//! Raw config → typed [`Config`], collecting every problem instead of stopping at the first.

use std::collections::{HashMap, HashSet};

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::str::FromStr;

use ipnet::IpNet;
use serde_saphyr::Spanned;

use super::check::Ctx;
use super::raw::*;
use super::*;
use crate::router::route::HostMatch;

/// YAML → raw structs (see [`super::yaml::parse`]).
pub(super) fn parse_raw(path: &Path, text: &str) -> Result<RawConfig, ConfigErrors> {
    super::yaml::parse(path, text, "deploy/examples/lockstep.yaml")
}

/// Checks the raw config, returning the typed one or every problem found.
pub(super) fn validate(file: &Path, raw: RawConfig) -> Result<Config, ConfigErrors> {
    let mut cx = Ctx::new(file);

    let mut listeners = listeners(&mut cx, &raw.listeners);
    let (pools, pool_index) = pools(&mut cx, &raw.pools);
    let routes = super::route::routes(&mut cx, &raw.routes, &pool_index, &listeners);
    let at: Vec<(String, Pos)> = raw
        .listeners
        .iter()
        .map(|l| (l.name.value.clone(), Pos::of(&l.name)))
        .collect();
    super::acme::default_names(&mut cx, &mut listeners, &routes, &at);
    if !raw.listeners.is_empty() && raw.routes.is_empty() {
        cx.errors.push(ConfigError::at(
            file,
            Pos::default(),
            "listeners are configured but there are no routes: every request would get 404; add `routes:` with at least one `{ path_prefix: \"/\", pool: NAME }`",
        ));
    }
    let admin = admin(&mut cx, raw.admin.as_ref());
    let dns = raw
        .dns
        .as_ref()
        .and_then(|d| super::dns::dns(&mut cx, d, &pool_index));
    let sync = raw
        .sync
        .as_ref()
        .and_then(|s| super::sync::sync(&mut cx, s));
    check_binds(
        &mut cx,
        &raw,
        &listeners,
        &admin,
        dns.as_ref(),
        sync.as_ref(),
    );

    if cx.errors.is_empty() {
        Ok(Config {
            file: file.to_path_buf(),
            listeners,
            routes,
            pools,
            admin,
            dns,
            sync,
            source: "".into(),
        })
    } else {
        cx.errors.sort_by_key(|e| (e.pos.line, e.pos.column));
        Err(ConfigErrors(cx.errors))
    }
}

/// The admin, DNS and sync listeners each need an address no other listener of the appliance
/// takes (listeners among themselves are checked by [`listeners`]).
fn check_binds(
    cx: &mut Ctx,
    raw: &RawConfig,
    listeners: &[Listener],
    admin: &Admin,
    dns: Option<&Dns>,
    sync: Option<&super::sync::Sync>,
) {
    let listener_on = |addr: SocketAddr| listeners.iter().find(|l| overlaps(l.bind, addr));
    if let (Some(a), Some(raw_bind)) =
        (admin.bind, raw.admin.as_ref().and_then(|a| a.bind.as_ref()))
    {
        if let Some(l) = listener_on(a) {
            cx.err(
                raw_bind,
                format!("admin.bind {a} overlaps listener `{}` on {}: give the admin listener its own port", l.name, l.bind),
            );
        }
    }
    if let (Some(d), Some(raw_dns)) = (dns, raw.dns.as_ref()) {
        // DNS also listens on TCP, so it must not take a port the proxy or admin listen on.
        if let Some(l) = listener_on(d.bind) {
            cx.err(
                &raw_dns.bind,
                format!(
                    "dns.bind {} overlaps listener `{}` on {}: give DNS its own port (53 is usual)",
                    d.bind, l.name, l.bind
                ),
            );
        } else if admin.bind.is_some_and(|a| overlaps(a, d.bind)) {
            cx.err(
                &raw_dns.bind,
                format!(
                    "dns.bind {} overlaps admin.bind: give DNS its own port (53 is usual)",
                    d.bind
                ),
            );
        }
    }
    if let (Some(s), Some(raw_sync)) = (sync, raw.sync.as_ref()) {
        let taken = listeners
            .iter()
            .map(|l| (l.bind, format!("listener `{}`", l.name)))
            .chain(admin.bind.map(|a| (a, "admin.bind".to_string())))
            .chain(dns.map(|d| (d.bind, "dns.bind".to_string())))
            .find(|(b, _)| overlaps(*b, s.bind));
        if let Some((b, what)) = taken {
            cx.err(
                &raw_sync.bind,
                format!("sync.bind {} overlaps {what} on {b}: give the sync API its own port (7700 is usual)", s.bind),
            );
        }
    }
}

/// Whether two binds would collide: the same port, and the same address or a wildcard that
/// covers the other (`[::]` covers IPv4 too on a dual-stack host, the Linux default).
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    // Port 0 asks the kernel for a free port each time, so it never collides.
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    let covers =
        |w: SocketAddr, o: SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || o.is_ipv4());
    a.ip() == b.ip() || covers(a, b) || covers(b, a)
}

fn listeners(cx: &mut Ctx<'_>, raw: &[RawListener]) -> Vec<Listener> {
    let mut out = Vec::new();
    let mut names = HashSet::new();
    let mut binds: Vec<(SocketAddr, String)> = Vec::new();
    for l in raw {
        if l.name.value.is_empty() {
            cx.err(&l.name, "listener name is empty: give each listener a name");
        } else if !names.insert(l.name.value.clone()) {
            cx.err(
                &l.name,
                format!(
                    "duplicate listener name `{}`: listener names must be unique",
                    l.name.value
                ),
            );
        }
        let bind = cx.socket_addr(&l.bind, "listener bind");
        if let Some(b) = bind {
            if let Some((ob, other)) = binds.iter().find(|(o, _)| overlaps(*o, b)) {
                cx.err(
                    &l.bind,
                    format!("listener `{}` binds {b}, which overlaps listener `{other}` on {ob}: give each listener its own port (or distinct specific addresses)", l.name.value),
                );
            }
            binds.push((b, l.name.value.clone()));
        }
        let tls = l.tls.as_ref().and_then(|t| listener_tls(cx, l, t));
        let acme = l
            .tls
            .as_ref()
            .and_then(|t| t.acme.as_ref())
            .and_then(|a| super::acme::acme(cx, a, &l.name.value, Pos::of(&l.name)));
        let trusted = networks(cx, l.trusted_proxies.as_deref(), "trusted proxy");
        let access_log = access_log(cx, l.access_log.as_ref());
        let t = l.timeouts.as_ref();
        let header_read_timeout = cx.duration(
            &t.and_then(|t| t.header_read.clone()),
            DEFAULT_HEADER_READ,
            "timeouts.header_read",
        );
        let idle_timeout = cx.duration(
            &t.and_then(|t| t.idle.clone()),
            DEFAULT_IDLE,
            "timeouts.idle",
        );
        let max_connections = cx.connections(
            &l.max_connections,
            DEFAULT_MAX_CONNECTIONS,
            "max_connections",
        );
        if let Some(bind) = bind {
            out.push(Listener {
                name: l.name.value.clone(),
                bind,
                tls,
                acme,
                trusted_proxies: trusted,
                access_log,
                header_read_timeout,
                idle_timeout,
                max_connections,
                http2_only: l.http2_only.as_ref().is_some_and(|v| v.value),
                proxy_from: proxy_from(cx, l.proxy_protocol.as_ref(), Pos::of(&l.name)),
            });
        }
    }
    out
}

/// A listener's `proxy_protocol.from`: at least one network (the protocol trusts what the
/// peer says, so it is never open to everyone by default).
fn proxy_from(cx: &mut Ctx<'_>, raw: Option<&RawProxyProtocol>, listener: Pos) -> Vec<IpNet> {
    let Some(p) = raw else { return Vec::new() };
    let nets = networks(cx, Some(&p.from), "proxy_protocol source");
    if p.from.is_empty() {
        cx.errors.push(ConfigError::at(
            cx.file,
            listener,
            "proxy_protocol.from is empty: name the balancers (CIDRs or addresses) whose connections carry a PROXY header",
        ));
    }
    for raw in &p.from {
        if IpNet::from_str(raw.value.trim()).is_ok_and(|n| n.prefix_len() == 0) {
            cx.err(
                raw,
                format!(
                    "proxy_protocol.from `{}` is every address: anyone could then claim any client address; name the balancers",
                    raw.value
                ),
            );
        }
    }
    nets
}

/// A listener's `tls:` certificates, loaded (errors at `cert:` or `key:`).
fn listener_tls(cx: &mut Ctx<'_>, l: &RawListener, t: &RawTls) -> Option<Vec<tls::LoadedCert>> {
    if t.certificates.is_empty() && t.acme.is_none() {
        cx.errors.push(ConfigError::at(
            cx.file,
            Pos::of(&l.name),
            format!("listener `{}` has `tls:` with no certificates: add `certificates: [{{ cert: FILE, key: FILE }}]` or `acme:`", l.name.value),
        ));
        return None;
    }
    let mut loaded = Vec::new();
    for c in &t.certificates {
        match tls::load(&cx.path(&c.cert.value), &cx.path(&c.key.value)) {
            Ok(k) => loaded.push(k),
            Err((tls::Part::Cert, e)) => cx.err(&c.cert, e),
            Err((tls::Part::Key, e)) => cx.err(&c.key, e),
        }
    }
    Some(loaded)
}

/// `access_log: off | combined | json`.
fn access_log(cx: &mut Ctx<'_>, v: Option<&Spanned<String>>) -> AccessLog {
    let Some(v) = v else { return AccessLog::Off };
    match v.value.as_str() {
        "off" => AccessLog::Off,
        "combined" => AccessLog::Combined,
        "json" => AccessLog::Json,
        other => {
            cx.err(
                v,
                format!("access_log `{other}` is not known: use off, combined or json"),
            );
            AccessLog::Off
        }
    }
}

fn pools(cx: &mut Ctx<'_>, raw: &[RawPool]) -> (Vec<Pool>, HashMap<String, usize>) {
    let mut out = Vec::new();
    let mut index = HashMap::new();
    for p in raw {
        if p.name.value.is_empty() {
            cx.err(&p.name, "pool name is empty: give each pool a name");
        } else if index.contains_key(&p.name.value) {
            cx.err(
                &p.name,
                format!(
                    "duplicate pool name `{}`: pool names must be unique",
                    p.name.value
                ),
            );
            continue;
        }
        index.insert(p.name.value.clone(), out.len());
        out.push(pool(cx, p));
    }
    (out, index)
}

/// One pool: its policy and hash key, backends, health checks, timeouts and ejection.
fn pool(cx: &mut Ctx<'_>, p: &RawPool) -> Pool {
    let policy = match p.balance.as_ref().map(|b| b.value) {
        None | Some(RawBalance::RoundRobin) => Policy::RoundRobin,
        Some(RawBalance::Weighted) => Policy::Weighted,
        Some(RawBalance::LeastConn) => Policy::LeastConn,
        Some(RawBalance::P2cEwma) => Policy::P2cEwma,
        Some(RawBalance::Hash) => Policy::Hash,
    };
    let t = p.timeouts.as_ref();
    Pool {
        name: p.name.value.clone(),
        policy,
        hash_key: pool_hash_key(cx, p, policy),
        backends: backends(cx, p),
        health: p.health.as_ref().map(|h| health(cx, h)),
        connect_timeout: cx.duration(
            &t.and_then(|t| t.connect.clone()),
            DEFAULT_CONNECT,
            "timeouts.connect",
        ),
        response_timeout: cx.duration(
            &t.and_then(|t| t.response.clone()),
            DEFAULT_RESPONSE,
            "timeouts.response",
        ),
        retries: p.retries.unwrap_or(DEFAULT_RETRIES),
        passive: passive(cx, p.passive.as_ref()),
        slow_start: p
            .slow_start
            .as_ref()
            .map(|_| cx.any_duration(&p.slow_start, Duration::ZERO, "slow_start"))
            .filter(|d| !d.is_zero()),
        queue_max: match p.queue.as_ref().and_then(|q| q.max.as_ref()) {
            Some(m) if m.value == 0 => {
                cx.err(m, "queue.max 0: requests over max_connections would all be refused at once; give at least 1");
                DEFAULT_QUEUE_MAX
            }
            Some(m) => m.value as usize,
            None => DEFAULT_QUEUE_MAX,
        },
        queue_timeout: cx.duration(
            &p.queue.as_ref().and_then(|q| q.timeout.clone()),
            DEFAULT_QUEUE_TIMEOUT,
            "queue.timeout",
        ),
        send_proxy: match p.send_proxy.as_ref().map(|v| (v, v.value.as_str())) {
            None => None,
            Some((_, "v1")) => Some(ProxyVersion::V1),
            Some((_, "v2")) => Some(ProxyVersion::V2),
            Some((v, other)) => {
                cx.err(v, format!("send_proxy `{other}`: write v1 or v2"));
                None
            }
        },
    }
}

/// `hash_key:`, which `balance: hash` needs and every other policy refuses.
fn pool_hash_key(cx: &mut Ctx<'_>, p: &RawPool, policy: Policy) -> Option<HashKey> {
    match (&p.hash_key, policy) {
        (Some(k), Policy::Hash) => parse_hash_key(cx, k),
        (Some(k), _) => {
            cx.err(
                k,
                "hash_key is only used with `balance: hash`: remove it or set `balance: hash`",
            );
            None
        }
        (None, Policy::Hash) => {
            let pos = p
                .balance
                .as_ref()
                .map(Pos::of)
                .unwrap_or_else(|| Pos::of(&p.name));
            cx.errors.push(ConfigError::at(
                cx.file,
                pos,
                "`balance: hash` needs `hash_key:` (header:NAME, cookie:NAME or client_ip)",
            ));
            None
        }
        (None, _) => None,
    }
}

/// A pool's backends: unique names, addresses, weights (not all 0), DNS addresses.
fn backends(cx: &mut Ctx<'_>, p: &RawPool) -> Vec<Backend> {
    if p.backends.is_empty() {
        cx.err(
            &p.name,
            format!(
                "pool `{}` has no backends: add at least one `{{ name, address }}`",
                p.name.value
            ),
        );
    }
    let mut backends = Vec::new();
    let mut names = HashSet::new();
    let mut total_weight: u64 = 0;
    for b in &p.backends {
        if b.name.value.is_empty() {
            cx.err(&b.name, "backend name is empty: give each backend a name");
        } else if !names.insert(b.name.value.clone()) {
            cx.err(
                &b.name,
                format!(
                    "duplicate backend name `{}` in pool `{}`: names must be unique within a pool",
                    b.name.value, p.name.value
                ),
            );
        }
        let address = cx.socket_addr(&b.address, "backend address");
        let weight = b.weight.as_ref().map(|w| w.value).unwrap_or(1);
        total_weight += u64::from(weight);
        let dns_address = match &b.dns_address {
            None => address.map(|a| a.ip()),
            Some(d) => {
                match IpAddr::from_str(d.value.trim()) {
                    Ok(ip) => Some(ip),
                    Err(_) => {
                        cx.err(d, format!("dns_address `{}` is not an IP address: write e.g. \"203.0.113.12\"", d.value));
                        None
                    }
                }
            }
        };
        if let (Some(address), Some(dns_address)) = (address, dns_address) {
            backends.push(Backend {
                name: b.name.value.clone(),
                address,
                dns_address,
                weight,
                max_connections: match &b.max_connections {
                    Some(m) if m.value == 0 => {
                        cx.err(m, "max_connections 0 would never send it a request: drain it with weight 0 or the admin API, or give at least 1");
                        None
                    }
                    m => m.as_ref().map(|m| m.value),
                },
            });
        }
    }
    if !p.backends.is_empty() && total_weight == 0 {
        cx.err(
            &p.name,
            format!("pool `{}` has a total weight of 0, so no backend could ever be picked: give at least one backend a weight ≥ 1", p.name.value),
        );
    }
    backends
}

/// `passive:` ejection settings, defaults where absent.
fn passive(cx: &mut Ctx<'_>, pa: Option<&RawPassive>) -> PassivePolicy {
    PassivePolicy {
        failures: pa
            .and_then(|p| p.failures)
            .unwrap_or(DEFAULT_PASSIVE_FAILURES),
        base: cx.duration(
            &pa.and_then(|p| p.ejection.clone()),
            DEFAULT_EJECTION,
            "passive.ejection",
        ),
        max: cx.duration(
            &pa.and_then(|p| p.max_ejection.clone()),
            DEFAULT_MAX_EJECTION,
            "passive.max_ejection",
        ),
    }
}

fn parse_hash_key(cx: &mut Ctx<'_>, k: &Spanned<String>) -> Option<HashKey> {
    let v = k.value.trim();
    if v == "client_ip" {
        return Some(HashKey::ClientIp);
    }
    if let Some(name) = v.strip_prefix("header:") {
        return match http::HeaderName::from_str(name) {
            Ok(h) => Some(HashKey::Header(h)),
            Err(_) => {
                cx.err(k, format!("`{name}` is not a valid header name"));
                None
            }
        };
    }
    if let Some(name) = v.strip_prefix("cookie:") {
        if !name.is_empty() && !name.contains([';', '=', ' ']) {
            return Some(HashKey::Cookie(name.to_string()));
        }
        cx.err(k, format!("`{name}` is not a valid cookie name"));
        return None;
    }
    cx.err(
        k,
        format!("hash_key `{v}` is not known: use header:NAME, cookie:NAME or client_ip"),
    );
    None
}

fn health(cx: &mut Ctx<'_>, h: &RawHealth) -> HealthCheck {
    let mut count = |v: &Option<Spanned<u32>>, default: u32, what: &str| match v {
        None => default,
        Some(s) if s.value == 0 => {
            cx.err(s, format!("health.{what} is 0: it must be at least 1 (consecutive checks needed to change state)"));
            default
        }
        Some(s) => s.value,
    };
    let rise = count(&h.rise, DEFAULT_RISE, "rise");
    let fall = count(&h.fall, DEFAULT_FALL, "fall");
    let path = match &h.path {
        None => DEFAULT_HEALTH_PATH.to_string(),
        Some(p)
            if !p.value.starts_with('/')
                || http::uri::PathAndQuery::from_str(&p.value).is_err() =>
        {
            cx.err(
                p,
                format!(
                    "health.path `{}` must be an absolute path such as /healthz",
                    p.value
                ),
            );
            DEFAULT_HEALTH_PATH.to_string()
        }
        Some(p) => p.value.clone(),
    };
    HealthCheck {
        path,
        interval: cx.duration(&h.interval, DEFAULT_HEALTH_INTERVAL, "health.interval"),
        timeout: cx.duration(&h.timeout, DEFAULT_HEALTH_TIMEOUT, "health.timeout"),
        rise,
        fall,
    }
}

fn admin(cx: &mut Ctx<'_>, raw: Option<&RawAdmin>) -> Admin {
    let Some(a) = raw else {
        return Admin::default();
    };
    Admin {
        bind: a
            .bind
            .as_ref()
            .and_then(|b| cx.socket_addr(b, "admin bind")),
        socket: a.socket.as_ref().map(|s| cx.path(&s.value)),
        allow_changes_from: networks(cx, a.allow_changes_from.as_deref(), "admin client"),
        hosts: admin_hosts(cx, a.hosts.as_deref()),
        token: a.token_file.as_ref().and_then(|f| {
            match crate::sync::auth::read_token(&cx.path(&f.value)) {
                Ok(t) => Some(crate::sync::auth::Secret(t)),
                Err(e) => {
                    cx.err(f, e.to_string());
                    None
                }
            }
        }),
        max_connections: cx.connections(
            &a.max_connections,
            DEFAULT_ADMIN_MAX_CONNECTIONS,
            "admin.max_connections",
        ),
        history_interval: match &a.history_interval {
            Some(v) => {
                let d = cx.duration(
                    &a.history_interval,
                    DEFAULT_HISTORY_INTERVAL,
                    "admin.history_interval",
                );
                if d < Duration::from_millis(100) {
                    cx.err(v, "admin.history_interval must be at least 100ms");
                }
                d.max(Duration::from_millis(100))
            }
            None => DEFAULT_HISTORY_INTERVAL,
        },
    }
}

/// `admin.hosts`: exact DNS names (no wildcards: each name is one the operator uses).
fn admin_hosts(cx: &mut Ctx<'_>, raw: Option<&[Spanned<String>]>) -> Vec<String> {
    let mut out = Vec::new();
    for h in raw.unwrap_or_default() {
        match HostMatch::parse(h.value.trim()) {
            Ok(HostMatch::Exact(name)) => out.push(name),
            Ok(HostMatch::Suffix(_)) => cx.err(
                h,
                format!("admin host `{}` is a wildcard: list each name the admin pages are reached by, e.g. \"lb1.mgmt.example\"", h.value),
            ),
            Err(e) => cx.err(h, format!("admin host: {e}")),
        }
    }
    out
}

/// A list of addresses or CIDRs (`trusted_proxies`, `admin.allow_changes_from`); `what` names
/// an entry in the error.
fn networks(cx: &mut Ctx<'_>, raw: Option<&[Spanned<String>]>, what: &str) -> Vec<IpNet> {
    let mut out = Vec::new();
    for t in raw.unwrap_or_default() {
        let s = t.value.trim();
        match IpNet::from_str(s).or_else(|_| IpAddr::from_str(s).map(IpNet::from)) {
            Ok(n) => out.push(n),
            Err(_) => cx.err(
                t,
                format!("{what} `{s}` is not an address or CIDR: write e.g. \"10.0.0.0/8\" or \"192.0.2.7\""),
            ),
        }
    }
    out
}
