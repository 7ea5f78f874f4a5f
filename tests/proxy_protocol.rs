//! The PROXY protocol (v1 and v2) both ways against a real HAProxy (Debian `haproxy`, started
//! here): in front of lockstep with `send-proxy` / `send-proxy-v2` (the client's address then
//! reaches the backend in X-Forwarded-For), and behind it with `accept-proxy` (HAProxy answers
//! with the source it was told). Clients connect from other loopback addresses (127.0.0.2,
//! 127.0.0.3) so that the client's address differs from the balancer's.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use common::*;

/// A HAProxy started from `config` (`{name}` placeholders already filled), killed on drop.
struct Haproxy {
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    fn start(config: &str, listens: SocketAddr) -> Haproxy {
        require_tool("haproxy", "haproxy");
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg, config).unwrap();
        let mut cmd = std::process::Command::new("haproxy");
        cmd.arg("-db").arg("-f").arg(&cfg);
        let proc = Proc::spawn(cmd, dir.path().join("haproxy.log"));
        // Ready when it accepts.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(listens).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "haproxy did not listen on {listens}:\n{}",
                proc.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Haproxy {
            _proc: proc,
            _dir: dir,
        }
    }
}

/// A free port on 127.0.0.1 (bound and released: HAProxy needs it in its file).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 GET from `from` (a loopback address) to `to`; the whole answer.
async fn get_from(from: [u8; 4], to: SocketAddr, path: &str) -> String {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from((from, 0))).unwrap();
    let mut c = s.connect(to).await.expect("connect");
    c.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: www.farm.test\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out))
        .await
        .expect("answer within 5 s")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn yaml(listener_extra: &str, backends: &str, pool_extra: &str) -> String {
    farm_yaml_with(listener_extra, backends, pool_extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_in_front_with_send_proxy_v1_and_v2_gives_the_client_address() {
    let web = DemoBackend::start("web-1").await;
    let app = start(&yaml(
        "    proxy_protocol: { from: [\"127.0.0.1\"] }\n",
        &web.yaml(),
        "",
    ))
    .await;
    let lockstep = proxy_addr(&app);
    let (v1, v2) = (free_port(), free_port());
    let _haproxy = Haproxy::start(
        &format!(
            "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n\
             listen v1\n  bind 127.0.0.1:{v1}\n  server lockstep {lockstep} send-proxy\n\
             listen v2\n  bind 127.0.0.1:{v2}\n  server lockstep {lockstep} send-proxy-v2\n"
        ),
        SocketAddr::from(([127, 0, 0, 1], v2)),
    );
    for (port, from) in [(v1, [127, 0, 0, 2]), (v2, [127, 0, 0, 3])] {
        let answer = get_from(
            from,
            SocketAddr::from(([127, 0, 0, 1], port)),
            "/echo-headers",
        )
        .await;
        let ip = std::net::Ipv4Addr::from(from).to_string();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // The backend is told the client's address, not HAProxy's (127.0.0.1).
        assert!(
            answer.contains(&format!("x-forwarded-for: {ip}\n")),
            "port {port}: {answer}"
        );
    }

    // A connection from the trusted balancer without a header is closed unanswered; from
    // anyone else, a PROXY line is not a header but a malformed request.
    let mut c = TcpStream::connect(lockstep).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    let forged = get_from([127, 0, 0, 4], lockstep, "/").await;
    let forged_line = raw_exchange_from([127, 0, 0, 4], lockstep).await;
    assert!(forged.starts_with("HTTP/1.1 200"), "{forged}");
    // Not a header from there: a malformed request line (its "version" is an address).
    assert!(
        forged_line.starts_with("HTTP/1.1 505") || forged_line.starts_with("HTTP/1.1 400"),
        "{forged_line}"
    );
    app.shutdown(Duration::from_millis(200)).await;
}

/// A forged PROXY header sent directly by a host that is not a trusted balancer.
async fn raw_exchange_from(from: [u8; 4], to: SocketAddr) -> String {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from((from, 0))).unwrap();
    let mut c = s.connect(to).await.expect("connect");
    c.write_all(b"PROXY TCP4 203.0.113.9 127.0.0.1 1234 80\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockstep_sends_proxy_v1_and_v2_to_haproxy_with_accept_proxy() {
    let (v1, v2) = (free_port(), free_port());
    // HAProxy as the backend: answers with the source and destination its PROXY header gave.
    let _haproxy = Haproxy::start(
        &format!(
            "defaults\n  mode http\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n\
             frontend v1\n  bind 127.0.0.1:{v1} accept-proxy\n  \
             http-request return status 200 content-type text/plain lf-string \"v1 %[src]:%[src_port] -> %[dst]:%[dst_port]\"\n\
             frontend v2\n  bind 127.0.0.1:{v2} accept-proxy\n  \
             http-request return status 200 content-type text/plain lf-string \"v2 %[src]:%[src_port] -> %[dst]:%[dst_port]\"\n"
        ),
        SocketAddr::from(([127, 0, 0, 1], v2)),
    );
    for (port, version) in [(v1, "v1"), (v2, "v2")] {
        let backends = format!("      - {{ name: hap, address: \"127.0.0.1:{port}\" }}\n");
        // Health checks go with a LOCAL header, which accept-proxy takes.
        let pool = format!(
            "    send_proxy: {version}\n    health: {{ path: /, interval: 200ms, rise: 1, fall: 1 }}\n"
        );
        let app = start(&yaml("", &backends, &pool)).await;
        let lockstep = proxy_addr(&app);
        for from in [[127, 0, 0, 2], [127, 0, 0, 3]] {
            let answer = get_from(from, lockstep, "/").await;
            let want = format!("{version} {}:", std::net::Ipv4Addr::from(from));
            assert!(answer.contains(&want), "{want}: {answer}");
            assert!(
                answer.contains(&format!("-> {lockstep}")),
                "the address the client connected to: {answer}"
            );
        }
        // The checks pass: the backend stays up.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let metrics = get(&h1_client(), app.admin_addr().unwrap(), "/metrics").await;
        assert!(
            metrics
                .body
                .contains("lockstep_backend_up{pool=\"www\",backend=\"hap\"} 1"),
            "{}",
            metrics.body
        );
        app.shutdown(Duration::from_millis(200)).await;
    }
}

/// Every PROXY protocol mistake is refused where it is written.
#[test]
fn proxy_protocol_config_is_checked() {
    let y = "listeners:\n  - name: http\n    bind: \"127.0.0.1:8080\"\n    proxy_protocol: { from: [\"0.0.0.0/0\", \"nonsense\"] }\n\
             \x20 - name: empty\n    bind: \"127.0.0.1:8081\"\n    proxy_protocol: { from: [] }\n\
             routes:\n  - { pool: www }\n\
             pools:\n  - name: www\n    send_proxy: v3\n    backends:\n      - { name: a, address: \"127.0.0.1:9\" }\n";
    let e = lockstep::config::parse(std::path::Path::new("pp.yaml"), y)
        .expect_err("refused")
        .to_string();
    for (line, says) in [
        (
            4,
            "is every address: anyone could then claim any client address",
        ),
        (
            4,
            "proxy_protocol source `nonsense` is not an address or CIDR",
        ),
        (5, "proxy_protocol.from is empty"),
        (12, "send_proxy `v3`: write v1 or v2"),
    ] {
        assert!(
            e.lines()
                .any(|l| l.contains(&format!("pp.yaml:{line}:")) && l.contains(says)),
            "line {line} should say {says:?}:\n{e}"
        );
    }
}

/// A TLS listener behind a balancer: the PROXY header comes first, then the TLS handshake;
/// the client's address from the header reaches the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_listener_reads_the_header_before_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::new(dir.path(), "www.farm.test");
    let web = DemoBackend::start("web-1").await;
    let yaml = format!(
        "listeners:\n  - name: https\n    bind: \"127.0.0.1:0\"\n    proxy_protocol: {{ from: [\"127.0.0.1\"] }}\n    \
         tls:\n      certificates:\n{}\
         routes:\n  - {{ pool: www }}\n\
         pools:\n  - name: www\n    backends:\n{}",
        cert.yaml(),
        web.yaml()
    );
    let app = start(&yaml).await;
    let addr = app.local_addr("https").unwrap();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let header = lockstep::net::proxy_protocol::encode(
        lockstep::net::proxy_protocol::Version::V2,
        Some(("203.0.113.7:40000".parse().unwrap(), addr)),
    );
    tcp.write_all(&header).await.unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der.clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let name = rustls_pki_types::ServerName::try_from("www.farm.test").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("TLS after the header");
    tls.write_all(
        b"GET /echo-headers HTTP/1.1\r\nHost: www.farm.test\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    let answer = String::from_utf8_lossy(&out);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("x-forwarded-for: 203.0.113.7\n"),
        "{answer}"
    );
    assert!(answer.contains("x-forwarded-proto: https\n"), "{answer}");
    app.shutdown(Duration::from_millis(200)).await;
}
