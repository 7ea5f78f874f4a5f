//! The `lockstep` binary end to end, as an operator drives it: `--version`/`--help`, `check`,
//! and `serve` as a real child process with demo backends, reloads over the socket and by
//! SIGHUP, a refused reload that keeps the old config serving, and SIGTERM.
//!
//! A child's listeners are configured on `127.0.0.1:0` and their real addresses read back
//! from the `listening` lines it logs. Every wait polls a condition with a deadline; every
//! child is killed if its test fails.

mod common;

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::wait::{self, DEADLINE};
use common::{request, run_lockstep, DemoBackends, Proc, BIN};

// ---------------------------------------------------------------------------------------------
// Helpers

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `line:column` (1-based) of the unique `needle` in `text`.
fn pos_of(text: &str, needle: &str) -> String {
    assert_eq!(
        text.matches(needle).count(),
        1,
        "`{needle}` must occur once in:\n{text}"
    );
    let at = text.find(needle).unwrap();
    let line = text[..at].matches('\n').count() + 1;
    let column = at - text[..at].rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("{line}:{column}")
}

/// The name of the backend that answers `GET /` through the proxy.
#[track_caller]
fn backend_behind(proxy: SocketAddr) -> String {
    let r = request(proxy, "GET", "/", None, b"")
        .unwrap_or_else(|e| panic!("GET through the proxy: {e}"));
    assert_eq!(r.status, 200, "body: {}", r.body);
    r.body.lines().next().unwrap_or_default().to_string()
}

/// The config the `serve` tests use: two pools of one demo backend each, one route; the
/// listener and the admin listener on port 0.
fn farm_yaml(backends: &DemoBackends, route_to: &str) -> String {
    format!(
        r#"listeners:
  - name: http
    bind: "127.0.0.1:0"
routes:
  - pool: {route_to}
pools:
  - name: one
    backends:
      - {{ name: web-1, address: "{}" }}
  - name: two
    backends:
      - {{ name: web-2, address: "{}" }}
admin:
  bind: "127.0.0.1:0"
  socket: admin.sock
"#,
        backends.addr(0),
        backends.addr(1)
    )
}

