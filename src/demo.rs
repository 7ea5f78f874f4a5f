//! `lockstep demo`: the embedded default. Three demo backends (each answers with its name)
//! and the appliance in front of them (proxy and DNS), all on loopback, plus the commands to
//! try.
//!
//! [`backend`] is a small real HTTP server (h1 and h2c) that tests use as a backend too.

use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::appliance::Appliance;

/// The demo config, with placeholders for ports.
pub const DEMO_YAML: &str = include_str!("../deploy/demo.yaml");

/// A demo backend's switchable health.
#[derive(Clone, Default)]
pub struct BackendControl {
    /// When set, `/healthz` answers 503.
    pub unhealthy: Arc<AtomicBool>,
}

/// Serves a demo backend named `name` on `socket` until `stop`:
/// `/healthz` → 200 `ok` (503 when marked unhealthy); anything else → 200 with the name,
/// an `X-Backend` header, and, for requests with a body, the body echoed after the name;
/// `/echo-headers` → the request headers it received, one per line.
pub async fn backend(
    name: String,
    socket: TcpListener,
    control: BackendControl,
    stop: CancellationToken,
) {
    let name: Arc<str> = name.into();
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = socket.accept() => match r { Ok(p) => p, Err(_) => continue },
        };
        let name = name.clone();
        let control = control.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| answer(name.clone(), control.clone(), req));
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

async fn answer(
    name: Arc<str>,
    control: BackendControl,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain"),
        );
        if let Ok(v) = header::HeaderValue::from_str(&name) {
            r.headers_mut().insert("x-backend", v);
        }
        r
    };
    if path == "/healthz" {
        return Ok(if control.unhealthy.load(Ordering::Relaxed) {
            reply(StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n".into())
        } else {
            reply(StatusCode::OK, "ok\n".into())
        });
    }
    if path == "/echo-headers" {
        let mut s = String::new();
        for (k, v) in req.headers() {
            s.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
        }
        return Ok(reply(StatusCode::OK, s));
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut text = format!("{name}\n");
    text.push_str(&String::from_utf8_lossy(&body));
    Ok(reply(StatusCode::OK, text))
}

/// Runs the demo until Ctrl-C.
pub async fn run(port: u16, admin_port: u16, dns_port: u16) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let mut yaml = DEMO_YAML
        .replace("@PORT@", &port.to_string())
        .replace("@ADMIN@", &admin_port.to_string())
        .replace("@DNS@", &dns_port.to_string());
    for i in 1..=3 {
        let socket = TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot bind a demo backend")?;
        let addr = socket.local_addr()?;
        yaml = yaml.replace(&format!("@WEB{i}@"), &addr.port().to_string());
        tokio::spawn(backend(
            format!("web-{i}"),
            socket,
            BackendControl::default(),
            stop.clone(),
        ));
    }
    let cfg = crate::config::parse(Path::new("<demo>"), &yaml)?;
    let app = Appliance::start(cfg).await?;
    let proxy = app.local_addr("http").context("demo listener missing")?;
    let admin = app.admin_addr().context("demo admin listener missing")?;
    let dns = app.dns_addr().context("demo DNS missing")?;
    println!(
        "lockstep demo: the appliance on http://{proxy} in front of web-1, web-2, web-3, DNS on {dns} (Ctrl-C to stop)\n\n\
         Try:\n  \
         for i in 1 2 3 4 5 6; do curl -s http://{proxy}/; done      # round robin: web-1, web-2, web-3, ...\n  \
         curl -si http://{proxy}/ | grep -i x-backend               # which backend answered\n  \
         curl -s --http2-prior-knowledge http://{proxy}/            # h2c\n  \
         curl -s -H 'Host: www.farm.test' http://{proxy}/echo-headers  # what the backend received\n  \
         curl -s http://{admin}/metrics | grep lockstep_http_requests\n  \
         dig @{dns_ip} -p {dns_port} www.farm.test +short       # the healthy backends, rotated: 127.0.0.1, .2, .3\n  \
         dig @{dns_ip} -p {dns_port} farm.test SOA +norec       # authoritative (flags: qr aa)\n",
        dns_ip = dns.ip(),
        dns_port = dns.port(),
    );
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for Ctrl-C")?;
    stop.cancel();
    app.shutdown(Duration::from_secs(2)).await;
    Ok(())
}
