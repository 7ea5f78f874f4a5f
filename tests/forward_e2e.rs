//! Detect and forward end to end with real processes (seed 004): a hub (`lockstep serve`) and
//! three `lockstep agent`s with `watch:`; edits are made in an agent's `watch.dir` with plain
//! file operations, or through its `PUT`/`DELETE /content/…` API, and observed from outside —
//! what each agent serves, its `X-Lockstep-Release`, its metrics, the other agents' edit
//! directories, the hub's `/sync/v1/agents`.
//!
//! The tests share two cores, so they run one at a time ([`serial`]).

mod common;
use common::farm::*;
use common::wait::{self, DEADLINE};
use common::{dead_address, request, Reply};

fn watch(mode: &str, extra: &str) -> String {
    format!("watch: {{ dir: {{DIR}}, mode: {mode}, debounce: 20ms{extra} }}\n")
}

/// Starts agent `name` with its watch directory `<name>-edit`; returns once it has looked at
/// the directory and, unless it refused it, may number edits (it has heard from the hub).
fn agent(farm: &Farm, name: &str, watch_line: &str, more: &str) -> Agent {
    let line = watch_line.replace("{DIR}", &format!("{name}-edit"));
    let a = farm.agent(name, None, &format!("{line}{more}"));
    // Listening comes first; the watch.dir is examined a moment later, and edits are numbered
    // once the hub's clock and its record of the agent are known.
    wait::until_blocking(
        &format!("{name} to look at its watch.dir and hear from the hub"),
        DEADLINE,
        || a.proc.log(),
        || {
            let log = a.proc.log();
            log.contains("is not empty")
                || (log.contains("watching for local edits")
                    && log.contains("local edits are numbered from now on"))
        },
    );
    a
}

fn edit_dir(farm: &Farm, a: &Agent) -> std::path::PathBuf {
    farm.path(&format!("{}-edit", a.name))
}

#[track_caller]
fn wait_served(agents: &[&Agent], path: &str, want: Option<&[u8]>) {
    for a in agents {
        wait::until_blocking(
            &format!(
                "{} to serve {path} as {:?}",
                a.name,
                want.map(String::from_utf8_lossy)
            ),
            DEADLINE,
            || a.proc.log(),
            || a.body(path).as_deref() == want,
        );
    }
}

#[track_caller]
fn wait_converged(farm: &Farm, agents: &[&Agent]) -> String {
    let mut id = String::new();
    wait::until_blocking(
        "every agent and the hub to hold the same release",
        DEADLINE,
        || {
            let ids: Vec<_> = agents
                .iter()
                .map(|a| (a.name.clone(), a.release()))
                .collect();
            format!("agents: {ids:?}\nhub: {}", farm.schedule())
        },
        || {
            let hub = farm.schedule()["active"].as_str().map(str::to_string);
            let all = agents
                .iter()
                .all(|a| a.release().is_some() && a.release() == hub);
            if all {
                id = hub.unwrap_or_default();
            }
            all
        },
    );
    id
}

/// The hub-time stamp (µs) of the changeset a write answered with (`{"changeset":"a1/SEQ"}`:
/// the sequence number is the hub time of the write).
fn changeset_stamp(r: &Reply) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&r.bytes).unwrap();
    v["changeset"]
        .as_str()
        .and_then(|c| c.rsplit_once('/'))
        .and_then(|(_, seq)| seq.parse().ok())
        .unwrap_or_else(|| panic!("no changeset in {}", r.body))
}

/// Hub time now (µs) as agent `a` estimates it: the wall clock plus its measured offset.
fn hub_now_us(a: &Agent) -> u64 {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as f64;
    (wall + a.metric("lockstep_agent_clock_offset_seconds") * 1e6) as u64
}

