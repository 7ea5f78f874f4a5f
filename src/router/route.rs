//! The route table: which pool a request goes to, decided by its Host and path.
//!
//! Pure: opens no sockets and reads no clock; it only compares strings. Routes are tried in
//! configuration order and the first match wins, so operators control precedence by ordering.

use std::borrow::Cow;

use super::ratelimit::RateLimit;
use super::rules::{Action, Rules};

/// How a route matches the Host: exact name, or `*.suffix` wildcard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// The normalised host must equal this name (lowercase, no trailing dot).
    Exact(String),
    /// The normalised host must end with this suffix, which keeps its leading dot
    /// (`".farm.test"`), so the apex `farm.test` itself does not match.
    Suffix(String),
}

impl HostMatch {
    /// Parses `"www.farm.test"` or `"*.farm.test"`; lowercases; strips one trailing dot.
    ///
    /// A bracketed IPv6 literal (`"[::1]"`) is accepted as an exact match, because that is
    /// how such a host arrives in a Host header. Err(reason) for an empty name, `"*"` alone,
    /// a `'*'` anywhere but a leading `"*."`, empty labels, over-long names, or characters not
    /// valid in a host name (allowed: ASCII letters, digits, `-`, `_`, `.`).
    pub fn parse(s: &str) -> Result<HostMatch, String> {
        let lower = s.to_ascii_lowercase();
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        if name.is_empty() {
            return Err(format!("invalid host {s:?}: empty"));
        }
        if name == "*" {
            // A bare wildcard would silently shadow every later route; omitting the host says
            // the same thing explicitly.
            return Err(format!(
                "invalid host {s:?}: '*' alone is not allowed; omit the host to match any host"
            ));
        }
        if let Some(rest) = name.strip_prefix("*.") {
            validate_name(s, rest)?;
            return Ok(HostMatch::Suffix(format!(".{rest}")));
        }
        if is_ipv6_literal(name) {
            return Ok(HostMatch::Exact(name.to_owned()));
        }
        validate_name(s, name)?;
        Ok(HostMatch::Exact(name.to_owned()))
    }

    /// True when the (already normalised, see [`normalize_host`]) host matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(name) => host == name,
            // Strictly longer than the suffix: at least one character must precede the dot,
            // which is what keeps the apex out.
            HostMatch::Suffix(suffix) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
        }
    }
}

/// Checks a lowercase DNS-style name; `original` is only used to make the error readable.
fn validate_name(original: &str, name: &str) -> Result<(), String> {
    if name.contains('*') {
        return Err(format!(
            "invalid host {original:?}: '*' is only allowed as a leading \"*.\""
        ));
    }
    if name.len() > 253 {
        return Err(format!(
            "invalid host {original:?}: longer than 253 characters"
        ));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(format!("invalid host {original:?}: empty label"));
        }
        if label.len() > 63 {
            return Err(format!(
                "invalid host {original:?}: label longer than 63 characters"
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!(
                "invalid host {original:?}: character {c:?} not allowed"
            ));
        }
    }
    Ok(())
}

/// `[` hex digits, colons (and dots for an embedded IPv4 tail) `]`.
fn is_ipv6_literal(name: &str) -> bool {
    name.strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .is_some_and(|inner| {
            inner.contains(':')
                && inner
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        })
}

/// One route: what it matches (listeners, host, path prefix) and what it does (its
/// [`Action`], its [`Rules`], its rate limit).
#[derive(Debug, Clone)]
pub struct Route {
    /// Its name in logs and metrics (`name:`, else `route N`, counted from 1).
    pub name: String,
    /// Host condition; `None` matches any host, including a request without one.
    pub host: Option<HostMatch>,
    /// Path prefix, matched on segment boundaries: `"/api"` matches `/api`, `/api/` and
    /// `/api/x`, not `/apix` (a prefix ending in `/` matches below it). Empty matches every
    /// path.
    pub path_prefix: String,
    /// The listeners (by name) whose requests it matches; empty: every listener's.
    pub listeners: Vec<String>,
    /// What it does with a matching request.
    pub action: Action,
    /// What it changes on the way.
    pub rules: Rules,
    /// Its per-client rate limit.
    pub rate_limit: Option<RateLimit>,
}

