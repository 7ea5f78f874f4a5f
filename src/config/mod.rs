//! Configuration: YAML file → raw serde structs ([`raw`]) → [`validate`] → the typed
//! [`Config`] the rest of lockstep trusts.
//!
//! Nothing here opens sockets; [`load`] reads the config file and the TLS files it names.
//! Every problem is reported as `file:line:column: what is wrong and what to do`.

pub mod acme;
pub mod check;
pub mod cluster;
pub mod dns;
pub mod duration;
pub mod error;
pub mod gc;
pub mod raw;
pub mod route;
pub mod size;
pub mod sync;
pub mod tls;
mod validate;
pub mod yaml;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

pub use dns::{
    Dns, Record, Rrl, Target, Zone, DEFAULT_DNS_TTL, DEFAULT_MAX_ANSWERS,
    DEFAULT_MAX_TCP_CONNECTIONS, DEFAULT_RRL_IPV4_PREFIX, DEFAULT_RRL_IPV6_PREFIX,
    DEFAULT_RRL_RATE, DEFAULT_RRL_SLIP, MAX_ANSWERS_LIMIT,
};
pub use error::{ConfigError, ConfigErrors, Pos};

use crate::router::balance::Policy;
use crate::router::health::PassivePolicy;
use crate::router::route::Route;

/// Default time a client may take to send its request head (nginx's `client_header_timeout`).
/// On HTTP/1.1 the clock runs from when the connection is ready for a head, so for a
/// kept-alive connection it also bounds the wait for the next request.
pub const DEFAULT_HEADER_READ: Duration = Duration::from_secs(60);
/// Default time a client connection may move no bytes at all (nginx's `keepalive_timeout`).
pub const DEFAULT_IDLE: Duration = Duration::from_secs(75);
/// Default cap on a proxy listener's open connections: room for 10 000 idle keep-alive
/// clients and a busy load beside them, two descriptors each, within the unit's
/// `LimitNOFILE`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;
/// Default cap on the admin listener's open connections (operators, scrapers, a status page).
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;
/// Default backend connect timeout.
pub const DEFAULT_CONNECT: Duration = Duration::from_secs(2);
/// Default time from request sent to response head.
pub const DEFAULT_RESPONSE: Duration = Duration::from_secs(30);
/// Default retries of idempotent requests after a connect failure.
pub const DEFAULT_RETRIES: u32 = 1;
/// Default health check path.
pub const DEFAULT_HEALTH_PATH: &str = "/healthz";
/// Default time between health checks.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Default health check timeout.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Default consecutive successes to come up.
pub const DEFAULT_RISE: u32 = 2;
/// Default consecutive failures to go down.
pub const DEFAULT_FALL: u32 = 3;
/// Default consecutive request failures that eject a backend.
pub const DEFAULT_PASSIVE_FAILURES: u32 = 5;
/// Default first ejection.
pub const DEFAULT_EJECTION: Duration = Duration::from_secs(10);
/// Default longest ejection.
pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub file: PathBuf,
    /// Proxy listeners.
    pub listeners: Vec<Listener>,
    /// Routes, first match wins; a `rules::Action::Pool` indexes `pools`.
    pub routes: Vec<Route>,
    /// Pools of backends.
    pub pools: Vec<Pool>,
    /// Admin listener and reload socket.
    pub admin: Admin,
    /// The DNS responder, when the `dns:` section is present.
    pub dns: Option<Dns>,
    /// The sync hub, when the `sync:` section is present.
    pub sync: Option<sync::Sync>,
    /// The YAML text it was parsed from (served by the admin API's `/api/config`).
    pub source: Arc<str>,
}

/// Access log format of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLog {
    /// No access log (the default: it costs throughput).
    Off,
    /// NCSA combined, as nginx and Apache write it.
    Combined,
    /// One JSON object per request.
    Json,
}

