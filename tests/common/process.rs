//! Real processes: [`Proc`] runs a child (`lockstep serve`, `lockstep agent`, a browser) in its
//! own process group with its stderr in a log file, reads back the addresses it bound from its
//! log ([`Proc::bound_addr`]: the listeners are configured on port 0, never on a port found
//! free beforehand), waits on it with [`crate::common::wait`], and kills the whole group when
//! dropped, so a failing test leaves nothing running. [`run_lockstep`] runs a command to its
//! end; [`require_tool`] makes a missing external tool fail the test that needs it.

use std::ffi::OsStr;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use super::wait::{self, DEADLINE};

/// The `lockstep` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_lockstep");

/// Fails the calling test unless `name` is an executable on `PATH` (or, holding a `/`, an
/// executable path), naming the Debian `package` that provides it. A test that needs an
/// external tool never passes silently without it.
#[track_caller]
pub fn require_tool(name: &str, package: &str) {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if name.contains('/') {
        runnable(Path::new(name))
    } else {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|d| runnable(&d.join(name))))
    };
    assert!(
        found,
        "{name} is not installed: apt-get install {package}; .ci/run installs it"
    );
}

/// A running child in its own process group, its stderr in `log`; killed (with its group)
/// when dropped.
pub struct Proc {
    /// The child (the group leader).
    pub child: Child,
    /// Its stderr.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with `NO_COLOR=1`, `RUST_LOG=info`, no stdin, stdout discarded and stderr
    /// written to `log`.
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        cmd.env("RUST_LOG", "info");
        Proc::start(cmd, log, Stdio::null())
    }

    /// Starts `cmd` with `NO_COLOR=1`, no stdin, `stdout` and stderr written to `log`.
    pub fn start(mut cmd: Command, log: PathBuf, stdout: impl Into<Stdio>) -> Proc {
        use std::os::unix::process::CommandExt;
        // Its own process group: `faketime` runs the agent as its child, and killing the group
        // kills both (killing `faketime` alone would leave the agent running).
        let child = cmd
            .process_group(0)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(File::create(&log).expect("create the log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Proc { child, log }
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Kills its whole process group and reaps it.
    pub fn kill9(&mut self) {
        if self.running() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (a `kill` name: HUP, TERM, STOP, CONT) to the child.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("cannot run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits (at most [`DEADLINE`]) until `cond` holds; fails with the log if it does not, or
    /// at once if the process exits meanwhile.
    #[track_caller]
    pub fn wait_until(&mut self, what: &str, mut cond: impl FnMut(&Proc) -> bool) {
        let log = self.log.clone();
        wait::until_blocking(
            what,
            DEADLINE,
            || std::fs::read_to_string(&log).unwrap_or_default(),
            || {
                if let Some(status) = self.child.try_wait().expect("try_wait") {
                    panic!(
                        "{} exited ({status}) while waiting for {what}:\n{}",
                        self.log.display(),
                        self.log()
                    );
                }
                cond(self)
            },
        );
    }

    /// Waits at most `within` for it to exit; fails with the log if it does not.
    #[track_caller]
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let mut status = None;
        let log = self.log.clone();
        wait::until_blocking(
            "the process to exit",
            within,
            || std::fs::read_to_string(&log).unwrap_or_default(),
            || {
                status = self.child.try_wait().expect("try_wait");
                status.is_some()
            },
        );
        status.expect("exited")
    }

    /// The address it logged in field `field` (`addr` in `listening listener=http
    /// addr=127.0.0.1:41234`) on the first line holding every one of `line_has`: the way to
    /// learn the port a listener configured on `127.0.0.1:0` really bound. Waits for the line
    /// (at most [`DEADLINE`]); fails if the process exits first.
    #[track_caller]
    pub fn bound_addr(&mut self, line_has: &[&str], field: &str) -> SocketAddr {
        let mut found = None;
        let what = format!("a log line with {line_has:?} and {field}=ADDRESS");
        self.wait_until(&what, |p| {
            found = find_addr(&p.log(), line_has, field);
            found.is_some()
        });
        found.expect("found")
    }
}

/// The `field=ADDRESS` of the first line of `log` holding every one of `line_has`.
fn find_addr(log: &str, line_has: &[&str], field: &str) -> Option<SocketAddr> {
    let key = format!(" {field}=");
    log.lines()
        .filter(|l| line_has.iter().all(|h| l.contains(h)))
        .find_map(|l| {
            let rest = &l[l.find(&key)? + key.len()..];
            rest.split_whitespace().next()?.parse().ok()
        })
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `lockstep args…` to completion (killed after [`DEADLINE`]); its output.
#[track_caller]
pub fn run_lockstep(args: &[&dyn AsRef<OsStr>]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("stdout");
    let mut cmd = Command::new(BIN);
    cmd.args(args.iter().map(|a| a.as_ref()));
    let stdout = File::create(&out_path).unwrap();
    let mut p = Proc::start(cmd, dir.path().join("stderr"), stdout);
    let status = p.wait_exit(DEADLINE);
    Output {
        status,
        stdout: std::fs::read(&out_path).unwrap(),
        stderr: std::fs::read(&p.log).unwrap(),
    }
}