/// A running `lockstep serve`, killed when dropped (so a failing test leaves no process).
struct Server {
    proc: Proc,
    cfg: PathBuf,
    proxy: SocketAddr,
    admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl Server {
    /// Starts `lockstep serve -c DIR/lockstep.yaml` on `yaml` (whose listener `http` and admin
    /// listener are on port 0), reads the addresses they bound from its log and waits until
    /// `/ready` answers.
    fn start(yaml: &str) -> Server {
        Server::start_with(yaml, &[])
    }

    /// [`Server::start`] with more arguments for `serve`.
    fn start_with(yaml: &str, args: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("lockstep.yaml");
        std::fs::write(&cfg, yaml).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("serve").args(args).arg("-c").arg(&cfg);
        let mut proc = Proc::spawn(cmd, dir.path().join("stderr.log"));
        let proxy = proc.bound_addr(&["listening", "listener=http"], "addr");
        let admin = proc.bound_addr(&["admin listening"], "addr");
        let mut server = Server {
            proc,
            cfg,
            proxy,
            admin,
            dir,
        };
        server.wait_until("/ready answers 200", |s| s.generation().is_some());
        server
    }

    /// The generation `/ready` reports, if it answers 200.
    fn generation(&self) -> Option<u64> {
        let r = request(self.admin, "GET", "/ready", None, b"").ok()?;
        if r.status != 200 {
            return None;
        }
        r.body
            .trim()
            .strip_prefix("ready generation=")?
            .parse()
            .ok()
    }

    fn stderr(&self) -> String {
        self.proc.log()
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    /// Waits until `cond` holds; fails (with the server's log) after the deadline, or at once
    /// if the server exits.
    #[track_caller]
    fn wait_until(&mut self, what: &str, cond: impl Fn(&Server) -> bool) {
        let log = self.proc.log.clone();
        let server = std::cell::RefCell::new(self);
        wait::until_blocking(
            what,
            DEADLINE,
            || std::fs::read_to_string(&log).unwrap_or_default(),
            || {
                let mut s = server.borrow_mut();
                assert!(
                    s.proc.running(),
                    "lockstep serve exited while waiting for {what}; stderr:\n{}",
                    s.stderr()
                );
                cond(&s)
            },
        );
    }

    /// Sends `signal` (a `kill` name: HUP, TERM) to the server.
    fn signal(&self, signal: &str) {
        self.proc.signal(signal);
    }
}

// ---------------------------------------------------------------------------------------------
// keygen, check --agent

/// An agent whose hub is on another host is refused by `check --agent` until it trusts a
/// publisher key (the error at `hub`'s line names the fix); `keygen` makes that key.
#[test]
fn check_agent_wants_trusted_keys_for_a_hub_on_another_host() {
    let dir = tempfile::tempdir().unwrap();
    // Everything else right for a hub on another host: https and the agent's own certificate.
    let pki = dir.path().join("pki");
    let mut ca = lockstep::ca::Ca::init(&pki, "t").unwrap();
    let me =
        lockstep::sync::identity::Identity::new(lockstep::sync::identity::Kind::Agent, "web-1")
            .unwrap();
    ca.issue_into(&me, &[], &["10.0.0.11".parse().unwrap()], 1, &pki)
        .unwrap();
    let cfg = dir.path().join("agent.yaml");
    let base = "name: web-1\nhub: \"https://10.0.0.1:7700\"\nstore: store\nserve: \"127.0.0.1:8081\"\n\
                tls: { ca: pki/ca.crt, crl: pki/crl.pem, cert: pki/web-1.crt, key: pki/web-1.key }\n";
    std::fs::write(&cfg, base).unwrap();
    let o = run_lockstep(&[&"check", &"--agent", &"-c", &cfg]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains("agent.yaml:2:6: hub https://10.0.0.1:7700 is not on this host, but trusted_keys is not set")
            && err.contains("lockstep keygen"),
        "{err}"
    );

    let key = dir.path().join("publisher.key");
    let o = run_lockstep(&[&"keygen", &"--out", &key]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("publisher.key.pub (key id "),
        "{}",
        stdout(&o)
    );
    std::fs::write(&cfg, format!("{base}trusted_keys: [publisher.key.pub]\n")).unwrap();
    let o = run_lockstep(&[&"check", &"--agent", &"-c", &cfg]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("1 trusted key(s)"), "{}", stdout(&o));
    // Given the secret key by mistake: refused at its line, saying which file to give.
    std::fs::write(&cfg, format!("{base}trusted_keys: [publisher.key]\n")).unwrap();
    let o = run_lockstep(&[&"check", &"--agent", &"-c", &cfg]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("agent.yaml:6:16: trusted_keys:"),
        "{}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains("give the `.pub` file"),
        "{}",
        stderr(&o)
    );
}

// ---------------------------------------------------------------------------------------------
// --version, --help

#[test]
fn version_prints_name_and_version() {
    let o = run_lockstep(&[&"--version"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).trim(),
        format!("lockstep {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn help_lists_the_commands_with_examples() {
    let o = run_lockstep(&[&"--help"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for word in [
        "serve",
        "check",
        "reload",
        "demo",
        "Examples:",
        "lockstep check -c ",
        "lockstep serve -c ",
    ] {
        assert!(out.contains(word), "--help lacks `{word}`:\n{out}");
    }
    for command in ["serve", "check", "reload", "demo"] {
        let o = run_lockstep(&[&command, &"--help"]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stdout(&o).contains(&format!("lockstep {command}")),
            "`{command} --help` has no example:\n{}",
            stdout(&o)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// check

#[test]
fn check_good_config_prints_ok() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("good.yaml");
    std::fs::write(
        &cfg,
        r#"listeners:
  - { name: http, bind: "127.0.0.1:8080" }
routes:
  - pool: www
pools:
  - name: www
    backends:
      - { name: web-1, address: "127.0.0.1:8081" }
      - { name: web-2, address: "127.0.0.1:8082" }
"#,
    )
    .unwrap();
    let o = run_lockstep(&[&"check", &"-c", &cfg]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with(&format!("{}: OK", cfg.display())), "{out}");
    assert!(
        out.contains("1 listener(s), 1 route(s), 1 pool(s), 2 backend(s)"),
        "{out}"
    );
}

#[test]
fn check_bad_config_lists_every_problem_as_path_line_column_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    let yaml = r#"listeners:
  - { name: http, bind: "127.0.0.1:8080" }
routes:
  - pool: wwx
pools:
  - name: www
    backends:
      - { name: web-1, address: "10.0.0.1" }
    health: { interval: 30 }
"#;
    std::fs::write(&cfg, yaml).unwrap();
    let o = run_lockstep(&[&"check", &"-c", &cfg]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "stdout: {}\nstderr: {}",
        stdout(&o),
        stderr(&o)
    );
    assert!(!stdout(&o).contains("OK"), "{}", stdout(&o));
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some("lockstep: the config has 3 problem(s):"),
        "{err}"
    );
    let p = cfg.display();
    let want = [
        format!(
            "{p}:{}: route to pool `wwx`, which does not exist: did you mean `www`?",
            pos_of(yaml, "wwx")
        ),
        format!(
            "{p}:{}: backend address `10.0.0.1` is not an ip:port address",
            pos_of(yaml, "\"10.0.0.1\"")
        ),
        format!(
            "{p}:{}: health.interval: duration `30` has no unit",
            pos_of(yaml, "30")
        ),
    ];
    assert_eq!(lines.len(), 1 + want.len(), "{err}");
    for (line, want) in lines[1..].iter().zip(&want) {
        assert!(
            line.starts_with(want.as_str()),
            "expected a line starting with\n  {want}\ngot\n  {line}"
        );
    }
}

#[test]
fn check_missing_file_says_it_cannot_read_it_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("nope.yaml");
    let o = run_lockstep(&[&"check", &"-c", &cfg]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("{}: cannot read the config file", cfg.display())),
        "{err}"
    );
    assert!(err.contains("No such file or directory"), "{err}");
}

#[test]
fn check_example_config_with_its_tls_files_prints_ok() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("lockstep.yaml");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/lockstep.yaml"),
        &cfg,
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("tls")).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec![
        "farm.test".to_string(),
        "*.farm.test".to_string(),
    ])
    .unwrap();
    std::fs::write(dir.path().join("tls/farm.crt"), ck.cert.pem()).unwrap();
    std::fs::write(
        dir.path().join("tls/farm.key"),
        ck.signing_key.serialize_pem(),
    )
    .unwrap();
    std::fs::write(dir.path().join("tls/sync.crt"), ck.cert.pem()).unwrap();
    std::fs::write(
        dir.path().join("tls/sync.key"),
        ck.signing_key.serialize_pem(),
    )
    .unwrap();
    std::fs::write(dir.path().join("maintenance.html"), "<h1>back soon</h1>\n").unwrap();
    // etcd's CA and the hub's client certificate (sync.cluster.tls): self-signed, only parsed.
    std::fs::create_dir(dir.path().join("etcd")).unwrap();
    std::fs::write(dir.path().join("etcd/ca.crt"), ck.cert.pem()).unwrap();
    std::fs::write(dir.path().join("etcd/lb-1.crt"), ck.cert.pem()).unwrap();
    std::fs::write(
        dir.path().join("etcd/lb-1.key"),
        ck.signing_key.serialize_pem(),
    )
    .unwrap();
    // The farm CA the sync API checks clients against, made by the binary.
    let o = Command::new(BIN)
        .args(["ca", "init", "--farm", "example", "--dir"])
        .arg(dir.path().join("ca"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for token in ["agent.token", "publish.token", "admin.token"] {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.path().join(token);
        std::fs::write(&p, "secret").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let key = dir.path().join("publisher.key");
    assert!(run_lockstep(&[&"keygen", &"--out", &key]).status.success());
    // Run from elsewhere: the TLS paths resolve against the config's directory, not the cwd.
    let o = Command::new(BIN)
        .arg("check")
        .arg("-c")
        .arg(&cfg)
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains(": OK ("), "{out}");
    assert!(
        out.contains("5 pool(s)") && out.contains(", dns") && out.contains(", sync"),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// serve, reload, signals

#[test]
fn serve_proxies_then_reloads_by_socket_and_sighup_and_refuses_a_broken_config() {
    let backends = DemoBackends::start(&["web-1", "web-2"]);
    let mut server = Server::start(&farm_yaml(&backends, "one"));
    assert_eq!(server.generation(), Some(1));
    assert_eq!(backend_behind(server.proxy), "web-1");
    assert!(
        server.socket().exists(),
        "no reload socket at {}",
        server.socket().display()
    );

    // `lockstep reload` applies the rewritten config and prints the new generation.
    std::fs::write(&server.cfg, farm_yaml(&backends, "two")).unwrap();
    let o = run_lockstep(&[&"reload", &"-c", &server.cfg]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}\nserver:\n{}",
        stderr(&o),
        server.stderr()
    );
    assert_eq!(
        stdout(&o).trim(),
        "reloaded: config generation 2 is serving"
    );
    assert_eq!(backend_behind(server.proxy), "web-2");
    assert_eq!(server.generation(), Some(2));

    // A broken config: `reload -c` refuses it (it reads the same file for admin.socket) ...
    let broken = farm_yaml(&backends, "three");
    std::fs::write(&server.cfg, &broken).unwrap();
    let at = format!(
        "{}:{}: route to pool `three`",
        server.cfg.display(),
        pos_of(&broken, "three")
    );
    let o = run_lockstep(&[&"reload", &"-c", &server.cfg]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains(&at),
        "expected `{at}` in:\n{}",
        stderr(&o)
    );
    // ... and so does the appliance when asked over the socket directly.
    let o = run_lockstep(&[&"reload", &"--socket", &server.socket()]);
    assert_ne!(o.status.code(), Some(0));
    let err = stderr(&o);
    assert!(
        err.contains("reload refused; the running config keeps serving"),
        "{err}"
    );
    assert!(err.contains(&at), "expected `{at}` in:\n{err}");
    assert_eq!(
        backend_behind(server.proxy),
        "web-2",
        "the previous config must keep serving"
    );
    assert_eq!(server.generation(), Some(2));

    // SIGHUP applies a changed config.
    std::fs::write(&server.cfg, farm_yaml(&backends, "one")).unwrap();
    server.signal("HUP");
    server.wait_until("generation 3 after SIGHUP", |s| s.generation() == Some(3));
    assert_eq!(backend_behind(server.proxy), "web-1");

    // SIGHUP with a broken config: logged with its position, the running config stays.
    let refusals = |s: &Server| {
        s.stderr()
            .lines()
            .filter(|l| l.contains("config refused") && l.contains(&at))
            .count()
    };
    let before = refusals(&server);
    assert_eq!(
        before,
        1,
        "the socket reload's refusal is logged once:\n{}",
        server.stderr()
    );
    std::fs::write(&server.cfg, &broken).unwrap();
    server.signal("HUP");
    server.wait_until("the refused SIGHUP reload in the log", |s| {
        refusals(s) > before
    });
    assert_eq!(server.generation(), Some(3));
    assert_eq!(backend_behind(server.proxy), "web-1");
}

#[test]
fn reload_that_cannot_bind_a_new_listener_is_refused_and_the_old_config_keeps_serving() {
    let backends = DemoBackends::start(&["web-1", "web-2"]);
    let mut server = Server::start(&farm_yaml(&backends, "one"));
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let yaml = farm_yaml(&backends, "two").replace(
        "routes:",
        &format!("  - {{ name: extra, bind: \"{addr}\" }}\nroutes:"),
    );
    std::fs::write(&server.cfg, yaml).unwrap();
    let o = run_lockstep(&[&"reload", &"-c", &server.cfg]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("reload refused; the running config keeps serving"),
        "{err}"
    );
    assert!(
        err.contains(&format!("cannot bind listener `extra` on {addr}")),
        "{err}"
    );
    assert_eq!(server.generation(), Some(1));
    assert_eq!(
        backend_behind(server.proxy),
        "web-1",
        "the previous config must keep serving"
    );

    // Once the address is free the same config applies.
    drop(taken);
    let o = run_lockstep(&[&"reload", &"-c", &server.cfg]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}\nserver:\n{}",
        stderr(&o),
        server.stderr()
    );
    assert_eq!(backend_behind(server.proxy), "web-2");
    assert_eq!(backend_behind(addr), "web-2");
    server.wait_until("generation 2", |s| s.generation() == Some(2));
}

#[test]
fn sigterm_exits_0_promptly_and_removes_the_reload_socket() {
    let backends = DemoBackends::start(&["web-1", "web-2"]);
    let mut server = Server::start(&farm_yaml(&backends, "one"));
    // A request first, so that a pooled upstream connection is open during the drain, and an
    // idle keep-alive client connection, which must not hold the drain up.
    assert_eq!(backend_behind(server.proxy), "web-1");
    let mut idle = TcpStream::connect(server.proxy).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: www.farm.test\r\n\r\n")
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("web-1") {
        let n = idle.read(&mut buf).expect("keep-alive response");
        assert!(
            n > 0,
            "connection closed before the response: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(server.socket().exists());

    let sent = Instant::now();
    server.signal("TERM");
    let status = server.proc.wait_exit(Duration::from_secs(3));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", server.stderr());
    assert!(sent.elapsed() < Duration::from_secs(3));
    assert!(
        !server.socket().exists(),
        "the reload socket {} was left behind",
        server.socket().display()
    );
    assert!(
        TcpStream::connect(server.proxy).is_err(),
        "the proxy still accepts after exit"
    );
}

/// The admin API (and the sync hub) run on `lockstep-control`, a thread at nice 10, so that a
/// flood on those listeners yields the core to the proxy (ARCHITECTURE.md, Threads); the
/// threads serving the proxy stay at the priority the process was started with.
#[test]
fn serve_runs_the_control_plane_on_a_thread_of_lower_priority() {
    let backends = DemoBackends::start(&["web-1", "web-2"]);
    let server = Server::start(&farm_yaml(&backends, "one"));
    let pid = server.proc.child.id();
    // (thread name, nice) of every thread: /proc/PID/task/TID/stat's 19th field is the nice
    // value; the name is between the parentheses (it may hold spaces, not parentheses here).
    let threads: Vec<(String, i64)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the process's threads")
        .map(|t| {
            let stat = std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap();
            let (head, rest) = stat.rsplit_once(") ").expect("stat format");
            let name = head.split_once(" (").expect("stat format").1.to_string();
            let nice = rest
                .split(' ')
                .nth(16)
                .expect("nice field")
                .parse()
                .unwrap();
            (name, nice)
        })
        .collect();
    let own = |name: &str| threads.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
    let main = own("lockstep").expect("the main thread");
    let lower = (main + 10).min(19);
    assert_eq!(
        own("lockstep-contro"),
        Some(lower),
        "the control thread at nice {lower} (main thread {main}): {threads:?}"
    );
    assert_eq!(backend_behind(server.proxy), "web-1");
    let r = request(server.admin, "GET", "/healthz", None, b"").unwrap();
    assert_eq!(
        r.status, 200,
        "the admin API answers from the control thread"
    );
}

/// The CPUs a thread may run on (`Cpus_allowed_list` of its status: "0-1", "3", "0,2-3").
fn cpus_allowed(status: &str) -> Vec<usize> {
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim();
    list.split(',')
        .flat_map(|r| match r.split_once('-') {
            Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).collect::<Vec<usize>>(),
            None => vec![r.parse().unwrap()],
        })
        .collect()
}

/// `--pin-workers` binds worker i to the i-th CPU the process may use (round the list when
/// there are more workers), and nothing else: the main and control threads keep every CPU.
#[test]
fn pin_workers_binds_each_worker_to_one_cpu_of_the_process() {
    let backends = DemoBackends::start(&["web-1", "web-2"]);
    let server = Server::start_with(
        &farm_yaml(&backends, "one"),
        &["--workers", "2", "--pin-workers"],
    );
    let pid = server.proc.child.id();
    let allowed = cpus_allowed(&std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap());
    let mut threads: Vec<(String, Vec<usize>)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the process's threads")
        .map(|t| {
            let t = t.unwrap().path();
            let name = std::fs::read_to_string(t.join("comm")).unwrap();
            let status = std::fs::read_to_string(t.join("status")).unwrap();
            (name.trim().to_string(), cpus_allowed(&status))
        })
        .collect();
    threads.sort();
    let of = |name: &str| {
        threads
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.clone())
    };
    // Thread names are cut at 15 bytes: lockstep-worker-0 reads "lockstep-worker".
    let workers: Vec<_> = threads
        .iter()
        .filter(|(n, _)| n == "lockstep-worker")
        .map(|(_, c)| c.clone())
        .collect();
    let mut expected = vec![vec![allowed[0]], vec![allowed[1 % allowed.len()]]];
    let mut seen = workers.clone();
    seen.sort();
    expected.sort();
    assert_eq!(
        seen, expected,
        "one CPU each, in the order allowed: {threads:?}"
    );
    assert_eq!(of("lockstep"), Some(allowed.clone()), "{threads:?}");
    assert_eq!(of("lockstep-contro"), Some(allowed), "{threads:?}");
    assert!(server.stderr().contains("worker pinned"));
    // Pinned, the workers serve: forty requests, each on a connection of its own, answered.
    for _ in 0..40 {
        assert_eq!(backend_behind(server.proxy), "web-1");
    }
}

#[test]
fn serve_with_a_bad_config_exits_2_with_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("lockstep.yaml");
    let yaml = "listeners:\n  - { name: http, bind: \"127.0.0.1:8080\" }\nroutes:\n  - pool: www\n";
    std::fs::write(&cfg, yaml).unwrap();
    let o = run_lockstep(&[&"serve", &"-c", &cfg]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let want = format!(
        "{}:{}: route to pool `www`, which does not exist",
        cfg.display(),
        pos_of(yaml, "www")
    );
    assert!(
        stderr(&o).contains(&want),
        "expected `{want}` in:\n{}",
        stderr(&o)
    );
}

#[test]
fn serve_on_an_address_in_use_exits_1_naming_the_address() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("lockstep.yaml");
    let mut yaml = String::new();
    writeln!(yaml, "listeners:\n  - {{ name: http, bind: \"{addr}\" }}").unwrap();
    yaml.push_str("routes:\n  - pool: www\npools:\n  - name: www\n    backends:\n      - { name: web-1, address: \"127.0.0.1:9\" }\n");
    std::fs::write(&cfg, yaml).unwrap();
    let o = run_lockstep(&[&"serve", &"-c", &cfg]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("cannot bind listener `http` on {addr}")),
        "{err}"
    );
    assert!(
        err.to_lowercase().contains("address already in use"),
        "{err}"
    );
    drop(taken);
}

#[test]
fn reload_without_a_running_appliance_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let o = run_lockstep(&[&"reload", &"--socket", &socket]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "cannot reach the appliance on {}",
            socket.display()
        )),
        "{err}"
    );
    assert!(err.contains("is `lockstep serve` running"), "{err}");
}

