//! The harness of the end-to-end sync tests: `lockstep serve` as the hub and `lockstep agent`
//! sidecars as real processes (in their own process groups, killed on drop), a minimal
//! blocking HTTP/1.1 client, and [`wait_for`] (a condition with a deadline, never a bare sleep).
#![allow(dead_code)] // Each test binary uses a different subset.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_lockstep");
pub const AGENT_TOKEN: &str = "e2e-agent-token";
pub const PUBLISH_TOKEN: &str = "e2e-publish-token";
/// How long anything we wait for may take.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Polls `cond` every 20 ms until it holds; panics with `what` (and `context()`) after
/// [`DEADLINE`].
#[track_caller]
pub fn wait_for(what: &str, context: impl Fn() -> String, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        if Instant::now() >= deadline {
            panic!("waited {DEADLINE:?} for {what}\n{}", context());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal blocking HTTP/1.1 client (one request per connection).

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> std::io::Result<Reply> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no head"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Ok(Reply {
        status,
        headers,
        body,
    })
}

pub fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..i]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + size]);
        b = &b[i + 2 + size + 2..];
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Processes

pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        use std::os::unix::process::CommandExt;
        // Its own process group: `faketime` runs the agent as its child, and killing the group
        // kills both (killing `faketime` alone would leave the agent running).
        let child = cmd
            .process_group(0)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("cannot start a process");
        Proc { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Farm {
    pub dir: tempfile::TempDir,
    pub hub_port: u16,
    pub admin_port: u16,
    pub hub: Option<Proc>,
}

pub struct Agent {
    pub name: String,
    pub port: u16,
    pub proc: Proc,
    pub cfg: PathBuf,
    pub clock: Option<&'static str>,
}

impl Farm {
    pub fn new(cadence: &str, lead: &str) -> Farm {
        Farm::with_sync(cadence, lead, "")
    }

    /// As [`Farm::new`], with `extra` lines in the hub's `sync:` section (indented by two).
    pub fn with_sync(cadence: &str, lead: &str, extra: &str) -> Farm {
        let dir = tempfile::tempdir().unwrap();
        write_private(&dir.path().join("agent.token"), AGENT_TOKEN);
        write_private(&dir.path().join("publish.token"), PUBLISH_TOKEN);
        let (hub_port, admin_port) = (free_port(), free_port());
        let yaml = format!(
            "sync:\n  bind: \"127.0.0.1:{hub_port}\"\n  store: hub-store\n  cadence: {cadence}\n  lead: {lead}\n  \
             agent_token_file: agent.token\n  publish_token_file: publish.token\n{extra}\
             admin:\n  bind: \"127.0.0.1:{admin_port}\"\n"
        );
        std::fs::write(dir.path().join("hub.yaml"), yaml).unwrap();
        let mut farm = Farm {
            dir,
            hub_port,
            admin_port,
            hub: None,
        };
        farm.start_hub();
        farm
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn hub_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.hub_port)
    }

    pub fn start_hub(&mut self) {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--workers", "1", "-c"])
            .arg(self.path("hub.yaml"))
            .current_dir(self.dir.path());
        self.hub = Some(Proc::spawn(cmd, self.path("hub.log")));
        let port = self.hub_port;
        wait_for(
            "the hub to answer",
            || self.hub_log(),
            || {
                http(port, "GET", "/sync/v1/time", Some(AGENT_TOKEN), b"")
                    .is_ok_and(|r| r.status == 200)
            },
        );
    }

    pub fn hub_log(&self) -> String {
        self.hub.as_ref().map(Proc::log).unwrap_or_default()
    }

    pub fn schedule(&self) -> serde_json::Value {
        let r = http(
            self.hub_port,
            "GET",
            "/sync/v1/schedule",
            Some(AGENT_TOKEN),
            b"",
        )
        .unwrap();
        serde_json::from_slice(&r.body).unwrap()
    }

    pub fn metric(&self, name: &str) -> f64 {
        let r = http(self.admin_port, "GET", "/metrics", None, b"").unwrap();
        String::from_utf8_lossy(&r.body)
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    /// Starts `lockstep agent`, under `faketime -f CLOCK` when `clock` is set.
    pub fn agent(&self, name: &str, clock: Option<&'static str>, extra: &str) -> Agent {
        let port = free_port();
        let cfg = self.path(&format!("{name}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "name: {name}\nhub: \"{}\"\ntoken_file: agent.token\nstore: {name}-store\nserve: \"127.0.0.1:{port}\"\n{extra}",
                self.hub_url()
            ),
        )
        .unwrap();
        let mut agent = Agent {
            name: name.to_string(),
            port,
            proc: self.spawn_agent(&cfg, clock, name),
            cfg,
            clock,
        };
        agent.wait_listening();
        agent
    }

    pub fn spawn_agent(&self, cfg: &Path, clock: Option<&'static str>, name: &str) -> Proc {
        let mut cmd = match clock {
            Some(offset) => {
                let mut c = Command::new("faketime");
                c.args(["-f", offset, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(["agent", "-c"])
            .arg(cfg)
            .current_dir(self.dir.path());
        let n = std::fs::read_dir(self.dir.path()).unwrap().count();
        Proc::spawn(cmd, self.path(&format!("{name}.{n}.log")))
    }

    pub fn restart(&self, agent: &mut Agent) {
        agent.proc.kill9();
        agent.proc = self.spawn_agent(&agent.cfg, agent.clock, &agent.name);
        agent.wait_listening();
    }

    /// `lockstep status` with the token in `token_file` (of the farm's directory): its output.
    pub fn status(&self, token_file: &str) -> String {
        let o = Command::new(BIN)
            .args(["status", "--hub", &self.hub_url(), "--token-file"])
            .arg(self.path(token_file))
            .args(["--admin", &format!("http://127.0.0.1:{}", self.admin_port)])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    /// Runs `lockstep publish` to completion; returns the release id it printed.
    pub fn publish(&self, site: &Path, at: &str) -> String {
        let o = Command::new(BIN)
            .args(["publish", "--hub", &self.hub_url(), "--token-file"])
            .arg(self.path("publish.token"))
            .args(["--at", at])
            .arg(site)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            o.status.success(),
            "publish failed: {out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        out.lines()
            .find_map(|l| l.strip_prefix("release "))
            .unwrap_or_else(|| panic!("no release id in: {out}"))
            .trim()
            .to_string()
    }

    pub fn site(&self, name: &str, files: &[(String, Vec<u8>)]) -> PathBuf {
        let root = self.path(name);
        let _ = std::fs::remove_dir_all(&root);
        for (path, content) in files {
            let p = root.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        root
    }
}

impl Agent {
    pub fn wait_listening(&mut self) {
        let port = self.port;
        let log = self.proc.log.clone();
        let deadline = Instant::now() + DEADLINE;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                self.proc.running(),
                "agent {} exited:\n{}",
                self.name,
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            assert!(
                Instant::now() < deadline,
                "agent {} did not listen:\n{}",
                self.name,
                self.proc.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The release the agent serves now (`X-Lockstep-Release` of `GET /`).
    pub fn release(&self) -> Option<String> {
        let r = http(self.port, "GET", "/", None, b"").ok()?;
        r.header("x-lockstep-release")
            .map(str::to_string)
            .filter(|s| !s.is_empty())
    }

    pub fn get(&self, path: &str) -> Reply {
        http(self.port, "GET", path, None, b"").unwrap()
    }
}

pub fn text_files(n: usize, tag: &str) -> Vec<(String, Vec<u8>)> {
    let mut files = vec![(
        "index.html".to_string(),
        format!("<h1>{tag}</h1>").into_bytes(),
    )];
    for i in 1..n {
        files.push((
            format!("pages/p{i}.txt"),
            format!("page {i} of {tag}\n").into_bytes(),
        ));
    }
    files
}

/// Pseudo-random bytes (xorshift), distinct per `seed`.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

impl Agent {
    /// A counter or gauge of the agent's `/.lockstep/metrics` (the sum over its label sets).
    pub fn metric(&self, name: &str) -> f64 {
        let r = http(self.port, "GET", "/.lockstep/metrics", None, b"").unwrap();
        String::from_utf8_lossy(&r.body)
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The body served for `path`, if 200.
    pub fn body(&self, path: &str) -> Option<Vec<u8>> {
        let r = http(self.port, "GET", path, None, b"").ok()?;
        (r.status == 200).then_some(r.body)
    }
}

/// Every regular file under `dir` with its content, by relative path.
pub fn tree(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(p);
            } else if t.is_file() {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().to_string();
                if let Ok(b) = std::fs::read(&p) {
                    out.insert(rel, b);
                }
            }
        }
    }
    out
}
