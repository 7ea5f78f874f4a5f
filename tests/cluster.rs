//! Several hubs on one real etcd (Debian `etcd-server`, three members on loopback started here):
//! the cycle compare-and-swap has one winner across hubs, a publish to one hub is seen by the
//! other at once, exactly one hub leads, and a hub cut off from etcd stops changing the state,
//! hands its lead over, and catches up when etcd is back.
//!
//! The end-to-end tests share two cores, so they run one at a time ([`serial`]).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use lockstep::cluster::EtcdStore;
use lockstep::config::cluster::Cluster;
use lockstep::sync::cycle::HubState;
use lockstep::sync::manifest::{Hash, Manifest};
use lockstep::sync::store::{FsStore, HubStore};

mod common;
use common::etcd::{Etcd, EtcdPki};
use common::farm::*;
use common::wait::{self, DEADLINE};
use common::{request, BIN};
use std::process::Command;

fn cluster(etcd: &Etcd, prefix: &str, name: &str, members: &[usize]) -> Cluster {
    let all = etcd.endpoints();
    Cluster {
        endpoints: members.iter().map(|&i| all[i].clone()).collect(),
        prefix: prefix.into(),
        name: name.into(),
        lease: Duration::from_secs(2),
        tls: None,
        advertise: None,
        replicas: 2,
    }
}

fn store(c: &Cluster, dir: &tempfile::TempDir) -> EtcdStore {
    let local = FsStore::open(&dir.path().join(&c.name)).unwrap();
    EtcdStore::connect(c, local, "http://127.0.0.1:9").unwrap()
}

