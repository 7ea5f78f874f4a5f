//! The systemd units as shipped: `systemd-analyze verify` finds nothing to say about them, and
//! `systemd-analyze security --offline=true` scores each at an exposure of 2.0 or less
//! (Debian's nginx and haproxy units score about 9.6). `.ci/run` installs systemd's tools.

mod common;

use std::path::Path;
use std::process::Command;

use common::require_tool;

const BIN: &str = env!("CARGO_BIN_EXE_lockstep");
const UNITS: [&str; 2] = ["lockstep.service", "lockstep-agent.service"];

fn analyze() -> Command {
    require_tool("systemd-analyze", "systemd");
    Command::new("systemd-analyze")
}

fn unit(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("systemd")
            .join(name),
    )
    .unwrap()
}

#[test]
fn the_units_verify_clean() {
    let dir = tempfile::tempdir().unwrap();
    for name in UNITS {
        // As installed, but with this build's binary and without the man page (which the
        // package installs): verify checks that every command exists.
        let text = unit(name)
            .replace("/usr/bin/lockstep", BIN)
            .replace("Documentation=man:lockstep(1) ", "Documentation=");
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let o = analyze().arg("verify").arg(&path).output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        // A host without the lockstep user or network-online.target may mention those; any
        // other remark is a defect of the unit.
        let defects: Vec<&str> = said
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| !l.contains("network-online.target") && !l.contains("multi-user.target"))
            .collect();
        assert!(o.status.success() && defects.is_empty(), "{name}:\n{said}");
    }
}

#[test]
fn the_units_are_hardened_to_an_exposure_of_2_or_less() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    for name in UNITS {
        let o = analyze()
            .args(["security", "--offline=true", "--threshold=20"])
            .arg(root.join(name))
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        let overall = out
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("{name}: no score in\n{out}"));
        assert!(o.status.success(), "{name} is above 2.0: {overall}\n{out}");
        let score: f64 = overall
            .split(':')
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{name}: cannot read {overall}"));
        assert!(score <= 2.0, "{name}: {overall}");
    }
}

#[test]
fn the_sysusers_file_declares_the_service_user() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/lockstep.sysusers"),
    )
    .unwrap();
    assert!(text.lines().any(|l| l.starts_with("u lockstep ")));
    for name in UNITS {
        assert!(unit(name).contains("\nUser=lockstep\n"), "{name}");
    }
}
