//! `lockstep demo`: the embedded default. Three demo backends (each answers with its name),
//! a sync agent beside each, and the appliance in front of them (proxy, DNS and the sync hub),
//! all on loopback; a first release is published, then the commands to try are printed. The
//! demo makes its own credentials: the tokens, and a publisher key ([`KEY_FILE`]) that signs
//! its releases and that the hub and every agent trust.
//!
//! [`backend`] is a small real HTTP server (h1 and h2c) that tests use as a backend too.
#![allow(clippy::disallowed_methods)] // I/O shell: random demo tokens; waits for the demo farm with a deadline

use crate::net::accept::{accept_loop, Accepted};
use crate::net::respond;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::TaskTracker;

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

use crate::agent::{self, AgentConfig, AgentHandle};
use crate::appliance::Appliance;
use crate::net::client::HttpClient;
use crate::publish;
use crate::sync::manifest::ReleaseId;
use crate::sync::sign::{self, PublicKey, SecretKey, TrustedKeys};

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
    // Its connections end with the backend (they are not drained: a stopped demo backend
    // is how tests make a backend fail).
    let tracker = TaskTracker::new();
    accept_loop(&socket, &name, &stop.clone(), &tracker, |stream, _| {
        let (name, control, stop) = (name.clone(), control.clone(), stop.clone());
        Accepted::Serve(async move {
            let svc = service_fn(move |req| answer(name.clone(), control.clone(), req));
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        })
    })
    .await
}

