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
//! | `GET /api/config` | the YAML the running generation was loaded from (lockstep configs hold no secrets inline: tokens and keys are files, named by path) |
//!
//! Requests that change state are accepted from loopback addresses, and from the networks in
//! `admin.allow_changes_from` (none by default): the admin listener is on loopback by default,
//! and one bound elsewhere still refuses other peers' drains with 403. A
//! drain lasts until `enable`, across reloads, while the backend stays configured; it is not
//! persisted across restarts.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::live::Live;
use crate::metrics::Metrics;
use crate::hub::Hub;
use crate::sync::protocol::Fleet;
use crate::publish::last_flip_skew;

/// An answer: status and JSON body (or YAML text for `/api/config`).
pub enum ApiAnswer {
    /// JSON.
    Json(StatusCode, Value),
    /// Plain text of a content type.
    Text(StatusCode, &'static str, String),
}

fn err(status: StatusCode, message: impl Into<String>) -> ApiAnswer {
    ApiAnswer::Json(status, json!({ "error": message.into() }))
}

/// Answers `method path` (under `/api/`) from `peer`, or `None` when the path is not the API's.
pub fn route(
    live: &Live,
    hub: Option<&Hub>,
    metrics: &Metrics,
    method: &Method,
    path: &str,
    peer: SocketAddr,
) -> Option<ApiAnswer> {
    let rest = path.strip_prefix("/api/")?;
    let segments: Vec<&str> = rest.split('/').collect();
    Some(match (method, segments.as_slice()) {
        (&Method::GET, ["pools"]) => ApiAnswer::Json(StatusCode::OK, pools(live)),
        (&Method::GET, ["agents"]) => match hub {
            Some(h) => ApiAnswer::Json(StatusCode::OK, agents(&h.fleet())),
            None => err(
                StatusCode::NOT_FOUND,
                "this appliance runs no sync hub (no `sync:` section)",
            ),
        },
        (&Method::GET, ["dns"]) => match live.config.dns {
            Some(_) => ApiAnswer::Json(StatusCode::OK, dns(&metrics.render())),
            None => err(
                StatusCode::NOT_FOUND,
                "this appliance answers no DNS (no `dns:` section)",
            ),
        },
        (&Method::GET, ["config"]) => ApiAnswer::Text(
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
            drain(live, pool, name, *action == "drain")
        }
        (_, ["pools"] | ["agents"] | ["dns"] | ["config"] | ["pools", _, "backends", _, _]) => err(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}"),
        ),
        _ => err(
            StatusCode::NOT_FOUND,
            format!("no admin API path {path}: see /api/pools, /api/agents, /api/dns, /api/config"),
        ),
    })
}

/// `GET /api/pools`.
pub fn pools(live: &Live) -> Value {
    let now = Instant::now();
    let pools: Vec<Value> = live
        .table
        .pools
        .iter()
        .map(|p| {
            let h = p.health.load();
            let backends: Vec<Value> = p
                .backends
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let ejected = h
                        .ejected_until
                        .get(i)
                        .copied()
                        .flatten()
                        .is_some_and(|until| now < until);
                    json!({
                        "name": b.config.name,
                        "address": b.config.address.to_string(),
                        "weight": b.config.weight,
                        "up": h.up.get(i).copied().unwrap_or(false),
                        "ejected": ejected,
                        "behind": h.behind.get(i).copied().unwrap_or(false),
                        "drained": h.drained.get(i).copied().unwrap_or(false),
                        "available": h.available(i, now),
                        "in_flight": b.in_flight.load(Ordering::Relaxed),
                    })
                })
                .collect();
            json!({
                "name": p.config.name,
                "policy": format!("{:?}", p.config.policy),
                "available": h.available_count(now),
                "backends": backends,
            })
        })
        .collect();
    json!({ "generation": live.table.generation, "pools": pools })
}

