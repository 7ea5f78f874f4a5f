//! `deploy/` as shipped, without root: `install.sh` stages a whole installation into a
//! directory (binary, units rewritten for the prefix, sysusers file, configs, tokens, man pages,
//! completions), the installed configs pass `lockstep check`, a second run keeps an operator's
//! edits and tokens, and `--uninstall` removes what it put there and nothing else. The .deb
//! itself is built and installed under real systemd by `deploy/test-systemd.sh` (`.ci/run`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_lockstep");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn install(dest: &Path, extra: &[&str]) -> Output {
    let out = Command::new(repo().join("deploy/install.sh"))
        .args([
            "--destdir",
            dest.to_str().unwrap(),
            "--bin",
            BIN,
            "--prefix",
            "/opt/ls",
        ])
        .args(extra)
        .output()
        .expect("cannot run deploy/install.sh");
    assert!(
        out.status.success(),
        "install.sh {extra:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn install_sh_stages_a_working_installation_and_keeps_what_the_operator_changed() {
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path();
    let out = install(d, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("created"), "no token was created: {stdout}");

    // The binary and the units, which name it where it was installed.
    let bin = d.join("opt/ls/bin/lockstep");
    assert_eq!(mode(&bin), 0o755);
    let v = Command::new(&bin).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("lockstep "));
    for unit in ["lockstep.service", "lockstep-agent.service"] {
        let text = read(&d.join("etc/systemd/system").join(unit));
        assert!(
            text.contains("ExecStart=/opt/ls/bin/lockstep "),
            "{unit}: {text}"
        );
        assert!(
            !text.contains("/usr/bin/lockstep"),
            "{unit} still names /usr/bin"
        );
    }
    assert!(read(&d.join("etc/sysusers.d/lockstep.conf")).contains("u lockstep"));

    // Tokens: 32 random bytes in hex, distinct, never readable by every user.
    let mut tokens = Vec::new();
    for name in ["agent", "publish"] {
        let p = d.join(format!("etc/lockstep/{name}.token"));
        assert_eq!(mode(&p), 0o640, "{name}.token");
        let t = read(&p).trim().to_string();
        assert_eq!(t.len(), 64, "{name}.token: {t:?}");
        assert!(
            t.bytes().all(|b| b.is_ascii_hexdigit()),
            "{name}.token: {t:?}"
        );
        tokens.push(t);
    }
    assert_ne!(tokens[0], tokens[1]);

    // The installed configs are valid as they are: each unit's ExecStartPre (the check systemd
    // runs before starting it) passes on them.
    let exec_start_pre = |unit: &str| -> Vec<String> {
        let text = read(&d.join("etc/systemd/system").join(unit));
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStartPre="))
            .unwrap_or_else(|| panic!("{unit} has no ExecStartPre"));
        // Paths as installed, inside the staging directory.
        line.split_whitespace()
            .map(|w| match w.strip_prefix('/') {
                Some(rest) if w.starts_with("/etc/") || w.starts_with("/opt/ls/") => {
                    d.join(rest).to_string_lossy().into_owned()
                }
                _ => w.to_string(),
            })
            .collect()
    };
    let conf = d.join("etc/lockstep/lockstep.yaml");
    for unit in ["lockstep.service", "lockstep-agent.service"] {
        let argv = exec_start_pre(unit);
        let check = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
        assert!(
            check.status.success() && String::from_utf8_lossy(&check.stdout).contains(": OK"),
            "{unit}'s ExecStartPre fails on the installed config: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }
    let agent = lockstep::agent::config::load(&d.join("etc/lockstep/agent.yaml"))
        .unwrap_or_else(|e| panic!("the installed agent.yaml: {e}"));
    assert_eq!(agent.name, "web-1");
    // A broken agent config fails the agent's pre-start check with exit 2 and the position.
    let agent_yaml = d.join("etc/lockstep/agent.yaml");
    let good = read(&agent_yaml);
    std::fs::write(
        &agent_yaml,
        good.replacen("name: web-1", "name: web-1\nnmae: x", 1),
    )
    .unwrap();
    let argv = exec_start_pre("lockstep-agent.service");
    let broken = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
    let said = String::from_utf8_lossy(&broken.stderr);
    assert_eq!(broken.status.code(), Some(2), "{said}");
    assert!(
        said.contains("agent.yaml:") && said.contains("nmae"),
        "{said}"
    );
    std::fs::write(&agent_yaml, good).unwrap();

    // Man pages and completions, generated from the command line itself.
    let man = read(&d.join("opt/ls/share/man/man1/lockstep.1"));
    assert!(
        man.starts_with(".ie") || man.contains(".TH lockstep 1"),
        "{man}"
    );
    for sub in ["serve", "agent", "publish", "status", "reload", "check"] {
        let page = read(&d.join(format!("opt/ls/share/man/man1/lockstep-{sub}.1")));
        assert!(
            page.contains(&format!("lockstep-{sub}")),
            "lockstep-{sub}.1"
        );
    }
    let bash = read(&d.join("opt/ls/share/bash-completion/completions/lockstep"));
    assert!(bash.contains("complete -F") && bash.contains("publish"));
    assert!(
        read(&d.join("opt/ls/share/zsh/site-functions/_lockstep")).contains("#compdef lockstep")
    );
    assert!(
        read(&d.join("opt/ls/share/fish/vendor_completions.d/lockstep.fish"))
            .contains("complete -c lockstep")
    );

    // A second run: the operator's edit and the tokens stay.
    let edited = read(&conf).replace("cadence: 10s", "cadence: 20s");
    std::fs::write(&conf, &edited).unwrap();
    let out = install(d, &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("kept"));
    assert_eq!(read(&conf), edited);
    assert_eq!(read(&d.join("etc/lockstep/agent.token")).trim(), tokens[0]);

    // A token someone made world-readable is reported (lockstep itself refuses it).
    let agent_token = d.join("etc/lockstep/agent.token");
    std::fs::set_permissions(&agent_token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = install(d, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("readable by every user"), "{stderr}");

    // Uninstall: the installed files go; configs and tokens stay.
    install(d, &["--uninstall"]);
    assert!(!bin.exists());
    assert!(!d.join("etc/systemd/system/lockstep.service").exists());
    assert!(!d.join("opt/ls/share/man/man1/lockstep.1").exists());
    assert!(conf.exists() && agent_token.exists());
}

#[test]
fn install_sh_refuses_bad_arguments_with_the_reason() {
    for (args, says) in [
        (
            vec!["--prefix", "relative/dir"],
            "--prefix must be absolute",
        ),
        (vec!["--frobnicate"], "unknown argument '--frobnicate'"),
        (
            vec!["--bin", "/nonexistent/lockstep"],
            "no executable at /nonexistent/lockstep",
        ),
    ] {
        let out = Command::new(repo().join("deploy/install.sh"))
            .args(["--destdir", "/nonexistent-dest"])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!Path::new("/nonexistent-dest").exists());
    }
}

#[test]
fn the_cli_prints_completions_and_writes_man_pages() {
    let out = Command::new(BIN)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("_lockstep()"));
    let out = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'tcsh'"));

    let dir = tempfile::tempdir().unwrap();
    let pages = dir.path().join("man1");
    let out = Command::new(BIN)
        .args(["manpages", "--dir", pages.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let main = read(&pages.join("lockstep.1"));
    assert!(main.contains(".TH lockstep 1"), "{main}");
    // Every subcommand has its page, and no `help` pseudo-command does.
    let mut names: Vec<String> = std::fs::read_dir(&pages)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.contains(&"lockstep-serve.1".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("help")), "{names:?}");
    let serve = read(&pages.join("lockstep-serve.1"));
    assert!(
        serve.contains("SIGHUP reloads the config"),
        "the examples are missing: {serve}"
    );
}
