//! The admin API: JSON views of the running appliance and the one state change operators
//! make by hand — draining a backend.
//!
//! | request | answer |
//! |---|---|
//! | `GET /api/pools` | every pool: policy, and per backend its address, weight, health (up, ejected, behind, drained, available), requests in flight |
//! | `GET /api/agents` | the sync hub's fleet (schedule, every agent's releases, θ, ε, last flip lateness, conflicts); 404 without `sync:` |
//! | `POST /api/pools/{pool}/backends/{name}/drain` | no new requests and no DNS answers for it; in-flight requests finish |
//! | `POST /api/pools/{pool}/backends/{name}/enable` | back in rotation |
//! | `GET /api/config` | the YAML the running generation was loaded from (lockstep configs hold no secrets inline: tokens and keys are files, named by path) |
//!
//! Requests that change state are accepted from loopback addresses only (the admin listener
//! is on loopback by default; one bound elsewhere still refuses remote drains with 403). A
//! drain lasts until `enable`, across reloads, while the backend stays configured; it is not
//! persisted across restarts.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::live::Live;
use crate::sync::hub::Hub;

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
    method: &Method,
    path: &str,
    peer: SocketAddr,
) -> Option<ApiAnswer> {
    let rest = path.strip_prefix("/api/")?;
    let segments: Vec<&str> = rest.split('/').collect();
    Some(match (method, segments.as_slice()) {
        (&Method::GET, ["pools"]) => ApiAnswer::Json(StatusCode::OK, pools(live)),
        (&Method::GET, ["agents"]) => match hub {
            Some(h) => ApiAnswer::Json(
                StatusCode::OK,
                serde_json::to_value(h.fleet()).unwrap_or(Value::Null),
            ),
            None => err(
                StatusCode::NOT_FOUND,
                "this appliance runs no sync hub (no `sync:` section)",
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
            if !peer.ip().is_loopback() {
                return Some(err(
                    StatusCode::FORBIDDEN,
                    "state-changing admin requests are accepted from loopback only",
                ));
            }
            drain(live, pool, name, *action == "drain")
        }
        (_, ["pools"] | ["agents"] | ["config"] | ["pools", _, "backends", _, _]) => err(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}"),
        ),
        _ => err(
            StatusCode::NOT_FOUND,
            format!("no admin API path {path}: see /api/pools, /api/agents, /api/config"),
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
        let yaml = "listeners:\n  - { name: http, bind: \"127.0.0.1:0\" }\nroutes:\n  - { path_prefix: \"/\", pool: www }\npools:\n  - name: www\n    backends:\n      - { name: a, address: \"127.0.0.1:9\" }\n      - { name: b, address: \"127.0.0.1:10\" }\n";
        let config = crate::config::parse(std::path::Path::new("t.yaml"), yaml).unwrap();
        Live::build(Arc::new(config), None, 1, &crate::metrics::Metrics::new())
    }

    fn status(a: Option<ApiAnswer>) -> StatusCode {
        match a {
            Some(ApiAnswer::Json(s, _)) | Some(ApiAnswer::Text(s, _, _)) => s,
            None => panic!("not an API path"),
        }
    }

    #[test]
    fn drains_are_refused_from_remote_peers_and_honoured_from_loopback() {
        let live = live();
        let path = "/api/pools/www/backends/b/drain";
        let remote: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let local6: SocketAddr = "[::1]:5000".parse().unwrap();
        assert_eq!(
            status(route(&live, None, &Method::POST, path, remote)),
            StatusCode::FORBIDDEN
        );
        assert!(!live.table.pools[0].health.load().drained[1]);
        // Reading is fine from anywhere the listener is reachable.
        assert_eq!(
            status(route(&live, None, &Method::GET, "/api/pools", remote)),
            StatusCode::OK
        );
        assert_eq!(
            status(route(&live, None, &Method::POST, path, local6)),
            StatusCode::OK
        );
        assert!(live.table.pools[0].health.load().drained[1]);
        let v = pools(&live);
        assert_eq!(v["pools"][0]["backends"][1]["drained"], true);
        assert_eq!(v["pools"][0]["available"], 1);
        let enable = "/api/pools/www/backends/b/enable";
        assert_eq!(
            status(route(&live, None, &Method::POST, enable, local)),
            StatusCode::OK
        );
        assert!(!live.table.pools[0].health.load().drained[1]);
        assert!(route(&live, None, &Method::GET, "/metrics", local).is_none());
        let table = render_pools(&pools(&live));
        assert!(table.contains("www") && table.contains(" up\n"), "{table}");
    }
}
