//! The sync plane's identities, end to end with real processes: a farm CA made by
//! `lockstep ca`, a hub (`lockstep serve`) with mutual TLS, two `lockstep agent`s with their own
//! certificates, `lockstep publish` with a publisher's. Each party acts only as itself: another
//! agent's certificate cannot report, send changesets or forward edits under a name it does not
//! carry; a revoked certificate is refused at the handshake after a reload; plain HTTP and
//! bearer tokens do not reach a hub with client certificates from the network.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use http::{Method, StatusCode};
use lockstep::net::client::{ClientTls, HttpClient, Remote};

use common::farm::{serial, write_private};
use common::process::{Proc, BIN};
use common::wait;

fn lockstep(dir: &Path, args: &[&str]) -> String {
    let o = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "lockstep {args:?} failed: {out}");
    out
}

struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// `lockstep ca init` and a certificate for each of `parties` (name, role).
    fn new(dir: &Path, parties: &[(&str, &str)]) -> Pki {
        lockstep(dir, &["ca", "init", "--dir", "ca", "--farm", "test"]);
        std::fs::create_dir(dir.join("pki")).unwrap();
        for (name, role) in parties {
            lockstep(
                dir,
                &[
                    "ca",
                    "issue",
                    name,
                    "--role",
                    role,
                    "--ip",
                    "127.0.0.1",
                    "--dns",
                    "localhost",
                    "--dir",
                    "ca",
                    "--out",
                    "pki",
                ],
            );
        }
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    fn cert(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("pki/{name}.crt")),
            self.dir.join(format!("pki/{name}.key")),
        )
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca/ca.crt")
    }

    fn crl(&self) -> PathBuf {
        self.dir.join("ca/crl.pem")
    }

    /// A client of `url` presenting `name`'s certificate.
    fn client(&self, remote: Remote, url: &str, name: &str) -> HttpClient {
        let (cert, key) = self.cert(name);
        let tls = ClientTls::files(&self.ca(), Some(&self.crl()), Some((&cert, &key))).unwrap();
        HttpClient::new(remote, url, None, Some(&tls)).unwrap()
    }
}

fn agent_yaml(pki: &Pki, name: &str, hub: &str, extra: &str) -> String {
    let (cert, key) = pki.cert(name);
    format!(
        "name: {name}\nhub: \"{hub}\"\nstore: {name}-store\nserve: \"127.0.0.1:0\"\n\
         tls: {{ ca: {}, crl: {}, cert: {}, key: {} }}\n{extra}",
        pki.ca().display(),
        pki.crl().display(),
        cert.display(),
        key.display()
    )
}

