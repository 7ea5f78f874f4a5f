//! Content sync end to end with real processes: `lockstep serve` as the hub, `lockstep agent`
//! sidecars (two of them under `faketime`, their clocks an hour ahead and an hour behind),
//! `lockstep publish` and `lockstep status` — observed from outside, as an operator would:
//! each agent's `X-Lockstep-Release` header, the hub's store on disk and its metrics.
//!
//! The tests share two cores, so they run one at a time ([`serial`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::farm::*;
use common::wait::{self, DEADLINE};
use common::{request, BIN};

// ---------------------------------------------------------------------------------------------

/// Four agents, one an hour ahead and one an hour behind, flip to a published release together
/// (seen from outside); a new agent bootstraps to the active release; `lockstep status` shows
/// the fleet with the measured offsets.
#[test]
fn four_agents_with_skewed_clocks_flip_together_and_a_new_agent_bootstraps() {
    let _serial = serial();
    let farm = Farm::new("500ms", "1s");
    let agents = [
        farm.agent("web-1", None, ""),
        farm.agent("web-2", None, ""),
        farm.agent("web-3", Some("+1h"), ""),
        farm.agent("web-4", Some("-1h"), ""),
    ];
    let logs = || {
        agents
            .iter()
            .map(|a| format!("--- {} ---\n{}", a.name, a.proc.log()))
            .collect::<String>()
            + &format!("--- hub ---\n{}", farm.hub_log())
    };
    let v1 = farm.publish(&farm.site("v1", &text_files(20, "v1")), "+2s");
    wait::until_blocking("every agent to serve v1", DEADLINE, logs, || {
        agents.iter().all(|a| a.release().as_deref() == Some(&v1))
    });

    let v2 = farm.publish(&farm.site("v2", &text_files(20, "v2")), "+3s");
    // Poll every agent in its own thread until it serves v2; note when each first did.
    let stop = Arc::new(AtomicBool::new(false));
    let pollers: Vec<_> = agents
        .iter()
        .map(|a| {
            let (addr, v1, v2, stop) = (a.addr, v1.clone(), v2.clone(), stop.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + DEADLINE;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if let Ok(r) = request(addr, "GET", "/index.html", None, b"") {
                        let release = r.header("x-lockstep-release").unwrap_or("").to_string();
                        let body = r.body.clone();
                        // Never a mixed answer: the body belongs to the release in the header.
                        if release == v1 {
                            assert_eq!(body, "<h1>v1</h1>");
                        } else if release == v2 {
                            assert_eq!(body, "<h1>v2</h1>");
                            return Some(Instant::now());
                        }
                    }
                    // The sampler's pacing, not a synchronisation: it timestamps the flip to
                    // within this interval, and the loop ends on the flip or the deadline.
                    std::thread::sleep(Duration::from_micros(500));
                }
                None
            })
        })
        .collect();
    let seen: Vec<Option<Instant>> = pollers.into_iter().map(|p| p.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    let seen: Vec<Instant> = seen
        .into_iter()
        .zip(&agents)
        .map(|(s, a)| s.unwrap_or_else(|| panic!("{} never served v2\n{}", a.name, logs())))
        .collect();
    let first = *seen.iter().min().unwrap();
    let spread = seen.iter().map(|s| *s - first).max().unwrap();
    // Loose on purpose (two shared cores, one polling thread per agent): an uncorrected clock
    // would be an hour off. bench/sync.sh measures the real skew.
    assert!(
        spread < Duration::from_millis(500),
        "flips spread over {spread:?}\n{}",
        logs()
    );

    // A new agent with an empty store bootstraps to the active release.
    wait::until_blocking("the hub to promote v2", DEADLINE, logs, || {
        farm.schedule()["active"] == v2.as_str()
    });
    let late = farm.agent("web-5", None, "");
    wait::until_blocking(
        "web-5 to bootstrap to v2",
        DEADLINE,
        || late.proc.log(),
        || late.release().as_deref() == Some(&v2),
    );
    assert_eq!(late.get("/pages/p3.txt").bytes, b"page 3 of v2\n");

    // The fleet as `lockstep status` sees it: everyone current, the skewed clocks measured.
    wait::until_blocking("every agent to report v2", DEADLINE, logs, || {
        let o = Command::new(BIN)
            .args(["status", "--json", "--hub", &farm.hub_url(), "--token-file"])
            .arg(farm.path("agent.token"))
            .output()
            .unwrap();
        let fleet: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        let Some(list) = fleet["agents"].as_array() else {
            return false;
        };
        let offset = |name: &str| {
            list.iter()
                .find(|a| a["name"] == name)
                .and_then(|a| a["report"]["offset_us"].as_i64())
        };
        let hour = 3_600_000_000i64;
        list.len() == 5
            && list.iter().all(|a| a["current"] == true)
            && offset("web-3").is_some_and(|o| (o + hour).abs() < 5_000_000)
            && offset("web-4").is_some_and(|o| (o - hour).abs() < 5_000_000)
            && offset("web-1").is_some_and(|o| o.abs() < 5_000_000)
    });
    let table = farm.status("publish.token");
    assert!(
        table.contains("web-3") && table.contains("current") && table.contains("POOL"),
        "{table}"
    );
}

