//! What a route does besides choosing a pool: answer itself (a redirect, a fixed response)
//! instead of forwarding, edit request and response headers, rewrite the path prefix, add
//! HSTS. Built once per configuration generation; applied per request.
//!
//! Pure: no sockets, no clock; each function takes the request's parts and returns or edits
//! values. The rate limits live in [`super::ratelimit`].

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

/// What a matching route does with the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Forward it to the pool of this index.
    Pool(usize),
    /// Answer with a redirect.
    Redirect(Redirect),
    /// Answer with a fixed response (a maintenance page, say).
    Respond(Fixed),
}

/// Header changes, applied in the order remove, set, add.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    /// Removed (every value).
    pub remove: Vec<HeaderName>,
    /// Replaced: the header then has exactly this value.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Appended beside the values already there.
    pub add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderEdits {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    /// Applies the edits to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for n in &self.remove {
            headers.remove(n);
        }
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
    }
}

/// Why a rule may not touch header `name`, if it may not: the message framing, the
/// connection's management and the routing are the proxy's.
pub fn reserved(name: &HeaderName) -> Option<&'static str> {
    match name.as_str() {
        "connection" | "keep-alive" | "proxy-connection" | "te" | "trailer" | "upgrade" => {
            Some("it manages the connection, which is the proxy's (hop-by-hop)")
        }
        "transfer-encoding" | "content-length" => {
            Some("it frames the message, which the proxy does")
        }
        "host" => Some("it is what the request was routed on; route on it instead"),
        _ => None,
    }
}

/// A redirect: the request's own URL with the parts given here replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// 301, 302, 303, 307 or 308.
    pub status: StatusCode,
    /// `http` or `https`; `None`: the request's.
    pub scheme: Option<&'static str>,
    /// Another host; `None`: the request's.
    pub host: Option<String>,
    /// Another port; `None`: the request's, unless the scheme changes (then the new scheme's
    /// default).
    pub port: Option<u16>,
    /// Replaces the route's path prefix; `None`: the path as it came.
    pub prefix: Option<String>,
}

impl Redirect {
    /// The `Location` for a request that came over TLS or not, for `host` (its Host or
    /// authority, port included), with `path` and `query`, matched by a route of
    /// `route_prefix`. `None` when there is no host to send the client to (a request without
    /// one, and no `host` here).
    pub fn location(
        &self,
        tls: bool,
        host: Option<&str>,
        path: &str,
        query: Option<&str>,
        route_prefix: &str,
    ) -> Option<String> {
        let came = if tls { "https" } else { "http" };
        let scheme = self.scheme.unwrap_or(came);
        let (name, port) = match (&self.host, host) {
            (Some(h), _) => (h.as_str(), None),
            (None, Some(h)) => split_port(h),
            (None, None) => return None,
        };
        let port = match (self.port, port) {
            (Some(p), _) => Some(p),
            // A port of the old scheme means nothing on the new one.
            (None, Some(_)) if scheme != came => None,
            (None, p) => p,
        };
        let path = match &self.prefix {
            Some(to) => rewrite_prefix(path, route_prefix, to),
            None => path.to_string(),
        };
        let mut out = format!("{scheme}://{name}");
        let default = if scheme == "https" { 443 } else { 80 };
        if let Some(p) = port.filter(|&p| p != default) {
            out.push_str(&format!(":{p}"));
        }
        out.push_str(&path);
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        Some(out)
    }
}

/// `host:port` → (`host`, port); a bracketed IPv6 literal keeps its brackets.
fn split_port(h: &str) -> (&str, Option<u16>) {
    match h.rsplit_once(':') {
        Some((name, port))
            if !port.contains(']') && (!name.contains(':') || name.ends_with(']')) =>
        {
            match port.parse() {
                Ok(p) => (name, Some(p)),
                Err(_) => (h, None),
            }
        }
        _ => (h, None),
    }
}

/// `path` (which `prefix` matched, on a segment boundary) with `prefix` replaced by `to`:
/// `/api/x` with `/api` → `/` is `/x`, with `/api` → `/v2` is `/v2/x`; never empty, one `/`
/// where the two meet.
pub fn rewrite_prefix(path: &str, prefix: &str, to: &str) -> String {
    let rest = path.strip_prefix(prefix).unwrap_or(path);
    let mut out = String::with_capacity(to.len() + rest.len() + 1);
    out.push_str(to);
    match (out.ends_with('/'), rest.starts_with('/')) {
        (true, true) => out.push_str(&rest[1..]),
        (false, false) if !rest.is_empty() => {
            out.push('/');
            out.push_str(rest);
        }
        _ => out.push_str(rest),
    }
    if !out.starts_with('/') {
        out.insert(0, '/');
    }
    out
}

/// A fixed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fixed {
    /// Its status.
    pub status: StatusCode,
    /// Its `Content-Type`.
    pub content_type: HeaderValue,
    /// Its body (a HEAD request gets the headers only).
    pub body: Bytes,
}

/// `Strict-Transport-Security` (RFC 6797) for `max_age_s`, with `includeSubDomains` and
/// `preload` when asked.
pub fn hsts_value(max_age_s: u64, include_subdomains: bool, preload: bool) -> HeaderValue {
    let mut v = format!("max-age={max_age_s}");
    if include_subdomains {
        v.push_str("; includeSubDomains");
    }
    if preload {
        v.push_str("; preload");
    }
    // Digits, letters, `=`, `;` and spaces only.
    HeaderValue::from_str(&v).expect("a valid header value")
}