#[test]
fn reload_with_a_config_without_admin_socket_says_what_to_set() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("lockstep.yaml");
    std::fs::write(
        &cfg,
        "pools:\n  - name: www\n    backends: [{ name: a, address: \"127.0.0.1:9\" }]\n",
    )
    .unwrap();
    let o = run_lockstep(&[&"reload", &"-c", &cfg]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("{} sets no admin.socket", cfg.display())),
        "{err}"
    );
    assert!(err.contains("--socket"), "{err}");
}

/// `lockstep check` warns of a listener certificate that has expired (and still says OK: the
/// appliance serves what it is given, and the operator is told).
#[test]
fn check_warns_of_an_expired_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["www.farm.test".to_string()]).unwrap();
    params.not_after = time::OffsetDateTime::from_unix_timestamp(now - 3 * 86_400 - 600).unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.path().join("c.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("c.key"), key.serialize_pem()).unwrap();
    let cfg = dir.path().join("lockstep.yaml");
    std::fs::write(
        &cfg,
        "listeners:\n  - name: https\n    bind: \"127.0.0.1:8443\"\n    tls: { certificates: [{ cert: c.pem, key: c.key }] }\n\
         routes:\n  - { pool: www }\n\
         pools:\n  - name: www\n    backends:\n      - { name: a, address: \"127.0.0.1:9\" }\n",
    )
    .unwrap();
    let o = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains(
            "warning: listener `https`, certificate www.farm.test: expired 3 day(s) ago: clients refuse it"
        ),
        "{out}"
    );
}