/// The paths where the trees under `dir` and `want` differ, for a failure message.
fn tree_diff(dir: &std::path::Path, want: &std::path::Path) -> String {
    let (have, want) = (tree(dir), tree(want));
    let extra: Vec<_> = have.keys().filter(|p| !want.contains_key(*p)).collect();
    let missing: Vec<_> = want.keys().filter(|p| !have.contains_key(*p)).collect();
    let differ: Vec<_> = have
        .iter()
        .filter(|(p, b)| want.get(*p).is_some_and(|w| w != *b))
        .map(|(p, _)| p)
        .collect();
    format!(
        "{}: extra {extra:?}, missing {} {:?}, differing {differ:?}",
        dir.display(),
        missing.len(),
        missing.iter().take(10).collect::<Vec<_>>()
    )
}

fn put(a: &Agent, path: &str, body: &[u8], token: Option<&str>) -> Reply {
    request(a.addr, "PUT", &format!("/content/{path}"), token, body).unwrap()
}

/// Edits, a new file, a delete and a rename in one agent's `watch.dir` are served by the
/// other two at once and land in their edit directories; an API write on agent 2 reaches 1 and
/// 3; escaping symlinks and oversized files are refused; nothing comes back to its origin.
#[test]
fn immediate_edits_reach_every_other_agent_and_never_come_back() {
    let _serial = serial();
    let farm = Farm::new("2s", "1s");
    let w = watch("immediate", ", max_file_size: 4KiB");
    let a1 = agent(&farm, "a1", &w, "");
    let a2 = agent(&farm, "a2", &w, "");
    let a3 = agent(&farm, "a3", &w, "");
    let d1 = edit_dir(&farm, &a1);
    let others = [&a2, &a3];
    // Peers come from the hub's registry: wait until a1 knows both.
    wait::until_blocking(
        "a1 to know its two peers",
        DEADLINE,
        || a1.proc.log(),
        || a1.metric("lockstep_agent_peers") == 2.0,
    );

    // A new file, then an edit of it.
    std::fs::write(d1.join("index.html"), "<h1>one</h1>").unwrap();
    wait_served(&others, "/index.html", Some(b"<h1>one</h1>"));
    std::fs::write(d1.join("index.html"), "<h1>two</h1>").unwrap();
    wait_served(&others, "/index.html", Some(b"<h1>two</h1>"));
    // A new file in a new directory, then a rename, then a delete.
    std::fs::create_dir_all(d1.join("docs")).unwrap();
    std::fs::write(d1.join("docs/a.txt"), "doc").unwrap();
    wait_served(&others, "/docs/a.txt", Some(b"doc"));
    std::fs::rename(d1.join("docs/a.txt"), d1.join("docs/b.txt")).unwrap();
    wait_served(&others, "/docs/b.txt", Some(b"doc"));
    wait_served(&others, "/docs/a.txt", None);
    std::fs::remove_file(d1.join("docs/b.txt")).unwrap();
    wait_served(&others, "/docs/b.txt", None);
    // Editor droppings are not forwarded.
    std::fs::write(d1.join(".index.html.swp"), "vim").unwrap();
    std::fs::write(d1.join("index.html~"), "backup").unwrap();

    // An API write on agent 2 reaches 1 and 3 (and their edit directories).
    assert_eq!(put(&a2, "api.txt", b"via api", None).status, 401);
    let r = put(&a2, "api.txt", b"via api", Some(AGENT_TOKEN));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(put(&a2, "../escape", b"x", Some(AGENT_TOKEN)).status, 400);
    wait_served(&[&a1, &a3], "/api.txt", Some(b"via api"));
    wait::until_blocking(
        "api.txt in a1's edit directory",
        DEADLINE,
        String::new,
        || std::fs::read(d1.join("api.txt")).is_ok_and(|b| b == b"via api"),
    );

    // Refused: a symlink out of the directory, a file over max_file_size (4 KiB).
    std::os::unix::fs::symlink("/etc/passwd", d1.join("passwd")).unwrap();
    std::fs::write(d1.join("big.bin"), vec![7u8; 8 * 1024]).unwrap();
    wait::until_blocking(
        "both refusals counted",
        DEADLINE,
        || a1.proc.log(),
        || a1.metric("lockstep_agent_refused_total") >= 2.0,
    );
    // A later edit goes through, and the refused ones never did.
    std::fs::write(d1.join("last.txt"), "last").unwrap();
    wait_served(&others, "/last.txt", Some(b"last"));
    for a in others {
        assert_eq!(a.body("/passwd"), None);
        assert_eq!(a.body("/big.bin"), None);
        assert_eq!(a.body("/.index.html.swp"), None);
        assert_eq!(a.body("/index.html~"), None);
    }
    let id = wait_converged(&farm, &[&a1, &a2, &a3]);
    assert!(!id.is_empty());

    // Every edit directory holds the fleet's content (less what a1 refused or ignores).
    let expect = {
        let mut t = tree(&d1);
        for p in ["passwd", "big.bin", ".index.html.swp", "index.html~"] {
            t.remove(p);
        }
        t
    };
    assert_eq!(tree(&edit_dir(&farm, &a2)), expect);
    assert_eq!(tree(&edit_dir(&farm, &a3)), expect);

    // Nothing came back: a1 installed only a2's changeset; a2 and a3 detected only their own
    // edits (the API write), none of the installs they wrote into their directories.
    assert_eq!(a1.metric("lockstep_agent_changesets_installed_total"), 1.0);
    assert_eq!(a2.metric("lockstep_agent_changes_detected_total"), 1.0);
    assert_eq!(a3.metric("lockstep_agent_changes_detected_total"), 0.0);
    // Bad input from the network: garbage, no token, a blob that does not match its hash, a
    // path escaping the tree — refused whole, nothing installed, the agent keeps serving.
    let post = |token, body: &[u8]| {
        request(a3.addr, "POST", "/.lockstep/changesets", token, body)
            .unwrap()
            .status
    };
    assert_eq!(post(None, b"x"), 401);
    assert_eq!(post(Some(AGENT_TOKEN), b"\xff\xff\xff\xffjunk"), 400);
    assert_eq!(post(Some(AGENT_TOKEN), b""), 400);
    let forged = |path: &str, bytes: &[u8], claimed: &[u8]| {
        use lockstep::sync::changeset::{Change, Changeset, Mode};
        use lockstep::sync::manifest::{Entry, Hash};
        let cs = Changeset {
            origin: "intruder".into(),
            seq: 1,
            mode: Mode::Immediate,
            base: None,
            detected_us: 1,
            changes: [(
                path.to_string(),
                Change {
                    entry: Some(Entry {
                        hash: Hash::of(claimed),
                        size: bytes.len() as u64,
                        content_type: "text/html".into(),
                    }),
                    prev: None,
                },
            )]
            .into(),
        };
        lockstep::agent::frame::encode(
            &lockstep::sync::provenance::SignedChangeset::unsigned(cs.clone()),
            |_| Some(bytes.to_vec()),
        )
        .unwrap()
    };
    assert_eq!(
        post(Some(AGENT_TOKEN), &forged("index.html", b"evil", b"good")),
        400
    );
    assert_eq!(
        post(Some(AGENT_TOKEN), &forged("../x", b"evil", b"evil")),
        400
    );
    // Well formed, but numbered ahead of a3's estimate of hub time (a `seq` that would keep
    // a3 from adopting the hub's release, a `detected_us` a day ahead): refused, counted.
    let ahead = |seq: u64, detected_us: u64| {
        use lockstep::sync::changeset::{Change, Changeset, Mode};
        use lockstep::sync::manifest::{Entry, Hash};
        let cs = Changeset {
            origin: "a1".into(),
            seq,
            mode: Mode::Immediate,
            base: None,
            detected_us,
            changes: [(
                "index.html".to_string(),
                Change {
                    entry: Some(Entry {
                        hash: Hash::of(b"forged"),
                        size: 6,
                        content_type: "text/html".into(),
                    }),
                    prev: None,
                },
            )]
            .into(),
        };
        lockstep::agent::frame::encode(
            &lockstep::sync::provenance::SignedChangeset::unsigned(cs.clone()),
            |_| Some(b"forged".to_vec()),
        )
        .unwrap()
    };
    let now = hub_now_us(&a3);
    for frame in [ahead(u64::MAX, now), ahead(now, now + 86_400_000_000)] {
        let r = request(
            a3.addr,
            "POST",
            "/.lockstep/changesets",
            Some(AGENT_TOKEN),
            &frame,
        )
        .unwrap();
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.body.contains("is beyond"), "{}", r.body);
    }
    assert_eq!(
        a3.metric("lockstep_agent_refused_total{what=\"implausible\"}"),
        2.0
    );
    assert_eq!(
        a3.body("/index.html").as_deref(),
        Some(&b"<h1>two</h1>"[..])
    );
    assert!(a3.metric("lockstep_agent_refused_total") >= 6.0);

    // Every edit of a1's reached a2 directly (the hub's release only confirmed them).
    assert!(a2.metric("lockstep_agent_changesets_installed_total") >= 6.0);
    assert!(a1.metric("lockstep_agent_changesets_forwarded_total") >= 12.0);
}