/// `/api/pools` as the table `lockstep status --admin` prints.
pub fn render_pools(v: &Value) -> String {
    let mut out = format!(
        "{:<12} {:<16} {:<22} {:>6} {:>9}  {}\n",
        "POOL", "BACKEND", "ADDRESS", "WEIGHT", "IN FLIGHT", "STATE"
    );
    for p in v["pools"].as_array().into_iter().flatten() {
        for b in p["backends"].as_array().into_iter().flatten() {
            let flag = |k: &str| b[k].as_bool().unwrap_or(false);
            let state = if flag("drained") {
                "drained"
            } else if !flag("up") {
                "DOWN"
            } else if flag("ejected") {
                "ejected"
            } else if flag("behind") {
                "behind"
            } else {
                "up"
            };
            out.push_str(&format!(
                "{:<12} {:<16} {:<22} {:>6} {:>9}  {}\n",
                p["name"].as_str().unwrap_or("?"),
                b["name"].as_str().unwrap_or("?"),
                b["address"].as_str().unwrap_or("?"),
                b["weight"].as_u64().unwrap_or(0),
                b["in_flight"].as_u64().unwrap_or(0),
                state
            ));
        }
    }
    out
}

/// `GET /api/agents`: the fleet as the sync API gives it, plus `last_flip_skew` (the rule of
/// `lockstep status`) when agents have reported a flip to the active release.
pub fn agents(f: &Fleet) -> Value {
    let mut v = serde_json::to_value(f).unwrap_or(Value::Null);
    if let (Some(o), Some((release, n, spread, lo, hi))) = (v.as_object_mut(), last_flip_skew(f)) {
        o.insert(
            "last_flip_skew".into(),
            json!({
                "release": release,
                "agents": n,
                "spread_us": spread,
                "min_us": lo,
                "max_us": hi,
            }),
        );
    }
    v
}

/// `GET /api/dns` from the metrics text: `lockstep_dns_queries_total{qtype,rcode}` and
/// `lockstep_dns_fail_open_answers_total{pool}`. (prometheus-client's families cannot be
/// listed, so the rendered text is the one place every label set appears.)
pub fn dns(metrics_text: &str) -> Value {
    let mut queries = Vec::new();
    let mut fail_open = Vec::new();
    let mut total = 0u64;
    for s in metrics_text.lines().filter_map(Series::parse) {
        match s.name {
            "lockstep_dns_queries_total" => {
                total += s.value;
                queries.push(json!({
                    "qtype": s.label("qtype"),
                    "rcode": s.label("rcode"),
                    "count": s.value,
                }));
            }
            "lockstep_dns_fail_open_answers_total" => {
                fail_open.push(json!({ "pool": s.label("pool"), "count": s.value }));
            }
            _ => {}
        }
    }
    json!({ "total": total, "queries": queries, "fail_open": fail_open })
}

/// One labelled counter line of the text format: `name{k="v",...} 12`.
struct Series<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
    value: u64,
}

impl<'a> Series<'a> {
    /// `None` for lines without labels (comments, `# EOF`) and anything malformed.
    fn parse(line: &'a str) -> Option<Series<'a>> {
        let (name, mut rest) = line.split_once('{')?;
        let mut labels = Vec::new();
        loop {
            if let Some(tail) = rest.strip_prefix('}') {
                let value: f64 = tail.trim().split(' ').next()?.parse().ok()?;
                return Some(Series {
                    name,
                    labels,
                    value: value as u64,
                });
            }
            let (key, after) = rest.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (_, '\\') => value.push(match chars.next()?.1 {
                        'n' => '\n',
                        c => c,
                    }),
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            labels.push((key, value));
            rest = after[end + 1..].trim_start_matches(',');
        }
    }

    fn label(&self, key: &str) -> &str {
        self.labels
            .iter()
            .find(|(k, _)| *k == key)
            .map_or("", |(_, v)| v.as_str())
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
            ApiAnswer::Json(
                StatusCode::OK,
                json!({ "pool": pool, "backend": name, "drained": d }),
            )
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

    fn metrics() -> Metrics {
        Metrics::new()
    }

    fn status(a: Option<ApiAnswer>) -> StatusCode {
        match a {
            Some(ApiAnswer::Json(s, _)) | Some(ApiAnswer::Text(s, _, _)) => s,
            None => panic!("not an API path"),
        }
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
                status(route(&live, None, &m, &Method::POST, path, peer)),
                want,
                "{peer}"
            );
        }
    }

