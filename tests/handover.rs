//! Listening sockets handed over by systemd (`LISTEN_FDS`, `LISTEN_FDNAMES`), as after a
//! `systemctl restart` with the file descriptor store: `systemd-socket-activate` binds them
//! and starts `lockstep serve` with them; a connection made before the appliance runs waits
//! in the backlog and is served, and a stored socket no listener claims is closed. (The store
//! itself, and restarts and a package upgrade under load, are tested under real systemd by
//! deploy/test-systemd.sh.)

mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::Command;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_lockstep");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn handed_over_sockets_are_served_and_unclaimed_ones_closed() {
    require_tool("systemd-socket-activate", "systemd");
    let backends = DemoBackends::start(&["b1"]);
    let dir = tempfile::tempdir().unwrap();
    let (p, q) = (free_port(), free_port());
    let cfg = dir.path().join("lockstep.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listeners:\n  - name: http\n    bind: \"127.0.0.1:{p}\"\n\
             routes:\n  - {{ path_prefix: \"/\", pool: www }}\n\
             pools:\n  - name: www\n    backends:\n{}\
             admin:\n  bind: \"127.0.0.1:0\"\n",
            backend_yaml("b1", backends.addr(0), 1)
        ),
    )
    .unwrap();
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg(format!("--listen=127.0.0.1:{p}"))
        .arg(format!("--listen=127.0.0.1:{q}"))
        .arg("--fdname=proxy-http:proxy-gone")
        .arg(BIN)
        .args(["serve", "--workers", "1", "-c"])
        .arg(&cfg);
    let mut proc = Proc::spawn(cmd, dir.path().join("stderr.log"));
    proc.wait_until("systemd-socket-activate listens", |p| {
        p.log().contains(&format!("127.0.0.1:{q}"))
    });
    // Made as soon as the socket exists, whether lockstep runs yet or not: it is answered.
    let http: SocketAddr = ([127, 0, 0, 1], p).into();
    let r = request(http, "GET", "/", None, b"").expect("served on the handed-over socket");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.backend().as_deref(), Some("b1"));
    proc.wait_until("lockstep serving", |p| p.log().contains("lockstep serving"));
    let log = proc.log();
    assert!(
        log.contains("listening sockets handed back by systemd sockets=2"),
        "{log}"
    );
    assert!(
        log.contains(r#"name="proxy-gone""#),
        "the unclaimed socket is named:\n{log}"
    );
    // The socket nothing claimed is closed: its port refuses.
    let gone: SocketAddr = ([127, 0, 0, 1], q).into();
    let e = std::net::TcpStream::connect(gone).expect_err("the unclaimed socket was closed");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
}
