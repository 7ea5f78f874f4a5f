//! `sync.cluster`: raw → checked [`Cluster`], the etcd cluster several hubs keep their state
//! in. The TLS files are read here (so `lockstep check` catches a bad one), and an etcd that
//! other hosts can reach must be spoken to over TLS: whoever writes its keys decides what every
//! backend serves.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde_saphyr::Spanned;

use super::check::Ctx;
use super::raw::{RawCluster, RawEtcdTls};
use super::tls;

/// Default [`Cluster::prefix`].
pub const DEFAULT_PREFIX: &str = "/lockstep/";

/// Default [`Cluster::lease`]: a hub that stops renewing loses its duties within this long.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(5);

/// Shortest and longest [`Cluster::lease`].
pub const LEASE_RANGE: (Duration, Duration) = (Duration::from_secs(2), Duration::from_secs(60));

/// The checked `sync.cluster` section.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// etcd client URLs, `http://` or `https://` with host and port.
    pub endpoints: Vec<String>,
    /// Key prefix of this farm's state, ending in `/`.
    pub prefix: String,
    /// This hub's name among the hubs.
    pub name: String,
    /// Time to live of the lease behind this hub's leadership (whole seconds).
    pub lease: Duration,
    /// TLS to etcd.
    pub tls: Option<EtcdTls>,
    /// The URL the other hubs reach this hub's sync API at (`None`: `sync.bind`'s address,
    /// known once bound).
    pub advertise: Option<String>,
    /// How many hubs must store a release's blobs before it is committed.
    pub replicas: usize,
}

/// Default [`Cluster::replicas`]: losing one hub loses no release.
pub const DEFAULT_REPLICAS: usize = 2;

