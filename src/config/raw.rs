//! The config file as written: serde structs that mirror the YAML one to one.
//!
//! Unknown and duplicate keys are refused by the parser. Values that need checking beyond
//! their YAML type (addresses, durations, names that refer to each other) are kept as
//! [`Spanned`] strings so that [`super::validate`] can report every problem with its line and
//! column, not just the first.

use serde::Deserialize;
use serde_saphyr::Spanned;

type S<T> = Spanned<T>;

/// The top level of `lockstep.yaml`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Where the proxy accepts connections.
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    /// Host/path → pool, first match wins.
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    /// Groups of backends.
    #[serde(default)]
    pub pools: Vec<RawPool>,
    /// The DNS round-robin responder.
    pub dns: Option<RawDns>,
    /// The content-sync hub.
    pub sync: Option<RawSync>,
    /// The admin listener and reload socket.
    pub admin: Option<RawAdmin>,
}

/// One proxy listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    /// Unique name, used in logs and metrics.
    pub name: S<String>,
    /// `ip:port` to bind.
    pub bind: S<String>,
    /// TLS termination; absent = plain HTTP (h1 and h2c).
    pub tls: Option<RawTls>,
    /// Peers whose `X-Forwarded-For` is trusted and appended to (CIDRs or addresses).
    pub trusted_proxies: Option<Vec<S<String>>>,
    /// `off` (default), `combined` or `json`.
    pub access_log: Option<S<String>>,
    /// Client-side timeouts.
    pub timeouts: Option<RawListenerTimeouts>,
    /// Most client connections open at once on this listener (all workers together).
    pub max_connections: Option<S<u32>>,
    /// Speak HTTP/2 only: h2c by prior knowledge, or only h2 offered by ALPN with TLS.
    pub http2_only: Option<S<bool>>,
    /// The PROXY protocol from trusted balancers.
    pub proxy_protocol: Option<RawProxyProtocol>,
}

/// A listener's PROXY protocol.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxyProtocol {
    /// The balancers (CIDRs or addresses) whose connections start with a PROXY header.
    pub from: Vec<S<String>>,
}

/// Certificates of a TLS listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// Certificate/key pairs; SNI picks among them, the first is the default.
    #[serde(default)]
    pub certificates: Vec<RawCertificate>,
    /// Certificates ordered from an ACME CA.
    pub acme: Option<RawAcme>,
}

/// A listener's ACME certificate (RFC 8555).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAcme {
    /// The CA's directory URL.
    pub directory: S<String>,
    /// Contact URIs of the account (`mailto:`).
    pub contact: Option<Vec<S<String>>>,
    /// The names to order for; absent = every host routed through the listener.
    pub names: Option<Vec<S<String>>>,
    /// `tls-alpn-01` (default) or `http-01`.
    pub challenge: Option<S<String>>,
    /// PEM file of the CAs the directory's certificate is checked against.
    pub ca: Option<S<String>>,
    /// Directory of the account key and the certificates.
    pub store: Option<S<String>>,
}

/// One PEM certificate chain and its private key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    /// PEM file with the certificate chain, leaf first.
    pub cert: S<String>,
    /// PEM file with the private key.
    pub key: S<String>,
}

/// Client-side timeouts of a listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListenerTimeouts {
    /// How long a client may take to send the request head.
    pub header_read: Option<S<String>>,
    /// How long a keep-alive connection may sit idle.
    pub idle: Option<S<String>>,
}

/// One route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Its name in logs and metrics.
    pub name: Option<S<String>>,
    /// The listeners whose requests it matches; absent = every listener's.
    pub listeners: Option<Vec<S<String>>>,
    /// Exact host or `*.suffix`; absent = any host.
    pub host: Option<S<String>>,
    /// Path prefix; absent = `/`.
    pub path_prefix: Option<S<String>>,
    /// Name of the pool that serves it (or `redirect`, or `respond`).
    pub pool: Option<S<String>>,
    /// Answer with a redirect instead.
    pub redirect: Option<RawRedirect>,
    /// Answer with a fixed response instead.
    pub respond: Option<RawRespond>,
    /// Replaces the path prefix before forwarding.
    pub rewrite_prefix: Option<S<String>>,
    /// Edits of the forwarded request's headers.
    pub request_headers: Option<RawHeaderEdits>,
    /// Edits of the response's headers.
    pub response_headers: Option<RawHeaderEdits>,
    /// `Strict-Transport-Security` on responses over TLS.
    pub hsts: Option<RawHsts>,
    /// Per-client rate limit.
    pub rate_limit: Option<RawRateLimit>,
}

/// A route's redirect.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedirect {
    /// `http` or `https`.
    pub scheme: Option<S<String>>,
    /// Another host.
    pub host: Option<S<String>>,
    /// Another port.
    pub port: Option<S<u16>>,
    /// Replaces the route's path prefix.
    pub prefix: Option<S<String>>,
    /// 301, 302, 303, 307 or 308.
    pub status: Option<S<u16>>,
}