/// What a route does to the requests it matches and their responses, besides [`Action`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// Edits of the request before it is forwarded.
    pub request_headers: HeaderEdits,
    /// Edits of every response to a matching request (the proxy's own included).
    pub response_headers: HeaderEdits,
    /// Replaces the route's path prefix before forwarding (`/` strips it).
    pub rewrite_prefix: Option<String>,
    /// `Strict-Transport-Security` added to responses sent over TLS (never over plain HTTP,
    /// where browsers ignore it: RFC 6797 §7.2).
    pub hsts: Option<HeaderValue>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(scheme: Option<&'static str>, host: Option<&str>, port: Option<u16>) -> Redirect {
        Redirect {
            status: StatusCode::PERMANENT_REDIRECT,
            scheme,
            host: host.map(str::to_string),
            port,
            prefix: None,
        }
    }

    #[test]
    fn http_to_https_keeps_host_path_and_query_and_drops_the_old_port() {
        let r = redirect(Some("https"), None, None);
        let at = |host, path, q| r.location(false, host, path, q, "/");
        assert_eq!(
            at(Some("www.farm.test"), "/a/b", Some("x=1")).as_deref(),
            Some("https://www.farm.test/a/b?x=1")
        );
        assert_eq!(
            at(Some("www.farm.test:8080"), "/", None).as_deref(),
            Some("https://www.farm.test/")
        );
        assert_eq!(
            at(Some("[2001:db8::1]:80"), "/", None).as_deref(),
            Some("https://[2001:db8::1]/")
        );
        assert_eq!(at(None, "/", None), None, "no host to send the client to");
        // Same scheme: the port stays; a given port replaces it; a default one is left out.
        let same = redirect(None, Some("new.farm.test"), None);
        assert_eq!(
            same.location(true, Some("old:8443"), "/p", None, "/")
                .as_deref(),
            Some("https://new.farm.test/p")
        );
        let keep = redirect(None, None, None);
        assert_eq!(
            keep.location(false, Some("h:8080"), "/p", None, "/")
                .as_deref(),
            Some("http://h:8080/p")
        );
        let port = redirect(Some("https"), None, Some(8443));
        assert_eq!(
            port.location(false, Some("h"), "/", None, "/").as_deref(),
            Some("https://h:8443/")
        );
        let default = redirect(Some("https"), None, Some(443));
        assert_eq!(
            default
                .location(false, Some("h:80"), "/", None, "/")
                .as_deref(),
            Some("https://h/")
        );
        assert_eq!(split_port("[::1]"), ("[::1]", None));
        assert_eq!(split_port("h:x"), ("h:x", None));
    }

    #[test]
    fn a_redirect_may_move_the_path_prefix() {
        let r = Redirect {
            prefix: Some("/new".into()),
            ..redirect(None, None, None)
        };
        assert_eq!(
            r.location(false, Some("h"), "/old/a", Some("q"), "/old")
                .as_deref(),
            Some("http://h/new/a?q")
        );
    }

    #[test]
    fn prefixes_are_rewritten_with_one_slash_where_they_meet() {
        for (path, prefix, to, want) in [
            ("/api/x", "/api", "/", "/x"),
            ("/api", "/api", "/", "/"),
            ("/api/x", "/api/", "/", "/x"),
            ("/api/x", "/api", "/v2", "/v2/x"),
            ("/api", "/api", "/v2", "/v2"),
            ("/api/x", "/api/", "/v2/", "/v2/x"),
            ("/old/x", "/old", "/new/", "/new/x"),
            ("/x/y", "/", "/app", "/app/x/y"),
            ("/api/x", "/api", "", "/x"),
        ] {
            assert_eq!(
                rewrite_prefix(path, prefix, to),
                want,
                "{path} {prefix} {to}"
            );
        }
    }

    #[test]
    fn header_edits_remove_then_set_then_add() {
        let n = |s: &'static str| HeaderName::from_static(s);
        let v = |s: &'static str| HeaderValue::from_static(s);
        let e = HeaderEdits {
            remove: vec![n("server"), n("x-a")],
            set: vec![(n("x-a"), v("1")), (n("x-b"), v("2"))],
            add: vec![(n("x-b"), v("3"))],
        };
        let mut h = HeaderMap::new();
        h.append(n("server"), v("backend"));
        h.append(n("x-a"), v("old"));
        h.append(n("x-a"), v("older"));
        h.append(n("x-b"), v("gone"));
        e.apply(&mut h);
        assert!(h.get("server").is_none());
        assert_eq!(h.get_all("x-a").iter().collect::<Vec<_>>(), [v("1")]);
        assert_eq!(
            h.get_all("x-b").iter().collect::<Vec<_>>(),
            [v("2"), v("3")]
        );
    }

    #[test]
    fn framing_connection_and_host_headers_are_the_proxys() {
        for n in [
            "connection",
            "transfer-encoding",
            "content-length",
            "host",
            "upgrade",
            "te",
        ] {
            assert!(reserved(&HeaderName::from_static(n)).is_some(), "{n}");
        }
        assert!(reserved(&HeaderName::from_static("x-frame-options")).is_none());
    }

    #[test]
    fn hsts_says_what_was_asked() {
        assert_eq!(
            hsts_value(31536000, true, true),
            "max-age=31536000; includeSubDomains; preload"
        );
        assert_eq!(hsts_value(600, false, false), "max-age=600");
    }
}
