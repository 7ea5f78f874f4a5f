//! The sync end-to-end harness: `lockstep serve` as the hub and `lockstep agent` sidecars as
//! real processes ([`Proc`]: own process groups, killed on drop), every listener configured on
//! `127.0.0.1:0` and its real address read back from the process's log; publishing and
//! `lockstep status` through the binary; site trees and their contents.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use super::client::{request, Reply};
use super::process::{Proc, BIN};
use super::wait::{self, DEADLINE};

pub const AGENT_TOKEN: &str = "e2e-agent-token";
pub const PUBLISH_TOKEN: &str = "e2e-publish-token";

/// One end-to-end test at a time: they share two cores.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A hub in a temporary directory (its config `hub.yaml`, the tokens, its store), agents
/// started in the same directory.
pub struct Farm {
    pub dir: tempfile::TempDir,
    /// The hub's sync API, as the running hub bound it (a restarted hub binds another port).
    pub hub_addr: SocketAddr,
    /// The hub's admin listener, as the running hub bound it.
    pub admin_addr: SocketAddr,
    pub hub: Option<Proc>,
}

/// A `lockstep agent`.
pub struct Agent {
    pub name: String,
    /// Its serve listener, as the running process bound it (a restart binds another port).
    pub addr: SocketAddr,
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
        let yaml = format!(
            "sync:\n  bind: \"127.0.0.1:0\"\n  store: hub-store\n  cadence: {cadence}\n  lead: {lead}\n  \
             agent_token_file: agent.token\n  publish_token_file: publish.token\n{extra}\
             admin:\n  bind: \"127.0.0.1:0\"\n"
        );
        std::fs::write(dir.path().join("hub.yaml"), yaml).unwrap();
        let unbound = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut farm = Farm {
            dir,
            hub_addr: unbound,
            admin_addr: unbound,
            hub: None,
        };
        farm.start_hub();
        farm
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn hub_url(&self) -> String {
        format!("http://{}", self.hub_addr)
    }

    /// Starts (or restarts) the hub; learns the addresses it bound from its log and waits
    /// until its sync API answers.
    pub fn start_hub(&mut self) {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--workers", "1", "-c"])
            .arg(self.path("hub.yaml"))
            .current_dir(self.dir.path());
        let n = std::fs::read_dir(self.dir.path()).unwrap().count();
        let mut hub = Proc::spawn(cmd, self.path(&format!("hub.{n}.log")));
        self.hub_addr = hub.bound_addr(&["sync hub listening"], "addr");
        self.admin_addr = hub.bound_addr(&["admin listening"], "addr");
        let addr = self.hub_addr;
        hub.wait_until("the hub to answer", |_| {
            request(addr, "GET", "/sync/v1/time", Some(AGENT_TOKEN), b"")
                .is_ok_and(|r| r.status == 200)
        });
        self.hub = Some(hub);
    }

    pub fn hub_log(&self) -> String {
        self.hub.as_ref().map(Proc::log).unwrap_or_default()
    }

    pub fn schedule(&self) -> serde_json::Value {
        let r = request(
            self.hub_addr,
            "GET",
            "/sync/v1/schedule",
            Some(AGENT_TOKEN),
            b"",
        )
        .unwrap();
        serde_json::from_slice(&r.bytes).unwrap()
    }

