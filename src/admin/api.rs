//! The admin API: JSON views of the running appliance and the one state change operators
//! make by hand — draining a backend.
//!
//! | request | answer |
//! |---|---|
//! | `GET /api/pools` | every pool: policy, and per backend its address, weight, health (up, ejected, behind, drained, available), requests in flight |
//! | `GET /api/agents` | the sync hub's fleet (schedule, every agent's releases, θ, ε, last flip lateness, conflicts) and the last flip's skew; 404 without `sync:` |
//! | `GET /api/dns` | DNS queries answered by type and response code, and fail-open answers by pool, read from the metrics; 404 without `dns:` |
//! | `POST /api/pools/{pool}/backends/{name}/drain` | no new requests and no DNS answers for it; in-flight requests finish |
//! | `POST /api/pools/{pool}/backends/{name}/enable` | back in rotation |
//! | `GET /api/history` | the last 15 minutes ([`super::history`]): per pool and backend requests per second, 5xx share, p50/p99 latency; DNS answers per second; rate-limit refusals; queue depth; the last 50 flips' skew |
//! | `GET /api/certificates` | every TLS listener's certificates: names, notAfter, ACME status |
//! | `GET /api/config` | the YAML the running generation was loaded from (lockstep configs hold no secrets inline: tokens and keys are files, named by path) |
//!
//! Requests that change state are accepted from loopback addresses, and from the networks in
//! `admin.allow_changes_from` (none by default): the admin listener is on loopback by default,
//! and one bound elsewhere still refuses other peers' drains with 403. They must also be ones a
//! browser cannot send cross-site: `Content-Type: application/json` and an
//! `X-Lockstep-Admin` header (a page elsewhere can send neither without a CORS preflight,
//! which this API never grants), so a page the operator opens behind an `ssh -L` tunnel
//! cannot drain the farm. Every `/api/` request (and `/status`) must name an IP address,
//! `localhost` or one of `admin.hosts` in its `Host`, so DNS rebinding reads nothing. A
//! drain lasts until `enable`, across reloads, while the backend stays configured; it is not
//! persisted across restarts.
#![allow(clippy::disallowed_methods)] // I/O shell: reads the clock once per view: health snapshots are judged as of now

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;

use super::view::{
    AcmeView, AgentsView, BackendView, CertView, DnsView, DrainReply, PoolView, PoolsView,
};
use crate::hub::fleet::last_flip_skew;
use crate::hub::Hub;
use crate::live::Live;
use crate::metrics::Metrics;
use crate::net::respond;
use crate::sync::protocol::{Fleet, SharedDrain};

/// An answer of the API.
pub type ApiAnswer = Response<Full<Bytes>>;

fn err(status: StatusCode, message: impl Into<String>) -> ApiAnswer {
    respond::error(status, message)
}

fn ok<T: serde::Serialize>(value: &T) -> ApiAnswer {
    respond::json(StatusCode::OK, value)
}

/// The header a state-changing request must carry (with a JSON content type).
pub const ADMIN_HEADER: &str = "x-lockstep-admin";

/// Why a state-changing request could have been forged by a page in the operator's browser,
/// or `None` when it could not (pure).
pub fn forgeable(headers: &http::HeaderMap) -> Option<&'static str> {
    let json = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Some("state-changing admin requests must be sent with `Content-Type: application/json` and an `X-Lockstep-Admin: 1` header (a browser page elsewhere can send neither)");
    }
    if !headers.contains_key(ADMIN_HEADER) {
        return Some("state-changing admin requests must carry an `X-Lockstep-Admin: 1` header (a browser page elsewhere cannot send it)");
    }
    None
}

