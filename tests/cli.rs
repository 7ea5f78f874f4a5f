//! The `lockstep` binary end to end, as an operator drives it: `--version`/`--help`, `check`,
//! and `serve` as a real child process with demo backends, reloads over the socket and by
//! SIGHUP, a refused reload that keeps the old config serving, and SIGTERM.
//!
//! A child's ports cannot be read back, so free ports are found by binding `127.0.0.1:0` and
//! releasing the socket before the child binds it. Every wait polls a condition with a
//! deadline; every child is killed if its test fails.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use lockstep::demo::BackendControl;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_lockstep");

/// How long a child gets to become ready, or to do anything else we wait for.
const DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Helpers

/// Runs `lockstep args…` to completion, killing it after [`DEADLINE`].
fn lockstep(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut child = Command::new(BIN)
        .args(args.iter().map(|a| a.as_ref()))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .expect("cannot start lockstep");
    let status = wait_exit(&mut child, DEADLINE).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "lockstep {:?} did not finish within {DEADLINE:?}; stderr:\n{}",
            args.iter()
                .map(|a| a.as_ref().to_owned())
                .collect::<Vec<_>>(),
            std::fs::read_to_string(&err_path).unwrap_or_default()
        )
    });
    Output {
        status,
        stdout: std::fs::read(&out_path).unwrap(),
        stderr: std::fs::read(&err_path).unwrap(),
    }
}

/// Waits for `child` to exit, at most `within`.
fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

/// Demo backends (each answers with its name) on a runtime of their own.
struct Backends {
    addrs: Vec<SocketAddr>,
    stop: CancellationToken,
    _rt: tokio::runtime::Runtime,
}

impl Backends {
    fn start(names: &[&str]) -> Backends {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let stop = CancellationToken::new();
        let addrs = names
            .iter()
            .map(|name| {
                let socket = TcpListener::bind("127.0.0.1:0").unwrap();
                socket.set_nonblocking(true).unwrap();
                let addr = socket.local_addr().unwrap();
                let _enter = rt.enter();
                let socket = tokio::net::TcpListener::from_std(socket).unwrap();
                rt.spawn(lockstep::demo::backend(
                    name.to_string(),
                    socket,
                    BackendControl::default(),
                    stop.clone(),
                ));
                addr
            })
            .collect();
        Backends {
            addrs,
            stop,
            _rt: rt,
        }
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A response read by [`get`].
struct Reply {
    status: u16,
    body: String,
}

/// `GET path` over a fresh HTTP/1.1 connection (`Connection: close`).
fn get(addr: SocketAddr, path: &str) -> std::io::Result<Reply> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: www.farm.test\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not an HTTP response: {raw:?}"),
        )
    };
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(body).ok_or_else(bad)?
    } else {
        body.to_string()
    };
    Ok(Reply { status, body })
}

fn dechunk(mut s: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        s = rest.get(size + 2..)?;
    }
}

/// The name of the backend that answers `GET /` through the proxy.
#[track_caller]
fn backend_behind(proxy: SocketAddr) -> String {
    let r = get(proxy, "/").unwrap_or_else(|e| panic!("GET through the proxy: {e}"));
    assert_eq!(r.status, 200, "body: {}", r.body);
    r.body.lines().next().unwrap_or_default().to_string()
}

/// The config the `serve` tests use: two pools of one demo backend each, one route.
fn farm_yaml(proxy: u16, admin: u16, backends: &Backends, route_to: &str) -> String {
    format!(
        r#"listeners:
  - name: http
    bind: "127.0.0.1:{proxy}"
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
  bind: "127.0.0.1:{admin}"
  socket: admin.sock
"#,
        backends.addrs[0], backends.addrs[1]
    )
}