/// Two hubs race every one of 1 000 cycle advances from the same state: each advance has
/// exactly one winner, and the loser sees the winner's state.
#[test]
fn two_hubs_racing_each_cycle_advance_have_one_winner_every_time() {
    let _serial = serial();
    let etcd = Etcd::start(3);
    let dir = tempfile::tempdir().unwrap();
    let hubs = [
        Arc::new(store(&cluster(&etcd, "/race/", "a", &[0, 1, 2]), &dir)),
        Arc::new(store(&cluster(&etcd, "/race/", "b", &[2, 1, 0]), &dir)),
    ];
    const ROUNDS: usize = 1000;
    let wins: Arc<Vec<AtomicU32>> = Arc::new((0..ROUNDS).map(|_| AtomicU32::new(0)).collect());
    let start = Arc::new(Barrier::new(2));
    let threads: Vec<_> = hubs
        .iter()
        .map(|hub| {
            let (hub, wins, start) = (hub.clone(), wins.clone(), start.clone());
            std::thread::spawn(move || {
                for round in 0..ROUNDS {
                    // Both read before either writes, as often as the barrier can make it.
                    start.wait();
                    loop {
                        let s = hub.state().unwrap();
                        if s.cycle as usize > round {
                            break;
                        }
                        let next = HubState {
                            version: s.version + 1,
                            cycle: s.cycle + 1,
                            ..s.clone()
                        };
                        if hub.swap_state(s.version, &next).unwrap() {
                            wins[round].fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let counts: Vec<u32> = wins.iter().map(|w| w.load(Ordering::Relaxed)).collect();
    let bad: Vec<_> = counts.iter().enumerate().filter(|(_, &n)| n != 1).collect();
    assert!(
        bad.is_empty(),
        "advances without exactly one winner: {bad:?}"
    );
    for hub in &hubs {
        let s = hub.state().unwrap();
        assert_eq!((s.cycle, s.version), (ROUNDS as u64, ROUNDS as u64));
        // Each hub's follower saw the last state, whoever wrote it.
        let mut rx = hub.changes().expect("a shared store is followed");
        let deadline = Instant::now() + DEADLINE;
        while rx.borrow_and_update().version != ROUNDS as u64 {
            assert!(Instant::now() < deadline, "the watch never caught up");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    // A swap whose answer was lost (an etcd leader killed mid-request), then built upon by the
    // other hub before the read-back: still the first hub's win, found in the state's history;
    // a rival state of the same version is not; a swap not applied is neither (try again).
    let s0 = hubs[0].state().unwrap();
    let bump = |s: &HubState, cycles: u64| HubState {
        version: s.version + 1,
        cycle: s.cycle + cycles,
        ..s.clone()
    };
    let mine = bump(&s0, 1);
    assert!(hubs[0].swap_state(s0.version, &mine).unwrap());
    let theirs = bump(&mine, 1);
    assert!(hubs[1].swap_state(mine.version, &theirs).unwrap());
    assert!(hubs[1]
        .swap_state(theirs.version, &bump(&theirs, 1))
        .unwrap());
    assert_eq!(hubs[0].resolve(s0.version, &mine).unwrap(), Some(true));
    assert_eq!(
        hubs[0].resolve(s0.version, &bump(&s0, 5)).unwrap(),
        Some(false)
    );
    let now = hubs[0].state().unwrap();
    assert_eq!(hubs[0].resolve(now.version, &bump(&now, 1)).unwrap(), None);

    // Exactly one leads; when it goes, the other takes over within its lease.
    wait::until_blocking("one hub to lead", DEADLINE, String::new, || {
        hubs.iter().filter(|h| h.leads()).count() == 1
    });
    let [a, b] = hubs;
    let (leader, other) = if a.leads() { (a, b) } else { (b, a) };
    drop(leader);
    wait::until_blocking("the other hub to lead", DEADLINE, String::new, || {
        other.leads()
    });
}

/// A hub configured with `sync.cluster` on the etcd, as the farm harness starts it, once it
/// says it reaches etcd (until then it answers no schedule).
fn hub_on(etcd: &Etcd, name: &str, members: &[usize]) -> Farm {
    joined(hub_started(etcd, name, members))
}

/// A hub as [`hub_on`] starts it, whether or not it reaches etcd.
fn hub_started(etcd: &Etcd, name: &str, members: &[usize]) -> Farm {
    let all = etcd.endpoints();
    let list: Vec<_> = members.iter().map(|&i| all[i].clone()).collect();
    Farm::with_sync(
        "500ms",
        "1s",
        &format!(
            "  cluster:\n    etcd: [{}]\n    prefix: /farm/\n    name: {name}\n    lease: 2s\n\
             pools:\n  - name: www\n    backends:\n      - {{ name: a, address: \"127.0.0.1:9\" }}\n      \
             - {{ name: b, address: \"127.0.0.1:10\" }}\n",
            list.join(", ")
        ),
    )
}

/// `farm` once its hub reaches etcd.
fn joined(farm: Farm) -> Farm {
    wait::until_blocking(
        "the hub to reach etcd",
        DEADLINE,
        || ready(&farm),
        || ready(&farm).contains("etcd=connected"),
    );
    farm
}

fn get(farm: &Farm, path: &str) -> (u16, Vec<u8>) {
    let r = request(farm.hub_addr, "GET", path, Some(AGENT_TOKEN), b"").unwrap();
    (r.status.as_u16(), r.bytes)
}

/// The blobs of release `id`, as its manifest on `farm`'s hub names them.
fn blobs_of(farm: &Farm, id: &str) -> Vec<Hash> {
    let (status, manifest) = get(farm, &format!("/sync/v1/releases/{id}"));
    assert_eq!(status, 200);
    Manifest::from_json(&manifest)
        .unwrap()
        .blobs()
        .into_iter()
        .map(|(h, _)| h)
        .collect()
}

/// `lockstep publish` to `farm`'s hub: whether it succeeded, and what it printed.
fn try_publish(farm: &Farm, site: &std::path::Path) -> (bool, String) {
    let o = Command::new(BIN)
        .args(["publish", "--hub", &farm.hub_url(), "--token-file"])
        .arg(farm.path("publish.token"))
        .args(["--at", "+1s"])
        .arg(site)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    (o.status.success(), text)
}

/// A publish to hub A: committed once B also stores its blobs (`replicas: 2`); B's long poll
/// returns with it at once and B serves its manifest and blobs; the cycle advances exactly once
/// (by the one hub that leads). A hub cut off from etcd changes nothing; with it gone, a
/// publish is refused until a second hub holds the blobs: a third hub, started empty, fetches
/// what it is asked for from the others. The cut-off hub catches up when etcd is back.
#[test]
fn hubs_share_releases_and_blobs_and_a_cut_off_hub_catches_up() {
    let _serial = serial();
    let etcd = Etcd::start(3);
    let a = hub_on(&etcd, "hub-a", &[0, 1]);
    // B reaches etcd through member 2 only, so pausing that member cuts B off alone.
    let b = hub_on(&etcd, "hub-b", &[2]);
    let logs = || format!("--- A ---\n{}\n--- B ---\n{}", a.hub_log(), b.hub_log());
    wait::until_blocking("exactly one hub to lead", DEADLINE, logs, || {
        a.hub_log().contains("this hub leads") != b.hub_log().contains("this hub leads")
    });

    // B's long poll, parked before the publish to A.
    let version = b.schedule()["version"].as_u64().unwrap();
    let b_addr = b.hub_addr;
    let poll = std::thread::spawn(move || {
        let r = request(
            b_addr,
            "GET",
            &format!("/sync/v1/schedule?wait={version}"),
            Some(AGENT_TOKEN),
            b"",
        )
        .unwrap();
        (
            Instant::now(),
            serde_json::from_slice::<serde_json::Value>(&r.bytes).unwrap(),
        )
    });
    let v1 = a.publish(&a.site("v1", &text_files(3, "v1")), "+2s");
    let published = Instant::now();
    let (returned, seen) = poll.join().unwrap();
    assert_eq!(
        seen["staged"].as_str(),
        Some(v1.as_str()),
        "{seen}\n{}",
        logs()
    );
    assert!(
        returned.saturating_duration_since(published) < Duration::from_secs(5),
        "B's long poll returned {:?} after the publish",
        returned.saturating_duration_since(published)
    );
    // Committed only once B held every blob too.
    let blobs = blobs_of(&b, &v1);
    assert_eq!(blobs.len(), 3);
    for h in &blobs {
        assert!(
            FsStore::blob_path_under(&b.path("hub-store"), h).exists(),
            "B lacks blob {h} of a committed release\n{}",
            logs()
        );
    }
    assert_eq!(get(&b, &format!("/sync/v1/blobs/{}", blobs[0])).0, 200);

    // No agent advances: the leading hub does, once, after the grace.
    let schedules = || format!("A: {}\nB: {}\n{}", a.schedule(), b.schedule(), logs());
    wait::until_blocking("v1 to go active on both hubs", DEADLINE, schedules, || {
        [&a, &b]
            .iter()
            .all(|h| h.schedule()["active"].as_str() == Some(v1.as_str()))
    });
    assert_eq!(a.schedule()["cycle"], 1, "{}", logs());
    assert_eq!(b.schedule()["cycle"], 1);
    let advanced = |f: &Farm| f.hub_log().matches("the hub did").count();
    assert_eq!(advanced(&a) + advanced(&b), 1, "{}", logs());

    // Each hub says who leads, and that it reaches etcd.
    let status = a.status("publish.token");
    assert!(
        status.contains("hub hub-a of 2") && status.contains("etcd connected"),
        "{status}"
    );
    assert!(
        ready(&b).contains("hub=hub-b etcd=connected leader=hub-"),
        "{}",
        ready(&b)
    );
    assert_eq!(b.metric("lockstep_sync_cluster_connected"), 1.0);

    // A backend drained through A's admin API is drained on B, and enabled through B's, on A.
    admin_post(&a, "/api/pools/www/backends/b/drain");
    wait::until_blocking(
        "B to drain the backend drained on A",
        DEADLINE,
        logs,
        || drained(&b, "b"),
    );
    admin_post(&b, "/api/pools/www/backends/b/enable");
    wait::until_blocking(
        "A to enable the backend enabled on B",
        DEADLINE,
        logs,
        || !drained(&a, "b"),
    );
    assert!(!drained(&a, "a") && !drained(&b, "a"));

    // Cut B off: its only member stops answering.
    etcd.pause(2);
    wait::until_blocking("B to notice it lost etcd", DEADLINE, logs, || {
        b.hub_log().contains("lost etcd")
    });
    assert!(ready(&b).contains("etcd=unreachable"), "{}", ready(&b));
    assert_eq!(b.metric("lockstep_sync_cluster_connected"), 0.0);
    assert_eq!(b.metric("lockstep_sync_cluster_leader"), 0.0);
    let status = b.status("publish.token");
    assert!(status.contains("etcd UNREACHABLE ("), "{status}");
    // B keeps answering what it has, but not the schedule (it may be behind): 503, saying why.
    let (code, said) = get(&b, "/sync/v1/schedule");
    let said = String::from_utf8_lossy(&said).to_string();
    assert!(
        code == 503 && said.contains("cut off from etcd"),
        "{code} {said}"
    );
    assert_eq!(get(&b, &format!("/sync/v1/releases/{v1}")).0, 200);
    // So an agent given B first takes the schedule from A, and reports through A.
    let agent = a.agent_of(
        &format!("[\"{}\", \"{}\"]", b.hub_url(), a.hub_url()),
        "web-1",
        None,
        "",
    );
    let logs = || format!("{}\n--- web-1 ---\n{}", logs(), agent.proc.log());
    wait::until_blocking("the agent to serve v1, through A", DEADLINE, logs, || {
        agent.release().as_deref() == Some(v1.as_str())
    });
    assert!(
        agent
            .proc
            .log()
            .contains("the hub cannot give the schedule: moved to the next"),
        "{}",
        logs()
    );
    wait::until_blocking("A to say the agent uses A", DEADLINE, logs, || {
        a.status("publish.token").lines().any(|l| {
            l.starts_with("web-1 ") && l.contains(a.hub_url().trim_start_matches("http://"))
        })
    });
    // A alone cannot hold a release twice: the publish is refused, saying why.
    wait::until_blocking("B's registration to lapse", DEADLINE, logs, || {
        !try_publish(&a, &a.site("v2", &text_files(3, "v2"))).0
    });
    let (ok, said) = try_publish(&a, &a.site("v2", &text_files(3, "v2")));
    assert!(!ok && said.contains("sync.cluster.replicas"), "{said}");
    assert_ne!(
        a.schedule()["staged"].as_str().map(str::len),
        Some(64),
        "{}",
        a.schedule()
    );

    // A third hub, started empty, serves v1's blobs by fetching them from A.
    let c = hub_on(&etcd, "hub-c", &[0, 1]);
    let (status, body) = get(&c, &format!("/sync/v1/blobs/{}", blobs[1]));
    assert_eq!(
        status,
        200,
        "{}\n--- C ---\n{}\n{}",
        String::from_utf8_lossy(&body),
        c.hub_log(),
        logs()
    );
    assert_eq!(Hash::of(&body), blobs[1]);
    // With two hubs again, the publish goes through.
    let v2 = a.publish(&a.site("v2", &text_files(3, "v2")), "+1s");

    wait::until_blocking("the agent to serve v2, through A", DEADLINE, logs, || {
        agent.release().as_deref() == Some(v2.as_str())
    });

    // An appliance started while etcd does not answer it runs (its admin API, proxy and DNS
    // serve), cut off, and joins when etcd is back.
    let d = hub_started(&etcd, "hub-d", &[2]);
    assert!(
        ready(&d).contains("hub=hub-d etcd=unreachable"),
        "{}",
        ready(&d)
    );
    assert!(
        d.hub_log().contains("etcd does not answer"),
        "{}",
        d.hub_log()
    );

    etcd.resume(2);
    wait::until_blocking("D to join and take v2", DEADLINE, logs, || {
        ready(&d).contains("etcd=connected") && d.schedule()["version"] == a.schedule()["version"]
    });
    wait::until_blocking("B to catch up with v2", DEADLINE, logs, || {
        let s = b.schedule();
        s["staged"].as_str() == Some(v2.as_str()) || s["active"].as_str() == Some(v2.as_str())
    });
    wait::until_blocking("B to say it reaches etcd again", DEADLINE, logs, || {
        ready(&b).contains("etcd=connected")
    });
}

/// A state change through `farm`'s admin API, as lockstep's own clients send it (JSON,
/// `X-Lockstep-Admin`).
fn admin_post(farm: &Farm, path: &str) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(farm.admin_addr).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nX-Lockstep-Admin: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        farm.admin_addr
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Whether `farm`'s appliance has backend `name` of pool www drained (`GET /api/pools`).
fn drained(farm: &Farm, name: &str) -> bool {
    let r = request(farm.admin_addr, "GET", "/api/pools", None, b"").unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.bytes).unwrap();
    v["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap()["drained"]
        .as_bool()
        .unwrap()
}

/// The admin listener's `/ready` body.
fn ready(farm: &Farm) -> String {
    request(farm.admin_addr, "GET", "/ready", None, b"")
        .unwrap()
        .body
}

/// Four agents (two with clocks an hour off) that know both hubs: `kill -9` of the hub they
/// use a second before an activation does not delay their flip (they hold the deadline), they
/// move to the other hub, and the cycle advances exactly once.
#[test]
fn agents_move_to_the_other_hub_and_flip_on_time_when_theirs_dies() {
    let _serial = serial();
    let etcd = Etcd::start(3);
    let mut a = hub_on(&etcd, "hub-a", &[0, 1, 2]);
    let b = hub_on(&etcd, "hub-b", &[0, 1, 2]);
    let hubs = format!("[\"{}\", \"{}\"]", a.hub_url(), b.hub_url());
    // Four agents, two of them with clocks an hour off either way.
    let agents = [
        a.agent_of(&hubs, "web-1", None, ""),
        a.agent_of(&hubs, "web-2", Some("+1h"), ""),
        a.agent_of(&hubs, "web-3", None, ""),
        a.agent_of(&hubs, "web-4", Some("-1h"), ""),
    ];
    let a_log = a.hub.as_ref().unwrap().log.clone();
    let logs = || {
        agents
            .iter()
            .map(|x| format!("--- {} ---\n{}", x.name, x.proc.log()))
            .collect::<String>()
            + &format!(
                "--- A ---\n{}\n--- B ---\n{}",
                std::fs::read_to_string(&a_log).unwrap_or_default(),
                b.hub_log()
            )
    };
    let v1 = a.publish(&a.site("v1", &text_files(3, "v1")), "+2s");
    wait::until_blocking("both agents to serve v1", DEADLINE, logs, || {
        agents.iter().all(|x| x.release().as_deref() == Some(&v1))
    });

    // Both report to A; B sees them too (the hubs share the agents' reports).
    wait::until_blocking(
        "hub B to list the agents reporting to A",
        DEADLINE,
        logs,
        || {
            let f = b.fleet();
            let names: Vec<&str> = f["agents"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x["name"].as_str()).collect())
                .unwrap_or_default();
            ["web-1", "web-2", "web-3", "web-4"]
                .iter()
                .all(|n| names.contains(n))
        },
    );

    let v2 = a.publish(&a.site("v2", &text_files(3, "v2")), "+4s");
    let s = a.schedule();
    let at_us = s["activation_us"].as_u64().unwrap();
    let ahead = Duration::from_micros(at_us - s["now_us"].as_u64().unwrap());
    let activation = Instant::now() + ahead;
    // The scenario's timing, not a synchronisation: the kill lands a second before the flip.
    std::thread::sleep(ahead.saturating_sub(Duration::from_secs(1)));
    a.hub.as_mut().unwrap().kill9();
    let flips: Vec<Instant> = agents
        .iter()
        .map(|x| {
            let deadline = Instant::now() + DEADLINE;
            while x.release().as_deref() != Some(&v2) {
                assert!(
                    Instant::now() < deadline,
                    "{} never flipped\n{}",
                    x.name,
                    logs()
                );
                std::thread::sleep(Duration::from_micros(500));
            }
            Instant::now()
        })
        .collect();
    for (x, at) in agents.iter().zip(&flips) {
        // On time: the poller runs in turn, so the later agent is seen a little late.
        assert!(
            at.saturating_duration_since(activation) < Duration::from_millis(500),
            "{} flipped {:?} after the activation\n{}",
            x.name,
            at.saturating_duration_since(activation),
            logs()
        );
    }
    wait::until_blocking(
        "the cycle to advance once, through hub B",
        DEADLINE,
        logs,
        || b.schedule()["cycle"] == 2 && b.schedule()["active"].as_str() == Some(v2.as_str()),
    );
    // `lockstep status` given both hubs, the first dead, answers from the second.
    let o = Command::new(BIN)
        .args([
            "status",
            "--hub",
            &format!("{},{}", a.hub_url(), b.hub_url()),
        ])
        .arg("--token-file")
        .arg(a.path("publish.token"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("hub hub-b of "),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    wait::until_blocking("the agents to move to hub B", DEADLINE, logs, || {
        agents
            .iter()
            .all(|x| x.proc.log().contains("moved to the next"))
    });
    assert_eq!(b.schedule()["cycle"], 2, "one advance for one activation");
    // `lockstep status` shows which hub each agent uses now.
    let b_hub = b.hub_url().trim_start_matches("http://").to_string();
    wait::until_blocking(
        "status to show both agents on hub B",
        DEADLINE,
        logs,
        || {
            let out = b.status("publish.token");
            ["web-1 ", "web-2 ", "web-3 ", "web-4 "]
                .iter()
                .all(|n| out.lines().any(|l| l.starts_with(n) && l.contains(&b_hub)))
        },
    );
}

/// `kill -9` of the etcd leader while a release is published, the kill landing at three
/// points of the publish: each publish either commits whole (staged or queued on both hubs,
/// its manifest and every blob on both) or fails saying why; and whatever either hub
/// schedules is whole on that hub.
#[test]
fn an_etcd_leader_killed_mid_publish_leaves_no_torn_release() {
    let _serial = serial();
    let mut etcd = Etcd::start(3);
    let a = hub_on(&etcd, "hub-a", &[0, 1, 2]);
    let b = hub_on(&etcd, "hub-b", &[0, 1, 2]);
    let logs = || format!("--- A ---\n{}\n--- B ---\n{}", a.hub_log(), b.hub_log());
    let mut committed = 0;
    for (round, delay) in [(0, 30u64), (1, 150), (2, 400)] {
        let leader = etcd.leader().expect("the etcd cluster has a leader");
        let site = a.site(&format!("r{round}"), &text_files(40, &format!("r{round}")));
        let (url, token) = (a.hub_url(), a.path("publish.token"));
        let publish = std::thread::spawn(move || {
            Command::new(BIN)
                .args(["publish", "--hub", &url, "--token-file"])
                .arg(token)
                .args(["--at", "+30s"])
                .arg(site)
                .output()
                .unwrap()
        });
        // The scenario's timing, not a synchronisation: where in the publish the kill lands.
        std::thread::sleep(Duration::from_millis(delay));
        etcd.kill(leader);
        let out = publish.join().unwrap();
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            committed += 1;
            let id = said
                .lines()
                .find_map(|l| l.strip_prefix("release "))
                .unwrap_or_else(|| panic!("no release id in: {said}"))
                .trim()
                .to_string();
            let named = |f: &Farm| {
                let s = f.schedule();
                [&s["staged"], &s["queued"]]
                    .iter()
                    .any(|v| v.as_str() == Some(id.as_str()))
            };
            wait::until_blocking("both hubs to schedule the release", DEADLINE, logs, || {
                named(&a) && named(&b)
            });
        } else {
            eprintln!("round {round}: the publish failed: {}", said.trim());
            assert_eq!(out.status.code(), Some(1), "{said}");
            assert!(
                said.contains("error") || said.contains("etcd") || said.contains("hub"),
                "a failed publish says why: {said}"
            );
        }
        // Never torn: what either hub schedules is whole on it, on its own disk.
        for hub in [&a, &b] {
            let s = hub.schedule();
            for id in [&s["staged"], &s["queued"], &s["active"]]
                .iter()
                .filter_map(|v| v.as_str())
            {
                for h in blobs_of(hub, id) {
                    assert!(
                        FsStore::blob_path_under(&hub.path("hub-store"), &h).exists(),
                        "round {round}: release {id} is scheduled but blob {h} is missing\n{}",
                        logs()
                    );
                }
            }
        }
        etcd.restart(leader);
    }
    // The kills did not stop publishing for good: once A has renewed its lease with the
    // restarted cluster (it answers 503 "cut off" until then, by design: ask another hub),
    // one more goes through. (Published at once, it failed once in a loaded full run: every
    // round's requests had gone to the killed member, and the lease was not yet renewed.)
    wait::until_blocking("A to be connected to etcd again", DEADLINE, logs, || {
        ready(&a).contains("etcd=connected")
    });
    let last = a.publish(&a.site("last", &text_files(3, "last")), "+30s");
    wait::until_blocking("B to schedule the last release", DEADLINE, logs, || {
        let s = b.schedule();
        [&s["staged"], &s["queued"]]
            .iter()
            .any(|v| v.as_str() == Some(last.as_str()))
    });
    eprintln!("{committed} of 3 publishes committed across an etcd leader kill");
}

/// A hub speaks TLS to an etcd that checks client certificates: with its certificate it
/// publishes; without one, the appliance runs on cut off (its proxy and DNS need no etcd),
/// answers no schedule, and `/ready` says why etcd is unreachable.
#[test]
fn a_hub_reaches_an_etcd_that_checks_client_certificates() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let pki = EtcdPki::new(dir.path());
    let etcd = Etcd::start_tls(&pki);
    let cluster = |cert: bool| {
        let identity = if cert {
            format!(
                ", cert: \"{}\", key: \"{}\"",
                pki.client.0.display(),
                pki.client.1.display()
            )
        } else {
            String::new()
        };
        format!(
            "  cluster:\n    etcd: [{}]\n    name: hub-tls\n    replicas: 1\n    tls: {{ ca: \"{}\"{identity} }}\n",
            etcd.endpoints()[0],
            pki.ca.display()
        )
    };
    let farm = joined(Farm::with_sync("500ms", "1s", &cluster(true)));
    let v1 = farm.publish(&farm.site("v1", &text_files(3, "v1")), "+2s");
    assert_eq!(farm.schedule()["staged"].as_str(), Some(v1.as_str()));
    assert!(
        farm.hub_log().contains("hub state in etcd"),
        "{}",
        farm.hub_log()
    );

    // The same hub without its certificate: etcd refuses the handshake. The appliance runs
    // on (its proxy and DNS need no etcd), cut off, and says why.
    let cfg = farm.path("no-cert.yaml");
    let yaml = std::fs::read_to_string(farm.path("hub.yaml"))
        .unwrap()
        .replace(&cluster(true), &cluster(false))
        .replace("store: hub-store", "store: hub-store-2");
    std::fs::write(&cfg, yaml).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--workers", "1", "-c"])
        .arg(&cfg)
        .current_dir(farm.dir.path());
    let mut p = common::Proc::spawn(cmd, farm.path("no-cert.log"));
    let admin = p.bound_addr(&["admin listening"], "addr");
    let hub = p.bound_addr(&["sync hub listening"], "addr");
    let ready = || {
        request(admin, "GET", "/ready", None, b"")
            .map(|r| r.body)
            .unwrap_or_default()
    };
    // e.g. "… etcd=unreachable (…: … received fatal alert: BadCertificate)" (with TLS 1.3 the
    // client may see the refusal as the connection closing instead).
    wait::until_blocking(
        "the hub to say why etcd is unreachable",
        DEADLINE,
        ready,
        || {
            let r = ready();
            r.contains("hub=hub-tls etcd=unreachable")
                && (r.contains("BadCertificate") || r.contains("closed") || r.contains("transport"))
        },
    );
    assert!(p.log().contains("etcd does not answer"), "{}", p.log());
    let r = request(hub, "GET", "/sync/v1/schedule", Some(AGENT_TOKEN), b"").unwrap();
    assert_eq!(r.status.as_u16(), 503, "{}", r.body);
    assert!(p.running(), "{}", p.log());
}

fn several(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/examples/several")
        .join(name)
}

/// deploy/examples/several, as README "Several appliances" tells operators to use it: the
/// appliance's config passes `lockstep check` with the files it names made by `lockstep ca`;
/// keepalived's `--config-test` accepts keepalived.conf (its check script included); etcd
/// knows every variable etcd.env sets.
#[test]
fn the_several_appliances_examples_hold() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::copy(several("appliance.yaml"), d.join("appliance.yaml")).unwrap();
    let lockstep = |args: &[&str]| {
        let o = Command::new(BIN)
            .args(args)
            .current_dir(d)
            .output()
            .unwrap();
        let said =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "lockstep {args:?}: {said}");
        said
    };
    lockstep(&["ca", "--dir", "ca", "init"]);
    // The sync API's certificate from the farm CA, and (here from the same CA) the client
    // certificate etcd asks for.
    for (out, party) in [("tls", "hub-a"), ("etcd", "etcd-hub-a")] {
        lockstep(&[
            "ca",
            "--dir",
            "ca",
            "issue",
            party,
            "--role",
            "hub",
            "--ip",
            "10.0.0.11",
            "--out",
            out,
        ]);
        for ext in ["crt", "key"] {
            let dir = d.join(out);
            std::fs::rename(
                dir.join(format!("{party}.{ext}")),
                dir.join(format!("hub.{ext}")),
            )
            .unwrap();
        }
    }
    std::fs::copy(d.join("ca/ca.crt"), d.join("etcd/ca.crt")).unwrap();
    let said = lockstep(&["check", "-c", "appliance.yaml"]);
    assert!(
        said.contains("2 pool(s)") && said.contains("dns, sync"),
        "{said}"
    );

    // keepalived drops to the check script's user to look at the script: as root, its config
    // test then ends by signal, so it runs as that user (nobody) here, on a copy it can read.
    common::process::require_tool("keepalived", "keepalived");
    let kdir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(kdir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let conf = kdir.path().join("keepalived.conf");
    std::fs::copy(several("keepalived.conf"), &conf).unwrap();
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
    let test = |conf: &std::path::Path| {
        let mut cmd = if rustix::process::geteuid().is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--", "keepalived"]);
            c
        } else {
            Command::new("keepalived")
        };
        cmd.arg("--config-test")
            .arg("-f")
            .arg(conf)
            .output()
            .unwrap()
    };
    let o = test(&conf);
    assert!(
        o.status.success(),
        "keepalived --config-test: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // The test can fail: a script that is not there is refused.
    let broken = kdir.path().join("broken.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(
        &broken,
        text.replace("/usr/bin/curl", "/usr/bin/no-such-curl"),
    )
    .unwrap();
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(!test(&broken).status.success());

    // Every ETCD_X of etcd.env is a flag --x etcd knows.
    common::process::require_tool("etcd", "etcd-server");
    let help = Command::new("etcd").arg("--help").output().unwrap();
    let help =
        String::from_utf8_lossy(&help.stdout).to_string() + &String::from_utf8_lossy(&help.stderr);
    let env = std::fs::read_to_string(several("etcd.env")).unwrap();
    let vars: Vec<&str> = env
        .lines()
        .filter(|l| l.starts_with("ETCD_"))
        .map(|l| l.split('=').next().unwrap())
        .collect();
    assert!(vars.len() > 10, "{env}");
    for var in vars {
        let flag = format!(
            "--{} ",
            var.trim_start_matches("ETCD_")
                .to_lowercase()
                .replace('_', "-")
        );
        assert!(
            help.contains(&flag),
            "etcd.env sets {var}: etcd has no {flag}"
        );
    }
}
