//! `routes:` checked into [`Route`]s: what each matches (listeners, host, path prefix), what it
//! does (a pool, a redirect or a fixed response) and its rules (header edits, prefix rewrite,
//! HSTS, rate limit), every problem reported with its line and column.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::StatusCode;
use serde_saphyr::Spanned;

use super::check::Ctx;
use super::error::{nearest, unknown_pool};
use super::raw::{RawHeaderEdits, RawHsts, RawRateLimit, RawRedirect, RawRespond, RawRoute};
use super::{ConfigError, Listener, Pos};
use crate::router::ratelimit::{LimitKey, RateLimit};
use crate::router::route::{HostMatch, Route};
use crate::router::rules::{self, Action, Fixed, HeaderEdits, Redirect, Rules};

/// Largest body of a fixed response (`respond.body` or `body_file`).
pub const MAX_FIXED_BODY: usize = 1024 * 1024;

/// Default `hsts.max_age`: a year, as the preload list asks.
pub const DEFAULT_HSTS_MAX_AGE: Duration = Duration::from_secs(365 * 24 * 3600);

/// Default `rate_limit.per`.
pub const DEFAULT_RATE_PER: Duration = Duration::from_secs(1);

/// The routes, in order; a route with a problem is left out (its errors are in `cx`).
pub(super) fn routes(
    cx: &mut Ctx<'_>,
    raw: &[RawRoute],
    pools: &HashMap<String, usize>,
    listeners: &[Listener],
) -> Vec<Route> {
    let mut out = Vec::new();
    let mut names: HashMap<String, Pos> = HashMap::new();
    for (i, r) in raw.iter().enumerate() {
        let errors = cx.errors.len();
        let name = match &r.name {
            Some(n) if n.value.is_empty() || n.value.len() > 64 => {
                cx.err(n, "route name must be 1 to 64 characters");
                String::new()
            }
            Some(n) => {
                if let Some(first) = names.insert(n.value.clone(), Pos::of(n)) {
                    cx.err(
                        n,
                        format!(
                            "route name `{}` is also used on line {}: names must be unique (they label metrics)",
                            n.value, first.line
                        ),
                    );
                }
                n.value.clone()
            }
            None => format!("route {}", i + 1),
        };
        let host = r
            .host
            .as_ref()
            .and_then(|h| match HostMatch::parse(&h.value) {
                Ok(m) => Some(m),
                Err(e) => {
                    cx.err(h, format!("route host `{}`: {e}", h.value));
                    None
                }
            });
        let path_prefix = match &r.path_prefix {
            None => "/".to_string(),
            Some(p) if !p.value.starts_with('/') => {
                cx.err(p, format!("path_prefix `{}` must start with /", p.value));
                "/".to_string()
            }
            Some(p) => p.value.clone(),
        };
        let on = route_listeners(cx, r.listeners.as_deref(), listeners, route_pos(r));
        let action = action(cx, r, i, pools);
        let rules = Rules {
            request_headers: edits(cx, r.request_headers.as_ref(), "request_headers"),
            response_headers: edits(cx, r.response_headers.as_ref(), "response_headers"),
            rewrite_prefix: rewrite(cx, r, &action),
            hsts: r.hsts.as_ref().map(|h| hsts(cx, h)),
        };
        if !rules.request_headers.is_empty()
            && matches!(action, Some(Action::Redirect(_) | Action::Respond(_)))
        {
            if let Some(h) = &r.request_headers {
                // At the first header it names.
                let at = [&h.set, &h.add]
                    .into_iter()
                    .flatten()
                    .flat_map(|m| m.keys())
                    .chain(h.remove.iter().flatten())
                    .map(Pos::of)
                    .min_by_key(|p| (p.line, p.column))
                    .unwrap_or_default();
                cx.errors.push(ConfigError::at(
                    cx.file,
                    at,
                    "request_headers only apply to a route with a pool (a redirect or a fixed response forwards nothing)",
                ));
            }
        }
        let rate_limit = r.rate_limit.as_ref().and_then(|l| rate_limit(cx, l));
        if let (Some(action), true) = (action, cx.errors.len() == errors) {
            out.push(Route {
                name,
                host,
                path_prefix,
                listeners: on,
                action,
                rules,
                rate_limit,
            });
        }
    }
    out
}