async fn answer(
    name: Arc<str>,
    control: BackendControl,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let reply = |status: StatusCode, body: String| {
        let mut r: Response<Full<Bytes>> = respond::bytes(status, "text/plain", body);
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

/// The demo's ports on 127.0.0.1 (0: any free port).
#[derive(Debug, Clone, Copy, Default)]
pub struct DemoPorts {
    /// The proxy listener.
    pub proxy: u16,
    /// The admin listener.
    pub admin: u16,
    /// DNS, UDP and TCP.
    pub dns: u16,
    /// The sync hub.
    pub sync: u16,
}

/// A running demo farm: the appliance (proxy, DNS, sync hub), three demo backends and an agent
/// beside each.
pub struct Demo {
    /// The appliance.
    pub app: Appliance,
    /// The agents, web-1..web-3.
    pub agents: Vec<AgentHandle>,
    /// The working directory (tokens, stores, the first site).
    pub dir: PathBuf,
    /// The release published at start.
    pub first_release: ReleaseId,
    /// The publisher key the hub and the agents trust ([`KEY_FILE`] in `dir`).
    pub key: PublicKey,
    stop: CancellationToken,
}

const FIRST_SITE: &str = "<!doctype html>\n<title>lockstep demo</title>\n<h1>release 1 of the demo site</h1>\n<p>Publish a directory with <code>lockstep publish</code> and every backend flips to it at the same instant.</p>\n";

/// The demo's publisher key in its directory (the public key is `publisher.key.pub`): sign
/// releases for the demo with `lockstep publish --sign-key DIR/publisher.key`.
pub const KEY_FILE: &str = "publisher.key";

/// The demo's publisher key: the one in `dir` if an earlier run made it, else a new one.
fn publisher_key(dir: &Path) -> anyhow::Result<SecretKey> {
    let path = dir.join(KEY_FILE);
    if !path.exists() {
        sign::write_key_pair(
            &path,
            Some("lockstep demo"),
            &ring::rand::SystemRandom::new(),
        )?;
    }
    Ok(sign::read_secret_key(&path)?)
}

fn write_token(path: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let token = format!("{:032x}", rand::random::<u128>());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(token.as_bytes())?;
    Ok(())
}

/// Starts the demo farm with its working files under `dir`, publishes a first release and
/// waits until every agent serves it.
pub async fn start(ports: DemoPorts, dir: &Path) -> anyhow::Result<Demo> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    write_token(&dir.join("agent.token"))?;
    write_token(&dir.join("publish.token"))?;
    let key = publisher_key(&dir)?;
    let stop = CancellationToken::new();
    let (yaml, agent_sockets) = start_backends(&ports, &dir, &stop).await?;
    let cfg = crate::config::parse(&dir.join("demo.yaml"), &yaml)?;
    let app = Appliance::start(cfg).await?;
    let hub = format!("http://{}", app.sync_addr().context("demo hub missing")?);
    let agents = start_agents(&hub, &dir, key.public(), agent_sockets, &stop).await?;
    let id = publish_first(&hub, &dir, &key).await?;
    wait_until_served(&app, &agents, id).await?;
    Ok(Demo {
        app,
        agents,
        dir,
        first_release: id,
        key: key.public(),
        stop,
    })
}

/// Starts the three demo backends and binds their agents' sockets; the demo config with their
/// ports filled in.
async fn start_backends(
    ports: &DemoPorts,
    dir: &Path,
    stop: &CancellationToken,
) -> anyhow::Result<(String, Vec<TcpListener>)> {
    let mut yaml = DEMO_YAML
        .replace("@PORT@", &ports.proxy.to_string())
        .replace("@ADMIN@", &ports.admin.to_string())
        .replace("@DNS@", &ports.dns.to_string())
        .replace("@SYNC@", &ports.sync.to_string())
        .replace("@DIR@", &dir.display().to_string());
    let mut agent_sockets = Vec::new();
    for i in 1..=3 {
        let socket = TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot bind a demo backend")?;
        yaml = yaml.replace(
            &format!("@WEB{i}@"),
            &socket.local_addr()?.port().to_string(),
        );
        tokio::spawn(backend(
            format!("web-{i}"),
            socket,
            BackendControl::default(),
            stop.clone(),
        ));
        let agent = TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot bind a demo agent")?;
        yaml = yaml.replace(
            &format!("@AGENT{i}@"),
            &agent.local_addr()?.port().to_string(),
        );
        agent_sockets.push(agent);
    }
    Ok((yaml, agent_sockets))
}

/// An agent beside each demo backend, each with an editing directory whose edits reach the
/// others at once; each trusts releases `key` signed and the other demo agents' edits.
async fn start_agents(
    hub: &str,
    dir: &Path,
    key: PublicKey,
    sockets: Vec<TcpListener>,
    stop: &CancellationToken,
) -> anyhow::Result<Vec<AgentHandle>> {
    let agent_token = crate::sync::auth::read_token(&dir.join("agent.token"))?;
    let names: Vec<String> = (1..=sockets.len()).map(|i| format!("web-{i}")).collect();
    let mut agents = Vec::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        let name = format!("web-{}", i + 1);
        let mut cfg = AgentConfig::new(
            &name,
            hub,
            &dir.join(format!("agent-{}", i + 1)),
            socket.local_addr()?,
        );
        cfg.token = Some(agent_token.clone());
        cfg.trusted_keys = Some(TrustedKeys::new([key]));
        cfg.trusted_origins = names.clone();
        cfg.watch = Some(crate::agent::config::Watch::new(
            Some(&dir.join(format!("edit-{}", i + 1))),
            crate::sync::changeset::Mode::Immediate,
        ));
        agents.push(agent::start_on(cfg, socket, stop.child_token()).await?);
    }
    Ok(agents)
}

/// Publishes the first demo site, signed with `key`; its release id.
async fn publish_first(
    hub: &str,
    dir: &Path,
    key: &SecretKey,
) -> anyhow::Result<crate::sync::manifest::ReleaseId> {
    let site = dir.join("site");
    std::fs::create_dir_all(&site)?;
    std::fs::write(site.join("index.html"), FIRST_SITE)?;
    let token = crate::sync::auth::read_token(&dir.join("publish.token"))?;
    let publisher = HttpClient::hub(hub, Some(token), None)?;
    let first = publish::publish(
        &publisher,
        &site,
        publish::At::Next,
        4,
        std::slice::from_ref(key),
    )
    .await
    .context("publishing the first demo release")?;
    Ok(first.committed.id)
}