/// A running `lockstep serve`, killed when dropped (so a failing test leaves no process).
struct Server {
    child: Child,
    cfg: PathBuf,
    log: PathBuf,
    proxy: SocketAddr,
    admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl Server {
    /// Starts `lockstep serve -c DIR/lockstep.yaml` on `yaml` (whose listener is `proxy` and
    /// admin listener `admin`) and waits until `/ready` answers.
    fn start(yaml: &str, proxy: u16, admin: u16) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("lockstep.yaml");
        let log = dir.path().join("stderr.log");
        std::fs::write(&cfg, yaml).unwrap();
        let child = Command::new(BIN)
            .arg("serve")
            .arg("-c")
            .arg(&cfg)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("cannot start lockstep serve");
        let mut server = Server {
            child,
            cfg,
            log,
            proxy: SocketAddr::from(([127, 0, 0, 1], proxy)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            dir,
        };
        server.wait_until("/ready answers 200", |s| s.generation().is_some());
        server
    }

    /// The generation `/ready` reports, if it answers 200.
    fn generation(&self) -> Option<u64> {
        let r = get(self.admin, "/ready").ok()?;
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
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    /// Polls `cond` until it holds; fails (with the server's log) after [`DEADLINE`] or if
    /// the server exits.
    #[track_caller]
    fn wait_until(&mut self, what: &str, cond: impl Fn(&Server) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !cond(self) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "lockstep serve exited ({status}) while waiting for {what}; stderr:\n{}",
                    self.stderr()
                );
            }
            if Instant::now() >= deadline {
                panic!("waited {DEADLINE:?} for {what}; stderr:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` (a `kill` name: HUP, TERM) to the server.
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("cannot run kill");
        assert!(status.success(), "kill -{signal} failed");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// --version, --help

#[test]
fn version_prints_name_and_version() {
    let o = lockstep(&[&"--version"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).trim(),
        format!("lockstep {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn help_lists_the_commands_with_examples() {
    let o = lockstep(&[&"--help"]);
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
        let o = lockstep(&[&command, &"--help"]);
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
    let o = lockstep(&[&"check", &"-c", &cfg]);
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
    let o = lockstep(&[&"check", &"-c", &cfg]);
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
    let o = lockstep(&[&"check", &"-c", &cfg]);
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
    std::fs::write(dir.path().join("tls/farm.key"), ck.key_pair.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("tls/sync.crt"), ck.cert.pem()).unwrap();
    std::fs::write(dir.path().join("tls/sync.key"), ck.key_pair.serialize_pem()).unwrap();
    for token in ["agent.token", "publish.token"] {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.path().join(token);
        std::fs::write(&p, "secret").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
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
    let backends = Backends::start(&["web-1", "web-2"]);
    let (proxy, admin) = (free_port(), free_port());
    let mut server = Server::start(&farm_yaml(proxy, admin, &backends, "one"), proxy, admin);
    assert_eq!(server.generation(), Some(1));
    assert_eq!(backend_behind(server.proxy), "web-1");
    assert!(
        server.socket().exists(),
        "no reload socket at {}",
        server.socket().display()
    );

    // `lockstep reload` applies the rewritten config and prints the new generation.
    std::fs::write(&server.cfg, farm_yaml(proxy, admin, &backends, "two")).unwrap();
    let o = lockstep(&[&"reload", &"-c", &server.cfg]);
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
    let broken = farm_yaml(proxy, admin, &backends, "three");
    std::fs::write(&server.cfg, &broken).unwrap();
    let at = format!(
        "{}:{}: route to pool `three`",
        server.cfg.display(),
        pos_of(&broken, "three")
    );
    let o = lockstep(&[&"reload", &"-c", &server.cfg]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains(&at),
        "expected `{at}` in:\n{}",
        stderr(&o)
    );
    // ... and so does the appliance when asked over the socket directly.
    let o = lockstep(&[&"reload", &"--socket", &server.socket()]);
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
    std::fs::write(&server.cfg, farm_yaml(proxy, admin, &backends, "one")).unwrap();
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
    let backends = Backends::start(&["web-1", "web-2"]);
    let (proxy, admin) = (free_port(), free_port());
    let mut server = Server::start(&farm_yaml(proxy, admin, &backends, "one"), proxy, admin);
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let yaml = farm_yaml(proxy, admin, &backends, "two").replace(
        "routes:",
        &format!("  - {{ name: extra, bind: \"{addr}\" }}\nroutes:"),
    );
    std::fs::write(&server.cfg, yaml).unwrap();
    let o = lockstep(&[&"reload", &"-c", &server.cfg]);
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
    let o = lockstep(&[&"reload", &"-c", &server.cfg]);
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
    let backends = Backends::start(&["web-1", "web-2"]);
    let (proxy, admin) = (free_port(), free_port());
    let mut server = Server::start(&farm_yaml(proxy, admin, &backends, "one"), proxy, admin);
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
    let status = wait_exit(&mut server.child, Duration::from_secs(3)).unwrap_or_else(|| {
        panic!(
            "still running 3s after SIGTERM; stderr:\n{}",
            server.stderr()
        )
    });
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

#[test]
fn serve_with_a_bad_config_exits_2_with_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("lockstep.yaml");
    let yaml = "listeners:\n  - { name: http, bind: \"127.0.0.1:8080\" }\nroutes:\n  - pool: www\n";
    std::fs::write(&cfg, yaml).unwrap();
    let o = lockstep(&[&"serve", &"-c", &cfg]);
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
    let o = lockstep(&[&"serve", &"-c", &cfg]);
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
    let o = lockstep(&[&"reload", &"--socket", &socket]);
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
    let o = lockstep(&[&"reload", &"-c", &cfg]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("{} sets no admin.socket", cfg.display())),
        "{err}"
    );
    assert!(err.contains("--socket"), "{err}");
}