fn route_listeners(
    cx: &mut Ctx<'_>,
    raw: Option<&[Spanned<String>]>,
    listeners: &[Listener],
    at: Pos,
) -> Vec<String> {
    let Some(raw) = raw else { return Vec::new() };
    for l in raw {
        if !listeners.iter().any(|x| x.name == l.value) {
            let names: Vec<&str> = listeners.iter().map(|x| x.name.as_str()).collect();
            let hint = match nearest(&l.value, names.iter().copied()) {
                Some(n) => format!("did you mean `{n}`?"),
                None => format!("listeners are: {}", names.join(", ")),
            };
            cx.err(
                l,
                format!(
                    "route for listener `{}`, which does not exist: {hint}",
                    l.value
                ),
            );
        }
    }
    if raw.is_empty() {
        cx.errors.push(ConfigError::at(
            cx.file,
            at,
            "a route's `listeners: []` matches nothing: name listeners, or leave the key out for all",
        ));
    }
    raw.iter().map(|l| l.value.clone()).collect()
}

/// Where a route is written, for a problem of the route as a whole: its first key with a
/// position (a route of only blocks and lists has none: the file's start).
fn route_pos(r: &RawRoute) -> Pos {
    [&r.name, &r.host, &r.path_prefix, &r.pool, &r.rewrite_prefix]
        .into_iter()
        .flatten()
        .map(Pos::of)
        .chain(r.listeners.iter().flatten().map(Pos::of))
        .min_by_key(|p| (p.line, p.column))
        .unwrap_or_default()
}

/// Exactly one of `pool`, `redirect`, `respond`.
fn action(
    cx: &mut Ctx<'_>,
    r: &RawRoute,
    i: usize,
    pools: &HashMap<String, usize>,
) -> Option<Action> {
    match (&r.pool, &r.redirect, &r.respond) {
        (Some(p), None, None) => pool(cx, p, pools),
        (None, Some(d), None) => redirect(cx, d).map(Action::Redirect),
        (None, None, Some(f)) => respond(cx, f).map(Action::Respond),
        (None, None, None) => {
            let at = route_pos(r);
            cx.errors.push(ConfigError::at(
                cx.file,
                at,
                format!(
                    "route {} does nothing: give it a `pool:`, a `redirect:` or a `respond:`",
                    i + 1
                ),
            ));
            None
        }
        _ => {
            let at = r.pool.as_ref().map(Pos::of).unwrap_or_default();
            cx.errors.push(ConfigError::at(
                cx.file,
                at,
                format!(
                    "route {} has more than one of `pool:`, `redirect:` and `respond:`: keep one",
                    i + 1
                ),
            ));
            None
        }
    }
}

fn pool(cx: &mut Ctx<'_>, p: &Spanned<String>, pools: &HashMap<String, usize>) -> Option<Action> {
    if let Some(&i) = pools.get(&p.value) {
        return Some(Action::Pool(i));
    }
    let hint = unknown_pool(&p.value, pools);
    cx.err(
        p,
        format!("route to pool `{}`, which does not exist: {hint}", p.value),
    );
    None
}