impl Route {
    /// True when this route accepts a request on `listener` for the normalised host and the
    /// query-less path.
    fn accepts(&self, listener: &str, host: Option<&str>, path: &str) -> bool {
        let host_ok = match (&self.host, host) {
            (None, _) => true,
            (Some(m), Some(h)) => m.matches(h),
            (Some(_), None) => false,
        };
        host_ok
            && prefix_matches(&self.path_prefix, path)
            && (self.listeners.is_empty() || self.listeners.iter().any(|l| l == listener))
    }
}

/// Whether `prefix` matches `path` on a segment boundary.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => {
            prefix.is_empty() || prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/')
        }
        None => false,
    }
}

/// First-match route table.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Builds the table; `routes` are tried in this order.
    pub fn new(routes: Vec<Route>) -> RouteTable {
        RouteTable { routes }
    }

    /// The route at index `i` (as [`RouteTable::find`] gave it).
    pub fn get(&self, i: usize) -> Option<&Route> {
        self.routes.get(i)
    }

    /// The first route (with its index) matching a request on `listener` for `host` and
    /// `path`.
    ///
    /// `host` is the raw Host header / `:authority` value (may carry a port, may be
    /// uppercase, may have a trailing dot, may be None). A route without a host matches any
    /// host. The path is matched by string prefix after dropping any `?query`. Does not
    /// allocate unless the host contains uppercase letters.
    pub fn find(&self, listener: &str, host: Option<&str>, path: &str) -> Option<(usize, &Route)> {
        let host = host.map(normalize_host);
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        self.routes
            .iter()
            .enumerate()
            .find(|(_, r)| r.accepts(listener, host.as_deref(), path))
    }

    /// The routes, in order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

/// A path with its `.` and `..` segments resolved (RFC 3986 §5.2.4), also when spelled
/// `%2e`: what routes match and what the backend is sent, so `/public/../admin` is routed, and
/// forwarded, as `/admin` and no prefix is bypassed. `..` never climbs above the root; a
/// trailing `.` or `..` leaves a trailing `/`. Borrows when there is nothing to resolve, the
/// common case.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    /// `Some(true)` for `..`, `Some(false)` for `.`, `None` for any other segment.
    fn dots(seg: &str) -> Option<bool> {
        let plain = seg.to_ascii_lowercase().replace("%2e", ".");
        match plain.as_str() {
            "." => Some(false),
            ".." => Some(true),
            _ => None,
        }
    }
    let candidate = |seg: &str| seg.starts_with('.') || seg.starts_with('%');
    if !path
        .split('/')
        .any(|seg| candidate(seg) && dots(seg).is_some())
    {
        return Cow::Borrowed(path);
    }
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    let mut out: Vec<&str> = Vec::with_capacity(segs.len());
    for (i, seg) in segs.iter().enumerate() {
        match dots(seg) {
            None => out.push(seg),
            Some(up) => {
                if up {
                    out.pop();
                }
                if i + 1 == segs.len() {
                    out.push("");
                }
            }
        }
    }
    Cow::Owned(format!("/{}", out.join("/")))
}

