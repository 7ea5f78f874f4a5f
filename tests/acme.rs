//! ACME certificates (RFC 8555) against a real CA, Debian's `pebble`: ordered at start with
//! TLS-ALPN-01 (on the TLS listener) or HTTP-01 (on the plain one), served by SNI, renewed at
//! two-thirds of a short lifetime without a reload, kept 0600 and reused across a restart;
//! and what `lockstep check` refuses in `tls.acme`.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::pebble::{free_ports, Pebble};
use common::wait::until;
use common::*;

/// Ports of one test: the appliance's plain and TLS listeners, its DNS, pebble and pebble's
/// management API.
struct Ports {
    http: u16,
    https: u16,
    dns: u16,
    pebble: u16,
}

impl Ports {
    /// Pebble on these ports, validating at the appliance's, resolving through its DNS.
    fn pebble(&self, dir: &Path, validity: Duration) -> Pebble {
        Pebble::start(dir, self.pebble, self.http, self.https, self.dns, validity)
    }

    fn free() -> Ports {
        let base = free_ports(5);
        Ports {
            http: base,
            https: base + 1,
            dns: base + 2,
            pebble: base + 3,
        }
    }
}

fn yaml(p: &Ports, pebble: &Pebble, challenge: &str, store: &Path, backend: &str) -> String {
    format!(
        r#"listeners:
  - name: http
    bind: "127.0.0.1:{http}"
  - name: https
    bind: "127.0.0.1:{https}"
    tls:
      acme:
        directory: "{directory}"
        contact: ["mailto:ops@farm.test"]
        challenge: {challenge}
        ca: "{ca}"
        store: "{store}"
routes:
  - {{ host: www.farm.test, pool: www }}
  - {{ host: api.farm.test, pool: www }}
pools:
  - name: www
    backends:
{backend}dns:
  bind: "127.0.0.1:{dns}"
  zones:
    - name: farm.test
      nameservers: [ns1.farm.test]
      records:
        - {{ name: www, addresses: ["127.0.0.1"] }}
        - {{ name: api, addresses: ["127.0.0.1"] }}
        - {{ name: ns1, addresses: ["127.0.0.1"] }}
admin:
  bind: "127.0.0.1:0"
"#,
        http = p.http,
        https = p.https,
        dns = p.dns,
        directory = pebble.directory,
        ca = pebble.wfe_ca.display(),
        store = store.display(),
    )
}

/// The leaf certificate `addr` serves for `sni`, verified against `root`; `None` while the
/// handshake fails (no certificate yet, or one that does not chain to `root`).
async fn served(
    addr: SocketAddr,
    sni: &str,
    root: &rustls_pki_types::CertificateDer<'static>,
) -> Option<Vec<u8>> {
    let tls = tls_connect(addr, sni, root).await.ok()?;
    let leaf = tls.get_ref().1.peer_certificates()?.first()?.to_vec();
    Some(leaf)
}