/// Answers `method path` (under `/api/`) from `peer`, or `None` when the path is not the API's.
#[allow(clippy::too_many_arguments)] // the request's parts and the four sources it reads
pub fn route(
    live: &Live,
    hub: Option<&Hub>,
    history: &super::history::History,
    metrics: &Metrics,
    method: &Method,
    path: &str,
    headers: &http::HeaderMap,
    peer: SocketAddr,
) -> Option<ApiAnswer> {
    let rest = path.strip_prefix("/api/")?;
    let segments: Vec<&str> = rest.split('/').collect();
    Some(match (method, segments.as_slice()) {
        (&Method::GET, ["pools"]) => ok(&pools(live)),
        (&Method::GET, ["certificates"]) => ok(&certificates(live)),
        (&Method::GET, ["history"]) => ok(history.lock().unwrap_or_else(|p| p.into_inner()).view()),
        (&Method::GET, ["agents"]) => match hub {
            Some(h) => ok(&agents(h.fleet())),
            None => err(
                StatusCode::NOT_FOUND,
                "this appliance runs no sync hub (no `sync:` section)",
            ),
        },
        (&Method::GET, ["dns"]) => match live.config.dns {
            Some(_) => ok(&DnsView::from_metrics(&metrics.render())),
            None => err(
                StatusCode::NOT_FOUND,
                "this appliance answers no DNS (no `dns:` section)",
            ),
        },
        (&Method::GET, ["config"]) => respond::bytes(
            StatusCode::OK,
            "application/yaml; charset=utf-8",
            format!(
                "# {} — generation {}\n{}",
                live.config.file.display(),
                live.table.generation,
                live.config.source
            ),
        ),
        (&Method::POST, ["pools", pool, "backends", name, action @ ("drain" | "enable")]) => {
            if !live.config.admin.may_change_state(peer.ip()) {
                return Some(err(
                    StatusCode::FORBIDDEN,
                    format!(
                        "state-changing admin requests are accepted from loopback and admin.allow_changes_from only, not from {}",
                        peer.ip()
                    ),
                ));
            }
            if let Some(why) = forgeable(headers) {
                return Some(err(StatusCode::FORBIDDEN, why));
            }
            let auth = headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if !live.config.admin.credential_ok(peer.ip(), auth) {
                return Some(respond::unauthorized(
                    "lockstep-admin",
                    "state-changing admin requests from other hosts need `Authorization: Bearer` with admin.token_file's token",
                ));
            }
            let answer = drain(live, pool, name, *action == "drain");
            if let (Some(hub), true) = (hub, answer.status().is_success()) {
                hub.share_drain(SharedDrain {
                    pool: pool.to_string(),
                    backend: name.to_string(),
                    drained: *action == "drain",
                });
            }
            answer
        }
        (
            _,
            ["pools"]
            | ["agents"]
            | ["dns"]
            | ["config"]
            | ["history"]
            | ["certificates"]
            | ["pools", _, "backends", _, _],
        ) => err(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}"),
        ),
        _ => err(
            StatusCode::NOT_FOUND,
            format!("no admin API path {path}: see /api/pools, /api/agents, /api/dns, /api/config"),
        ),
    })
}

/// `GET /api/certificates`: every TLS listener's certificates and when they expire.
pub fn certificates(live: &Live) -> Vec<CertView> {
    let acme_view = |listener: &str| {
        let s = live.acme.status(listener);
        AcmeView {
            error: s.as_ref().and_then(|s| s.error.clone()),
            next_order: s.map(|s| s.next_order),
        }
    };
    let mut out: Vec<CertView> = live
        .certificates()
        .into_iter()
        .map(|(listener, certificate, c)| {
            // The ordered certificate of an ACME listener says how ordering goes.
            let ordered = live
                .acme
                .certificate(&listener)
                .is_some_and(|o| std::sync::Arc::ptr_eq(&o, &c));
            CertView {
                acme: ordered.then(|| acme_view(&listener)),
                listener,
                certificate,
                names: c.names.clone(),
                not_after: c.not_after,
            }
        })
        .collect();
    // An ACME listener without its certificate yet: its names, and why not.
    for l in &live.config.listeners {
        if let Some(a) = l
            .acme
            .as_ref()
            .filter(|_| live.acme.certificate(&l.name).is_none())
        {
            out.push(CertView {
                listener: l.name.clone(),
                certificate: "ACME: not issued yet".into(),
                names: a.names.clone(),
                not_after: None,
                acme: Some(acme_view(&l.name)),
            });
        }
    }
    out
}