/// A burst of 1 000 edits leaves every agent on the same release with identical edit
/// directories; an agent stopped during the burst catches up from the hub after its restart.
#[test]
fn a_burst_of_edits_converges_and_a_stopped_agent_catches_up() {
    let _serial = serial();
    let farm = Farm::new("2s", "1s");
    let w = watch("immediate", "");
    let a1 = agent(&farm, "a1", &w, "");
    let a2 = agent(&farm, "a2", &w, "");
    let mut a3 = agent(&farm, "a3", &w, "");
    let d1 = edit_dir(&farm, &a1);
    std::fs::write(d1.join("index.html"), "start").unwrap();
    wait_served(&[&a2, &a3], "/index.html", Some(b"start"));

    a3.proc.kill9();
    // 1 000 edits: 400 new files, 400 of them edited again, 200 deleted.
    for i in 0..400 {
        std::fs::write(d1.join(format!("f{i}.txt")), format!("v1 {i}")).unwrap();
    }
    for i in 0..400 {
        std::fs::write(d1.join(format!("f{i}.txt")), format!("v2 {i}")).unwrap();
    }
    for i in 0..200 {
        std::fs::remove_file(d1.join(format!("f{i}.txt"))).unwrap();
    }
    wait_served(&[&a2], "/f399.txt", Some(b"v2 399"));
    let id = wait_converged(&farm, &[&a1, &a2]);
    wait::until_blocking(
        "a2's edit directory to follow",
        DEADLINE,
        || tree_diff(&edit_dir(&farm, &a2), &d1),
        || tree(&edit_dir(&farm, &a2)) == tree(&d1),
    );

    farm.restart(&mut a3);
    let after = wait_converged(&farm, &[&a1, &a2, &a3]);
    assert_eq!(after, id);
    wait::until_blocking(
        "a3's edit directory to follow",
        DEADLINE,
        || {
            format!(
                "{}\n{}",
                tree_diff(&edit_dir(&farm, &a3), &d1),
                a3.proc.log()
            )
        },
        || tree(&edit_dir(&farm, &a3)) == tree(&d1),
    );
    assert_eq!(a3.body("/f0.txt"), None);
    assert_eq!(a3.body("/f200.txt").as_deref(), Some(&b"v2 200"[..]));
}

