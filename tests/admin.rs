//! The admin API on a real appliance: `/api/pools` reflects health and drains,
//! `POST …/drain` takes a backend out of the proxy's rotation (and `…/enable` puts it back),
//! `/api/config` is the running YAML, `/api/agents` the sync hub's fleet.

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};

async fn post(client: &HttpClient, admin: std::net::SocketAddr, path: &str) -> (u16, String) {
    let req = Request::post(format!("http://{admin}{path}"))
        .body(Full::new(Bytes::new()))
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