/// Waits until every agent serves release `id` and the proxy's checks have seen them do so.
async fn wait_until_served(
    app: &Appliance,
    agents: &[AgentHandle],
    id: crate::sync::manifest::ReleaseId,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let ready = |app: &Appliance| {
        let live = app.live().load();
        live.table.pool("static").is_some_and(|p| {
            p.health.load().available_count(std::time::Instant::now()) == p.backends.len()
        })
    };
    while agents.iter().any(|a| a.active() != Some(id)) || !ready(app) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the demo agents did not activate the first release"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

impl Demo {
    /// Stops everything and removes the working directory.
    pub async fn shutdown(self) {
        self.stop.cancel();
        for a in self.agents {
            a.shutdown(Duration::from_secs(1)).await;
        }
        self.app.shutdown(Duration::from_secs(2)).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the demo until Ctrl-C.
pub async fn run(port: u16, admin_port: u16, dns_port: u16, sync_port: u16) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("lockstep-demo-{}", std::process::id()));
    let demo = start(
        DemoPorts {
            proxy: port,
            admin: admin_port,
            dns: dns_port,
            sync: sync_port,
        },
        &dir,
    )
    .await?;
    let app = &demo.app;
    let proxy = app.local_addr("http").context("demo listener missing")?;
    let admin = app.admin_addr().context("demo admin listener missing")?;
    let dns = app.dns_addr().context("demo DNS missing")?;
    let hub = app.sync_addr().context("demo hub missing")?;
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "lockstep".into());
    let agents: Vec<String> = demo
        .agents
        .iter()
        .map(|a| a.serve_addr().port().to_string())
        .collect();
    let d = demo.dir.display();
    println!(
        "lockstep demo: the appliance on http://{proxy} in front of web-1, web-2, web-3, DNS on {dns},\n\
         the sync hub on http://{hub} and an agent beside each backend (Ctrl-C to stop)\n\n\
         Try:\n  \
         for i in 1 2 3 4 5 6; do curl -s http://{proxy}/; done      # round robin: web-1, web-2, web-3, ...\n  \
         curl -si http://{proxy}/ | grep -i x-backend               # which backend answered\n  \
         curl -s --http2-prior-knowledge http://{proxy}/            # h2c\n  \
         curl -s -H 'Host: www.farm.test' http://{proxy}/echo-headers  # what the backend received\n  \
         curl -s http://{admin}/metrics | grep lockstep_http_requests\n  \
         curl -s http://{admin}/api/pools                          # or open http://{admin}/status in a browser\n  \
         dig @{dns_ip} -p {dns_port} www.farm.test +short       # the healthy backends, rotated: 127.0.0.1, .2, .3\n  \
         dig @{dns_ip} -p {dns_port} farm.test SOA +norec       # authoritative (flags: qr aa)\n\n\
         Content sync (release {first}, signed by the demo's key {key_id}, is active on every agent;\n\
         the hub and the agents refuse releases that key did not sign):\n  \
         curl -s -H 'Host: static.farm.test' http://{proxy}/   # the published site, through the proxy\n  \
         for p in {ports}; do curl -sI http://127.0.0.1:$p/ | grep -i x-lockstep-release; done\n  \
         mkdir -p /tmp/site && echo '<h1>release 2</h1>' > /tmp/site/index.html\n  \
         {exe} publish --hub http://{hub} --token-file {d}/publish.token --sign-key {d}/publisher.key --at +5s /tmp/site\n  \
         {exe} status --hub http://{hub} --token-file {d}/publish.token   # every agent, its clock offset and last flip\n\n\
         Detect and forward (each agent watches {d}/edit-N, immediate mode):\n  \
         echo '<h1>edited on web-1</h1>' > {d}/edit-1/index.html\n  \
         curl -s http://127.0.0.1:{port2}/    # web-2 serves the edit at once; {d}/edit-2 has it too\n  \
         curl -s -X PUT -H \"Authorization: Bearer $(cat {d}/agent.token)\" --data-binary 'hi' http://127.0.0.1:{port3}/content/hi.txt\n",
        dns_ip = dns.ip(),
        dns_port = dns.port(),
        first = demo.first_release.short(),
        key_id = demo.key.id(),
        ports = agents.join(" "),
        port2 = agents.get(1).cloned().unwrap_or_default(),
        port3 = agents.get(2).cloned().unwrap_or_default(),
    );
    // Ctrl-C or SIGTERM: stop and remove the working directory either way.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot wait for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot wait for Ctrl-C")?,
        _ = term.recv() => {}
    }
    demo.shutdown().await;
    Ok(())
}