    pub fn metric(&self, name: &str) -> f64 {
        let r = request(self.admin_addr, "GET", "/metrics", None, b"").unwrap();
        r.body
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    /// Starts `lockstep agent` (serving on `127.0.0.1:0`), under `faketime -f CLOCK` when
    /// `clock` is set; returns once it has logged the address it serves on.
    pub fn agent(&self, name: &str, clock: Option<&'static str>, extra: &str) -> Agent {
        self.agent_of(&format!("\"{}\"", self.hub_url()), name, clock, extra)
    }

    /// As [`Farm::agent`], with `hub` (a YAML value: one URL or a list) as its hubs.
    pub fn agent_of(
        &self,
        hub: &str,
        name: &str,
        clock: Option<&'static str>,
        extra: &str,
    ) -> Agent {
        let cfg = self.path(&format!("{name}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "name: {name}\nhub: {hub}\ntoken_file: agent.token\nstore: {name}-store\nserve: \"127.0.0.1:0\"\n{extra}"
            ),
        )
        .unwrap();
        let mut proc = self.spawn_agent(&cfg, clock, name);
        Agent {
            name: name.to_string(),
            addr: Agent::serving(&mut proc),
            proc,
            cfg,
            clock,
        }
    }

    pub fn spawn_agent(&self, cfg: &Path, clock: Option<&'static str>, name: &str) -> Proc {
        let mut cmd = match clock {
            Some(offset) => {
                super::process::require_tool("faketime", "faketime");
                forget_dead_faketimes();
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
        agent.addr = Agent::serving(&mut agent.proc);
    }

    /// `lockstep status` with the token in `token_file` (of the farm's directory): its output.
    pub fn status(&self, token_file: &str) -> String {
        let o = Command::new(BIN)
            .args(["status", "--hub", &self.hub_url(), "--token-file"])
            .arg(self.path(token_file))
            .args(["--admin", &format!("http://{}", self.admin_addr)])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    /// Runs `lockstep publish` to completion; returns the release id it printed.
    pub fn publish(&self, site: &Path, at: &str) -> String {
        self.publish_signed(site, at, &[])
    }

    /// As [`Farm::publish`], signed with each of `keys` (secret key files in the farm's
    /// directory, from [`Farm::keygen`]).
    pub fn publish_signed(&self, site: &Path, at: &str, keys: &[&str]) -> String {
        let mut cmd = Command::new(BIN);
        cmd.args(["publish", "--hub", &self.hub_url(), "--token-file"])
            .arg(self.path("publish.token"))
            .args(["--at", at]);
        for k in keys {
            cmd.arg("--sign-key").arg(self.path(k));
        }
        let o = cmd.arg(site).output().unwrap();
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

    /// `lockstep keygen --out NAME` in the farm's directory: NAME (secret) and NAME.pub.
    pub fn keygen(&self, name: &str) -> PathBuf {
        let out = self.path(name);
        let o = Command::new(BIN)
            .args(["keygen", "--comment", name, "--out"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "keygen failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    }

    /// The fleet as the hub reports it (`GET /sync/v1/agents`).
    pub fn fleet(&self) -> serde_json::Value {
        let r = request(
            self.hub_addr,
            "GET",
            "/sync/v1/agents",
            Some(AGENT_TOKEN),
            b"",
        )
        .unwrap();
        serde_json::from_slice(&r.bytes).unwrap()
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
    /// The address a freshly spawned agent serves on, from its `agent started serve=…` line.
    fn serving(proc: &mut Proc) -> SocketAddr {
        proc.bound_addr(&["agent started"], "serve")
    }

    /// The release the agent serves now (`X-Lockstep-Release` of `GET /`).
    pub fn release(&self) -> Option<String> {
        let r = request(self.addr, "GET", "/", None, b"").ok()?;
        r.header("x-lockstep-release")
            .map(str::to_string)
            .filter(|s| !s.is_empty())
    }

    pub fn get(&self, path: &str) -> Reply {
        request(self.addr, "GET", path, None, b"").unwrap()
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
        let r = request(self.addr, "GET", "/.lockstep/metrics", None, b"").unwrap();
        r.body
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// One labelled series of a counter of the agent's metrics, e.g.
    /// `labelled("lockstep_agent_refused_total", "what=\"signature\"")`.
    pub fn labelled(&self, name: &str, labels: &str) -> f64 {
        let r = request(self.addr, "GET", "/.lockstep/metrics", None, b"").unwrap();
        let prefix = format!("{name}{{{labels}}} ");
        r.body
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Whether the agent's store holds the blob of `content`.
    pub fn has_blob(&self, farm: &Farm, content: &[u8]) -> bool {
        let hash = blake3::hash(content).to_hex().to_string();
        farm.path(&format!("{}-store/blobs/{}/{hash}", self.name, &hash[..2]))
            .exists()
    }

    /// The body served for `path`, if 200.
    pub fn body(&self, path: &str) -> Option<Vec<u8>> {
        let r = request(self.addr, "GET", path, None, b"").ok()?;
        (r.status == 200).then_some(r.bytes)
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

/// The faketime wrapper names a semaphore and a shared-memory segment after its pid and
/// refuses to start ("sem_open: File exists") when they exist; one killed with SIGKILL (as
/// the tests stop agents) leaves them behind, so a later wrapper given the same pid fails.
/// Those of processes that are gone are removed first.
fn forget_dead_faketimes() {
    let Ok(entries) = std::fs::read_dir("/dev/shm") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("sem.faketime_sem_")
            .or_else(|| name.strip_prefix("faketime_shm_"));
        if let Some(pid) = pid.filter(|p| p.bytes().all(|b| b.is_ascii_digit())) {
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