    #[test]
    fn drains_are_refused_from_remote_peers_and_honoured_from_loopback() {
        let (live, m) = (live(), metrics());
        let path = "/api/pools/www/backends/b/drain";
        let remote: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let local6: SocketAddr = "[::1]:5000".parse().unwrap();
        assert_eq!(
            status(route(&live, None, &m, &Method::POST, path, remote)),
            StatusCode::FORBIDDEN
        );
        assert!(!live.table.pools[0].health.load().drained[1]);
        // Reading is fine from anywhere the listener is reachable.
        assert_eq!(
            status(route(&live, None, &m, &Method::GET, "/api/pools", remote)),
            StatusCode::OK
        );
        assert_eq!(
            status(route(&live, None, &m, &Method::POST, path, local6)),
            StatusCode::OK
        );
        assert!(live.table.pools[0].health.load().drained[1]);
        let v = pools(&live);
        assert_eq!(v["pools"][0]["backends"][1]["drained"], true);
        assert_eq!(v["pools"][0]["available"], 1);
        let enable = "/api/pools/www/backends/b/enable";
        assert_eq!(
            status(route(&live, None, &m, &Method::POST, enable, local)),
            StatusCode::OK
        );
        assert!(!live.table.pools[0].health.load().drained[1]);
        assert!(route(&live, None, &m, &Method::GET, "/metrics", local).is_none());
        let table = render_pools(&pools(&live));
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
        let v = dns(&m.render());
        assert_eq!(v["total"], 10, "{v}");
        let mut queries: Vec<(String, String, u64)> = v["queries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| {
                (
                    q["qtype"].as_str().unwrap().to_owned(),
                    q["rcode"].as_str().unwrap().to_owned(),
                    q["count"].as_u64().unwrap(),
                )
            })
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
        assert_eq!(v["fail_open"], json!([{ "pool": "www", "count": 3 }]));
        // Other series, comments and escapes do not confuse the reader.
        let v = dns("# HELP lockstep_dns_queries {x}\nlockstep_http_requests_total{pool=\"a\"} 4\nlockstep_dns_fail_open_answers_total{pool=\"a\\\"b,c\"} 1\n# EOF\n");
        assert_eq!(
            v,
            json!({ "total": 0, "queries": [], "fail_open": [{ "pool": "a\"b,c", "count": 1 }] })
        );

        // Without `dns:` the page hides the section: 404.
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert_eq!(
            status(route(&live(), None, &m, &Method::GET, "/api/dns", local)),
            StatusCode::NOT_FOUND
        );
        let yaml = "pools:\n  - name: www\n    backends:\n      - { name: a, address: \"127.0.0.1:9\" }\ndns:\n  bind: \"127.0.0.1:0\"\n  zones:\n    - name: farm.test\n      nameservers: [ns.provider.example]\n      records:\n        - { name: www, pool: www }\n";
        let config = crate::config::parse(std::path::Path::new("t.yaml"), yaml).unwrap();
        let with_dns = Live::build(Arc::new(config), None, 1, &m);
        match route(&with_dns, None, &m, &Method::GET, "/api/dns", local) {
            Some(ApiAnswer::Json(StatusCode::OK, v)) => assert_eq!(v["total"], 10, "{v}"),
            _ => panic!("/api/dns did not answer 200 with `dns:`"),
        }
    }

    #[test]
    fn agents_carry_the_last_flips_skew() {
        let (mut fleet, _, r2) = crate::publish::sample_fleet();
        let v = agents(&fleet);
        assert_eq!(
            v["last_flip_skew"],
            json!({ "release": r2, "agents": 2, "spread_us": 150, "min_us": -30, "max_us": 120 })
        );
        // Still the fleet the sync API gives.
        assert_eq!(serde_json::from_value::<Fleet>(v).unwrap(), fleet);
        // No flip to the active release reported: no skew.
        fleet.schedule.active = None;
        assert!(agents(&fleet).get("last_flip_skew").is_none());
    }
}
