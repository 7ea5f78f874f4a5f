//! A real etcd cluster on loopback (Debian `etcd-server`), started by the test that needs it:
//! `n` members, each a process in its own data directory, killed when dropped.
//!
//! [`Etcd::start_tls`] starts one that speaks TLS to its clients and asks for their
//! certificates ([`EtcdPki`]: a CA, etcd's certificate for 127.0.0.1, a client's).
//!
//! etcd needs its ports before it starts (every member names its peers' URLs), so they cannot
//! be `:0`: they are drawn at random below the kernel's ephemeral range (so no outgoing
//! connection takes one meanwhile), probed free, and if a member still fails to bind, the
//! whole cluster is started again on new ones.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::process::{require_tool, Proc};

/// One member.
pub struct Member {
    /// Its name (`m0`, `m1`, …).
    pub name: String,
    /// Its client port.
    pub client: u16,
    /// Its peer port.
    pub peer: u16,
    /// Its metrics port (plain HTTP, `/health` and `/metrics`, whatever the client URLs).
    pub metrics: u16,
    proc: Option<Proc>,
}

/// A running cluster.
pub struct Etcd {
    /// The members.
    pub members: Vec<Member>,
    dir: tempfile::TempDir,
    initial: String,
    tls: Option<EtcdPki>,
}

/// The certificates of an etcd that checks its clients' (PEM files).
#[derive(Clone)]
pub struct EtcdPki {
    /// The CA that issued both.
    pub ca: PathBuf,
    /// etcd's certificate (127.0.0.1, localhost) and key.
    pub server: (PathBuf, PathBuf),
    /// A client's certificate and key.
    pub client: (PathBuf, PathBuf),
}

impl EtcdPki {
    /// Makes a CA and the two certificates it issues, in `dir`.
    pub fn new(dir: &std::path::Path) -> EtcdPki {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "etcd test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issue = |name: &str, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            p.subject_alt_names
                .push(SanType::IpAddress([127, 0, 0, 1].into()));
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            p.extended_key_usages = vec![usage];
            let cert = p
                .signed_by(&key, &rcgen::Issuer::from_params(&ca, &ca_key))
                .unwrap();
            let (c, k) = (
                dir.join(format!("{name}.crt")),
                dir.join(format!("{name}.key")),
            );
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            (c, k)
        };
        let server = issue("etcd", ExtendedKeyUsagePurpose::ServerAuth);
        let client = issue("hub", ExtendedKeyUsagePurpose::ClientAuth);
        let ca = dir.join("etcd-ca.crt");
        std::fs::write(&ca, ca_cert.pem()).unwrap();
        EtcdPki { ca, server, client }
    }
}

/// Three consecutive free ports: client, peer, metrics.
fn free_ports() -> Option<u16> {
    // Below 32768, where Linux draws ephemeral ports by default.
    let base = 20_000 + (rand_u32() % 4_000) as u16 * 3;
    let held: Vec<TcpListener> = (0..3)
        .map(|k| TcpListener::bind(("127.0.0.1", base + k)).ok())
        .collect::<Option<_>>()?;
    drop(held);
    Some(base)
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos() ^ std::process::id() as u128);
    h.finish() as u32
}

impl Etcd {
    /// Starts `n` members and waits until every one answers `/health`.
    pub fn start(n: usize) -> Etcd {
        Etcd::start_with(n, None)
    }

    /// Starts one member that speaks TLS to its clients with `pki` and asks for their
    /// certificates.
    pub fn start_tls(pki: &EtcdPki) -> Etcd {
        Etcd::start_with(1, Some(pki))
    }

    fn start_with(n: usize, tls: Option<&EtcdPki>) -> Etcd {
        require_tool("etcd", "etcd-server");
        let mut last = String::new();
        for _ in 0..5 {
            match Etcd::try_start(n, tls) {
                Ok(e) => return e,
                Err(why) => last = why,
            }
        }
        panic!("etcd did not start in 5 attempts: {last}");
    }