/// Waits (a minute at most) until `addr` serves a certificate for `sni` chaining to `root`,
/// other than `not`; returns it.
async fn wait_served(
    addr: SocketAddr,
    sni: &str,
    root: &rustls_pki_types::CertificateDer<'static>,
    not: Option<&Vec<u8>>,
    pebble: &Pebble,
) -> Vec<u8> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(c) = served(addr, sni, root).await.filter(|c| Some(c) != not) {
            return c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {} certificate for {sni} within 60 s; pebble:\n{}",
            if not.is_some() { "renewed" } else { "ordered" },
            pebble.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn series(app: &lockstep::appliance::Appliance, name: &str) -> f64 {
    parse_metrics(&app.metrics().render())
        .unwrap()
        .get(name)
        .copied()
        .unwrap_or(0.0)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_01_orders_serves_by_sni_and_renews_at_two_thirds_without_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::free();
    // A 24 s lifetime: renewed 16 s after it starts.
    let pebble = ports.pebble(dir.path(), Duration::from_secs(24));
    let backend = DemoBackend::start("b1").await;
    let store = dir.path().join("acme");
    let app = start(&yaml(
        &ports,
        &pebble,
        "tls-alpn-01",
        &store,
        &backend.yaml(),
    ))
    .await;
    let https: SocketAddr = ([127, 0, 0, 1], ports.https).into();
    let (root, root_pem) = pebble.issuing_root(dir.path());

    let first = wait_served(https, "www.farm.test", &root, None, &pebble).await;
    // One certificate for every host routed through the listener, picked by SNI.
    assert_eq!(
        served(https, "api.farm.test", &root).await.as_ref(),
        Some(&first)
    );
    // curl, trusting only pebble's root, reaches the backend through it.
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&root_pem)
        .arg("--resolve")
        .arg(format!("www.farm.test:{}:127.0.0.1", ports.https))
        .arg(format!("https://www.farm.test:{}/", ports.https))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{out:?}");
    assert!(
        !pebble.log().contains("validate w/ HTTP"),
        "pebble validated over TLS-ALPN-01 only:\n{}",
        pebble.log()
    );
    // Kept as secrets.
    assert_eq!(mode(&store), 0o700);
    let mut files: Vec<_> = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "account, certificate and key: {files:?}");
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    // A client asking for the validation protocol outside an order gets no certificate.
    assert!(validation_handshake(https, "www.farm.test").await.is_err());

    let renewed = wait_served(https, "www.farm.test", &root, Some(&first), &pebble).await;
    assert!(
        series(
            &app,
            r#"lockstep_acme_orders_total{listener="https",result="ok"}"#
        ) >= 2.0
    );
    assert_eq!(app.generation(), 1, "no reload was needed");
    // The admin API says where it comes from and when it renews (two-thirds in).
    let (before, after) = lockstep::config::tls::validity(&renewed).unwrap();
    let due = before + (after - before) * 2 / 3;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let certs = api_certificates(&app).await;
        let ordered = certs
            .iter()
            .find(|c| c["listener"] == "https")
            .expect("the https certificate");
        if ordered["acme"]["error"].is_null() && ordered["acme"]["next_order"].as_u64() == Some(due)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "renewal due {due}: {ordered}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let not_after = lockstep::config::tls::not_after(&renewed).unwrap();
    until(
        "the expiry metric follows the renewal",
        Duration::from_secs(10),
        || {
            let expiry: Vec<f64> = parse_metrics(&app.metrics().render())
                .unwrap()
                .into_iter()
                .filter(|(k, _)| {
                    k.starts_with(
                        r#"lockstep_tls_certificate_expiry_timestamp_seconds{listener="https""#,
                    )
                })
                .map(|(_, v)| v)
                .collect();
            async move { expiry == [not_after as f64] }
        },
    )
    .await;
    app.shutdown(Duration::from_secs(1)).await;
}