fn redirect(cx: &mut Ctx<'_>, d: &RawRedirect) -> Option<Redirect> {
    let errors = cx.errors.len();
    let status = match &d.status {
        None => StatusCode::FOUND,
        Some(s) if [301, 302, 303, 307, 308].contains(&s.value) => {
            StatusCode::from_u16(s.value).ok()?
        }
        Some(s) => {
            cx.err(
                s,
                format!(
                    "redirect status {} is not a redirect: use 301 or 308 (permanent), 302 or 307 (temporary), or 303",
                    s.value
                ),
            );
            StatusCode::FOUND
        }
    };
    let scheme = match d.scheme.as_ref().map(|s| (s, s.value.as_str())) {
        None => None,
        Some((_, "http")) => Some("http"),
        Some((_, "https")) => Some("https"),
        Some((s, other)) => {
            cx.err(s, format!("redirect scheme `{other}`: write http or https"));
            None
        }
    };
    let host = d.host.as_ref().and_then(|h| match HostMatch::parse(&h.value) {
        Ok(HostMatch::Exact(name)) => Some(name),
        _ => {
            cx.err(
                h,
                format!(
                    "redirect host `{}` is not a host name or address (no port, no wildcard: the port is `port:`)",
                    h.value
                ),
            );
            None
        }
    });
    if let Some(p) = d.port.as_ref().filter(|p| p.value == 0) {
        cx.err(p, "redirect port 0: give a port from 1 to 65535");
    }
    let prefix = d
        .prefix
        .as_ref()
        .and_then(|p| checked_prefix(cx, p, "redirect prefix"));
    if scheme.is_none() && host.is_none() && d.port.is_none() && prefix.is_none() {
        let at = d.status.as_ref().map(Pos::of).unwrap_or_default();
        cx.errors.push(ConfigError::at(
            cx.file,
            at,
            "a redirect to the same URL would loop: give it a `scheme:`, `host:`, `port:` or `prefix:`",
        ));
    }
    (cx.errors.len() == errors).then(|| Redirect {
        status,
        scheme,
        host,
        port: d.port.as_ref().map(|p| p.value),
        prefix,
    })
}

/// A path prefix to put in a URL: starts with `/`, a valid path, no query.
fn checked_prefix(cx: &mut Ctx<'_>, p: &Spanned<String>, what: &str) -> Option<String> {
    let ok = p.value.starts_with('/')
        && !p.value.contains(['?', '#'])
        && http::uri::PathAndQuery::try_from(p.value.as_str()).is_ok();
    if ok {
        Some(p.value.clone())
    } else {
        cx.err(
            p,
            format!(
                "{what} `{}` must be a path starting with / (no query, no fragment, no spaces)",
                p.value
            ),
        );
        None
    }
}

fn respond(cx: &mut Ctx<'_>, f: &RawRespond) -> Option<Fixed> {
    let errors = cx.errors.len();
    let status = match &f.status {
        None => StatusCode::OK,
        Some(s) => match StatusCode::from_u16(s.value) {
            Ok(c) if (200..=599).contains(&s.value) && ![204, 304].contains(&s.value) => c,
            _ => {
                cx.err(
                    s,
                    format!(
                        "respond status {} cannot carry a page: use 200 to 599, but not 204 or 304",
                        s.value
                    ),
                );
                StatusCode::OK
            }
        },
    };
    let body = match (&f.body, &f.body_file) {
        (Some(b), None) => Bytes::from(b.value.clone()),
        (None, Some(p)) => match std::fs::read(cx.path(&p.value)) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                cx.err(
                    p,
                    format!(
                        "respond body_file `{}`: {e} (relative paths are from the config file's directory)",
                        cx.path(&p.value).display()
                    ),
                );
                Bytes::new()
            }
        },
        (None, None) => Bytes::new(),
        (Some(b), Some(_)) => {
            cx.err(b, "respond has both `body:` and `body_file:`: keep one");
            Bytes::new()
        }
    };
    if body.len() > MAX_FIXED_BODY {
        let at = f
            .body
            .as_ref()
            .or(f.body_file.as_ref())
            .map(Pos::of)
            .unwrap_or_default();
        cx.errors.push(ConfigError::at(
            cx.file,
            at,
            format!(
                "respond body is {} bytes, over the {MAX_FIXED_BODY} allowed (it is kept in memory and sent whole)",
                body.len()
            ),
        ));
    }
    let content_type = match &f.content_type {
        None => HeaderValue::from_static("text/plain; charset=utf-8"),
        Some(c) => match HeaderValue::from_str(&c.value) {
            Ok(v) if c.value.contains('/') => v,
            _ => {
                cx.err(
                    c,
                    format!(
                        "content_type `{}` is not a media type such as text/html",
                        c.value
                    ),
                );
                HeaderValue::from_static("text/plain")
            }
        },
    };
    (cx.errors.len() == errors).then_some(Fixed {
        status,
        content_type,
        body,
    })
}