/// `GET /api/pools`.
pub fn pools(live: &Live) -> PoolsView {
    let now = Instant::now();
    let pools = live
        .table
        .pools
        .iter()
        .map(|p| {
            let h = p.health.load();
            let flag = |v: &[bool], i: usize| v.get(i).copied().unwrap_or(false);
            let backends = p
                .backends
                .iter()
                .enumerate()
                .map(|(i, b)| BackendView {
                    name: b.config.name.clone(),
                    address: b.config.address.to_string(),
                    weight: b.config.weight,
                    up: flag(&h.up, i),
                    ejected: h
                        .ejected_until
                        .get(i)
                        .copied()
                        .flatten()
                        .is_some_and(|until| now < until),
                    behind: flag(&h.behind, i),
                    drained: flag(&h.drained, i),
                    available: h.available(i, now),
                    in_flight: b.in_flight.load(Ordering::Relaxed),
                })
                .collect();
            PoolView {
                name: p.config.name.clone(),
                policy: format!("{:?}", p.config.policy),
                available: h.available_count(now),
                backends,
            }
        })
        .collect();
    PoolsView {
        generation: live.table.generation,
        pools,
    }
}

/// `GET /api/agents`: the fleet as the sync API gives it, plus `last_flip_skew` (the rule of
/// `lockstep status`) when agents have reported a flip to the active release.
pub fn agents(fleet: Fleet) -> AgentsView {
    AgentsView {
        last_flip_skew: last_flip_skew(&fleet),
        fleet,
    }
}