/// A route's fixed response.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRespond {
    /// Its status.
    pub status: Option<S<u16>>,
    /// Its body, inline.
    pub body: Option<S<String>>,
    /// Its body, from a file.
    pub body_file: Option<S<String>>,
    /// Its `Content-Type`.
    pub content_type: Option<S<String>>,
}

/// Header edits: names to values (set, add), names (remove).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderEdits {
    /// Replaced.
    pub set: Option<std::collections::HashMap<S<String>, S<String>>>,
    /// Appended.
    pub add: Option<std::collections::HashMap<S<String>, S<String>>>,
    /// Removed.
    pub remove: Option<Vec<S<String>>>,
}

/// HSTS of a route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHsts {
    /// How long browsers keep to HTTPS.
    pub max_age: Option<S<String>>,
    /// Subdomains too.
    pub include_subdomains: Option<bool>,
    /// Ask to be preloaded in browsers.
    pub preload: Option<S<bool>>,
}

/// A route's per-client rate limit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    /// Requests allowed per `per`.
    pub requests: S<u32>,
    /// The period of `requests`.
    pub per: Option<S<String>>,
    /// Requests allowed at once after a quiet spell.
    pub burst: Option<S<u32>>,
    /// `client_ip` or `header:NAME`.
    pub key: Option<S<String>>,
}

/// One pool of backends.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    /// Unique name.
    pub name: S<String>,
    /// Balancing policy.
    pub balance: Option<S<RawBalance>>,
    /// For `hash`: `header:NAME`, `cookie:NAME` or `client_ip`.
    pub hash_key: Option<S<String>>,
    /// The backends.
    pub backends: Vec<RawBackend>,
    /// Active health checks; absent = none (passive ejection still applies).
    pub health: Option<RawHealth>,
    /// Upstream timeouts.
    pub timeouts: Option<RawPoolTimeouts>,
    /// Retries of idempotent requests to another backend after a connect failure.
    pub retries: Option<u32>,
    /// Passive ejection.
    pub passive: Option<RawPassive>,
    /// Send the PROXY protocol (`v1` or `v2`) to the backends.
    pub send_proxy: Option<S<String>>,
    /// How long a backend's share ramps up after it comes back.
    pub slow_start: Option<S<String>>,
    /// Requests waiting for a backend under its `max_connections`.
    pub queue: Option<RawQueue>,
}

/// A pool's queue.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueue {
    /// Most requests waiting.
    pub max: Option<S<u32>>,
    /// Longest wait.
    pub timeout: Option<S<String>>,
}

/// The balancing policies.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawBalance {
    /// Each backend in turn.
    RoundRobin,
    /// Smooth weighted round robin.
    Weighted,
    /// Fewest requests in flight (per weight).
    LeastConn,
    /// Power of two choices over a latency EWMA.
    P2cEwma,
    /// Consistent hashing on `hash_key`.
    Hash,
}

/// One backend.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    /// Unique within the pool.
    pub name: S<String>,
    /// `ip:port` the proxy connects to.
    pub address: S<String>,
    /// Relative weight (default 1).
    pub weight: Option<S<u32>>,
    /// The address DNS answers with, when it differs from `address`'s IP.
    pub dns_address: Option<S<String>>,
    /// Most requests in flight to it at once; more wait in the pool's queue.
    pub max_connections: Option<S<u32>>,
}

/// Active health check.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// Path to GET; a 2xx or 3xx answer is healthy.
    pub path: Option<S<String>>,
    /// Time between checks.
    pub interval: Option<S<String>>,
    /// Time a check may take.
    pub timeout: Option<S<String>>,
    /// Consecutive successes to come up.
    pub rise: Option<S<u32>>,
    /// Consecutive failures to go down.
    pub fall: Option<S<u32>>,
}

/// Upstream timeouts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPoolTimeouts {
    /// TCP connect to a backend.
    pub connect: Option<S<String>>,
    /// From sending the request to the response head.
    pub response: Option<S<String>>,
}

/// Passive ejection settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPassive {
    /// Consecutive failures (connect errors, 5xx) that eject a backend; 0 disables.
    pub failures: Option<u32>,
    /// First ejection length; doubles per consecutive ejection.
    pub ejection: Option<S<String>>,
    /// Longest ejection.
    pub max_ejection: Option<S<String>>,
}

/// The DNS responder (validated by the DNS part).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    /// `ip:port` for UDP and TCP.
    pub bind: S<String>,
    /// Most addresses in one answer.
    pub max_answers: Option<S<u32>>,
    /// Most DNS-over-TCP connections open at once.
    pub max_tcp_connections: Option<S<u32>>,
    /// Response-rate limiting of UDP answers per client prefix.
    pub rrl: Option<RawRrl>,
    /// Authoritative zones.
    #[serde(default)]
    pub zones: Vec<RawZone>,
}

/// Response-rate limiting of the DNS responder's UDP answers (Knot's and NSD's RRL).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRrl {
    /// Answers per second to one client prefix (Knot's `rate-limit`); 0 turns RRL off.
    pub rate_limit: Option<S<u32>>,
    /// Every `slip`-th answer over the rate goes out truncated (TC) instead of being dropped
    /// (Knot's `slip`); 0 drops them all.
    pub slip: Option<S<u32>>,
    /// Length of the IPv4 prefix that shares one rate.
    pub ipv4_prefix: Option<S<u32>>,
    /// Length of the IPv6 prefix that shares one rate.
    pub ipv6_prefix: Option<S<u32>>,
}

