//! HTTP/2 conformance by h2spec (the real tool, `../shared/tools/h2spec` or `$H2SPEC`): every
//! one of its 146 cases on a TLS listener (ALPN h2) and on an h2c listener
//! (`http2_only: true`, prior knowledge), with a backend behind both so that request bodies
//! reach the checks that read them.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;

/// Where h2spec is: `$H2SPEC`, else `../shared/tools/h2spec` beside the repository.
fn h2spec() -> PathBuf {
    let path = std::env::var_os("H2SPEC")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/h2spec")
        });
    assert!(
        path.is_file(),
        "h2spec is not at {}: set H2SPEC to the binary (summerwind/h2spec; ../shared/tools/README.md)",
        path.display()
    );
    path
}

/// Runs h2spec against `port` (`tls`: over TLS with ALPN) and returns (passed, total, output).
fn run(port: u16, tls: bool) -> (u32, u32, String) {
    let mut cmd = Command::new(h2spec());
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-o", "2"]);
    if tls {
        cmd.args(["-t", "-k"]);
    }
    let out = cmd.output().expect("h2spec runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // The summary: "146 tests, 146 passed, 0 skipped, 0 failed".
    let summary = text
        .lines()
        .rev()
        .find(|l| l.contains(" tests, ") && l.contains(" passed"))
        .unwrap_or_else(|| panic!("no h2spec summary in:\n{text}"));
    let num = |word: &str| -> u32 {
        summary
            .split(',')
            .find(|p| p.trim().ends_with(word))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no `{word}` count in {summary:?}"))
    };
    (num("passed"), num("tests"), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2spec_passes_every_case_on_tls_and_h2c_listeners() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = TestCert::new(dir.path(), "farm.test");
    // h2spec's stream-state cases send their next frame (RST_STREAM, WINDOW_UPDATE, …) right
    // after a complete request and expect the stream still open: a backend answering within
    // microseconds closes it first (the answer's DATA frame is then what h2spec reads). A
    // backend that takes 30 ms keeps every case about the frames, not about the race.
    let web = delayed_backend(Duration::from_millis(30)).await;
    let yaml = format!(
        "listeners:\n  - name: https\n    bind: \"127.0.0.1:0\"\n    tls:\n      certificates:\n{}\
         \x20 - name: h2c\n    bind: \"127.0.0.1:0\"\n    http2_only: true\n\
         routes:\n  - {{ path_prefix: \"/\", pool: www }}\n\
         pools:\n  - name: www\n    backends:\n{}",
        cert.yaml(),
        backend_yaml("web-1", web, 1)
    );
    let app = start(&yaml).await;
    for (listener, tls) in [("https", true), ("h2c", false)] {
        let port = app.local_addr(listener).expect("listener").port();
        let (passed, total, text) = tokio::task::spawn_blocking(move || run(port, tls))
            .await
            .expect("h2spec task");
        assert!(
            total >= 146,
            "{listener}: h2spec ran {total} cases:\n{text}"
        );
        assert_eq!(passed, total, "{listener}: h2spec failures:\n{text}");
    }
    app.shutdown(Duration::from_millis(200)).await;
}