/// Two agents write one path while neither can hear the other (direct forwarding pointed at a
/// dead peer, the hub paused): when the hub resumes, the later write by hub time wins on every
/// agent, and the loser is reported by the hub (`/sync/v1/agents` conflicts, metric).
#[test]
fn concurrent_edits_of_one_path_resolve_to_the_later_and_report_the_loser() {
    let _serial = serial();
    let farm = Farm::new("2s", "1s");
    let w = watch("immediate", "");
    // A peer address nothing accepts on (held for the whole test, so nobody else takes it).
    let dead_peer = dead_address();
    let dead = format!("peers: [\"http://{}\"]\n", dead_peer.addr);
    let a1 = agent(&farm, "a1", &w, &dead);
    let a2 = agent(&farm, "a2", &w, &dead);
    assert_eq!(
        put(&a1, "page.html", b"base", Some(AGENT_TOKEN)).status,
        200
    );
    wait_served(&[&a2], "/page.html", Some(b"base"));
    wait_converged(&farm, &[&a1, &a2]);

    let hub = farm.hub.as_ref().unwrap();
    hub.signal("STOP");
    let first = put(&a1, "page.html", b"from a1", Some(AGENT_TOKEN));
    assert_eq!(first.status, 200, "{}", first.body);
    // a2 must write later by hub time: wait until a2's estimate of the hub clock (its wall
    // clock plus the offset it measured) has passed the stamp of a1's changeset.
    let first_us = changeset_stamp(&first);
    wait::until_blocking(
        "a2's hub clock to pass the stamp of a1's write",
        DEADLINE,
        || a2.proc.log(),
        || hub_now_us(&a2) > first_us,
    );
    let second = put(&a2, "page.html", b"from a2", Some(AGENT_TOKEN));
    assert_eq!(second.status, 200, "{}", second.body);
    assert!(
        changeset_stamp(&second) > first_us,
        "a2's write is not later by hub time: {} then {}",
        first.body,
        second.body
    );
    // Each serves its own write meanwhile.
    assert_eq!(a1.body("/page.html").as_deref(), Some(&b"from a1"[..]));
    assert_eq!(a2.body("/page.html").as_deref(), Some(&b"from a2"[..]));
    hub.signal("CONT");

    wait_served(&[&a1, &a2], "/page.html", Some(b"from a2"));
    wait_converged(&farm, &[&a1, &a2]);
    let fleet = request(
        farm.hub_addr,
        "GET",
        "/sync/v1/agents",
        Some(AGENT_TOKEN),
        b"",
    )
    .unwrap();
    let fleet: serde_json::Value = serde_json::from_slice(&fleet.bytes).unwrap();
    let conflicts = fleet["conflicts"].as_array().unwrap();
    assert_eq!(conflicts.len(), 1, "{fleet}");
    assert_eq!(conflicts[0]["path"], "page.html");
    assert_eq!(conflicts[0]["winner"]["origin"], "a2");
    assert_eq!(conflicts[0]["loser"]["origin"], "a1");
    assert_eq!(farm.metric("lockstep_sync_conflicts_total"), 1.0);
    assert!(farm.hub_log().contains("concurrent edits of one path"));
    // a1's edit directory follows the winner.
    wait::until_blocking(
        "a1's edit directory to hold the winner",
        DEADLINE,
        String::new,
        || std::fs::read(edit_dir(&farm, &a1).join("page.html")).is_ok_and(|b| b == b"from a2"),
    );
    // `lockstep status` shows it too.
    let out = farm.status("agent.token");
    assert!(
        out.contains("conflict") && out.contains("page.html"),
        "{out}"
    );
}