/// One authoritative zone.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawZone {
    /// Zone apex, e.g. `farm.test`.
    pub name: S<String>,
    /// TTL of the answers.
    pub ttl: Option<S<u32>>,
    /// NS names of the apex.
    #[serde(default)]
    pub nameservers: Vec<S<String>>,
    /// Names in the zone.
    #[serde(default)]
    pub records: Vec<RawRecord>,
}

/// One name in a zone: either a pool's healthy backends or fixed addresses.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRecord {
    /// Relative name (`www`) or `@` for the apex.
    pub name: S<String>,
    /// Answer with this pool's healthy backends.
    pub pool: Option<S<String>>,
    /// Answer with these addresses.
    pub addresses: Option<Vec<S<String>>>,
}

/// The content-sync hub (validated by the sync part).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSync {
    /// `ip:port` of the sync API.
    pub bind: S<String>,
    /// Directory of the hub's store.
    pub store: S<String>,
    /// Activation grid.
    pub cadence: Option<S<String>>,
    /// Least time between a publish and its activation.
    pub lead: Option<S<String>>,
    /// Time between collections of unused releases and blobs (`0s`: never).
    pub gc_interval: Option<S<String>>,
    /// Unused content younger than this is kept.
    pub gc_grace: Option<S<String>>,
    /// An agent's report stops counting (stale) when not renewed within this long.
    pub report_expiry: Option<S<String>>,
    /// File holding the agents' bearer token.
    pub agent_token_file: Option<S<String>>,
    /// File holding the publishers' bearer token.
    pub publish_token_file: Option<S<String>>,
    /// Publisher public keys (`.pub` files): a commit must carry a signature by one of them.
    pub trusted_keys: Option<S<Vec<S<String>>>>,
    /// Serve the sync API over TLS with these certificates, asking for client certificates.
    pub tls: Option<RawSyncTls>,
    /// Most connections open at once on the sync API.
    pub max_connections: Option<S<u32>>,
    /// Most bytes of uploaded blobs no release names yet.
    pub upload_quota: Option<S<String>>,
    /// Several hubs sharing their state in etcd (absent: this hub's store is the state).
    pub cluster: Option<RawCluster>,
}

/// `sync.cluster`: the hub's state in etcd, shared by the hubs of several appliances.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// etcd client URLs (`https://10.0.0.1:2379`).
    pub etcd: S<Vec<S<String>>>,
    /// Key prefix of this farm's state in etcd.
    pub prefix: Option<S<String>>,
    /// This hub's name among the hubs (default: the host name).
    pub name: Option<S<String>>,
    /// Time to live of the lease behind this hub's leadership.
    pub lease: Option<S<String>>,
    /// The URL the other hubs reach this hub's sync API at.
    pub advertise: Option<S<String>>,
    /// How many hubs must store a release's blobs before it is committed.
    pub replicas: Option<S<u32>>,
    /// TLS to etcd: its CA and this hub's client certificate.
    pub tls: Option<RawEtcdTls>,
}

/// TLS to etcd.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEtcdTls {
    /// The CA etcd's server certificates come from (PEM).
    pub ca: S<String>,
    /// This hub's client certificate (PEM), for etcd's `--client-cert-auth`.
    pub cert: Option<S<String>>,
    /// Its private key (PEM).
    pub key: Option<S<String>>,
}

/// TLS of the sync API: its certificates and the farm CA its clients' certificates come from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSyncTls {
    /// Certificate/key pairs of the hub (SNI picks; the first is the default).
    pub certificates: Vec<RawCertificate>,
    /// The farm CA (`ca.crt` of `lockstep ca init`): agents and publishers present a
    /// certificate it issued, which names them.
    pub client_ca: Option<S<String>>,
    /// The farm CA's revocation list (`crl.pem`), re-read at reload.
    pub crl: Option<S<String>>,
    /// The farm CA's directory (`lockstep ca init --dir`): lets agents join with a one-time
    /// token (`lockstep ca join-token`, `lockstep agent join`).
    pub ca_dir: Option<S<String>>,
}

/// Admin listener and reload socket.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// `ip:port` of the admin HTTP listener (`/metrics`, `/healthz`, `/ready`).
    pub bind: Option<S<String>>,
    /// Unix socket `lockstep reload` talks to.
    pub socket: Option<S<String>>,
    /// Addresses or CIDRs, besides loopback, whose admin requests may change state.
    pub allow_changes_from: Option<Vec<S<String>>>,
    /// Host names the status page and API answer to, besides IP addresses and `localhost`.
    pub hosts: Option<Vec<S<String>>>,
    /// File holding the bearer token a state-changing request from anywhere but loopback
    /// must carry.
    pub token_file: Option<S<String>>,
    /// Most connections open at once on the admin listener.
    pub max_connections: Option<S<u32>>,
    /// How often the status page's history takes a point.
    pub history_interval: Option<S<String>>,
}