/// One proxy listener.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Unique name.
    pub name: String,
    /// Address to bind.
    pub bind: SocketAddr,
    /// Certificates when TLS terminates here; the first is the default for clients without SNI
    /// (with ACME, the ordered certificate comes first for the names it covers and for
    /// clients without SNI; empty with ACME only).
    pub tls: Option<Vec<tls::LoadedCert>>,
    /// Certificates ordered by ACME for this (TLS) listener.
    pub acme: Option<acme::Acme>,
    /// Peers whose `X-Forwarded-For` is kept and appended to; others' is replaced.
    pub trusted_proxies: Vec<IpNet>,
    /// Access log format.
    pub access_log: AccessLog,
    /// Time allowed for the request head.
    pub header_read_timeout: Duration,
    /// Keep-alive idle timeout.
    pub idle_timeout: Duration,
    /// Most client connections open at once (all workers together); more are closed at
    /// accept and counted in `lockstep_connections_refused_total`.
    pub max_connections: usize,
    /// HTTP/2 only (h2c by prior knowledge; with TLS, ALPN offers only h2).
    pub http2_only: bool,
    /// Peers whose connections start with a PROXY protocol header (v1 or v2), which then
    /// gives the client's address; empty: none (the protocol is off).
    pub proxy_from: Vec<IpNet>,
}

/// What the `hash` policy hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// A request header's value.
    Header(http::HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// The client's IP address.
    ClientIp,
}

/// One backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Unique within its pool.
    pub name: String,
    /// Where the proxy connects.
    pub address: SocketAddr,
    /// What DNS answers with for it.
    pub dns_address: IpAddr,
    /// Relative weight.
    pub weight: u32,
    /// Most requests in flight to it at once (none: no limit); more wait in the pool's queue.
    pub max_connections: Option<u32>,
}

/// Active health check settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Path to GET.
    pub path: String,
    /// Time between checks.
    pub interval: Duration,
    /// Time a check may take.
    pub timeout: Duration,
    /// Consecutive successes to come up (≥ 1).
    pub rise: u32,
    /// Consecutive failures to go down (≥ 1).
    pub fall: u32,
}

/// One pool.
#[derive(Debug, Clone)]
pub struct Pool {
    /// Unique name.
    pub name: String,
    /// Balancing policy.
    pub policy: Policy,
    /// For `Policy::Hash`.
    pub hash_key: Option<HashKey>,
    /// Backends, in config order.
    pub backends: Vec<Backend>,
    /// Active checks, if configured.
    pub health: Option<HealthCheck>,
    /// Backend connect timeout.
    pub connect_timeout: Duration,
    /// Time from the request sent (on a connection had: connecting is `connect_timeout`'s) to
    /// the response head.
    pub response_timeout: Duration,
    /// Retries to another backend after a connect failure (idempotent requests only).
    pub retries: u32,
    /// Passive ejection.
    pub passive: PassivePolicy,
    /// The PROXY protocol version sent to the backends before each connection's first
    /// byte, if any.
    pub send_proxy: Option<ProxyVersion>,
    /// How long a backend's share of new requests ramps up after it comes back (up again,
    /// no longer ejected, behind or drained); none: at once.
    pub slow_start: Option<Duration>,
    /// Most requests waiting for a backend under its `max_connections`.
    pub queue_max: usize,
    /// Longest a request waits in the queue before a 503.
    pub queue_timeout: Duration,
}

/// Default `pools[].queue.max`.
pub const DEFAULT_QUEUE_MAX: usize = 1024;
/// Default `pools[].queue.timeout`.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);

/// A PROXY protocol version (HAProxy's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    /// Text.
    V1,
    /// Binary.
    V2,
}