/// Scheduled mode: an edit goes to the hub, which stages the next release; every agent, the
/// origin included, activates it at the same instant (one release id, the hub's cycle moved).
#[test]
fn scheduled_edits_activate_everywhere_at_the_next_instant() {
    let _serial = serial();
    let farm = Farm::new("2s", "1s");
    let w = watch("scheduled", "");
    let a1 = agent(&farm, "a1", &w, "");
    let a2 = agent(&farm, "a2", &w, "");
    let a3 = agent(&farm, "a3", &w, "");
    let d1 = edit_dir(&farm, &a1);
    let cycle = farm.schedule()["cycle"].as_u64().unwrap();
    std::fs::write(d1.join("index.html"), "scheduled").unwrap();
    wait::until_blocking(
        "the hub to stage the edit",
        DEADLINE,
        || farm.hub_log(),
        || !farm.schedule()["staged"].is_null() || farm.schedule()["cycle"].as_u64() > Some(cycle),
    );
    let id = wait_converged(&farm, &[&a1, &a2, &a3]);
    for a in [&a1, &a2, &a3] {
        assert_eq!(a.body("/index.html").as_deref(), Some(&b"scheduled"[..]));
        // A scheduled flip: its lateness was measured and reported.
        assert!(
            a.metric("lockstep_agent_flip_lateness_seconds_count") >= 1.0,
            "{}",
            a.name
        );
    }
    assert!(farm.schedule()["cycle"].as_u64().unwrap() > cycle);
    assert_eq!(a1.metric("lockstep_agent_changesets_installed_total"), 0.0);
    wait::until_blocking(
        "a2's edit directory to follow",
        DEADLINE,
        String::new,
        || std::fs::read(edit_dir(&farm, &a2).join("index.html")).is_ok_and(|b| b == b"scheduled"),
    );
    assert!(!id.is_empty());
}

