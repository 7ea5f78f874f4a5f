//! The sync agent against the real hub, over real sockets on loopback: bootstrap, staging in
//! the background, the scheduled flip at the hub's instant despite an hour of clock offset,
//! the cycle advance, restarts that keep serving, resumed staging, refusal of damaged blobs
//! and of a store that cannot write, re-planning when the staged release is replaced, a late
//! agent, and responses that never mix two releases.
//!
//! The hub runs in-process ([`TestHub`]) with an injectable clock, so "the agents' clocks are
//! an hour off" is the hub's clock being an hour ahead of theirs.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use lockstep::agent::{self, AgentConfig, AgentHandle};
use lockstep::hub::{self, Hub, HubMetrics, Settings};
use lockstep::metrics::Metrics;
use lockstep::net::client::HttpClient as HubClient;
use lockstep::publish::{self, At};
use lockstep::sync::auth::Tokens;
use lockstep::sync::manifest::{Hash, ReleaseId};
use lockstep::sync::protocol::{CommitState, Report, RELEASE_HEADER};
use lockstep::sync::schedule::Rules;
use lockstep::sync::store::FsStore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use common::*;

const AGENT_TOKEN: &str = "agent-token-0123456789";
const PUBLISH_TOKEN: &str = "publish-token-0123456789";
const HOUR_US: i64 = 3_600_000_000;