fn drain(live: &Live, pool: &str, name: &str, drained: bool) -> ApiAnswer {
    let Some(p) = live.table.pools.iter().find(|p| p.config.name == pool) else {
        return err(StatusCode::NOT_FOUND, format!("no pool `{pool}`"));
    };
    match p.set_drained(name, drained) {
        Some(d) => {
            tracing::info!(
                pool,
                backend = name,
                drained = d,
                "backend drain changed by the admin API"
            );
            ok(&DrainReply {
                pool: pool.to_owned(),
                backend: name.to_owned(),
                drained: d,
            })
        }
        None => err(
            StatusCode::NOT_FOUND,
            format!("pool `{pool}` has no backend `{name}`"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    fn live() -> Live {
        live_with("")
    }

    /// A live table whose config ends with `extra` (e.g. an `admin:` section).
    fn live_with(extra: &str) -> Live {
        let yaml = "listeners:\n  - { name: http, bind: \"127.0.0.1:0\" }\nroutes:\n  - { path_prefix: \"/\", pool: www }\npools:\n  - name: www\n    backends:\n      - { name: a, address: \"127.0.0.1:9\" }\n      - { name: b, address: \"127.0.0.1:10\" }\n";
        let yaml = format!("{yaml}{extra}");
        let config = crate::config::parse(std::path::Path::new("t.yaml"), &yaml).unwrap();
        Live::build(Arc::new(config), None, 1, &crate::metrics::Metrics::new())
    }

    fn history() -> crate::admin::history::History {
        Default::default()
    }

    fn metrics() -> Metrics {
        Metrics::new()
    }

    /// What lockstep's own clients send with a state change.
    fn json_headers() -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            "application/json".parse().unwrap(),
        );
        h.insert(ADMIN_HEADER, "1".parse().unwrap());
        h
    }

    #[test]
    fn a_state_change_a_browser_could_forge_cross_site_is_refused() {
        let (live, m) = (live(), metrics());
        let path = "/api/pools/www/backends/b/drain";
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let form = |ctype: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, ctype.parse().unwrap());
            h
        };
        // What an HTML form can send, and JSON without the header (fetch with no-cors).
        for h in [
            http::HeaderMap::new(),
            form("application/x-www-form-urlencoded"),
            form("multipart/form-data; boundary=x"),
            form("text/plain"),
            form("application/json"),
        ] {
            assert_eq!(
                status(route(
                    &live,
                    None,
                    &history(),
                    &m,
                    &Method::POST,
                    path,
                    &h,
                    local
                )),
                StatusCode::FORBIDDEN,
                "{h:?}"
            );
            assert!(
                !live.table.pools[0].health.load().drained[1],
                "{h:?} drained"
            );
        }
        let mut h = form("application/json; charset=utf-8");
        h.insert(ADMIN_HEADER, "1".parse().unwrap());
        assert_eq!(
            status(route(
                &live,
                None,
                &history(),
                &m,
                &Method::POST,
                path,
                &h,
                local
            )),
            StatusCode::OK
        );
        assert!(live.table.pools[0].health.load().drained[1]);
    }

    fn status(a: Option<ApiAnswer>) -> StatusCode {
        a.expect("an API path").status()
    }

    #[test]
    fn allow_changes_from_admits_those_networks_and_no_others() {
        let live = live_with("admin:\n  allow_changes_from: [\"10.1.0.0/16\", \"192.0.2.7\"]\n");
        let m = metrics();
        let path = "/api/pools/www/backends/a/drain";
        for (peer, want) in [
            ("10.1.2.3:5000", StatusCode::OK),
            ("192.0.2.7:5000", StatusCode::OK),
            ("[::ffff:10.1.9.9]:5000", StatusCode::OK), // a v4 peer on a dual-stack socket
            ("10.2.0.1:5000", StatusCode::FORBIDDEN),
            ("192.0.2.8:5000", StatusCode::FORBIDDEN),
            ("[2001:db8::1]:5000", StatusCode::FORBIDDEN),
            ("127.0.0.1:5000", StatusCode::OK),
        ] {
            let peer: SocketAddr = peer.parse().unwrap();
            assert_eq!(
                status(route(
                    &live,
                    None,
                    &history(),
                    &m,
                    &Method::POST,
                    path,
                    &json_headers(),
                    peer
                )),
                want,
                "{peer}"
            );
        }
    }

    #[test]
    fn with_a_token_file_other_hosts_need_the_token_too() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("admin.token");
        std::fs::write(&token, "s3cret\n").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let live = live_with(&format!(
            "admin:\n  allow_changes_from: [\"10.1.0.0/16\"]\n  token_file: {}\n",
            token.display()
        ));
        assert!(!format!("{:?}", live.config.admin).contains("s3cret"));
        let m = metrics();
        let path = "/api/pools/www/backends/a/drain";
        let remote: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let with = |auth: Option<&str>| {
            let mut h = json_headers();
            if let Some(a) = auth {
                h.insert(http::header::AUTHORIZATION, a.parse().unwrap());
            }
            h
        };
        for (auth, want) in [
            (None, StatusCode::UNAUTHORIZED),
            (Some("Bearer wrong"), StatusCode::UNAUTHORIZED),
            (Some("Bearer s3cret"), StatusCode::OK),
        ] {
            let h = with(auth);
            assert_eq!(
                status(route(
                    &live,
                    None,
                    &history(),
                    &m,
                    &Method::POST,
                    path,
                    &h,
                    remote
                )),
                want,
                "{auth:?}"
            );
        }
        // Loopback needs no token; a network outside allow_changes_from is refused even with it.
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let h = json_headers();
        assert_eq!(
            status(route(
                &live,
                None,
                &history(),
                &m,
                &Method::POST,
                path,
                &h,
                local
            )),
            StatusCode::OK
        );
        let outside: SocketAddr = "10.2.0.1:5000".parse().unwrap();
        let h = with(Some("Bearer s3cret"));
        assert_eq!(
            status(route(
                &live,
                None,
                &history(),
                &m,
                &Method::POST,
                path,
                &h,
                outside
            )),
            StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn drains_are_refused_from_remote_peers_and_honoured_from_loopback() {
        let (live, m) = (live(), metrics());
        let path = "/api/pools/www/backends/b/drain";
        let remote: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let local6: SocketAddr = "[::1]:5000".parse().unwrap();
        assert_eq!(
            status(route(
                &live,
                None,
                &history(),
                &m,
                &Method::POST,
                path,
                &json_headers(),
                remote
            )),
            StatusCode::FORBIDDEN
        );
        assert!(!live.table.pools[0].health.load().drained[1]);
        // Reading is fine from anywhere the listener is reachable.
        assert_eq!(
            status(route(
                &live,
                None,
                &history(),
                &m,
                &Method::GET,
                "/api/pools",
                &json_headers(),
                remote
            )),
            StatusCode::OK
        );
        assert_eq!(
            status(route(
                &live,
                None,
                &history(),
                &m,
                &Method::POST,
                path,
                &json_headers(),
                local6
            )),
            StatusCode::OK
        );
        assert!(live.table.pools[0].health.load().drained[1]);
        let v = pools(&live);
        assert!(v.pools[0].backends[1].drained);
        assert_eq!(v.pools[0].available, 1);
        let enable = "/api/pools/www/backends/b/enable";
        assert_eq!(
            status(route(
                &live,
                None,
                &history(),
                &m,
                &Method::POST,
                enable,
                &json_headers(),
                local
            )),
            StatusCode::OK
        );
        assert!(!live.table.pools[0].health.load().drained[1]);
        assert!(route(
            &live,
            None,
            &history(),
            &m,
            &Method::GET,
            "/metrics",
            &json_headers(),
            local
        )
        .is_none());
        let table = crate::publish::render_pools(&pools(&live));
        assert!(table.contains("www") && table.contains(" up\n"), "{table}");
    }

    #[test]
    fn dns_counts_come_from_the_dns_metrics_and_need_a_dns_section() {
        let m = metrics();
        let d = crate::dns::DnsMetrics::register(&m);
        let q = |qtype, rcode| crate::dns::metrics::QueryLabels { qtype, rcode };
        d.queries.get_or_create(&q("A", "NOERROR")).inc_by(7);
        d.queries.get_or_create(&q("AAAA", "NOERROR")).inc();
        d.queries.get_or_create(&q("A", "NXDOMAIN")).inc_by(2);
        d.fail_open
            .get_or_create(&crate::dns::metrics::NameLabels { pool: "www".into() })
            .inc_by(3);
        let v = DnsView::from_metrics(&m.render());
        assert_eq!(v.total, 10, "{v:?}");
        let mut queries: Vec<(String, String, u64)> = v
            .queries
            .iter()
            .map(|q| (q.qtype.clone(), q.rcode.clone(), q.count))
            .collect();
        queries.sort();
        assert_eq!(
            queries,
            [
                ("A".into(), "NOERROR".into(), 7),
                ("A".into(), "NXDOMAIN".into(), 2),
                ("AAAA".into(), "NOERROR".into(), 1)
            ]
        );
        assert_eq!(
            serde_json::to_value(&v.fail_open).unwrap(),
            json!([{ "pool": "www", "count": 3 }])
        );
        // Other series, comments and escapes do not confuse the reader.
        let v = DnsView::from_metrics("# HELP lockstep_dns_queries {x}\nlockstep_http_requests_total{pool=\"a\"} 4\nlockstep_dns_fail_open_answers_total{pool=\"a\\\"b,c\"} 1\n# EOF\n");
        assert_eq!(
            serde_json::to_value(&v).unwrap(),
            json!({ "total": 0, "queries": [], "fail_open": [{ "pool": "a\"b,c", "count": 1 }] })
        );

        // Without `dns:` the page hides the section: 404.
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert_eq!(
            status(route(
                &live(),
                None,
                &history(),
                &m,
                &Method::GET,
                "/api/dns",
                &json_headers(),
                local
            )),
            StatusCode::NOT_FOUND
        );
        let yaml = "pools:\n  - name: www\n    backends:\n      - { name: a, address: \"127.0.0.1:9\" }\ndns:\n  bind: \"127.0.0.1:0\"\n  zones:\n    - name: farm.test\n      nameservers: [ns.provider.example]\n      records:\n        - { name: www, pool: www }\n";
        let config = crate::config::parse(std::path::Path::new("t.yaml"), yaml).unwrap();
        let with_dns = Live::build(Arc::new(config), None, 1, &m);
        let a = route(
            &with_dns,
            None,
            &history(),
            &m,
            &Method::GET,
            "/api/dns",
            &json_headers(),
            local,
        )
        .expect("an API path");
        assert_eq!(a.status(), StatusCode::OK, "/api/dns answers with `dns:`");
    }

    #[test]
    fn agents_carry_the_last_flips_skew() {
        let (mut fleet, _, r2) = crate::hub::fleet::sample_fleet();
        let v = serde_json::to_value(agents(fleet.clone())).unwrap();
        assert_eq!(
            v["last_flip_skew"],
            json!({ "release": r2, "agents": 2, "spread_us": 150, "min_us": -30, "max_us": 120 })
        );
        // Still the fleet the sync API gives, and read back whole by clients.
        assert_eq!(serde_json::from_value::<Fleet>(v.clone()).unwrap(), fleet);
        assert_eq!(
            serde_json::from_value::<AgentsView>(v).unwrap(),
            agents(fleet.clone())
        );
        // No flip to the active release reported: no skew.
        fleet.schedule.active = None;
        let v = serde_json::to_value(agents(fleet)).unwrap();
        assert!(v.get("last_flip_skew").is_none());
    }
}