/// Normalises a Host value: strips the port (also for `"[::1]:8080"` IPv6 literals, which
/// keep their brackets), lowercases, strips one trailing dot.
///
/// Borrows when the value is already lowercase, which is the common case.
pub fn normalize_host(raw: &str) -> Cow<'_, str> {
    let host = strip_port(raw);
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// Drops `:port`. A bracketed literal ends at `]`; an unbracketed value with several colons
/// is a bare IPv6 address (not valid in a Host header, but not ours to mangle) and is kept.
fn strip_port(raw: &str) -> &str {
    if raw.starts_with('[') {
        return match raw.find(']') {
            Some(end) => &raw[..=end],
            None => raw,
        };
    }
    match raw.rfind(':') {
        Some(i) if !raw[..i].contains(':') => &raw[..i],
        _ => raw,
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn dot_segments_are_resolved_before_matching() {
        for (raw, want) in [
            ("/a/b", "/a/b"),
            ("/", "/"),
            ("/a/./b", "/a/b"),
            ("/public/../admin", "/admin"),
            ("/public/%2e%2E/admin", "/admin"),
            ("/public/%2e/x", "/public/x"),
            ("/../../etc", "/etc"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/a/.hidden/..x", "/a/.hidden/..x"),
        ] {
            assert_eq!(normalize_path(raw), want, "{raw}");
        }
        assert!(matches!(normalize_path("/a/b.c/d"), Cow::Borrowed(_)));
    }

    use super::*;

    fn route(host: Option<&str>, prefix: &str, pool: usize) -> Route {
        Route {
            name: format!("to {pool}"),
            host: host.map(|h| HostMatch::parse(h).expect("valid test host")),
            path_prefix: prefix.to_owned(),
            listeners: Vec::new(),
            action: Action::Pool(pool),
            rules: Rules::default(),
            rate_limit: None,
        }
    }

    /// The pool a request on listener `web` goes to.
    fn pool_of(t: &RouteTable, host: Option<&str>, path: &str) -> Option<usize> {
        t.find("web", host, path).map(|(_, r)| match r.action {
            Action::Pool(p) => p,
            _ => usize::MAX,
        })
    }

    #[test]
    fn a_route_for_some_listeners_matches_only_their_requests() {
        let mut tls_only = route(None, "/", 1);
        tls_only.listeners = vec!["https".into()];
        let t = RouteTable::new(vec![tls_only, route(None, "/", 2)]);
        assert_eq!(t.find("https", None, "/").map(|(i, _)| i), Some(0));
        assert_eq!(t.find("http", None, "/").map(|(i, _)| i), Some(1));
    }

    #[test]
    fn exact_host_matches_only_that_host() {
        let t = RouteTable::new(vec![route(Some("www.farm.test"), "/", 1)]);
        assert_eq!(pool_of(&t, Some("www.farm.test"), "/"), Some(1));
        assert_eq!(pool_of(&t, Some("api.farm.test"), "/"), None);
        assert_eq!(pool_of(&t, Some("farm.test"), "/"), None);
    }

    #[test]
    fn wildcard_matches_subdomains_but_not_apex() {
        let t = RouteTable::new(vec![route(Some("*.farm.test"), "/", 2)]);
        assert_eq!(pool_of(&t, Some("a.farm.test"), "/"), Some(2));
        assert_eq!(pool_of(&t, Some("a.b.farm.test"), "/"), Some(2));
        assert_eq!(pool_of(&t, Some("farm.test"), "/"), None);
        assert_eq!(pool_of(&t, Some("evilfarm.test"), "/"), None);
        assert_eq!(pool_of(&t, Some(".farm.test"), "/"), None);
    }

    #[test]
    fn port_is_stripped_including_ipv6_literals() {
        let t = RouteTable::new(vec![
            route(Some("www.farm.test"), "/", 1),
            route(Some("[::1]"), "/", 2),
        ]);
        assert_eq!(pool_of(&t, Some("www.farm.test:8080"), "/"), Some(1));
        assert_eq!(pool_of(&t, Some("[::1]:8080"), "/"), Some(2));
        assert_eq!(pool_of(&t, Some("[::1]"), "/"), Some(2));
        assert_eq!(normalize_host("[::1]:8080"), "[::1]");
        assert_eq!(normalize_host("[2001:DB8::1]:443"), "[2001:db8::1]");
        assert_eq!(normalize_host("10.0.0.1:80"), "10.0.0.1");
        assert_eq!(normalize_host("::1"), "::1");
    }

    #[test]
    fn host_case_and_trailing_dot_are_ignored() {
        let t = RouteTable::new(vec![route(Some("WWW.Farm.Test."), "/", 1)]);
        assert_eq!(pool_of(&t, Some("www.FARM.test"), "/"), Some(1));
        assert_eq!(pool_of(&t, Some("www.farm.test."), "/"), Some(1));
        assert_eq!(pool_of(&t, Some("WWW.FARM.TEST.:443"), "/"), Some(1));
    }

    #[test]
    fn normalize_borrows_when_already_lowercase() {
        assert!(matches!(
            normalize_host("www.farm.test:80"),
            Cow::Borrowed("www.farm.test")
        ));
        assert!(matches!(normalize_host("Www.farm.test"), Cow::Owned(_)));
    }

    #[test]
    fn first_match_wins_in_order() {
        let t = RouteTable::new(vec![
            route(Some("www.farm.test"), "/api", 1),
            route(Some("*.farm.test"), "/", 2),
            route(Some("www.farm.test"), "/", 3),
        ]);
        assert_eq!(pool_of(&t, Some("www.farm.test"), "/api/users"), Some(1));
        // Route 3 is shadowed by the earlier wildcard.
        assert_eq!(pool_of(&t, Some("www.farm.test"), "/index.html"), Some(2));
    }

    #[test]
    fn route_without_host_matches_any_host_and_none() {
        let t = RouteTable::new(vec![
            route(Some("www.farm.test"), "/", 1),
            route(None, "/", 9),
        ]);
        assert_eq!(pool_of(&t, Some("other.example"), "/"), Some(9));
        assert_eq!(pool_of(&t, None, "/"), Some(9));
        assert_eq!(pool_of(&t, Some(""), "/"), Some(9));
    }

    #[test]
    fn host_route_does_not_match_request_without_host() {
        let t = RouteTable::new(vec![route(Some("www.farm.test"), "/", 1)]);
        assert_eq!(pool_of(&t, None, "/"), None);
    }

    #[test]
    fn path_prefix_matches_on_segment_boundaries_of_the_path_without_query() {
        let t = RouteTable::new(vec![route(None, "/api/", 1), route(None, "/static", 2)]);
        assert_eq!(pool_of(&t, None, "/api/v1?x=1"), Some(1));
        assert_eq!(pool_of(&t, None, "/api"), None);
        // `/static` is the segment, not a string prefix: `/staticfiles` is another path.
        assert_eq!(pool_of(&t, None, "/staticfiles/a.css"), None);
        assert_eq!(pool_of(&t, None, "/static"), Some(2));
        assert_eq!(pool_of(&t, None, "/static/a.css"), Some(2));
        // The query is not part of the path: "/?/api/" has path "/".
        assert_eq!(pool_of(&t, None, "/?/api/"), None);
    }

    #[test]
    fn no_match_gives_none() {
        assert_eq!(pool_of(&RouteTable::default(), Some("a"), "/"), None);
        let t = RouteTable::new(vec![route(Some("a.test"), "/x", 1)]);
        assert_eq!(pool_of(&t, Some("a.test"), "/y"), None);
    }

    #[test]
    fn parse_accepts_and_normalises() {
        assert_eq!(
            HostMatch::parse("WWW.Farm.Test."),
            Ok(HostMatch::Exact("www.farm.test".into()))
        );
        assert_eq!(
            HostMatch::parse("*.Farm.test"),
            Ok(HostMatch::Suffix(".farm.test".into()))
        );
        assert_eq!(
            HostMatch::parse("10.0.0.1"),
            Ok(HostMatch::Exact("10.0.0.1".into()))
        );
        assert_eq!(
            HostMatch::parse("my_host-1"),
            Ok(HostMatch::Exact("my_host-1".into()))
        );
    }

    #[test]
    fn parse_rejects_bad_names() {
        for bad in [
            "",
            ".",
            "*",
            "*.",
            "a*.farm.test",
            "*farm.test",
            "www.*.test",
            "*.*.test",
            "a..b",
            ".farm.test",
            "a b",
            "a/b",
            "host:80",
            "[zz::1]",
            "é.test",
        ] {
            assert!(HostMatch::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(HostMatch::parse(&"a".repeat(64)).is_err());
        assert!(HostMatch::parse(&["a"; 130].join(".")).is_err());
    }
}