/// An agent killed while staging resumes after a restart without fetching again what it had,
/// and a blob tampered with in the hub's store is refused: the agents keep serving the release
/// they had and report the problem.
#[test]
fn an_agent_killed_mid_staging_resumes_and_a_tampered_blob_is_never_activated() {
    let _serial = serial();
    let farm = Farm::new("500ms", "1s");
    let mut agent = farm.agent("web-1", None, "fetch_concurrency: 1\n");
    let other = farm.agent("web-2", None, "");
    let v1 = farm.publish(&farm.site("v1", &text_files(3, "v1")), "+2s");
    wait::until_blocking(
        "both agents to serve v1",
        DEADLINE,
        || agent.proc.log(),
        || agent.release().as_deref() == Some(&v1) && other.release().as_deref() == Some(&v1),
    );

    // A big release, staged far ahead; kill web-1 once it holds part of it.
    let files: Vec<(String, Vec<u8>)> = (0..400)
        .map(|i| (format!("media/f{i}.bin"), noise(i, 32 * 1024)))
        .collect();
    let served_before = farm.metric("lockstep_sync_blobs_served_total");
    let big = farm.publish(&farm.site("big", &files), "+40s");
    let blobs_dir = farm.path("web-1-store/blobs");
    let count = || walk(&blobs_dir).len();
    wait::until_blocking(
        "web-1 to fetch some blobs",
        DEADLINE,
        || agent.proc.log(),
        || count() >= 20,
    );
    agent.proc.kill9();
    let had = count();
    assert!(
        had < 400,
        "web-1 fetched everything ({had}) before it could be killed"
    );
    // Whatever it had is whole: every blob file holds the bytes its name says.
    for p in walk(&blobs_dir) {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        assert_eq!(
            blake3::hash(&std::fs::read(&p).unwrap())
                .to_hex()
                .to_string(),
            name
        );
    }
    assert_eq!(agent.release(), None, "killed");
    farm.restart(&mut agent);
    assert_eq!(
        agent.release().as_deref(),
        Some(v1.as_str()),
        "a restarted agent serves its active release at once"
    );
    wait::until_blocking(
        "web-1 to finish staging",
        DEADLINE,
        || agent.proc.log(),
        || count() >= 400,
    );
    let served = farm.metric("lockstep_sync_blobs_served_total") - served_before;
    // web-2 fetched all 400; web-1 fetched `had` before it was killed (plus at most the one in
    // flight) and, after the restart, only the 400 - `had` it lacked. Refetching what it had
    // would make it at least 800 + `had`.
    assert!(
        served <= (400 + had + (400 - had) + 1) as f64,
        "refetched: {served} blobs served, web-1 had {had}"
    );

    // Tamper with a blob in the hub's store after its upload, then commit a release using it.
    // Same length as the genuine bytes, so only the hash can tell (a length mismatch is refused
    // by the hub at commit already).
    let tampered = b"GENUINE".to_vec();
    let genuine = blake3::hash(b"genuine").to_hex().to_string();
    let manifest = format!(
        r#"{{"files":{{"evil.txt":{{"hash":"{genuine}","size":7,"type":"text/plain; charset=utf-8"}},"index.html":{{"hash":"{}","size":11,"type":"text/html; charset=utf-8"}}}}}}"#,
        blake3::hash(b"<h1>v3</h1>").to_hex()
    );
    let up = request(
        farm.hub_addr,
        "POST",
        "/sync/v1/releases",
        Some(PUBLISH_TOKEN),
        manifest.as_bytes(),
    )
    .unwrap();
    assert_eq!(up.status, 200, "{}", up.body);
    let id = serde_json::from_slice::<serde_json::Value>(&up.bytes).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    for (hash, body) in [
        (&genuine, &b"genuine"[..]),
        (
            &blake3::hash(b"<h1>v3</h1>").to_hex().to_string(),
            &b"<h1>v3</h1>"[..],
        ),
    ] {
        let r = request(
            farm.hub_addr,
            "PUT",
            &format!("/sync/v1/blobs/{hash}"),
            Some(PUBLISH_TOKEN),
            body,
        )
        .unwrap();
        assert!(r.status == 201 || r.status == 200);
    }
    let stored = farm
        .path("hub-store/blobs")
        .join(&genuine[..2])
        .join(&genuine);
    std::fs::write(&stored, &tampered).unwrap();
    let now = farm.schedule()["now_us"].as_u64().unwrap();
    let commit = format!(r#"{{"at_us":{}}}"#, now + 2_000_000);
    let c = request(
        farm.hub_addr,
        "POST",
        &format!("/sync/v1/releases/{id}/commit"),
        Some(PUBLISH_TOKEN),
        commit.as_bytes(),
    )
    .unwrap();
    assert_eq!(c.status, 200, "{}", c.body);
    // Past the activation (and the hub's own grace-period advance), nobody serves it: the
    // agents keep v1 (the big release was replaced before its activation) and say why.
    wait::until_blocking(
        "the hub to promote the release itself",
        DEADLINE,
        || farm.hub_log(),
        || farm.schedule()["active"] == id.as_str(),
    );
    for a in [&agent, &other] {
        assert_eq!(
            a.release().as_deref(),
            Some(v1.as_str()),
            "{}\n{}",
            a.name,
            a.proc.log()
        );
        assert_ne!(
            a.get("/evil.txt").bytes,
            tampered,
            "{} served tampered bytes",
            a.name
        );
    }
    wait::until_blocking(
        "the agents to report the refused blob",
        DEADLINE,
        || farm.hub_log(),
        || {
            let r = request(
                farm.hub_addr,
                "GET",
                "/sync/v1/agents",
                Some(AGENT_TOKEN),
                b"",
            )
            .unwrap();
            let fleet: serde_json::Value = serde_json::from_slice(&r.bytes).unwrap();
            fleet["agents"].as_array().is_some_and(|l| {
                l.len() == 2
                    && l.iter()
                        .all(|a| a["report"]["error"].is_string() && a["current"] == false)
            })
        },
    );
    let _ = big;
}

/// All the files under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The hub killed with SIGKILL in the middle of a publish loses nothing: its store holds only
/// whole files, the schedule is what it was, and publishing again uploads only what is missing.
#[test]
fn a_hub_killed_mid_publish_loses_nothing_and_shows_no_torn_release() {
    let _serial = serial();
    let mut farm = Farm::new("500ms", "1s");
    let v1 = farm.publish(&farm.site("v1", &text_files(3, "v1")), "+1s");
    wait::until_blocking(
        "v1 to activate",
        DEADLINE,
        || farm.hub_log(),
        || farm.schedule()["active"] == v1.as_str(),
    );
    let before = farm.schedule();

    let files: Vec<(String, Vec<u8>)> = (0..600)
        .map(|i| (format!("f/{i}.bin"), noise(1000 + i, 16 * 1024)))
        .collect();
    let site = farm.site("big", &files);
    let base = walk(&farm.path("hub-store/blobs")).len();
    let mut publish = Command::new(BIN)
        .args([
            "publish",
            "--concurrency",
            "2",
            "--hub",
            &farm.hub_url(),
            "--token-file",
        ])
        .arg(farm.path("publish.token"))
        .arg(&site)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let blobs = farm.path("hub-store/blobs");
    wait::until_blocking(
        "the hub to receive some blobs",
        DEADLINE,
        || farm.hub_log(),
        || walk(&blobs).len() >= 50,
    );
    farm.hub.as_mut().unwrap().kill9();
    let status = publish.wait().unwrap();
    let had = walk(&blobs).len() - base;
    assert!(
        !status.success(),
        "publish must fail when the hub dies under it"
    );
    assert!(
        had < 600,
        "the hub received every blob before it was killed"
    );
    // No torn file: every blob and manifest holds the bytes its name says.
    for p in walk(&blobs)
        .into_iter()
        .chain(walk(&farm.path("hub-store/releases")))
    {
        let stem = p.file_stem().unwrap().to_string_lossy().to_string();
        assert_eq!(
            blake3::hash(&std::fs::read(&p).unwrap())
                .to_hex()
                .to_string(),
            stem,
            "{}",
            p.display()
        );
    }

    farm.start_hub();
    let after = farm.schedule();
    for key in ["version", "cycle", "active", "staged", "activation_us"] {
        assert_eq!(after[key], before[key], "{key} changed across the crash");
    }
    assert!(
        walk(&farm.path("hub-store/tmp")).is_empty(),
        "leftovers of interrupted writes are cleared"
    );
    let o = Command::new(BIN)
        .args(["publish", "--hub", &farm.hub_url(), "--token-file"])
        .arg(farm.path("publish.token"))
        .arg(&site)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let uploaded: usize = out
        .split("uploaded ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        uploaded == 600 - had,
        "uploaded {uploaded} after {had} survived (base {base}): {out}"
    );
    assert!(out.contains("staged"), "{out}");
}

/// The ids of the manifests and the names of the blobs a store holds.
fn stored(store: &Path) -> (Vec<String>, Vec<String>) {
    let mut releases: Vec<String> = std::fs::read_dir(store.join("releases"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.strip_suffix(".json").map(str::to_string)
        })
        .collect();
    releases.sort();
    let mut blobs: Vec<String> = walk(&store.join("blobs"))
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    blobs.sort();
    (releases, blobs)
}

/// Old releases leave the hub's and the agents' stores (with the blobs only they used) once
/// past the grace period; the active and previous releases stay whole, a rollback to the
/// previous one works without fetching anything, and a release an agent built from a changeset
/// is stored so that a restart serves it even with the hub gone.
#[test]
fn old_releases_leave_the_stores_while_active_and_previous_stay() {
    let _serial = serial();
    let gc = "gc_interval: 200ms\ngc_grace: 1s\n";
    let farm = Farm::with_sync("500ms", "500ms", "  gc_interval: 200ms\n  gc_grace: 1s\n");
    let mut a = farm.agent("web-1", None, &format!("{gc}watch:\n  mode: immediate\n"));
    let logs = || {
        format!(
            "--- agent ---\n{}--- hub ---\n{}",
            a.proc.log(),
            farm.hub_log()
        )
    };
    // Five files each: one shared by every version, four of its own.
    let site = |v: usize| {
        let mut files = text_files(4, &format!("v{v}"));
        files.push(("shared.txt".into(), b"the same in every release\n".to_vec()));
        farm.site(&format!("v{v}"), &files)
    };
    let mut ids = Vec::new();
    for v in 1..=4 {
        let id = farm.publish(&site(v), "+1s");
        wait::until_blocking(&format!("web-1 to serve v{v}"), DEADLINE, logs, || {
            a.release().as_deref() == Some(&id)
        });
        ids.push(id);
    }
    wait::until_blocking("the hub to promote v4", DEADLINE, logs, || {
        farm.schedule()["active"] == ids[3].as_str()
    });
    let (v3, v4) = (ids[2].clone(), ids[3].clone());
    let mut want_releases = vec![v3.clone(), v4.clone()];
    want_releases.sort();
    // v3 and v4: four files of their own each, and the shared one.
    let want_blobs = 4 + 4 + 1;
    for store in [farm.path("hub-store"), farm.path("web-1-store")] {
        wait::until_blocking(
            &format!("{} to hold only v3 and v4", store.display()),
            DEADLINE,
            || format!("{:?}\n{}", stored(&store), logs()),
            || {
                let (releases, blobs) = stored(&store);
                releases == want_releases && blobs.len() == want_blobs
            },
        );
    }
    assert!(
        farm.metric("lockstep_sync_gc_removed_total{what=\"blobs\"}") >= 8.0,
        "{}",
        logs()
    );
    assert!(a.metric("lockstep_agent_gc_removed_total") >= 10.0);
    assert!(a.metric("lockstep_agent_gc_removed_bytes_total") > 0.0);
    assert_eq!(a.get("/index.html").bytes, b"<h1>v4</h1>");
    assert_eq!(a.get("/shared.txt").bytes, b"the same in every release\n");

    // The previous release is whole: a rollback needs nothing from the hub's upload path.
    let fetched = a.metric("lockstep_agent_fetched_blobs_total");
    let o = Command::new(BIN)
        .args([
            "publish",
            "--rollback",
            "--hub",
            &farm.hub_url(),
            "--token-file",
        ])
        .arg(farm.path("publish.token"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait::until_blocking("web-1 to roll back to v3", DEADLINE, logs, || {
        a.release().as_deref() == Some(&v3)
    });
    assert_eq!(a.get("/pages/p2.txt").bytes, b"page 2 of v3\n");
    assert_eq!(a.metric("lockstep_agent_fetched_blobs_total"), fetched);

    // A write through the agent's API becomes a release built on the agent: its manifest is
    // stored, and a restart serves it while the hub is down.
    let put = request(
        a.addr,
        "PUT",
        "/content/news.txt",
        Some(AGENT_TOKEN),
        b"written on web-1\n",
    )
    .unwrap();
    assert!(put.status.as_u16() < 300, "PUT answered {}", put.status);
    wait::until_blocking("web-1 to serve its own write", DEADLINE, logs, || {
        a.body("/news.txt").as_deref() == Some(b"written on web-1\n".as_slice())
    });
    let built = a.release().unwrap();
    wait::until_blocking(
        "web-1 to store the built release's manifest",
        DEADLINE,
        logs,
        || {
            farm.path("web-1-store/releases")
                .join(format!("{built}.json"))
                .is_file()
        },
    );
    let mut farm = farm;
    farm.hub.as_mut().unwrap().kill9();
    farm.restart(&mut a);
    assert_eq!(
        a.release().as_deref(),
        Some(built.as_str()),
        "{}",
        a.proc.log()
    );
    assert_eq!(a.get("/news.txt").bytes, b"written on web-1\n");
}
