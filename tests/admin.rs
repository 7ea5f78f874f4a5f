//! The admin API on a real appliance: `/api/pools` reflects health and drains,
//! `POST …/drain` takes a backend out of the proxy's rotation (and `…/enable` puts it back),
//! `/api/config` is the running YAML, `/api/agents` the sync hub's fleet.

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};

/// A state change as lockstep's own clients send it (JSON, `X-Lockstep-Admin`).
async fn post(client: &HttpClient, admin: std::net::SocketAddr, path: &str) -> (u16, String) {
    send(
        client,
        admin,
        path,
        &[
            ("content-type", "application/json"),
            ("x-lockstep-admin", "1"),
        ],
    )
    .await
}

/// POST `path` with exactly `headers`.
async fn send(
    client: &HttpClient,
    admin: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut req = Request::post(format!("http://{admin}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from_static(b"pool=www")))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn json(client: &HttpClient, admin: std::net::SocketAddr, path: &str) -> serde_json::Value {
    let r = get(client, admin, path).await;
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

#[tokio::test]
async fn a_drained_backend_leaves_the_rotation_until_enabled() {
    let webs = DemoBackend::start_n(3).await;
    let yaml = farm_yaml(&backends_yaml(&webs), "");
    let mut app = start(&yaml).await;
    let (client, proxy) = (h1_client(), proxy_addr(&app));
    let admin = app.admin_addr().unwrap();

    let pools = json(&client, admin, "/api/pools").await;
    let www = &pools["pools"][0];
    assert_eq!(www["name"], "www");
    assert_eq!(www["available"], 3);
    assert_eq!(www["backends"][1]["name"], webs[1].name);
    assert_eq!(www["backends"][1]["drained"], false);
    assert_eq!(www["backends"][1]["up"], true);

    let web2 = webs[1].name.clone();
    let (status, body) = post(
        &client,
        admin,
        &format!("/api/pools/www/backends/{web2}/drain"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let counts: BTreeMap<String, usize> = tally(&client, proxy, 30).await;
    assert_eq!(counts.get(&web2), None, "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 30);
    let pools = json(&client, admin, "/api/pools").await;
    assert_eq!(pools["pools"][0]["backends"][1]["drained"], true);
    assert_eq!(pools["pools"][0]["backends"][1]["available"], false);
    assert_eq!(pools["pools"][0]["available"], 2);

    // A reload keeps the drain.
    app.reload(config(&yaml)).unwrap();
    assert_eq!(tally(&client, proxy, 12).await.get(&web2), None);

    let (status, _) = post(
        &client,
        admin,
        &format!("/api/pools/www/backends/{web2}/enable"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(tally(&client, proxy, 30).await.get(&web2), Some(&10));

    // Unknown names, wrong methods.
    assert_eq!(
        post(&client, admin, "/api/pools/nope/backends/x/drain")
            .await
            .0,
        404
    );
    assert_eq!(
        post(&client, admin, "/api/pools/www/backends/nope/drain")
            .await
            .0,
        404
    );
    assert_eq!(post(&client, admin, "/api/pools").await.0, 405);
    assert_eq!(
        get(&client, admin, "/api/pools/www/backends/x/drain")
            .await
            .status,
        405
    );
    assert_eq!(
        get(&client, admin, "/api/agents").await.status,
        404,
        "no sync hub here"
    );

    let cfg = get(&client, admin, "/api/config").await;
    assert_eq!(cfg.status, 200);
    assert!(
        cfg.body.contains("pools:") && cfg.body.contains(&web2),
        "{}",
        cfg.body
    );
}

/// A page the operator opens in the browser that reaches the admin listener (an `ssh -L`
/// tunnel to it, or a management network) can neither drain backends with a form or a simple
/// fetch, nor read the API through a DNS name it controls (rebinding).
#[tokio::test]
async fn a_cross_site_form_and_a_rebinding_host_are_refused() {
    let webs = DemoBackend::start_n(2).await;
    let app = start(&farm_yaml(&backends_yaml(&webs), "")).await;
    let client = h1_client();
    let admin = app.admin_addr().unwrap();
    let web2 = webs[1].name.clone();
    let drain = format!("/api/pools/www/backends/{web2}/drain");

    // What a cross-site HTML form (or a no-cors fetch) can send.
    for ctype in [
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/plain",
    ] {
        let (status, body) = send(&client, admin, &drain, &[("content-type", ctype)]).await;
        assert_eq!(status, 403, "{ctype}: {body}");
        assert!(
            body.contains("X-Lockstep-Admin"),
            "the refusal says what is missing: {body}"
        );
    }
    let (status, _) = send(
        &client,
        admin,
        &drain,
        &[("content-type", "application/json")],
    )
    .await;
    assert_eq!(status, 403, "JSON without the header");
    let pools = json(&client, admin, "/api/pools").await;
    assert_eq!(
        pools["pools"][0]["backends"][1]["drained"], false,
        "nothing was drained"
    );

    // DNS rebinding: the browser sends the attacker's name as Host.
    for path in ["/api/config", "/api/pools", "/status"] {
        let r = get_with(&client, admin, path, &[("host", "rebind.attacker.example")])
            .await
            .unwrap();
        assert_eq!(r.status, 403, "{path}: {}", r.body);
        assert!(!r.body.contains("pools:"), "{path} leaked the config");
        assert!(
            r.body.contains("admin.hosts"),
            "the refusal names the fix: {}",
            r.body
        );
    }
    let r = get_with(
        &client,
        admin,
        "/api/config",
        &[("host", "rebind.attacker.example")],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403);
    // Monitoring by any name still works; so do IP addresses and localhost.
    let r = get_with(
        &client,
        admin,
        "/metrics",
        &[("host", "appliance1.internal:9900")],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let r = get_with(&client, admin, "/api/pools", &[("host", "localhost:9900")])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let (status, body) = post(&client, admin, &drain).await;
    assert_eq!(status, 200, "lockstep's own request: {body}");
    app.shutdown(std::time::Duration::from_secs(1)).await;
}