/// TLS to etcd, as PEM (what the gRPC client takes).
#[derive(Clone)]
pub struct EtcdTls {
    /// The CA etcd's certificates come from.
    pub ca_pem: Vec<u8>,
    /// This hub's client certificate chain and key, when etcd asks for one.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs and `Debug` dumps.
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

/// `bind`: `sync.bind`; `https`: whether the sync API has TLS.
pub(super) fn cluster(
    cx: &mut Ctx<'_>,
    raw: &RawCluster,
    bind: Option<SocketAddr>,
    https: bool,
) -> Cluster {
    let tls = raw.tls.as_ref().and_then(|t| etcd_tls(cx, t));
    let endpoints = endpoints(cx, &raw.etcd, raw.tls.is_some());
    let prefix = match &raw.prefix {
        None => DEFAULT_PREFIX.to_string(),
        Some(p) if p.value.trim().is_empty() || p.value.chars().any(char::is_whitespace) => {
            cx.err(p, "sync.cluster.prefix must be a key prefix without spaces, e.g. /lockstep/ (one per farm sharing an etcd)");
            DEFAULT_PREFIX.to_string()
        }
        Some(p) if p.value.ends_with('/') => p.value.clone(),
        Some(p) => format!("{}/", p.value),
    };
    let name = match &raw.name {
        Some(n) => {
            if !valid_name(&n.value) {
                cx.err(n, format!("sync.cluster.name `{}` is not a hub name: 1 to 63 letters, digits, '.', '-' or '_'", n.value));
            }
            n.value.clone()
        }
        None => host_name(),
    };
    Cluster {
        endpoints,
        prefix,
        name,
        lease: lease(cx, raw.lease.as_ref()),
        tls,
        advertise: advertise(cx, raw, bind, https),
        replicas: match &raw.replicas {
            None => DEFAULT_REPLICAS,
            Some(r) if r.value == 0 || r.value > 16 => {
                cx.err(r, "sync.cluster.replicas must be 1 to 16: how many hubs store a release's blobs before its commit (default 2: losing one hub loses no release)");
                DEFAULT_REPLICAS
            }
            Some(r) => r.value as usize,
        },
    }
}

/// `sync.cluster.advertise`: a URL of the sync API's scheme; needed when `sync.bind` is on
/// every address (which of them would the other hubs use?).
fn advertise(
    cx: &mut Ctx<'_>,
    raw: &RawCluster,
    bind: Option<SocketAddr>,
    https: bool,
) -> Option<String> {
    let scheme = if https { "https" } else { "http" };
    let Some(a) = &raw.advertise else {
        if bind.is_some_and(|b| b.ip().is_unspecified()) {
            cx.err(&raw.etcd, format!("sync.bind is on every address: set sync.cluster.advertise to the URL the other hubs reach this one at, e.g. {scheme}://10.0.0.11:7700"));
        }
        return None;
    };
    let uri: Result<http::Uri, _> = a.value.trim().parse();
    match uri {
        Ok(u)
            if u.scheme_str() == Some(scheme)
                && u.authority().is_some_and(|x| x.port_u16().is_some())
                && matches!(u.path(), "" | "/") =>
        {
            Some(a.value.trim().trim_end_matches('/').to_string())
        }
        _ => {
            cx.err(a, format!("sync.cluster.advertise must be {scheme}://host:port (the sync API's scheme), e.g. {scheme}://10.0.0.11:7700"));
            None
        }
    }
}

/// A hub name: what `lockstep status` shows and what the hubs' keys in etcd are named by.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// This machine's host name, or `hub` when it has none that is a valid hub name.
fn host_name() -> String {
    let n = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    if valid_name(&n) {
        n
    } else {
        "hub".to_string()
    }
}

fn lease(cx: &mut Ctx<'_>, raw: Option<&Spanned<String>>) -> Duration {
    let Some(v) = raw else { return DEFAULT_LEASE };
    let d = cx.any_duration(&Some(v.clone()), DEFAULT_LEASE, "sync.cluster.lease");
    let (lo, hi) = LEASE_RANGE;
    if d < lo || d > hi || d.subsec_nanos() != 0 {
        cx.err(v, "sync.cluster.lease must be whole seconds from 2s to 60s (default 5s): a hub that stops renewing it loses its duties within that long");
        return DEFAULT_LEASE;
    }
    d
}

/// The endpoints: a non-empty list of `http(s)://host:port`; all `https://` when TLS is set,
/// and loopback ones only without it.
fn endpoints(cx: &mut Ctx<'_>, list: &Spanned<Vec<Spanned<String>>>, tls: bool) -> Vec<String> {
    if list.value.is_empty() {
        cx.err(list, "sync.cluster.etcd is empty: list the etcd members' client URLs, e.g. [https://10.0.0.1:2379, https://10.0.0.2:2379, https://10.0.0.3:2379]");
    }
    let mut out = Vec::new();
    for e in &list.value {
        match endpoint(&e.value, tls) {
            Ok(url) => out.push(url),
            Err(msg) => cx.err(e, format!("sync.cluster.etcd: {msg}")),
        }
    }
    out
}

fn endpoint(v: &str, tls: bool) -> Result<String, String> {
    let uri: http::Uri = v
        .trim()
        .parse()
        .map_err(|_| format!("`{v}` is not a URL: write e.g. https://10.0.0.1:2379"))?;
    let (Some(scheme), Some(auth)) = (uri.scheme_str(), uri.authority()) else {
        return Err(format!(
            "`{v}` needs a scheme and a host: write e.g. https://10.0.0.1:2379"
        ));
    };
    if auth.port_u16().is_none() || !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "`{v}` must be scheme://host:port and nothing more, e.g. https://10.0.0.1:2379"
        ));
    }
    match (scheme, tls) {
        ("https", true) => {}
        ("http", false) if is_loopback(auth.host()) => {}
        ("http", false) => return Err(format!("`{v}` is reachable over the network in clear: etcd holds what every backend serves, so speak to it over TLS (set sync.cluster.tls: {{ ca: FILE, cert: FILE, key: FILE }} and write https://), or use a loopback etcd")),
        ("http", true) => return Err(format!("`{v}` is plain http while sync.cluster.tls is set: write https://")),
        ("https", false) => return Err(format!("`{v}` is https but sync.cluster.tls is not set: add sync.cluster.tls: {{ ca: FILE }} (and cert, key when etcd checks clients)")),
        _ => return Err(format!("`{v}`: the scheme must be http or https")),
    }
    Ok(format!("{scheme}://{auth}"))
}

fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

fn etcd_tls(cx: &mut Ctx<'_>, t: &RawEtcdTls) -> Option<EtcdTls> {
    let ca = cx.path_at(&t.ca, "sync.cluster.tls.ca")?;
    let ca_pem = match std::fs::read(&ca) {
        Ok(b) => b,
        Err(e) => {
            cx.err(&t.ca, format!("cannot read {}: {e}", ca.display()));
            return None;
        }
    };
    let certs = CertificateDer::pem_slice_iter(&ca_pem).collect::<Result<Vec<_>, _>>();
    if !certs.is_ok_and(|c| !c.is_empty()) {
        cx.err(&t.ca, format!("{} holds no PEM CERTIFICATE block: give the CA that issued etcd's server certificates", ca.display()));
        return None;
    }
    let identity = match (&t.cert, &t.key) {
        (None, None) => None,
        (Some(c), Some(k)) => {
            let (cp, kp) = (
                cx.path_at(c, "sync.cluster.tls.cert")?,
                cx.path_at(k, "sync.cluster.tls.key")?,
            );
            match tls::load(&cp, &kp) {
                Ok(_) => {}
                Err((tls::Part::Cert, e)) => {
                    cx.err(c, e);
                    return None;
                }
                Err((tls::Part::Key, e)) => {
                    cx.err(k, e);
                    return None;
                }
            }
            // Read back as written: the gRPC client takes PEM.
            Some((std::fs::read(&cp).ok()?, std::fs::read(&kp).ok()?))
        }
        (Some(c), None) => {
            cx.err(
                c,
                "sync.cluster.tls.cert without key: give both, or neither",
            );
            return None;
        }
        (None, Some(k)) => {
            cx.err(
                k,
                "sync.cluster.tls.key without cert: give both, or neither",
            );
            return None;
        }
    };
    Some(EtcdTls { ca_pem, identity })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_urls_with_a_port_and_clear_text_stays_on_loopback() {
        assert_eq!(
            endpoint("http://127.0.0.1:2379", false).unwrap(),
            "http://127.0.0.1:2379"
        );
        assert_eq!(
            endpoint("http://localhost:2379/", false).unwrap(),
            "http://localhost:2379"
        );
        assert_eq!(
            endpoint("http://[::1]:2379", false).unwrap(),
            "http://[::1]:2379"
        );
        assert_eq!(
            endpoint("https://10.0.0.1:2379", true).unwrap(),
            "https://10.0.0.1:2379"
        );
        for (bad, tls, says) in [
            ("http://10.0.0.1:2379", false, "over TLS"),
            ("http://etcd.internal:2379", false, "over TLS"),
            (
                "https://10.0.0.1:2379",
                false,
                "sync.cluster.tls is not set",
            ),
            ("http://127.0.0.1:2379", true, "write https://"),
            ("10.0.0.1:2379", true, "scheme"),
            ("https://10.0.0.1", true, "host:port"),
            ("https://10.0.0.1:2379/v3", true, "host:port"),
            ("unix://x:1", false, "http or https"),
            ("not a url", false, "not a URL"),
        ] {
            let e = endpoint(bad, tls).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn hub_names_are_short_and_plain() {
        assert!(valid_name("hub-a.example_1"));
        for bad in ["", "a b", "a/b", &"x".repeat(64)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(valid_name(&host_name()));
    }
}