/// An agent started with a `watch.dir` that holds something else than the fleet's release does
/// not push it over the fleet: watching is refused with the reason; an empty one is filled
/// from the release.
#[test]
fn a_stale_watch_dir_is_refused_and_an_empty_one_is_filled() {
    let _serial = serial();
    let farm = Farm::new("2s", "1s");
    let w = watch("immediate", "");
    let a1 = agent(&farm, "a1", &w, "");
    std::fs::write(edit_dir(&farm, &a1).join("index.html"), "fleet").unwrap();
    wait_converged(&farm, &[&a1]);

    // a2: an empty directory, filled from the release.
    let a2 = agent(&farm, "a2", &w, "");
    wait::until_blocking(
        "a2's edit directory to be filled",
        DEADLINE,
        || a2.proc.log(),
        || std::fs::read(edit_dir(&farm, &a2).join("index.html")).is_ok_and(|b| b == b"fleet"),
    );
    // a3: a directory left over from something else.
    let stale = farm.path("a3-edit");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("index.html"), "stale").unwrap();
    let a3 = agent(&farm, "a3", &w, "");
    wait::until_blocking(
        "a3 to refuse its watch.dir",
        DEADLINE,
        || a3.proc.log(),
        || {
            a3.proc
                .log()
                .contains("is not empty and differs from the active release")
        },
    );
    wait_converged(&farm, &[&a1, &a2, &a3]);
    for a in [&a1, &a2, &a3] {
        assert_eq!(
            a.body("/index.html").as_deref(),
            Some(&b"fleet"[..]),
            "{}",
            a.name
        );
    }
    assert_eq!(
        std::fs::read(stale.join("index.html")).unwrap(),
        b"stale",
        "nothing lost"
    );
    assert_eq!(a3.metric("lockstep_agent_refused_total"), 1.0);
}

/// Every file under `dir` whose bytes are exactly `secret`, for a failure message.
fn holding(dir: &std::path::Path, secret: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() && std::fs::read(e.path()).is_ok_and(|b| b == secret) {
                found.push(e.path());
            }
        }
    }
    found
}

/// The security issue through real agents: a file of a1's `watch.dir` swapped back and forth
/// for a symlink to a secret (the agent token itself) while a1 detects edits never makes any
/// agent serve the secret nor store it; a `PUT` through a symlinked directory of `watch.dir`
/// is refused with the reason and writes nothing outside.
#[test]
fn links_in_watch_dir_never_ship_a_secret_nor_lead_a_write_out() {
    let _serial = serial();
    let farm = Farm::new("2s", "1s");
    let w = watch("immediate", "");
    // A whole-tree rescan every 5 ms: detection runs while the file flips (the debouncer
    // alone would wait for it to go quiet).
    let a1 = agent(&farm, "a1", &watch("immediate", ", rescan: 5ms"), "");
    let a2 = agent(&farm, "a2", &w, "");
    let d1 = edit_dir(&farm, &a1);
    wait::until_blocking(
        "a1 to know its peer",
        DEADLINE,
        || a1.proc.log(),
        || a1.metric("lockstep_agent_peers") == 1.0,
    );
    std::fs::write(d1.join("page.html"), "public").unwrap();
    wait_served(&[&a1, &a2], "/page.html", Some(b"public"));

    let secret = farm.path("agent.token");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = {
        let (stop, d1, secret) = (stop.clone(), d1.clone(), secret.clone());
        std::thread::spawn(move || {
            let tmp = d1.join(".lockstep-tmp-flip");
            let mut flips = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::fs::remove_file(&tmp);
                if flips % 2 == 0 {
                    std::os::unix::fs::symlink(&secret, &tmp).unwrap();
                } else {
                    std::fs::write(&tmp, "public").unwrap();
                }
                std::fs::rename(&tmp, d1.join("page.html")).unwrap();
                flips += 1;
            }
            flips
        })
    };
    let until = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut served = Vec::new();
    while std::time::Instant::now() < until {
        for a in [&a1, &a2] {
            if a.body("/page.html").as_deref() == Some(AGENT_TOKEN.as_bytes()) {
                served.push(a.name.clone());
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(flipper.join().unwrap() > 100);
    // The flipper may have left the link: replace it, do not write through it.
    let _ = std::fs::remove_file(d1.join("page.html"));
    std::fs::write(d1.join("page.html"), "last").unwrap();
    wait_served(&[&a1, &a2], "/page.html", Some(b"last"));
    assert_eq!(served, Vec::<String>::new(), "the secret was served");
    for store in ["a1-store", "a2-store", "hub-store"] {
        assert_eq!(
            holding(&farm.path(store), AGENT_TOKEN.as_bytes()),
            Vec::<std::path::PathBuf>::new(),
            "the secret was stored"
        );
    }
    assert!(a1.metric("lockstep_agent_refused_total") >= 1.0);

    // A write through a directory of watch.dir that links out of it.
    let outside = farm.path("elsewhere");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, d1.join("out")).unwrap();
    let r = put(&a1, "out/planted.html", b"planted", Some(AGENT_TOKEN));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body
            .contains("is a symlink: lockstep never follows links inside watch.dir"),
        "{}",
        r.body
    );
    assert!(!outside.join("planted.html").exists());
    assert_eq!(a2.body("/out/planted.html"), None);
}