async fn status(c: &HttpClient, method: Method, path: &str, body: &[u8]) -> Option<StatusCode> {
    match c
        .send(
            method,
            path,
            Some((bytes::Bytes::copy_from_slice(body), "application/json")),
            Duration::from_secs(5),
        )
        .await
    {
        Ok(a) => Some(a.status),
        Err(e) => e.status(),
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_party_acts_only_as_itself_and_revoked_ones_not_at_all() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(
        dir,
        &[
            ("lb", "hub"),
            ("web-1", "agent"),
            ("web-2", "agent"),
            ("ci", "publisher"),
        ],
    );
    write_private(&dir.join("agent.token"), "agent-token");
    write_private(&dir.join("publish.token"), "publish-token");
    let (hub_cert, hub_key) = pki.cert("lb");
    std::fs::write(
        dir.join("hub.yaml"),
        format!(
            "sync:\n  bind: \"127.0.0.1:0\"\n  store: hub-store\n  cadence: 200ms\n  lead: 300ms\n  \
             agent_token_file: agent.token\n  publish_token_file: publish.token\n  tls:\n    certificates:\n      - {{ cert: {}, key: {} }}\n    \
             client_ca: {}\n    crl: {}\n    ca_dir: ca\nadmin:\n  bind: \"127.0.0.1:0\"\n",
            hub_cert.display(),
            hub_key.display(),
            pki.ca().display(),
            pki.crl().display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--workers", "1", "-c", "hub.yaml"])
        .current_dir(dir);
    let mut hub = Proc::spawn(cmd, dir.join("hub.log"));
    let hub_addr = hub.bound_addr(&["sync hub listening"], "addr");
    let admin = hub.bound_addr(&["admin listening"], "addr");
    let url = format!("https://127.0.0.1:{}", hub_addr.port());

    // A publisher publishes with its certificate, and signs the release with its key.
    lockstep(dir, &["keygen", "--out", "publisher.key"]);
    let site = dir.join("site");
    std::fs::create_dir(&site).unwrap();
    std::fs::write(site.join("index.html"), "v1").unwrap();
    let (ci_cert, ci_key) = pki.cert("ci");
    let out = lockstep(
        dir,
        &[
            "publish",
            "--hub",
            &url,
            "--ca-file",
            pki.ca().to_str().unwrap(),
            "--cert",
            ci_cert.to_str().unwrap(),
            "--key",
            ci_key.to_str().unwrap(),
            "--sign-key",
            "publisher.key",
            "--at",
            "+300ms",
            site.to_str().unwrap(),
        ],
    );
    let release = out
        .lines()
        .find_map(|l| l.strip_prefix("release "))
        .unwrap()
        .trim()
        .to_string();

    // Two agents with their own certificates, trusting the publisher's key, stage and serve
    // it; web-1 forwards its edits to web-2 at once, agent to agent over TLS; web-2's go
    // through the hub into the next release.
    std::fs::create_dir(dir.join("edit-1")).unwrap();
    std::fs::create_dir(dir.join("edit-2")).unwrap();
    let mut agents = Vec::new();
    for (name, edit, mode) in [
        ("web-1", "edit-1", "immediate"),
        ("web-2", "edit-2", "scheduled"),
    ] {
        let cfg = dir.join(format!("{name}.yaml"));
        let watch =
            format!("watch: {{ dir: {edit}, mode: {mode} }}\ntrusted_keys: [publisher.key.pub]\n");
        std::fs::write(&cfg, agent_yaml(&pki, name, &url, &watch)).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["agent", "-c"]).arg(&cfg).current_dir(dir);
        let mut p = Proc::spawn(cmd, dir.join(format!("{name}.log")));
        let addr = p.bound_addr(&["agent started"], "serve");
        agents.push((p, addr));
    }
    let release_of = |addr: std::net::SocketAddr| {
        common::client::request(addr, "GET", "/", None, b"")
            .ok()
            .and_then(|r| r.header("x-lockstep-release").map(str::to_string))
    };
    let logs = || {
        ["hub.log", "web-1.log", "web-2.log"]
            .iter()
            .map(|f| std::fs::read_to_string(dir.join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    };
    wait::until_blocking(
        "both agents to serve the release",
        wait::DEADLINE,
        logs,
        || {
            agents
                .iter()
                .all(|(_, a)| release_of(*a).as_deref() == Some(release.as_str()))
        },
    );
    std::fs::write(dir.join("edit-1/news.html"), "from web-1").unwrap();
    let web2 = agents[1].1;
    wait::until_blocking("web-1's edit to reach web-2", wait::DEADLINE, logs, || {
        common::client::request(web2, "GET", "/news.html", None, b"")
            .is_ok_and(|r| r.status == 200 && r.body == "from web-1")
    });
    // web-2's edit becomes a release the hub builds, which no publisher signed: web-1 stages
    // and activates it because its provenance lists web-2's changeset, signed with web-2's
    // farm certificate, on the publisher's signed release.
    std::fs::write(dir.join("edit-2/sched.html"), "from web-2").unwrap();
    let web1 = agents[0].1;
    wait::until_blocking(
        "web-2's edit to reach web-1 through the hub",
        wait::DEADLINE,
        logs,
        || {
            common::client::request(web1, "GET", "/sched.html", None, b"")
                .is_ok_and(|r| r.status == 200 && r.body == "from web-2")
        },
    );
    assert!(!logs().contains("refused"), "{}", logs());

    // web-2's certificate cannot act as web-1: report, changeset, forward to a peer.
    let as_web2 = pki.client(Remote::Hub, &url, "web-2");
    let report = br#"{"active":null,"staged":null}"#;
    assert_eq!(
        status(
            &as_web2,
            Method::POST,
            "/sync/v1/agents/web-1/report",
            report
        )
        .await,
        Some(StatusCode::FORBIDDEN)
    );
    let cs = format!(
        r#"{{"origin":"web-1","seq":1,"mode":"scheduled","base":null,"detected_us":1,"changes":{{"x.html":{{"entry":null,"prev":null}}}}}}"#
    );
    assert_eq!(
        status(&as_web2, Method::POST, "/sync/v1/changesets", cs.as_bytes()).await,
        Some(StatusCode::FORBIDDEN)
    );
    // As itself it may report.
    assert_eq!(
        status(
            &as_web2,
            Method::POST,
            "/sync/v1/agents/web-2/report",
            report
        )
        .await,
        Some(StatusCode::NO_CONTENT)
    );
    // A publisher is no agent, an agent no publisher.
    let as_ci = pki.client(Remote::Hub, &url, "ci");
    assert_eq!(
        status(&as_ci, Method::POST, "/sync/v1/agents/ci/report", report).await,
        Some(StatusCode::FORBIDDEN)
    );
    assert_eq!(
        status(&as_web2, Method::POST, "/sync/v1/rollback", b"").await,
        Some(StatusCode::FORBIDDEN)
    );
    // Peer to peer: web-2 forwarding a changeset of web-1 to web-1's agent.
    let web1_url = format!("https://127.0.0.1:{}", agents[0].1.port());
    let peer_web2 = pki.client(Remote::Peer, &web1_url, "web-2");
    let forged: lockstep::sync::changeset::Changeset = serde_json::from_str(
        &cs.replace("\"web-1\"", "\"web-3\"")
            .replace("scheduled", "immediate"),
    )
    .unwrap();
    let forged = lockstep::sync::provenance::SignedChangeset::unsigned(forged);
    let frame = lockstep::agent::frame::encode(&forged, |_| None).unwrap();
    assert_eq!(
        status(&peer_web2, Method::POST, "/.lockstep/changesets", &frame).await,
        Some(StatusCode::FORBIDDEN)
    );
    // Under its own name, a peer's changeset must carry its signature, and one that verifies:
    // unsigned, or altered after signing (in flight, or by the hub), it is not installed.
    let own: lockstep::sync::changeset::Changeset = serde_json::from_str(
        &cs.replace("\"web-1\"", "\"web-2\"")
            .replace("scheduled", "immediate")
            .replace("\"seq\":1", "\"seq\":2"),
    )
    .unwrap();
    let (cert, key) = pki.cert("web-2");
    let signer = lockstep::sync::provenance::ChangesetSigner::new(
        lockstep::sync::sign::SecretKey::from_pem(&std::fs::read(&key).unwrap(), "web-2.key")
            .unwrap(),
        &rustls_pki_types::pem::PemObject::from_pem_file(&cert)
            .map(|c: rustls_pki_types::CertificateDer<'static>| c.to_vec())
            .unwrap(),
    );
    let mut altered = signer.sign(own.clone());
    altered.changeset.detected_us += 1;
    for bad in [
        lockstep::sync::provenance::SignedChangeset::unsigned(own.clone()),
        altered,
    ] {
        let frame = lockstep::agent::frame::encode(&bad, |_| None).unwrap();
        let refused = peer_web2
            .send(
                Method::POST,
                "/.lockstep/changesets",
                Some((frame, "application/x-lockstep-changeset")),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        let why = String::from_utf8_lossy(&refused.body);
        assert!(
            why.contains("not signed") || why.contains("does not verify"),
            "{why}"
        );
    }
    let metrics = common::client::request(admin, "GET", "/metrics", None, b"")
        .unwrap()
        .body;
    assert_eq!(
        metric(&metrics, "lockstep_sync_refused_total{reason=\"identity\"}"),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "lockstep_sync_refused_total{reason=\"role\"}"),
        2.0
    );
    assert!(hub
        .log()
        .contains("agent web-2 may act only as itself, not as agent web-1"));

    // From the network the hub takes no bearer token and no plain HTTP; without a client
    // certificate a TLS client is unauthenticated (from loopback it may use the token).
    let anon = HttpClient::new(
        Remote::Hub,
        &url,
        Some("wrong".into()),
        Some(&ClientTls::ca_file(&pki.ca()).unwrap()),
    )
    .unwrap();
    assert_eq!(
        status(&anon, Method::GET, "/sync/v1/schedule", b"").await,
        Some(StatusCode::UNAUTHORIZED)
    );

    // A new backend joins with a one-time token: one command, its key made where it stays.
    let printed = lockstep(
        dir,
        &[
            "ca",
            "join-token",
            "web-3",
            "--ip",
            "127.0.0.1",
            "--dir",
            "ca",
            "--hub",
            &url,
        ],
    );
    let command = printed
        .lines()
        .find(|l| l.trim_start().starts_with("lockstep agent join"))
        .unwrap_or_else(|| panic!("no join command in: {printed}"));
    let args: Vec<&str> = command.split_whitespace().skip(1).collect();
    let arg = |name: &str| args[args.iter().position(|a| *a == name).unwrap() + 1].to_string();
    let (token, hash) = (arg("--token"), arg("--ca-hash"));
    let join = |hash: &str, out: &str| {
        Command::new(BIN)
            .args([
                "agent",
                "join",
                "--hub",
                &url,
                "--token",
                &token,
                "--ca-hash",
                hash,
                "--out",
                out,
            ])
            .current_dir(dir)
            .output()
            .unwrap()
    };
    // A pinned fingerprint that is not the hub's: nothing is sent.
    let wrong = join(&"0".repeat(64), "pki-x");
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("refusing to send the token"));
    let joined = join(&hash, "pki-3");
    assert!(
        joined.status.success(),
        "{}",
        String::from_utf8_lossy(&joined.stderr)
    );
    assert!(String::from_utf8_lossy(&joined.stdout).contains("joined as agent web-3"));
    let key_mode = std::fs::metadata(dir.join("pki-3/web-3.key")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key_mode.permissions()) & 0o777,
        0o600
    );
    let tls = ClientTls::files(
        &dir.join("pki-3/ca.crt"),
        Some(&dir.join("pki-3/crl.pem")),
        Some((&dir.join("pki-3/web-3.crt"), &dir.join("pki-3/web-3.key"))),
    )
    .unwrap();
    let as_web3 = HttpClient::new(Remote::Hub, &url, None, Some(&tls)).unwrap();
    assert_eq!(
        status(
            &as_web3,
            Method::POST,
            "/sync/v1/agents/web-3/report",
            report
        )
        .await,
        Some(StatusCode::NO_CONTENT)
    );
    assert_eq!(
        status(
            &as_web3,
            Method::POST,
            "/sync/v1/agents/web-1/report",
            report
        )
        .await,
        Some(StatusCode::FORBIDDEN)
    );
    // The token works once.
    let again = join(&hash, "pki-4");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("unknown, used or expired"));

    // Revoked: after `lockstep ca revoke` and a reload, web-2's handshake fails; web-1's works.
    lockstep(dir, &["ca", "revoke", "web-2", "--dir", "ca"]);
    hub.signal("HUP");
    let fresh = || pki.client(Remote::Hub, &url, "web-2");
    wait::until(
        "the hub to refuse web-2's certificate",
        wait::DEADLINE,
        || async {
            fresh()
                .send(Method::GET, "/sync/v1/time", None, Duration::from_secs(2))
                .await
                .is_err_and(|e| e.status().is_none())
        },
    )
    .await;
    // A connection web-2 made before the revocation is refused from its next request on.
    let kept = as_web2
        .send(Method::GET, "/sync/v1/time", None, Duration::from_secs(2))
        .await;
    assert!(
        kept.as_ref()
            .map_or(true, |a| a.status == StatusCode::UNAUTHORIZED),
        "{:?}",
        kept.map(|a| a.status)
    );
    let as_web1 = pki.client(Remote::Hub, &url, "web-1");
    assert_eq!(
        status(&as_web1, Method::GET, "/sync/v1/time", b"").await,
        Some(StatusCode::OK)
    );
    for (mut p, _) in agents {
        p.kill9();
    }
    hub.kill9();
}

/// Two network namespaces joined by a veth pair: real non-loopback addresses on one machine.
/// Deleted (with their interfaces) when dropped.
struct NetnsPair {
    names: [String; 2],
    addrs: [String; 2],
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

impl NetnsPair {
    fn new() -> NetnsPair {
        common::process::require_tool("ip", "iproute2");
        let id = std::process::id();
        let net = 1 + id % 250;
        let names = [format!("ls-a-{id}"), format!("ls-b-{id}")];
        let links = [format!("lsa{id}"), format!("lsb{id}")];
        let addrs = [format!("10.231.{net}.1"), format!("10.231.{net}.2")];
        let pair = NetnsPair { names, addrs };
        for n in &pair.names {
            ip(&["netns", "add", n]);
        }
        ip(&[
            "link", "add", &links[0], "type", "veth", "peer", "name", &links[1],
        ]);
        for i in 0..2 {
            let (ns, link) = (&pair.names[i], &links[i]);
            ip(&["link", "set", link, "netns", ns]);
            let cidr = format!("{}/24", pair.addrs[i]);
            ip(&["-n", ns, "addr", "add", &cidr, "dev", link]);
            ip(&["-n", ns, "link", "set", link, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    /// `args` run inside namespace `i`.
    fn command(&self, i: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.names[i], program]);
        c
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// Off loopback, on two real addresses (two network namespaces): a sync API without client
/// certificates does not start, an agent or publisher that would speak plain HTTP to the other
/// host is refused by `check` (and by the command itself), a bearer token from the network
/// opens nothing, and the farm works end to end over mutual TLS.
#[test]
fn between_two_hosts_only_mutual_tls_is_spoken() {
    let _serial = serial();
    common::process::require_tool("curl", "curl");
    let net = NetnsPair::new();
    let (hub_ip, backend_ip) = (net.addrs[0].clone(), net.addrs[1].clone());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    lockstep(dir, &["ca", "init", "--dir", "ca"]);
    std::fs::create_dir(dir.join("pki")).unwrap();
    for (name, role, addr) in [
        ("lb", "hub", hub_ip.as_str()),
        ("web-1", "agent", backend_ip.as_str()),
        ("ci", "publisher", backend_ip.as_str()),
    ] {
        lockstep(
            dir,
            &[
                "ca", "issue", name, "--role", role, "--ip", addr, "--dir", "ca", "--out", "pki",
            ],
        );
    }
    write_private(&dir.join("agent.token"), "agent-token");
    write_private(&dir.join("publish.token"), "publish-token");
    // The publisher's signing key; the agent trusts its .pub.
    lockstep(dir, &["keygen", "--out", "publisher.key"]);
    let sync = |tls: &str| {
        format!(
            "sync:\n  bind: \"{hub_ip}:7700\"\n  store: hub-store\n  cadence: 200ms\n  lead: 300ms\n  \
             agent_token_file: agent.token\n  publish_token_file: publish.token\n{tls}"
        )
    };
    // Tokens only, on a real address: `check` refuses it at sync.bind, and so does `serve`.
    std::fs::write(dir.join("open.yaml"), sync("")).unwrap();
    let check = Command::new(BIN)
        .args(["check", "-c", "open.yaml"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(2));
    let said = String::from_utf8_lossy(&check.stderr);
    assert!(
        said.contains("open.yaml:2:9:") && said.contains("sync.tls.client_ca is not set"),
        "{said}"
    );
    let serve = net
        .command(0, BIN)
        .args(["serve", "-c", "open.yaml"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert_eq!(
        serve.status.code(),
        Some(2),
        "a sync API open to the network started"
    );

    std::fs::write(
        dir.join("hub.yaml"),
        sync(
            "  tls:\n    certificates: [{ cert: pki/lb.crt, key: pki/lb.key }]\n    \
             client_ca: ca/ca.crt\n    crl: ca/crl.pem\n",
        ),
    )
    .unwrap();
    let mut cmd = net.command(0, BIN);
    cmd.args(["serve", "--workers", "1", "-c", "hub.yaml"])
        .current_dir(dir);
    let mut hub = Proc::spawn(cmd, dir.join("hub.log"));
    hub.bound_addr(&["sync hub listening"], "addr");
    let url = format!("https://{hub_ip}:7700");

    // The backend's side: plain HTTP, or https without its own certificate, is refused by
    // `check --agent`; with its certificate the agent runs.
    let agent = |hub: &str, tls: bool| {
        let tls = if tls {
            "tls: { ca: ca/ca.crt, crl: ca/crl.pem, cert: pki/web-1.crt, key: pki/web-1.key }\n\
             trusted_keys: [publisher.key.pub]\n"
        } else {
            "hub_ca: ca/ca.crt\n"
        };
        format!(
            "name: web-1\nhub: \"{hub}\"\ntoken_file: agent.token\nstore: web-1-store\nserve: \"127.0.0.1:0\"\n{tls}"
        )
    };
    for (text, want) in [
        (agent(&format!("http://{hub_ip}:7700"), true), "plain HTTP"),
        (agent(&url, false), "no certificate"),
    ] {
        std::fs::write(dir.join("bad-agent.yaml"), text).unwrap();
        let o = Command::new(BIN)
            .args(["check", "--agent", "-c", "bad-agent.yaml"])
            .current_dir(dir)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2));
        let said = String::from_utf8_lossy(&o.stderr);
        assert!(
            said.contains("bad-agent.yaml:2:6:") && said.contains(want),
            "{said}"
        );
    }
    std::fs::write(dir.join("web-1.yaml"), agent(&url, true)).unwrap();
    let mut cmd = net.command(1, BIN);
    cmd.args(["agent", "-c", "web-1.yaml"]).current_dir(dir);
    let mut web1 = Proc::spawn(cmd, dir.join("web-1.log"));
    let serving = web1.bound_addr(&["agent started"], "serve");

    // A token from the other host opens nothing (401 over TLS); plain HTTP is no answer.
    let curl = |args: &[&str]| {
        let o = net
            .command(1, "curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
            ])
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    assert_eq!(
        curl(&[
            "--cacert",
            "ca/ca.crt",
            "-H",
            "Authorization: Bearer publish-token",
            &format!("{url}/sync/v1/schedule"),
        ]),
        "401"
    );
    assert_eq!(
        curl(&[&format!("http://{hub_ip}:7700/sync/v1/schedule")]),
        "000"
    );
    // With a publisher's certificate and key as lockstep wrote them, curl (OpenSSL) gets in.
    assert_eq!(
        curl(&[
            "--cacert",
            "ca/ca.crt",
            "--cert",
            "pki/ci.crt",
            "--key",
            "pki/ci.key",
            &format!("{url}/sync/v1/schedule"),
        ]),
        "200"
    );
    // The publisher's own client refuses plain HTTP to the other host before sending anything.
    let site = dir.join("site");
    std::fs::create_dir(&site).unwrap();
    std::fs::write(site.join("index.html"), "over the wire").unwrap();
    let plain = net
        .command(1, BIN)
        .args([
            "publish",
            "--hub",
            &format!("http://{hub_ip}:7700"),
            "--token-file",
            "publish.token",
            "site",
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(!plain.status.success());
    assert!(String::from_utf8_lossy(&plain.stderr).contains("plain HTTP"));
    // With its certificate it publishes, signed with its signing key (the agent on the other
    // host trusts only that), and the agent serves it.
    let published = net
        .command(1, BIN)
        .args([
            "publish",
            "--hub",
            &url,
            "--ca-file",
            "ca/ca.crt",
            "--cert",
            "pki/ci.crt",
            "--key",
            "pki/ci.key",
            "--sign-key",
            "publisher.key",
            "--at",
            "+300ms",
            "site",
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        published.status.success(),
        "{}",
        String::from_utf8_lossy(&published.stderr)
    );
    let get = || {
        let o = net
            .command(1, "curl")
            .args(["-s", "--max-time", "2", &format!("http://{serving}/")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    wait::until_blocking(
        "the agent on the other host to serve the release",
        wait::DEADLINE,
        || format!("{}\n{}", hub.log(), web1.log()),
        || get() == "over the wire",
    );
}