fn edits(cx: &mut Ctx<'_>, raw: Option<&RawHeaderEdits>, what: &str) -> HeaderEdits {
    let Some(raw) = raw else {
        return HeaderEdits::default();
    };
    let name = |cx: &mut Ctx<'_>, n: &Spanned<String>| -> Option<HeaderName> {
        match HeaderName::from_bytes(n.value.as_bytes()) {
            Ok(h) => match rules::reserved(&h) {
                Some(why) => {
                    cx.err(n, format!("{what} may not change `{}`: {why}", n.value));
                    None
                }
                None => Some(h),
            },
            Err(_) => {
                cx.err(n, format!("{what}: `{}` is not a header name", n.value));
                None
            }
        }
    };
    let pairs = |cx: &mut Ctx<'_>,
                 m: Option<&HashMap<Spanned<String>, Spanned<String>>>|
     -> Vec<(HeaderName, HeaderValue)> {
        let mut m: Vec<_> = m.into_iter().flatten().collect();
        // In the file's order.
        m.sort_by_key(|(k, _)| (Pos::of(*k).line, Pos::of(*k).column));
        m.into_iter()
            .filter_map(|(k, v)| {
                let n = name(cx, k)?;
                match HeaderValue::from_str(&v.value) {
                    Ok(v) => Some((n, v)),
                    Err(_) => {
                        cx.err(
                            v,
                            format!(
                                "{what}: the value of `{}` has a character a header may not hold",
                                k.value
                            ),
                        );
                        None
                    }
                }
            })
            .collect()
    };
    let set = pairs(cx, raw.set.as_ref());
    let add = pairs(cx, raw.add.as_ref());
    let remove = raw
        .remove
        .iter()
        .flatten()
        .filter_map(|n| name(cx, n))
        .collect();
    HeaderEdits { remove, set, add }
}

fn rewrite(cx: &mut Ctx<'_>, r: &RawRoute, action: &Option<Action>) -> Option<String> {
    let p = r.rewrite_prefix.as_ref()?;
    if r.pool.is_none() {
        if action.is_some() {
            cx.err(
                p,
                "rewrite_prefix only applies to a route with a pool (a redirect has its own `prefix:`)",
            );
        }
        return None;
    }
    if p.value.is_empty() {
        return Some("/".into());
    }
    checked_prefix(cx, p, "rewrite_prefix")
}

fn hsts(cx: &mut Ctx<'_>, h: &RawHsts) -> HeaderValue {
    let max_age = cx.any_duration(&h.max_age, DEFAULT_HSTS_MAX_AGE, "hsts.max_age");
    let subdomains = h.include_subdomains.unwrap_or(false);
    if let Some(p) = h.preload.as_ref().filter(|p| p.value) {
        // What browsers' preload list requires (hstspreload.org).
        if max_age < DEFAULT_HSTS_MAX_AGE || !subdomains {
            cx.err(
                p,
                "hsts preload needs max_age of at least a year and include_subdomains: true",
            );
        }
    }
    rules::hsts_value(
        max_age.as_secs(),
        subdomains,
        h.preload.as_ref().is_some_and(|p| p.value),
    )
}

fn rate_limit(cx: &mut Ctx<'_>, l: &RawRateLimit) -> Option<RateLimit> {
    let errors = cx.errors.len();
    if l.requests.value == 0 {
        cx.err(&l.requests, "rate_limit.requests must be at least 1");
    }
    let per = cx.duration(&l.per, DEFAULT_RATE_PER, "rate_limit.per");
    let burst = match &l.burst {
        Some(b) if b.value == 0 => {
            cx.err(b, "rate_limit.burst must be at least 1");
            1
        }
        Some(b) => b.value,
        None => l.requests.value.max(1),
    };
    let key = match l.key.as_ref().map(|k| (k, k.value.as_str())) {
        None | Some((_, "client_ip")) => LimitKey::ClientIp,
        Some((k, v)) => match v
            .strip_prefix("header:")
            .and_then(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        {
            Some(n) => LimitKey::Header(n),
            None => {
                cx.err(
                    k,
                    format!("rate_limit.key `{v}`: write client_ip or header:NAME (e.g. header:X-Api-Key)"),
                );
                LimitKey::ClientIp
            }
        },
    };
    (cx.errors.len() == errors).then(|| RateLimit {
        rate: f64::from(l.requests.value) / per.as_secs_f64(),
        burst,
        key,
    })
}