/// A TLS handshake offering only ALPN `acme-tls/1`, trusting anything (as a validator does).
async fn validation_handshake(addr: SocketAddr, sni: &str) -> Result<(), String> {
    use std::sync::Arc;
    let mut cfg = Arc::unwrap_or_clone(lockstep::net::tls::client_config_unverified());
    cfg.alpn_protocols = vec![b"acme-tls/1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from(sni.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_01_orders_on_the_plain_listener_and_a_restart_reuses_the_kept_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::free();
    let pebble = ports.pebble(dir.path(), Duration::from_secs(90 * 86_400));
    let backend = DemoBackend::start("b1").await;
    let store = dir.path().join("acme");
    let config = yaml(&ports, &pebble, "http-01", &store, &backend.yaml());
    let app = start(&config).await;
    let https: SocketAddr = ([127, 0, 0, 1], ports.https).into();
    let (root, _) = pebble.issuing_root(dir.path());
    let first = Some(wait_served(https, "api.farm.test", &root, None, &pebble).await);
    assert!(
        pebble
            .log()
            .contains("validate w/ HTTP: http://api.farm.test"),
        "pebble validated over HTTP-01:\n{}",
        pebble.log()
    );
    // Nothing of the challenge stays answerable once the order is done.
    let http: SocketAddr = ([127, 0, 0, 1], ports.http).into();
    let r = get(&h1_client(), http, "/.well-known/acme-challenge/anything").await;
    assert_eq!(r.status, 404, "no route for this host: {r:?}");
    app.shutdown(Duration::from_secs(1)).await;

    // Restarted: the kept certificate is served at once, and nothing is ordered.
    let app = start(&config).await;
    assert_eq!(served(https, "api.farm.test", &root).await, first);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let text = app.metrics().render();
    assert!(
        !text.contains("lockstep_acme_orders_total{"),
        "no order after a restart:\n{text}"
    );
    app.shutdown(Duration::from_secs(1)).await;
}

fn check_errors(yaml: &str) -> String {
    match lockstep::config::parse(Path::new("lockstep.yaml"), yaml) {
        Ok(_) => panic!("accepted:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn check_refuses_what_acme_cannot_order_naming_line_and_fix() {
    let base = |acme: &str, routes: &str, plain: bool| {
        format!(
            "listeners:\n{}  - name: https\n    bind: \"127.0.0.1:0\"\n    tls:\n      acme:\n{acme}routes:\n{routes}pools:\n  - name: www\n    backends:\n      - {{ name: b, address: \"127.0.0.1:1\" }}\n",
            if plain { "  - name: http\n    bind: \"127.0.0.1:0\"\n" } else { "" }
        )
    };
    let dir = "        directory: https://acme.test/dir\n        ca: /etc/ssl/certs/ca-certificates.crt\n";
    let www = "  - { host: www.farm.test, pool: www }\n";
    // A wildcard route host cannot be proven by HTTP-01 or TLS-ALPN-01.
    let e = check_errors(&base(
        dir,
        "  - { host: \"*.farm.test\", pool: www }\n",
        true,
    ));
    assert!(
        e.contains("*.farm.test cannot be proven") && e.contains("acme.names"),
        "{e}"
    );
    // Nor a wildcard name.
    let e = check_errors(&base(
        &format!("{dir}        names: [\"*.farm.test\"]\n"),
        www,
        true,
    ));
    assert!(
        e.contains("lockstep.yaml:10:") && e.contains("DNS-01"),
        "{e}"
    );
    // No host routed, no names.
    let e = check_errors(&base(dir, "  - { pool: www }\n", true));
    assert!(e.contains("acme has no names"), "{e}");
    // HTTP-01 without a plain listener.
    let e = check_errors(&base(
        &format!("{dir}        challenge: http-01\n"),
        www,
        false,
    ));
    assert!(e.contains("http-01 is answered on a plain"), "{e}");
    // Not https, a contact that is not mailto:, an unknown challenge.
    let e = check_errors(&base(
        "        directory: http://acme.test/dir\n        contact: [ops@farm.test]\n        challenge: dns-01\n        ca: /etc/ssl/certs/ca-certificates.crt\n",
        www,
        true,
    ));
    assert!(e.contains("https:// directory URL"), "{e}");
    assert!(e.contains("must be a mailto: URI"), "{e}");
    assert!(e.contains("acme.challenge `dns-01` is not known"), "{e}");
    // A CA file that is not there.
    let e = check_errors(&base(
        "        directory: https://acme.test/dir\n        ca: /nonexistent/ca.pem\n",
        www,
        true,
    ));
    assert!(
        e.contains("acme.ca: cannot read CA file /nonexistent/ca.pem"),
        "{e}"
    );
}

/// Two appliances sharing a farm in etcd (`sync.cluster`): the leading one orders, and the CA
/// reaches only the other (the names resolve to it, on 127.0.0.2): the order succeeds because
/// the other answers the shared challenge, and it then serves the shared certificate, written
/// to its own store, without ordering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_several_appliances_the_leader_orders_and_the_others_answer_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = common::etcd::Etcd::start(1);
    let ports = Ports::free();
    let pebble = ports.pebble(dir.path(), Duration::from_secs(90 * 86_400));
    let backend = DemoBackend::start("b1").await;
    let appliance = |ip: &str, name: &str, dns: bool| {
        let store = dir.path().join(format!("acme-{name}"));
        let mut y = yaml(&ports, &pebble, "tls-alpn-01", &store, &backend.yaml())
            .replace("bind: \"127.0.0.1:", &format!("bind: \"{ip}:"))
            .replace(r#"addresses: ["127.0.0.1"]"#, r#"addresses: ["127.0.0.2"]"#);
        if !dns {
            let at = y.find("dns:\n").unwrap();
            let end = y.find("admin:\n").unwrap();
            y.replace_range(at..end, "");
        }
        y.push_str(&format!(
            "sync:\n  bind: \"{ip}:0\"\n  store: \"{}\"\n  cluster:\n    etcd: [{}]\n    name: {name}\n    lease: 2s\n",
            dir.path().join(format!("hub-{name}")).display(),
            etcd.endpoints()[0]
        ));
        (y, store)
    };
    // A answers DNS (on 127.0.0.1, where pebble asks): the names are B's address.
    let (ya, _) = appliance("127.0.0.1", "a", true);
    let a = start(&ya).await;
    let leads = |app: &lockstep::appliance::Appliance| {
        app.hub()
            .and_then(|h| h.shared_store())
            .is_some_and(|s| s.leads())
    };
    until("appliance a leads", Duration::from_secs(20), || {
        let l = leads(&a);
        async move { l }
    })
    .await;
    let (yb, store_b) = appliance("127.0.0.2", "b", false);
    let b = start(&yb).await;
    assert!(!leads(&b));
    let (root, _) = pebble.issuing_root(dir.path());
    let on_b: SocketAddr = ([127, 0, 0, 2], ports.https).into();
    let on_a: SocketAddr = ([127, 0, 0, 1], ports.https).into();
    let served_b = wait_served(on_b, "www.farm.test", &root, None, &pebble).await;
    assert_eq!(served(on_a, "www.farm.test", &root).await, Some(served_b));
    assert!(
        !pebble.log().contains("validate w/ HTTP"),
        "{}",
        pebble.log()
    );
    assert_eq!(
        series(
            &a,
            r#"lockstep_acme_orders_total{listener="https",result="ok"}"#
        ),
        1.0
    );
    assert!(
        !b.metrics().render().contains("lockstep_acme_orders_total{"),
        "b ordered nothing"
    );
    let kept: Vec<_> = std::fs::read_dir(&store_b)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("https.")
        })
        .collect();
    assert_eq!(
        kept.len(),
        2,
        "b kept the shared certificate and key: {kept:?}"
    );
    for f in &kept {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    b.shutdown(Duration::from_secs(1)).await;
    a.shutdown(Duration::from_secs(1)).await;
}

/// The certificates of the admin API (`GET /api/certificates`).
async fn api_certificates(app: &lockstep::appliance::Appliance) -> Vec<serde_json::Value> {
    let admin = app.admin_addr().expect("admin listener");
    let r = get(&h1_client(), admin, "/api/certificates").await;
    assert_eq!(r.status, 200, "{r:?}");
    serde_json::from_slice(&r.bytes).expect("JSON")
}

/// An ACME CA that cannot be reached: the listener still serves (TLS without a certificate
/// yet refuses handshakes, plain HTTP goes on), and the admin API and status page say why
/// nothing was issued and when the next try is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_ca_is_shown_with_its_error_and_next_try() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCert::new(dir.path(), "ca.test");
    let dead = dead_address();
    let backend = DemoBackend::start("b1").await;
    let yaml = format!(
        "listeners:\n  - name: http\n    bind: \"127.0.0.1:0\"\n  - name: https\n    bind: \"127.0.0.1:0\"\n    tls:\n      acme:\n        directory: \"https://{}/dir\"\n        ca: \"{}\"\n        store: \"{}\"\n\
         routes:\n  - {{ host: www.farm.test, pool: www }}\n\
         pools:\n  - name: www\n    backends:\n{}\
         admin:\n  bind: \"127.0.0.1:0\"\n",
        dead.addr,
        ca.cert_path.display(),
        dir.path().join("acme").display(),
        backend.yaml()
    );
    let app = start(&yaml).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let last = loop {
        let last = api_certificates(&app).await;
        let failed = last.iter().any(|c| {
            c["listener"] == "https"
                && c["acme"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("ACME CA"))
        });
        if failed {
            break last;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no ACME error shown: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let c = last.iter().find(|c| c["listener"] == "https").unwrap();
    assert_eq!(c["certificate"], "ACME: not issued yet");
    assert_eq!(c["names"], serde_json::json!(["www.farm.test"]));
    assert!(c["not_after"].is_null());
    // The next try backs off a minute.
    let now = lockstep::sync::clock::wall_us() / 1_000_000;
    let next = c["acme"]["next_order"].as_u64().unwrap();
    assert!(
        (now + 50..=now + 61).contains(&next),
        "next try at {next}, now {now}"
    );
    assert_eq!(
        series(
            &app,
            r#"lockstep_acme_orders_total{listener="https",result="error"}"#
        ),
        1.0
    );
    app.shutdown(Duration::from_secs(1)).await;
}
