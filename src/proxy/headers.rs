//! Header rewriting between client and backend (pure: works on `HeaderMap`s only).
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1) and every header named in `Connection` are dropped in
//! both directions; requests get `X-Forwarded-For`/`-Proto`/`-Host` and `Via`. A client's own
//! `X-Forwarded-*`, `Forwarded` and `X-Real-IP` values are kept only when it is a trusted
//! proxy: otherwise anyone could claim any client address. [`refuse`] answers what must not
//! go on at all (RFC 9112's Host rules, CONNECT, TRACE).

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Real-IP` (nginx's single-address form).
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The hop-by-hop headers (RFC 9110 §7.6.1, and the older `Keep-Alive` and
/// `Proxy-Connection`); `Connection` first.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Why a request is answered at the edge, before any route or backend (RFC 9112 §3.2 and
/// §3.2.2; RFC 9110 §9.3.6, §9.3.8): the status and a short reason, or `None` to go on.
///
/// - an HTTP/1.1 request without `Host`, or any request with more than one: 400;
/// - `CONNECT` (lockstep is a reverse proxy, not a tunnel to anywhere) and `TRACE` (it would
///   echo the client's headers, cookies included, through every hop): 405.
pub fn refuse(
    version: http::Version,
    method: &http::Method,
    headers: &HeaderMap,
) -> Option<(http::StatusCode, &'static str)> {
    use http::{Method, StatusCode, Version};
    let mut hosts = headers.get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Some((StatusCode::BAD_REQUEST, "more than one Host header\n"));
    }
    if first.is_none() && version == Version::HTTP_11 {
        return Some((
            StatusCode::BAD_REQUEST,
            "an HTTP/1.1 request needs a Host header\n",
        ));
    }
    if *method == Method::CONNECT || *method == Method::TRACE {
        return Some((
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT and TRACE are not served\n",
        ));
    }
    None
}

/// True when the request asks for the one protocol upgrade passed through, WebSocket:
/// `Connection: upgrade` and `Upgrade: websocket`. Any other `Upgrade` (h2c, TLS, a made-up
/// protocol) is a hop-by-hop header like the rest: dropped, and the request served as an
/// ordinary one, never a blind tunnel.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .any(|v| has_token(v, "websocket"))
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v, "upgrade"))
}

fn has_token(v: &HeaderValue, token: &str) -> bool {
    v.to_str()
        .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        .unwrap_or(false)
}

/// Removes hop-by-hop headers and those named in `Connection`. When `keep_upgrade` is set
/// (an upgrade being passed through), `Upgrade` and `Connection: upgrade` survive.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names the message has finds which of the hop-by-hop ones are there
    // (standard names compare as enum tags): most messages carry none, a backend's answer
    // usually `Connection` alone. Removing a name costs hashing it, so only those present are
    // removed (callgrind: removing the whole list from every answer was ~9 % of the proxy's
    // instructions per request).
    let has = present(headers, HOP_BY_HOP.each_ref());
    if has[0] {
        // The names `Connection` lists, among the headers the message has (compared without
        // case; `Connection: keep-alive` usually names none): no allocation then.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|t| !(keep_upgrade && t.eq_ignore_ascii_case("upgrade")))
            .filter_map(|t| headers.keys().find(|n| n.as_str().eq_ignore_ascii_case(t)))
            .cloned()
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for (i, h) in HOP_BY_HOP.iter().enumerate() {
        if !has[i] || keep_upgrade && (h == header::UPGRADE || h == header::CONNECTION) {
            continue;
        }
        headers.remove(h);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Whether `peer` is in the trusted proxy list.
pub fn is_trusted(peer: IpAddr, trusted: &[IpNet]) -> bool {
    let peer = canonical(peer);
    trusted.iter().any(|n| n.contains(&peer))
}

/// IPv4-mapped IPv6 addresses compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The peer address as a header value (IPv4-mapped IPv6 shown as IPv4); computed once per
/// connection so that requests do not format it again.
pub fn peer_value(peer: IpAddr) -> HeaderValue {
    // An IP address prints as ASCII digits, dots, colons and hex: always a valid value.
    HeaderValue::from_str(&canonical(peer).to_string())
        .expect("an IP address is a valid header value")
}

/// What the proxy knows about the client side of one request.
pub struct Forwarded<'a> {
    /// The TCP peer, from [`peer_value`].
    pub peer: &'a HeaderValue,
    /// Whether the peer is a trusted proxy.
    pub trusted: bool,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The host the client asked for (Host or :authority), if any.
    pub host: Option<HeaderValue>,
    /// `Via` token for the client's protocol version, e.g. `1.1 lockstep`.
    pub via: &'static str,
}

/// The fields lockstep adds to a request going to a backend (`X-Forwarded-*`, `Via`): the
/// upstream writer puts them after the request's own, so none is inserted into its header map
/// (an insertion hashes the name: four of them were ~4 % of a proxied request's instructions).
pub struct Added {
    fields: [(&'static HeaderName, HeaderValue); 4],
    len: usize,
}

impl Added {
    fn push(&mut self, name: &'static HeaderName, value: HeaderValue) {
        self.fields[self.len] = (name, value);
        self.len += 1;
    }

    /// The fields, in the order they are written.
    pub fn fields(&self) -> &[(&'static HeaderName, HeaderValue)] {
        &self.fields[..self.len]
    }
}

/// `Via`, as a static for [`Added`].
static VIA: HeaderName = header::VIA;

/// The forwarding fields of a request going to a backend: the client's own `Forwarded` and
/// `X-Real-IP` go unless it is a trusted proxy, and every field returned replaces any of the
/// same name the request had (removed here).
pub fn add_forwarded(headers: &mut HeaderMap, f: Forwarded<'_>) -> Added {
    // Which of the names below the request has, in one pass (a lookup or a removal hashes
    // the name; most requests carry none of them).
    let [forwarded, real_ip, xff, xfp, xfh, via] = present(
        headers,
        [
            &header::FORWARDED,
            &X_REAL_IP,
            &X_FORWARDED_FOR,
            &X_FORWARDED_PROTO,
            &X_FORWARDED_HOST,
            &header::VIA,
        ],
    );
    let mut added = Added {
        fields: std::array::from_fn(|_| (&VIA, HeaderValue::from_static(""))),
        len: 0,
    };
    if !f.trusted {
        // The other ways a client could name an address or a scheme: only a trusted proxy
        // may speak for the client.
        if forwarded {
            headers.remove(header::FORWARDED);
        }
        if real_ip {
            headers.remove(&X_REAL_IP);
        }
    }
    let prior = (f.trusted && xff)
        .then(|| joined(headers, &X_FORWARDED_FOR))
        .flatten();
    let value = match prior {
        Some(prior) => {
            let peer = f.peer.to_str().unwrap_or("");
            HeaderValue::from_str(&format!("{prior}, {peer}")).ok()
        }
        // The common case: the cached value, shared by reference count.
        None => Some(f.peer.clone()),
    };
    if let Some(v) = value {
        if xff {
            headers.remove(&X_FORWARDED_FOR);
        }
        added.push(&X_FORWARDED_FOR, v);
    }
    if !(f.trusted && xfp) {
        if xfp {
            headers.remove(&X_FORWARDED_PROTO);
        }
        added.push(&X_FORWARDED_PROTO, HeaderValue::from_static(f.proto));
    }
    if !(f.trusted && xfh) {
        if xfh {
            headers.remove(&X_FORWARDED_HOST);
        }
        if let Some(v) = f.host {
            added.push(&X_FORWARDED_HOST, v);
        }
    }
    let prior = via.then(|| joined(headers, &header::VIA)).flatten();
    let value = match prior {
        Some(prior) => HeaderValue::from_str(&format!("{prior}, {}", f.via)).ok(),
        None => Some(HeaderValue::from_static(f.via)),
    };
    if let Some(v) = value {
        if via {
            headers.remove(header::VIA);
        }
        added.push(&VIA, v);
    }
    added
}

/// Which of `N` names a header map has, found in one pass over its names.
fn present<const N: usize>(headers: &HeaderMap, names: [&HeaderName; N]) -> [bool; N] {
    let mut found = [false; N];
    for name in headers.keys() {
        if let Some(i) = names.iter().position(|n| *n == name) {
            found[i] = true;
        }
    }
    found
}

/// All values of a header joined with `, ` (how a list header is read when sent several times).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut out: Option<String> = None;
    for v in headers.get_all(name) {
        let s = v.to_str().ok()?;
        match &mut out {
            Some(o) => {
                o.push_str(", ");
                o.push_str(s);
            }
            None => out = Some(s.to_string()),
        }
    }
    out
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {

    #[test]
    fn only_websocket_upgrades_pass() {
        let with = |upgrade: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
            h.insert(header::UPGRADE, upgrade.parse().unwrap());
            h
        };
        assert!(is_upgrade(&with("websocket")));
        assert!(is_upgrade(&with("WebSocket")));
        for other in ["h2c", "TLS/1.2", "tunnel", "raw"] {
            assert!(!is_upgrade(&with(other)), "{other}");
        }
        let mut no_connection = with("websocket");
        no_connection.remove(header::CONNECTION);
        assert!(!is_upgrade(&no_connection));
    }

    #[test]
    fn host_rules_and_methods_refused_at_the_edge() {
        use http::{Method, StatusCode, Version};
        let with = |hosts: &[&str]| {
            let mut h = HeaderMap::new();
            for v in hosts {
                h.append(header::HOST, v.parse().unwrap());
            }
            h
        };
        let one = with(&["www.farm.test"]);
        assert_eq!(refuse(Version::HTTP_11, &Method::GET, &one), None);
        // HTTP/1.1 without Host, any version with two: 400.
        let none = with(&[]);
        assert_eq!(
            refuse(Version::HTTP_11, &Method::GET, &none).map(|r| r.0),
            Some(StatusCode::BAD_REQUEST)
        );
        let two = with(&["a.test", "b.test"]);
        for v in [Version::HTTP_10, Version::HTTP_11, Version::HTTP_2] {
            assert_eq!(
                refuse(v, &Method::GET, &two).map(|r| r.0),
                Some(StatusCode::BAD_REQUEST),
                "{v:?}"
            );
        }
        // HTTP/1.0 and h2 (`:authority`) may go without.
        assert_eq!(refuse(Version::HTTP_10, &Method::GET, &none), None);
        assert_eq!(refuse(Version::HTTP_2, &Method::GET, &none), None);
        for m in [Method::CONNECT, Method::TRACE] {
            assert_eq!(
                refuse(Version::HTTP_11, &m, &one).map(|r| r.0),
                Some(StatusCode::METHOD_NOT_ALLOWED)
            );
        }
    }

    #[test]
    fn forwarded_and_x_real_ip_from_untrusted_clients_are_dropped() {
        let peer = HeaderValue::from_static("192.0.2.1");
        for trusted in [false, true] {
            let mut h = HeaderMap::new();
            h.insert(
                header::FORWARDED,
                "for=10.6.6.6;proto=https".parse().unwrap(),
            );
            h.insert(X_REAL_IP.clone(), "10.6.6.6".parse().unwrap());
            forward(
                &mut h,
                Forwarded {
                    peer: &peer,
                    trusted,
                    proto: "http",
                    host: None,
                    via: "1.1 lockstep",
                },
            );
            assert_eq!(h.contains_key(header::FORWARDED), trusted);
            assert_eq!(h.contains_key(&X_REAL_IP), trusted);
        }
    }

    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    /// `add_forwarded` on `h`, its fields then put in `h` as the upstream writer writes them.
    fn forward(h: &mut HeaderMap, f: Forwarded<'_>) {
        let added = add_forwarded(h, f);
        for (name, value) in added.fields() {
            assert!(!h.contains_key(*name), "{name} written twice");
            h.append(*name, value.clone());
        }
    }

    fn fwd(peer: &HeaderValue, trusted: bool) -> Forwarded<'_> {
        Forwarded {
            peer,
            trusted,
            proto: "https",
            host: Some(HeaderValue::from_static("www.farm.test")),
            via: "1.1 lockstep",
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn connection_names_match_without_case() {
        let mut h = map(&[
            ("connection", "X-Secret, Keep-Alive"),
            ("x-secret", "1"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn upgrade_survives_when_passed_through() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("keep-alive", "1"),
        ]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert!(!h.contains_key("keep-alive"));
    }

    #[test]
    fn untrusted_peer_replaces_forwarded_headers() {
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "gopher"),
            ("x-forwarded-host", "evil.test"),
        ]);
        forward(
            &mut h,
            fwd(&peer_value("192.0.2.1".parse().unwrap()), false),
        );
        assert_eq!(h["x-forwarded-for"], "192.0.2.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "www.farm.test");
        assert_eq!(h["via"], "1.1 lockstep");
    }

    #[test]
    fn trusted_peer_is_appended_to() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "10.1.1.1"),
            ("x-forwarded-proto", "http"),
            ("via", "1.0 edge"),
        ]);
        forward(
            &mut h,
            fwd(&peer_value("::ffff:10.0.0.2".parse().unwrap()), true),
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 10.1.1.1, 10.0.0.2");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["via"], "1.0 edge, 1.1 lockstep");
    }

    #[test]
    fn trust_matches_cidrs_and_mapped_addresses() {
        let nets: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        assert!(is_trusted("10.2.3.4".parse().unwrap(), &nets));
        assert!(is_trusted("::ffff:10.2.3.4".parse().unwrap(), &nets));
        assert!(is_trusted("::1".parse().unwrap(), &nets));
        assert!(!is_trusted("192.0.2.1".parse().unwrap(), &nets));
    }

    #[test]
    fn cookie_lookup() {
        let h = map(&[("cookie", "a=1; session=abc; b=2")]);
        assert_eq!(cookie(&h, "session"), Some("abc"));
        assert_eq!(cookie(&h, "missing"), None);
    }
}