/// Admin settings.
#[derive(Debug, Clone)]
pub struct Admin {
    /// The admin HTTP listener, when set.
    pub bind: Option<SocketAddr>,
    /// The reload socket, when set.
    pub socket: Option<PathBuf>,
    /// Networks, besides loopback, whose admin requests may change state (drain/enable).
    pub allow_changes_from: Vec<IpNet>,
    /// Host names (lowercase) the status page and API answer to, besides IP addresses and
    /// `localhost`: a name an attacker's DNS points at the appliance (rebinding) is refused.
    pub hosts: Vec<String>,
    /// The token a state-changing request from anywhere but loopback must carry
    /// (`Authorization: Bearer …`), when set.
    pub token: Option<crate::sync::auth::Secret>,
    /// Most connections open at once on the admin listener.
    pub max_connections: usize,
    /// How often the status page's history (the last [`HISTORY_POINTS`] points) takes one.
    pub history_interval: Duration,
}

/// Points of the status page's history (15 minutes at the default interval).
pub const HISTORY_POINTS: usize = 90;
/// Default `admin.history_interval`.
pub const DEFAULT_HISTORY_INTERVAL: Duration = Duration::from_secs(10);

impl Default for Admin {
    fn default() -> Admin {
        Admin {
            bind: None,
            socket: None,
            allow_changes_from: Vec::new(),
            hosts: Vec::new(),
            token: None,
            max_connections: DEFAULT_ADMIN_MAX_CONNECTIONS,
            history_interval: DEFAULT_HISTORY_INTERVAL,
        }
    }
}

impl Admin {
    /// Whether a request from `ip` may change state: loopback always, else only from
    /// `allow_changes_from` (an IPv4-mapped IPv6 peer counts as its IPv4 address).
    pub fn may_change_state(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_loopback() || self.allow_changes_from.iter().any(|n| n.contains(&ip))
    }

    /// Whether a state-changing request from `ip` carries the credential it needs: none from
    /// loopback; from elsewhere, `admin.token_file`'s token when one is set.
    pub fn credential_ok(&self, ip: std::net::IpAddr, authorization: Option<&str>) -> bool {
        if ip.to_canonical().is_loopback() {
            return true;
        }
        match &self.token {
            Some(t) => crate::sync::auth::bearer_matches(&t.0, authorization),
            None => true,
        }
    }

    /// Whether the status page and API answer a request that named `host` (its `Host`
    /// header, port included or not): an IP address, `localhost`, or one of `hosts`. A
    /// request without a `Host` comes from no browser and is answered.
    pub fn serves_host(&self, host: Option<&str>) -> bool {
        let Some(host) = host else { return true };
        let name = crate::router::route::normalize_host(host);
        match name.strip_prefix('[') {
            Some(v6) => v6
                .strip_suffix(']')
                .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok()),
            None => {
                name.parse::<std::net::Ipv4Addr>().is_ok()
                    || name == "localhost"
                    || self.hosts.iter().any(|h| *h == name)
            }
        }
    }
}

/// Reads and checks a config file, returning every problem found.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError::at(
            path,
            Pos::default(),
            format!("cannot read the config file: {e}"),
        )])
    })?;
    parse(path, &text)
}

/// Checks config text as if read from `path` (relative TLS paths resolve against its directory).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let raw = validate::parse_raw(path, text)?;
    let mut config = validate::validate(path, raw)?;
    config.source = text.into();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_pages_answer_ip_addresses_localhost_and_configured_names_only() {
        let admin = Admin {
            hosts: vec!["lb1.mgmt.example".into()],
            ..Admin::default()
        };
        for ok in [
            None,
            Some("127.0.0.1:9900"),
            Some("10.1.2.3"),
            Some("[::1]:9900"),
            Some("[2001:db8::1]"),
            Some("localhost:9900"),
            Some("LOCALHOST"),
            Some("lb1.mgmt.example:9900"),
            Some("LB1.mgmt.example."),
        ] {
            assert!(admin.serves_host(ok), "{ok:?} refused");
        }
        for rebinding in [
            Some("evil.example"),
            Some("evil.example:9900"),
            Some("127.0.0.1.evil.example"),
            Some("localhost.evil.example"),
            Some("lb1.mgmt.example.evil"),
            Some("[::1"),
            Some(""),
        ] {
            assert!(!admin.serves_host(rebinding), "{rebinding:?} answered");
        }
    }
}