/// The real hub (`lockstep::hub`), on `127.0.0.1:0`, with its clock `offset_us` ahead of the
/// system clock.
struct TestHub {
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    addr: SocketAddr,
    store: PathBuf,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl TestHub {
    async fn start(store: &Path, offset_us: i64) -> TestHub {
        Self::start_on(store, offset_us, "127.0.0.1:0".parse().unwrap()).await
    }

    async fn start_on(store: &Path, offset_us: i64, addr: SocketAddr) -> TestHub {
        let metrics = Arc::new(Metrics::new());
        let clock: hub::Clock = Arc::new(move || {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_micros() as i64;
            (now + offset_us) as u64
        });
        let hub = Hub::new(
            Arc::new(FsStore::open(store).unwrap()),
            Settings {
                rules: Rules::new(Duration::from_secs(1), Duration::from_millis(500)),
                tokens: Tokens {
                    agent: Some(AGENT_TOKEN.into()),
                    publish: Some(PUBLISH_TOKEN.into()),
                },
                gc: Default::default(),
                report_expiry: lockstep::sync::protocol::DEFAULT_REPORT_EXPIRY,
                ca_dir: None,
                revoked: Default::default(),
                trusted_keys: None,
                upload_quota: lockstep::config::sync::DEFAULT_UPLOAD_QUOTA,
            },
            clock,
            HubMetrics::register(&metrics),
        )
        .unwrap();
        let socket = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(hub.clone().run(stop.clone()));
        tracker.spawn(hub::api::serve(
            socket,
            None,
            lockstep::net::limit::Cap::new(4096, Default::default()),
            hub.clone(),
            stop.clone(),
            tracker.clone(),
        ));
        TestHub {
            hub,
            metrics,
            addr,
            store: store.to_path_buf(),
            stop,
            tracker,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn publisher(&self) -> HubClient {
        HubClient::hub(&self.url(), Some(PUBLISH_TOKEN.into()), None).unwrap()
    }

    /// Publishes `site` to activate `after` from now (hub clock); returns (id, activation).
    async fn publish(&self, site: &Path, after: Duration) -> (ReleaseId, u64) {
        let o = publish::publish(&self.publisher(), site, At::In(after), 4, &[])
            .await
            .unwrap();
        assert_eq!(o.committed.state, CommitState::Staged, "{o:?}");
        (o.committed.id, o.committed.activation_us.unwrap())
    }

    fn report(&self, name: &str) -> Option<Report> {
        self.hub
            .fleet()
            .agents
            .into_iter()
            .find(|a| a.name == name)
            .map(|a| a.report)
    }

    fn advances_by(&self, by: &str) -> f64 {
        let m = parse_metrics(&self.metrics.render()).unwrap();
        m.iter()
            .filter(|(k, _)| {
                k.starts_with("lockstep_sync_cycle_advances") && k.contains(&format!("\"{by}\""))
            })
            .map(|(_, v)| *v)
            .sum()
    }

    async fn stop(self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// A site directory with `files`, replacing what was there.
fn site(root: &Path, files: &[(&str, &str)]) -> PathBuf {
    let _ = std::fs::remove_dir_all(root);
    for (path, content) in files {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    root.to_path_buf()
}

fn agent_config(name: &str, hub_url: &str, store: &Path) -> AgentConfig {
    let mut c = AgentConfig::new(name, hub_url, store, "127.0.0.1:0".parse().unwrap());
    c.token = Some(AGENT_TOKEN.into());
    c
}

async fn start_agent(config: AgentConfig) -> AgentHandle {
    agent::start(config).await.expect("agent starts")
}

/// The release named by an agent's answer to `/`, with the body.
async fn release_of(client: &HttpClient, agent: &AgentHandle) -> (Option<String>, Reply) {
    let r = get(client, agent.serve_addr(), "/").await;
    let id = r
        .headers
        .get(RELEASE_HEADER)
        .map(|v| v.to_str().unwrap().to_string());
    (id, r)
}

/// Waits (at most `within`) until `agent` serves release `id`.
async fn wait_active(agent: &AgentHandle, id: ReleaseId, within: Duration) {
    let what = format!("the agent to serve {}", id.short());
    wait::until(&what, within, || async { agent.active() == Some(id) }).await
}

fn metric(agent: &AgentHandle, name: &str) -> f64 {
    let m = parse_metrics(&agent.metrics().render()).unwrap();
    m.get(name).copied().unwrap_or(0.0)
}

fn token_file(dir: &Path) -> PathBuf {
    let p = dir.join("agent.token");
    std::fs::write(&p, AGENT_TOKEN).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_an_hour_off_flip_at_the_hubs_instant_and_advance_the_cycle() {
    let dir = tempfile::tempdir().unwrap();
    // The hub's clock is an hour ahead of the agents'.
    let hub = TestHub::start(&dir.path().join("hub"), HOUR_US).await;
    let client = h1_client();
    let mut a_cfg = agent_config("web-1", &hub.url(), &dir.path().join("a"));
    a_cfg.release_dir = Some(dir.path().join("www"));
    let a = start_agent(a_cfg).await;
    let b = start_agent(agent_config("web-2", &hub.url(), &dir.path().join("b"))).await;

    // Nothing published: 503 without a release header.
    let (id, r) = release_of(&client, &a).await;
    assert_eq!((r.status, id), (StatusCode::SERVICE_UNAVAILABLE, None));

    for (round, body) in ["v1", "v2"].into_iter().enumerate() {
        let s = site(
            &dir.path().join("site"),
            &[("index.html", body), ("css/site.css", "body{}")],
        );
        let (id, at) = hub.publish(&s, Duration::from_millis(1500)).await;
        // Staged in the background, then flipped at the activation time: watched from
        // outside, no answer names the new release before the hub's clock reaches it.
        let seen_new = std::cell::RefCell::new([false, false]);
        let what = format!("round {round}: both agents to flip to {body}");
        wait::until(&what, Duration::from_secs(10), || async {
            for (i, agent) in [&a, &b].into_iter().enumerate() {
                let (got, r) = release_of(&client, agent).await;
                let hub_after = hub.hub.now_us();
                if got.as_deref() == Some(id.to_hex().as_str()) {
                    assert_eq!(r.body, body);
                    assert!(
                        hub_after + 20_000 >= at,
                        "agent {i} served {body} {} µs before its activation time",
                        at - hub_after
                    );
                    seen_new.borrow_mut()[i] = true;
                }
            }
            seen_new.borrow().iter().all(|s| *s)
        })
        .await;
        // The first agent after the activation advanced the cycle.
        wait::until(
            "the hub's cycle to advance to the release",
            Duration::from_secs(5),
            || async { hub.hub.state().active == Some(id) },
        )
        .await;
        assert_eq!(hub.hub.state().cycle, round as u64 + 1);
        for name in ["web-1", "web-2"] {
            let what = format!("{name} to report its flip");
            wait::until(&what, Duration::from_secs(5), || async {
                hub.report(name)
                    .is_some_and(|r| r.active == Some(id) && r.last_flip == Some(id))
            })
            .await;
            let r = hub.report(name).unwrap();
            let lateness = r.last_flip_lateness_us.unwrap();
            assert!(lateness.abs() < 1_000_000, "{name} lateness {lateness} µs");
            let offset = r.offset_us.unwrap();
            assert!(
                (offset - HOUR_US).abs() < 1_000_000,
                "{name} measured offset {offset} µs, the hub is an hour ahead"
            );
            assert!(r.error_us.unwrap() >= 0);
        }
    }
    assert!(hub.advances_by("agent") >= 2.0, "agents won the advances");
    assert_eq!(hub.advances_by("hub"), 0.0);
    // release_dir: `current` follows the flip; the copy of v1 stays as the previous.
    let www = dir.path().join("www");
    wait::until(
        "release_dir's current to follow the flip to v2",
        Duration::from_secs(5),
        || async {
            std::fs::read_to_string(www.join("current/index.html"))
                .ok()
                .as_deref()
                == Some("v2")
        },
    )
    .await;
    assert_eq!(std::fs::read_dir(www.join("releases")).unwrap().count(), 2);
    assert_eq!(metric(&a, "lockstep_agent_flips_total"), 2.0);
    let v2 = hub.hub.state().active.unwrap();
    let metrics = parse_metrics(&a.metrics().render()).unwrap();
    assert_eq!(
        metrics.get(&format!(
            "lockstep_agent_active_release{{release=\"{v2}\"}}"
        )),
        Some(&1.0)
    );
    assert!(
        !metrics
            .keys()
            .any(|k| k.starts_with("lockstep_agent_staged_release{")),
        "nothing is staged after the flip: {metrics:?}"
    );
    assert_eq!(
        metric(&a, "lockstep_agent_flip_lateness_seconds_count"),
        2.0
    );
    a.shutdown(Duration::from_secs(2)).await;
    b.shutdown(Duration::from_secs(2)).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_serves_from_disk_without_the_hub_and_a_new_one_bootstraps() {
    let dir = tempfile::tempdir().unwrap();
    let hub_store = dir.path().join("hub");
    let hub = TestHub::start(&hub_store, 0).await;
    let client = h1_client();
    let a = start_agent(agent_config("web-1", &hub.url(), &dir.path().join("a"))).await;
    let s = site(&dir.path().join("site"), &[("index.html", "v1")]);
    let (v1, _) = hub.publish(&s, Duration::from_millis(800)).await;
    wait_active(&a, v1, Duration::from_secs(10)).await;
    // The hub's cycle advanced before it stops: a hub that comes back still scheduling v1's
    // flip would have the new agent below flip to it on schedule rather than bootstrap.
    wait::until("the cycle to advance", Duration::from_secs(10), || async {
        hub.advances_by("agent") + hub.advances_by("hub") >= 1.0
    })
    .await;
    a.shutdown(Duration::from_secs(2)).await;
    let hub_addr = hub.addr;
    hub.stop().await;

    // The hub is down: the restarted agent serves v1 from its store at once.
    let cfg = agent_config(
        "web-1",
        &format!("http://{hub_addr}"),
        &dir.path().join("a"),
    );
    let a = start_agent(cfg).await;
    let (id, r) = release_of(&client, &a).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, "v1");
    assert_eq!(id, Some(v1.to_hex()));

    // The hub comes back (same store, same address): a new agent copies its active release
    // at once (claims 10–11, 27), and the restarted one reports again.
    let hub = TestHub::start_on(&hub_store, 0, hub_addr).await;
    let b = start_agent(agent_config("web-2", &hub.url(), &dir.path().join("b"))).await;
    wait_active(&b, v1, Duration::from_secs(10)).await;
    assert_eq!(release_of(&client, &b).await.1.body, "v1");
    wait::until(
        "the restarted agent to reconnect",
        Duration::from_secs(15),
        || async { hub.report("web-1").is_some_and(|r| r.active == Some(v1)) },
    )
    .await;
    // A bootstrap is not a scheduled flip: no lateness.
    assert_eq!(hub.report("web-2").unwrap().last_flip, None);
    a.shutdown(Duration::from_secs(2)).await;
    b.shutdown(Duration::from_secs(2)).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_fetches_only_missing_blobs_and_resumes_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(&dir.path().join("hub"), 0).await;
    let files = [
        ("index.html", "home"),
        ("a.txt", "aaaa"),
        ("b/c.txt", "cccccc"),
    ];
    let s = site(&dir.path().join("site"), &files);
    let (v1, _) = hub.publish(&s, Duration::from_millis(800)).await;
    // An earlier run of this agent stored two of the three blobs before it stopped.
    let agent_store = dir.path().join("a");
    let partial = FsStore::open(&agent_store).unwrap();
    for (_, content) in &files[..2] {
        partial
            .write_blob(&Hash::of(content.as_bytes()), content.as_bytes())
            .unwrap();
    }
    drop(partial);
    let a = start_agent(agent_config("web-1", &hub.url(), &agent_store)).await;
    wait_active(&a, v1, Duration::from_secs(10)).await;
    assert_eq!(metric(&a, "lockstep_agent_fetched_blobs_total"), 1.0);
    assert_eq!(metric(&a, "lockstep_agent_fetched_bytes_total"), 6.0);

    // A one-file change moves that file only.
    let s = site(
        &dir.path().join("site"),
        &[
            ("index.html", "home, edited"),
            ("a.txt", "aaaa"),
            ("b/c.txt", "cccccc"),
        ],
    );
    let (v2, _) = hub.publish(&s, Duration::from_millis(800)).await;
    wait_active(&a, v2, Duration::from_secs(10)).await;
    assert_eq!(metric(&a, "lockstep_agent_fetched_blobs_total"), 2.0);
    assert_eq!(metric(&a, "lockstep_agent_fetched_bytes_total"), 6.0 + 12.0);
    assert_eq!(metric(&a, "lockstep_agent_hash_failures_total"), 0.0);

    // Rollback: the previous release is still held, so nothing moves. "Previous" is the hub's:
    // wait for the agent's advance to have promoted v2 there.
    wait::until(
        "the agent's advance to promote v2 on the hub",
        Duration::from_secs(5),
        || async { hub.hub.state().active == Some(v2) },
    )
    .await;
    let back = publish::rollback(&hub.publisher()).await.unwrap();
    assert_eq!((back.id, back.state), (v1, CommitState::Staged));
    wait_active(&a, v1, Duration::from_secs(10)).await;
    assert_eq!(metric(&a, "lockstep_agent_fetched_blobs_total"), 2.0);
    a.shutdown(Duration::from_secs(2)).await;
    hub.stop().await;
}

/// Serves v1 on a fresh agent and returns it stopped, with the hub still up.
async fn agent_serving_v1(dir: &Path, hub: &TestHub) -> ReleaseId {
    let s = site(&dir.join("site"), &[("index.html", "v1")]);
    let (v1, _) = hub.publish(&s, Duration::from_millis(800)).await;
    let a = start_agent(agent_config("web-1", &hub.url(), &dir.join("a"))).await;
    wait_active(&a, v1, Duration::from_secs(10)).await;
    a.shutdown(Duration::from_secs(2)).await;
    v1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_blob_is_refused_counted_reported_and_never_activated() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(&dir.path().join("hub"), 0).await;
    let client = h1_client();
    let v1 = agent_serving_v1(dir.path(), &hub).await;
    // v2 is published, then its new blob is damaged on the hub's disk (same size).
    let s = site(
        &dir.path().join("site"),
        &[("index.html", "v1"), ("new.txt", "fresh content")],
    );
    let (v2, at) = hub.publish(&s, Duration::from_millis(1500)).await;
    let hub_blob = FsStore::blob_path_under(&hub.store, &Hash::of(b"fresh content"));
    std::fs::write(&hub_blob, b"FRESH CONTENT").unwrap();

    let a = start_agent(agent_config("web-1", &hub.url(), &dir.path().join("a"))).await;
    assert_eq!(a.active(), Some(v1));
    wait::until(
        "web-1 to report the staging error",
        Duration::from_secs(10),
        || async {
            hub.report("web-1")
                .and_then(|r| r.error)
                .is_some_and(|e| e.contains("did not match its hash"))
        },
    )
    .await;
    assert_eq!(metric(&a, "lockstep_agent_hash_failures_total"), 3.0);
    assert!(metric(&a, "lockstep_agent_staging_failures_total") >= 1.0);
    assert!(!FsStore::blob_path_under(&dir.path().join("a"), &Hash::of(b"fresh content")).exists());
    // Past the activation (and the hub's own advance): still v1, whole.
    wait::until(
        "the hub to advance to v2 itself",
        Duration::from_secs(10),
        || async { hub.hub.state().active == Some(v2) },
    )
    .await;
    assert!(hub.hub.now_us() > at);
    let (id, r) = release_of(&client, &a).await;
    assert_eq!((id, r.body.as_str()), (Some(v1.to_hex()), "v1"));
    assert_eq!(
        get(&client, a.serve_addr(), "/new.txt").await.status,
        StatusCode::NOT_FOUND
    );

    // Repaired on the hub: the agent's next attempt fetches it and catches up.
    std::fs::write(&hub_blob, b"fresh content").unwrap();
    wait_active(&a, v2, Duration::from_secs(20)).await;
    assert_eq!(
        get(&client, a.serve_addr(), "/new.txt").await.body,
        "fresh content"
    );
    a.shutdown(Duration::from_secs(2)).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_write_fails_staging_and_the_old_release_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(&dir.path().join("hub"), 0).await;
    let client = h1_client();
    let v1 = agent_serving_v1(dir.path(), &hub).await;
    // A content whose blob directory (first two hex digits) no other blob uses; a plain file
    // in its place makes the write fail as a full disk would (the tests run as root, so
    // permissions cannot stand in).
    let v1_prefix = Hash::of(b"v1").to_hex()[..2].to_string();
    let content = (0..)
        .map(|i| format!("new {i}"))
        .find(|c| Hash::of(c.as_bytes()).to_hex()[..2] != v1_prefix)
        .unwrap();
    let prefix = Hash::of(content.as_bytes()).to_hex()[..2].to_string();
    std::fs::write(dir.path().join("a/blobs").join(&prefix), b"in the way").unwrap();
    let s = site(
        &dir.path().join("site"),
        &[("index.html", "v1"), ("new.txt", &content)],
    );
    let (v2, at) = hub.publish(&s, Duration::from_millis(1000)).await;
    let a = start_agent(agent_config("web-1", &hub.url(), &dir.path().join("a"))).await;
    wait::until(
        "web-1 to report the store error",
        Duration::from_secs(10),
        || async {
            hub.report("web-1")
                .and_then(|r| r.error)
                .is_some_and(|e| e.contains("the agent's store"))
        },
    )
    .await;
    assert_eq!(metric(&a, "lockstep_agent_hash_failures_total"), 0.0);
    // Past the activation time, and past the hub's own advance (the agent could not stage
    // v2, so it did not advance): still v1, whole.
    wait::until(
        "the hub to advance to v2 itself",
        Duration::from_secs(10),
        || async { hub.hub.state().active == Some(v2) },
    )
    .await;
    assert!(hub.hub.now_us() > at);
    assert_eq!(a.active(), Some(v1));
    let (id, r) = release_of(&client, &a).await;
    assert_eq!((id, r.body.as_str()), (Some(v1.to_hex()), "v1"));
    a.shutdown(Duration::from_secs(2)).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_staged_release_is_never_activated() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(&dir.path().join("hub"), 0).await;
    let client = h1_client();
    let v1 = agent_serving_v1(dir.path(), &hub).await;
    let a = start_agent(agent_config("web-1", &hub.url(), &dir.path().join("a"))).await;
    assert_eq!(a.active(), Some(v1));
    let s = site(&dir.path().join("site"), &[("index.html", "v2")]);
    let (v2, _) = hub.publish(&s, Duration::from_secs(4)).await;
    // v2 staged and armed on the agent; then v3 replaces it, earlier.
    wait::until(
        "web-1 to stage and arm v2",
        Duration::from_secs(5),
        || async { hub.report("web-1").is_some_and(|r| r.staged == Some(v2)) },
    )
    .await;
    let s = site(&dir.path().join("site"), &[("index.html", "v3")]);
    let (v3, _) = hub.publish(&s, Duration::from_millis(1500)).await;
    let mut bodies = std::collections::BTreeSet::new();
    let flipped = wait::until("web-1 to flip to v3", Duration::from_secs(10), || async {
        a.active() == Some(v3)
    });
    let watch = async {
        // Watch past v2's original time too.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < until {
            bodies.insert(release_of(&client, &a).await.1.body);
            // The sampler's pacing, not a synchronisation: it watches for a fixed window.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::join!(flipped, watch);
    assert!(
        !bodies.contains("v2"),
        "served the replaced release: {bodies:?}"
    );
    assert!(bodies.contains("v3"));
    a.shutdown(Duration::from_secs(2)).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_staged_after_the_activation_flips_at_once_and_reports_how_late() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(&dir.path().join("hub"), 0).await;
    let s = site(&dir.path().join("site"), &[("index.html", "v1")]);
    let (v1, at) = hub.publish(&s, Duration::from_millis(600)).await;
    // Nobody is staged at the activation time; this agent starts 300 ms after it, before
    // the hub's own advance (2 s after).
    wait::until(
        "the hub clock to pass the activation by 300 ms",
        Duration::from_secs(5),
        || async { hub.hub.now_us() >= at + 300_000 },
    )
    .await;
    let a = start_agent(agent_config("web-1", &hub.url(), &dir.path().join("a"))).await;
    wait_active(&a, v1, Duration::from_secs(5)).await;
    wait::until(
        "web-1 to report its flip",
        Duration::from_secs(5),
        || async { hub.report("web-1").is_some_and(|r| r.last_flip == Some(v1)) },
    )
    .await;
    let lateness = hub.report("web-1").unwrap().last_flip_lateness_us.unwrap();
    assert!(lateness >= 300_000, "lateness {lateness} µs");
    assert!(lateness < 2_000_000, "lateness {lateness} µs");
    a.shutdown(Duration::from_secs(2)).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_response_mixes_two_releases_across_a_flip() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(&dir.path().join("hub"), 0).await;
    let files = |v: &str| -> Vec<(String, String)> {
        (0..20)
            .map(|i| (format!("f{i}.txt"), format!("{v} file {i}")))
            .chain([("index.html".to_string(), format!("{v} home"))])
            .collect()
    };
    let v1_files = files("v1");
    let v1_refs: Vec<(&str, &str)> = v1_files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let s = site(&dir.path().join("site"), &v1_refs);
    let (v1, _) = hub.publish(&s, Duration::from_millis(800)).await;
    let a = start_agent(agent_config("web-1", &hub.url(), &dir.path().join("a"))).await;
    wait_active(&a, v1, Duration::from_secs(10)).await;
    let v2_files = files("v2");
    let v2_refs: Vec<(&str, &str)> = v2_files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let s = site(&dir.path().join("site"), &v2_refs);
    let (v2, _) = hub.publish(&s, Duration::from_millis(1200)).await;
    let expect: HashMap<String, &str> = [(v1.to_hex(), "v1"), (v2.to_hex(), "v2")].into();

    // Four keep-alive clients hammer the agent across the flip.
    let addr = a.serve_addr();
    let mut tasks = Vec::new();
    for t in 0..4 {
        let expect = expect.clone();
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            let mut seen = std::collections::BTreeSet::new();
            let until = std::time::Instant::now() + Duration::from_millis(2500);
            let mut n = 0usize;
            while std::time::Instant::now() < until {
                let path = if n % 3 == 0 {
                    "/".to_string()
                } else {
                    format!("/f{}.txt", (n + t) % 20)
                };
                let r = get(&client, addr, &path).await;
                let id = r.headers[RELEASE_HEADER].to_str().unwrap().to_string();
                let v = expect
                    .get(&id)
                    .unwrap_or_else(|| panic!("unknown release {id}"));
                assert!(
                    r.body.starts_with(v),
                    "{path}: header says {v}, body is {:?}",
                    r.body
                );
                let etag = r.headers[http::header::ETAG].to_str().unwrap().to_string();
                assert_eq!(etag, format!("\"{}\"", Hash::of(r.body.as_bytes())));
                seen.insert(*v);
                n += 1;
            }
            (seen, n)
        }));
    }
    let mut all = std::collections::BTreeSet::new();
    for t in tasks {
        let (seen, n) = t.await.unwrap();
        assert!(n > 10);
        all.extend(seen);
    }
    assert_eq!(all.into_iter().collect::<Vec<_>>(), vec!["v1", "v2"]);
    a.shutdown(Duration::from_secs(2)).await;
    hub.stop().await;
}

#[test]
fn the_agent_command_reports_config_problems_at_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.yaml");
    std::fs::write(
        &cfg,
        "name: web-1\nhub: \"http://127.0.0.1:1\"\nstore: /tmp/x\nserve: \"127.0.0.1:8081\"\nfetch_concurency: 4\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["agent", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "agent.yaml:5:1: unknown key `fetch_concurency`: did you mean `fetch_concurrency`?"
        ),
        "{err}"
    );
}

#[test]
fn the_example_agent_config_loads() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/agent.yaml"
    ))
    .unwrap();
    // Point the token file at a real private file and the PKI at a real farm CA; every other
    // key as in the example.
    let token = token_file(dir.path());
    let pki = dir.path().join("pki");
    let mut ca = lockstep::ca::Ca::init(&pki, "example").unwrap();
    let me =
        lockstep::sync::identity::Identity::new(lockstep::sync::identity::Kind::Agent, "web-1")
            .unwrap();
    ca.issue_into(&me, &[], &["10.0.0.11".parse().unwrap()], 1, &pki)
        .unwrap();
    let text = text
        .replace("/etc/lockstep/agent.token", token.to_str().unwrap())
        .replace("/etc/lockstep/pki", pki.to_str().unwrap());
    // And the trusted key at a real public key.
    let key = dir.path().join("publisher.key");
    lockstep::sync::sign::write_key_pair(&key, None, &ring::rand::SystemRandom::new()).unwrap();
    let public = lockstep::sync::sign::public_path(&key);
    let text = text.replace("/etc/lockstep/publisher.key.pub", public.to_str().unwrap());
    let c = agent::config::parse(Path::new("agent.yaml"), &text).unwrap();
    assert_eq!(c.trusted_keys.as_ref().map(|k| k.len()), Some(1));
    assert_eq!(c.name, "web-1");
    assert!(c.token.is_some() && c.watch.is_some() && c.release_dir.is_some());
    assert!(c.tls.as_ref().is_some_and(|t| t.own.is_some()));
    assert_eq!(c.gc, lockstep::sync::gc::Gc::default());
    // A grace too short to protect a staging in progress is refused where it is written.
    let e = agent::config::parse(
        Path::new("agent.yaml"),
        &text.replace("gc_grace: 1h", "gc_grace: 0s"),
    )
    .unwrap_err()
    .to_string();
    let line = 1 + text
        .lines()
        .position(|l| l.starts_with("gc_grace:"))
        .unwrap();
    assert!(
        e.contains(&format!(
            "agent.yaml:{line}:11: gc_grace must be at least 1s"
        )),
        "{e}"
    );
}
