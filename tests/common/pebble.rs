//! A real ACME CA for the tests: Debian's `pebble` (RFC 8555 test server), started on
//! loopback with its own HTTPS certificate, validating challenges at the ports the appliance
//! under test listens on and resolving names through the appliance's own DNS responder.

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::process::{require_tool, Proc};
use super::wait::until_blocking;

/// Consecutive free ports from `base`: `n` of them free for TCP and UDP both.
pub fn free_ports(n: u16) -> u16 {
    use std::hash::{BuildHasher, Hasher};
    for attempt in 0..200u32 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(attempt ^ std::process::id());
        // Below 32768, where Linux draws ephemeral ports by default.
        let base = 24_000 + (h.finish() % 8_000) as u16;
        let held: Option<Vec<(TcpListener, UdpSocket)>> = (0..n)
            .map(|k| {
                Some((
                    TcpListener::bind(("127.0.0.1", base + k)).ok()?,
                    UdpSocket::bind(("127.0.0.1", base + k)).ok()?,
                ))
            })
            .collect();
        if held.is_some() {
            return base;
        }
    }
    panic!("no {n} consecutive free ports");
}

/// A running pebble.
pub struct Pebble {
    /// Its directory URL.
    pub directory: String,
    /// The CA certificate of its own HTTPS listener (for `acme.ca`).
    pub wfe_ca: PathBuf,
    /// The management API (`https://127.0.0.1:PORT`), where its issuing root is.
    management: String,
    proc: Proc,
}

impl Pebble {
    /// Starts pebble on `port` (directory) and `port + 1` (management), validating HTTP-01 at
    /// `http_port` and TLS-ALPN-01 at `tls_port` of whatever `dns` (a DNS server's port on
    /// 127.0.0.1) resolves the names to, issuing certificates valid for `validity`; waits
    /// until its directory answers.
    pub fn start(
        dir: &Path,
        port: u16,
        http_port: u16,
        tls_port: u16,
        dns: u16,
        validity: Duration,
    ) -> Pebble {
        require_tool("pebble", "pebble");
        require_tool("curl", "curl");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pebble WFE");
        let cert = params.self_signed(&key).unwrap();
        let wfe_ca = dir.join("pebble-wfe.pem");
        let wfe_key = dir.join("pebble-wfe.key");
        std::fs::write(&wfe_ca, cert.pem()).unwrap();
        std::fs::write(&wfe_key, key.serialize_pem()).unwrap();
        let config = dir.join("pebble.json");
        let json = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{}", port + 1),
            "certificate": wfe_ca,
            "privateKey": wfe_key,
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": validity.as_secs(),
        }});
        std::fs::write(&config, json.to_string()).unwrap();
        let mut cmd = Command::new("pebble");
        cmd.arg("-config")
            .arg(&config)
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{dns}"))
            // No random sleeps before validating, no random nonce rejections, and a fresh
            // authorization for every order (a renewal proves the names again).
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0");
        // It logs to stdout: into a file of its own beside the stderr log.
        let stdout = std::fs::File::create(dir.join("pebble.out")).unwrap();
        let proc = Proc::start(cmd, dir.join("pebble.log"), stdout);
        let pebble = Pebble {
            directory: format!("https://127.0.0.1:{port}/dir"),
            wfe_ca,
            management: format!("https://127.0.0.1:{}", port + 1),
            proc,
        };
        until_blocking(
            "pebble answers its directory",
            Duration::from_secs(20),
            || pebble.log(),
            || pebble.get(&pebble.directory).is_some(),
        );
        pebble
    }

    fn get(&self, url: &str) -> Option<String> {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "5", "--cacert"])
            .arg(&self.wfe_ca)
            .arg(url)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The root its certificates chain to (DER), and its PEM file in `dir`.
    pub fn issuing_root(&self, dir: &Path) -> (rustls_pki_types::CertificateDer<'static>, PathBuf) {
        use rustls_pki_types::pem::PemObject;
        let pem = self
            .get(&format!("{}/roots/0", self.management))
            .expect("pebble gives its root");
        let path = dir.join("pebble-root.pem");
        std::fs::write(&path, &pem).unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .expect("a PEM root")
            .into_owned();
        (der, path)
    }

    /// What it logged.
    pub fn log(&self) -> String {
        let out = self.proc.log.with_extension("out");
        format!(
            "{}{}",
            std::fs::read_to_string(out).unwrap_or_default(),
            self.proc.log()
        )
    }
}