    fn try_start(n: usize, tls: Option<&EtcdPki>) -> Result<Etcd, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut members = Vec::new();
        while members.len() < n {
            if let Some(base) = free_ports() {
                if members.iter().any(|m: &Member| m.client.abs_diff(base) < 3) {
                    continue;
                }
                members.push(Member {
                    name: format!("m{}", members.len()),
                    client: base,
                    peer: base + 1,
                    metrics: base + 2,
                    proc: None,
                });
            }
        }
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd {
            members,
            dir,
            initial,
            tls: tls.cloned(),
        };
        for i in 0..n {
            etcd.spawn(i, "new");
        }
        etcd.wait_healthy()?;
        Ok(etcd)
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let m = &self.members[i];
        let data: PathBuf = self.dir.path().join(&m.name);
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut cmd = Command::new("etcd");
        if let Some(pki) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&pki.server.0)
                .arg("--key-file")
                .arg(&pki.server.1)
                .arg("--trusted-ca-file")
                .arg(&pki.ca)
                .arg("--client-cert-auth");
        }
        cmd.args([
            "--name",
            &m.name,
            "--data-dir",
            data.to_str().unwrap(),
            "--listen-client-urls",
            &format!("{scheme}://127.0.0.1:{}", m.client),
            "--advertise-client-urls",
            &format!("{scheme}://127.0.0.1:{}", m.client),
            "--listen-metrics-urls",
            &format!("http://127.0.0.1:{}", m.metrics),
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{}", m.peer),
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{}", m.peer),
            "--initial-cluster",
            &self.initial,
            "--initial-cluster-state",
            state,
            "--initial-cluster-token",
            "lockstep-test",
            // Quick elections: the tests kill leaders.
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
            "--log-level",
            "warn",
        ]);
        let log = self.dir.path().join(format!("{}.log", m.name));
        self.members[i].proc = Some(Proc::spawn(cmd, log));
    }

    fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut healthy = 0;
            for m in &mut self.members {
                let p = m.proc.as_mut().expect("started");
                if !p.running() {
                    return Err(format!("member {} exited:\n{}", m.name, p.log()));
                }
                if health(m.metrics) {
                    healthy += 1;
                }
            }
            if healthy == self.members.len() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err("members not healthy within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The client URLs, for `sync.cluster.etcd`.
    pub fn endpoints(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.members
            .iter()
            .map(|m| format!("{scheme}://127.0.0.1:{}", m.client))
            .collect()
    }

    /// The endpoints as a YAML flow list.
    pub fn yaml_list(&self) -> String {
        format!("[{}]", self.endpoints().join(", "))
    }

    /// `kill -9` of member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill9();
        }
    }

    /// Stops member `i` (SIGSTOP): it holds its sockets and answers nothing.
    pub fn pause(&self, i: usize) {
        self.members[i]
            .proc
            .as_ref()
            .expect("running")
            .signal("STOP");
    }

    /// Resumes a paused member.
    pub fn resume(&self, i: usize) {
        self.members[i]
            .proc
            .as_ref()
            .expect("running")
            .signal("CONT");
    }

    /// Starts a killed member again on its data directory and waits until the cluster is
    /// healthy again.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i, "existing");
        if let Err(why) = self.wait_healthy() {
            panic!("member {i} did not come back: {why}");
        }
    }

    /// The member that leads the cluster now (its `/metrics` says `etcd_server_is_leader 1`).
    pub fn leader(&self) -> Option<usize> {
        self.members.iter().position(|m| {
            m.proc.is_some() && get(m.metrics, "/metrics").contains("\netcd_server_is_leader 1")
        })
    }
}

/// Whether the member on `port` says it is healthy (`GET /health`).
pub fn health(port: u16) -> bool {
    get(port, "/health").contains("\"health\":\"true\"")
}

/// `GET path` from the member on `port`: the whole answer, empty if it does not answer.
fn get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return String::new();
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}