/// A reinstalled agent (its store and edit directory wiped, its clock an hour behind the
/// hub's) whose first edit is made while the hub cannot answer yet: the edit is numbered above
/// what the hub recorded of the agent's earlier life, so it reaches the other agent and the
/// hub's release instead of being taken for a duplicate and dropped.
#[test]
fn a_reinstalled_agents_first_edit_reaches_the_fleet() {
    let _serial = serial();
    let farm = Farm::new("2s", "1s");
    let w = watch("immediate", "");
    let mut a1 = agent(&farm, "a1", &w, "");
    let a2 = agent(&farm, "a2", &w, "");
    std::fs::write(edit_dir(&farm, &a1).join("index.html"), "before").unwrap();
    wait_served(&[&a2], "/index.html", Some(b"before"));
    wait_converged(&farm, &[&a1, &a2]);
    assert!(farm.schedule()["applied"]["a1"].as_u64().is_some());

    // Reinstall: a new machine, nothing of a1's store or directory left; its clock is an hour
    // behind, and the hub does not answer while it starts.
    a1.proc.kill9();
    std::fs::remove_dir_all(farm.path("a1-store")).unwrap();
    std::fs::remove_dir_all(edit_dir(&farm, &a1)).unwrap();
    let hub = farm.hub.as_ref().unwrap();
    hub.signal("STOP");
    let line = w.replace("{DIR}", "a1-edit");
    let a1 = farm.agent("a1", Some("-1h"), &line);
    wait::until_blocking(
        "a1 to watch its new directory",
        DEADLINE,
        || a1.proc.log(),
        || a1.proc.log().contains("watching for local edits"),
    );
    std::fs::write(edit_dir(&farm, &a1).join("first.txt"), "after reinstall").unwrap();
    wait::until_blocking(
        "a1 to see the edit",
        DEADLINE,
        || a1.proc.log(),
        || {
            let log = a1.proc.log();
            log.contains("local edit detected") || log.contains("local edits wait for the hub")
        },
    );
    hub.signal("CONT");

    wait_served(&[&a2, &a1], "/first.txt", Some(b"after reinstall"));
    wait_converged(&farm, &[&a1, &a2]);
    for a in [&a1, &a2] {
        assert_eq!(
            a.body("/first.txt").as_deref(),
            Some(&b"after reinstall"[..])
        );
        assert_eq!(a.body("/index.html").as_deref(), Some(&b"before"[..]));
    }
    wait::until_blocking("the edit in a2's directory", DEADLINE, String::new, || {
        std::fs::read(edit_dir(&farm, &a2).join("first.txt")).is_ok_and(|b| b == b"after reinstall")
    });
}
