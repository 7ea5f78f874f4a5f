//! The sync hub inside the appliance, over real sockets: publishing (only missing blobs move),
//! tokens and roles, refusals of bad input, the cycle compare-and-swap under concurrency, the
//! grace-period advance, long polls, a restart losing nothing, and the router leaving
//! backends whose agent is behind the fleet's release.

mod common;

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use lockstep::appliance::Appliance;
use lockstep::net::client::{ClientError, ClientTls, HttpClient as HubClient, REQUEST_TIMEOUT};
use lockstep::publish::{self, At};
use lockstep::sync::manifest::Hash;
use lockstep::sync::protocol::{Advanced, CommitState, Report, Schedule, Uploaded};

use common::*;

const AGENT: &str = "agent-token-123";
const PUBLISH: &str = "publish-token-456";

struct Hub {
    dir: tempfile::TempDir,
}

impl Hub {
    fn new() -> Hub {
        let dir = tempfile::tempdir().unwrap();
        for (name, token) in [("agent.token", AGENT), ("publish.token", PUBLISH)] {
            let p = dir.path().join(name);
            std::fs::write(&p, token).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        Hub { dir }
    }

    fn sync_yaml(&self, cadence: &str, lead: &str) -> String {
        let d = self.dir.path().display();
        format!(
            "sync:\n  bind: \"127.0.0.1:0\"\n  store: {d}/store\n  cadence: {cadence}\n  lead: {lead}\n  \
             agent_token_file: {d}/agent.token\n  publish_token_file: {d}/publish.token\n"
        )
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// A site directory with `files`.
    fn site(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let root = self.dir.path().join(name);
        let _ = std::fs::remove_dir_all(&root);
        for (path, content) in files {
            let p = root.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        root
    }
}

async fn start_hub(yaml: &str) -> Appliance {
    start(&format!("{yaml}admin:\n  bind: \"127.0.0.1:0\"\n")).await
}

fn client(app: &Appliance, token: Option<&str>) -> HubClient {
    let url = format!("http://{}", app.sync_addr().expect("sync hub running"));
    HubClient::hub(&url, token.map(String::from), None).unwrap()
}

async fn schedule(c: &HubClient) -> Schedule {
    c.json(
        Method::GET,
        "/sync/v1/schedule",
        None::<&()>,
        REQUEST_TIMEOUT,
    )
    .await
    .unwrap()
}

async fn status_of(c: &HubClient, method: Method, path: &str, body: &[u8]) -> StatusCode {
    let body = (!body.is_empty()).then(|| (Bytes::copy_from_slice(body), "application/json"));
    c.send(method, path, body, REQUEST_TIMEOUT)
        .await
        .unwrap()
        .status
}

#[tokio::test]
async fn publishing_moves_only_missing_blobs_and_stages_on_the_grid() {
    let hub = Hub::new();
    let app = start_hub(&hub.sync_yaml("10s", "2s")).await;
    let c = client(&app, Some(PUBLISH));
    let site = hub.site(
        "site",
        &[
            ("index.html", "v1"),
            ("css/a.css", "a{}"),
            ("img/logo.png", "png"),
        ],
    );
    // Two publishes before the first one's activation need room before it (a publish within
    // the lead of the staged activation is queued instead): wait, on the hub's clock, until the
    // next activation on the 10 s grid is more than 5 s beyond the lead.
    let room = |now: u64| (now + 2_000_000).div_ceil(10_000_000) * 10_000_000 - 2_000_000 - now;
    wait::until(
        "the hub's clock to leave room before the next activation",
        Duration::from_secs(15),
        || async { room(schedule(&c).await.now_us) > 5_000_000 },
    )
    .await;
    let before = schedule(&c).await;
    let first = publish::publish(&c, &site, At::Next, 4, &[]).await.unwrap();
    assert_eq!((first.files, first.uploaded_blobs), (3, 3));
    assert_eq!(first.committed.state, CommitState::Staged);
    let at = first.committed.activation_us.unwrap();
    assert_eq!(at % 10_000_000, 0, "activations are on the 10 s grid");
    assert!(at >= before.now_us + 2_000_000, "no sooner than the lead");
    let s = schedule(&c).await;
    assert_eq!(s.staged, Some(first.committed.id));
    assert!(s.version > before.version);

    // One file changed: one blob moves.
    std::fs::write(site.join("index.html"), "v2").unwrap();
    let second = publish::publish(&c, &site, At::Next, 4, &[]).await.unwrap();
    assert_eq!((second.uploaded_blobs, second.uploaded_bytes), (1, 2));
    assert_ne!(second.committed.id, first.committed.id);
    assert_eq!(
        schedule(&c).await.staged,
        Some(second.committed.id),
        "replaced before its activation"
    );

    // The hub serves what was published, byte for byte, and the manifest hashes to its id.
    let m = c
        .send(
            Method::GET,
            &format!("/sync/v1/releases/{}", second.committed.id),
            None,
            REQUEST_TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(Hash::of(&m.body), second.committed.id);
    let blob = c
        .send(
            Method::GET,
            &format!("/sync/v1/blobs/{}", Hash::of(b"v2")),
            None,
            REQUEST_TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(&blob.body[..], b"v2");
    app.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn tokens_and_roles_are_enforced() {
    let hub = Hub::new();
    let app = start_hub(&hub.sync_yaml("1s", "2s")).await;
    let none = client(&app, None);
    let wrong = client(&app, Some("guess"));
    let agent = client(&app, Some(AGENT));
    let publisher = client(&app, Some(PUBLISH));
    let a = none
        .send(Method::GET, "/sync/v1/schedule", None, REQUEST_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(a.headers.get("www-authenticate").is_some());
    assert_eq!(
        status_of(&wrong, Method::GET, "/sync/v1/time", b"").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status_of(&agent, Method::GET, "/sync/v1/time", b"").await,
        StatusCode::OK
    );
    assert_eq!(
        status_of(&publisher, Method::GET, "/sync/v1/agents", b"").await,
        StatusCode::OK
    );
    // Agents may not publish; publishers may not advance cycles or report as agents.
    assert_eq!(
        status_of(&agent, Method::POST, "/sync/v1/releases", b"{\"files\":{}}").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status_of(&agent, Method::POST, "/sync/v1/rollback", b"").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status_of(&publisher, Method::POST, "/sync/v1/cycles/0/advance", b"").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status_of(
            &publisher,
            Method::POST,
            "/sync/v1/agents/web-1/report",
            b"{}"
        )
        .await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status_of(&agent, Method::POST, "/sync/v1/agents/web-1/report", b"{}").await,
        StatusCode::NO_CONTENT
    );
    app.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn bad_input_is_refused_with_the_reason_and_changes_nothing() {
    let hub = Hub::new();
    let app = start_hub(&hub.sync_yaml("1s", "2s")).await;
    let c = client(&app, Some(PUBLISH));
    let agent = client(&app, Some(AGENT));
    let h = Hash::of(b"x");
    for path in ["../etc/passwd", "/abs", "a//b", "a\\\\b", "a/./b", ""] {
        let body =
            format!(r#"{{"files":{{"{path}":{{"hash":"{h}","size":1,"type":"text/plain"}}}}}}"#);
        let a = c
            .send(
                Method::POST,
                "/sync/v1/releases",
                Some((Bytes::from(body), "application/json")),
                REQUEST_TIMEOUT,
            )
            .await
            .unwrap();
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{path:?}");
        assert!(
            String::from_utf8_lossy(&a.body).contains("refused"),
            "{path:?}: {:?}",
            a.body
        );
    }
    assert_eq!(
        status_of(&c, Method::POST, "/sync/v1/releases", b"{not json").await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        status_of(
            &c,
            Method::POST,
            "/sync/v1/releases",
            b"{\"files\":{},\"extra\":1}"
        )
        .await,
        StatusCode::BAD_REQUEST
    );
    // A blob whose bytes do not match the name it is put under.
    let a = c
        .send(
            Method::PUT,
            &format!("/sync/v1/blobs/{h}"),
            Some((Bytes::from_static(b"not x"), "application/octet-stream")),
            REQUEST_TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(!hub
        .store()
        .join("blobs")
        .join(&h.to_hex()[..2])
        .join(h.to_hex())
        .exists());
    assert_eq!(
        status_of(&c, Method::PUT, "/sync/v1/blobs/nothex", b"x").await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        status_of(&c, Method::GET, &format!("/sync/v1/releases/{h}"), b"").await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        status_of(&c, Method::GET, &format!("/sync/v1/blobs/{h}"), b"").await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        status_of(
            &c,
            Method::POST,
            &format!("/sync/v1/releases/{h}/commit"),
            b""
        )
        .await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        status_of(&c, Method::GET, "/sync/v1/nope", b"").await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        status_of(&c, Method::DELETE, "/sync/v1/schedule", b"").await,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        status_of(
            &agent,
            Method::POST,
            "/sync/v1/agents/bad%20name/report",
            b"{}"
        )
        .await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        status_of(
            &agent,
            Method::POST,
            "/sync/v1/agents/web-1/report",
            b"{\"active\":\"zz\"}"
        )
        .await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        status_of(&agent, Method::POST, "/sync/v1/cycles/x/advance", b"").await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        status_of(&agent, Method::GET, "/sync/v1/schedule?wait=x", b"").await,
        StatusCode::BAD_REQUEST
    );

    // A manifest whose blobs were never uploaded cannot be committed.
    let body =
        format!(r#"{{"files":{{"index.html":{{"hash":"{h}","size":1,"type":"text/html"}}}}}}"#);
    let up: Uploaded = serde_json::from_slice(
        &c.send(
            Method::POST,
            "/sync/v1/releases",
            Some((Bytes::from(body), "application/json")),
            REQUEST_TIMEOUT,
        )
        .await
        .unwrap()
        .body,
    )
    .unwrap();
    assert_eq!(up.missing, vec![h]);
    let a = c
        .send(
            Method::POST,
            &format!("/sync/v1/releases/{}/commit", up.id),
            None,
            REQUEST_TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::CONFLICT);
    // An activation time in the past is refused.
    c.send(
        Method::PUT,
        &format!("/sync/v1/blobs/{h}"),
        Some((Bytes::from_static(b"x"), "application/octet-stream")),
        REQUEST_TIMEOUT,
    )
    .await
    .unwrap();
    let a = c
        .send(
            Method::POST,
            &format!("/sync/v1/releases/{}/commit", up.id),
            Some((Bytes::from_static(b"{\"at_us\":1}"), "application/json")),
            REQUEST_TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::CONFLICT, "{:?}", a.body);
    let s = schedule(&c).await;
    assert_eq!(
        (s.version, s.staged, s.active),
        (0, None, None),
        "nothing was staged"
    );
    // Rollback without a previous release.
    assert_eq!(
        status_of(&c, Method::POST, "/sync/v1/rollback", b"").await,
        StatusCode::CONFLICT
    );
    app.shutdown(Duration::from_secs(1)).await;
}

/// The security issue's numbers over HTTP: a changeset with `seq = u64::MAX` (it would make
/// the hub answer "duplicate" to every later edit of web-1, which web-1 then drops) and one
/// with a `detected_us` a day ahead (it would win every conflict) are refused whole with a 400
/// naming the field and the bound, and counted; web-1's honest edit still applies. A report
/// whose `serve` is not an `ip:port` is refused too.
#[tokio::test]
async fn changesets_numbered_ahead_of_the_hub_and_bad_serve_addresses_are_refused() {
    use lockstep::sync::changeset::{Change, Changeset, Mode, MAX_AHEAD_US};
    use lockstep::sync::manifest::Entry;
    let hub = Hub::new();
    let app = start_hub(&hub.sync_yaml("1s", "2s")).await;
    let agent = client(&app, Some(AGENT));
    let data = b"edited";
    let h = Hash::of(data);
    assert!(
        status_of(&agent, Method::PUT, &format!("/sync/v1/blobs/{h}"), data)
            .await
            .is_success()
    );
    let now = schedule(&agent).await.now_us;
    let edit = |seq: u64, detected_us: u64| Changeset {
        origin: "web-1".into(),
        seq,
        mode: Mode::Immediate,
        base: None,
        detected_us,
        changes: [(
            "index.html".to_string(),
            Change {
                entry: Some(Entry {
                    hash: h,
                    size: data.len() as u64,
                    content_type: "text/html".into(),
                }),
                prev: None,
            },
        )]
        .into(),
    };
    let send = |cs: Changeset| {
        let agent = agent.clone();
        async move {
            agent
                .send(
                    Method::POST,
                    "/sync/v1/changesets",
                    Some((
                        Bytes::from(serde_json::to_vec(&cs).unwrap()),
                        "application/json",
                    )),
                    REQUEST_TIMEOUT,
                )
                .await
                .unwrap()
        }
    };
    let day = 86_400_000_000;
    for (cs, field) in [
        (edit(u64::MAX, now), "seq"),
        (edit(now, now + day), "detected_us"),
    ] {
        let a = send(cs).await;
        let body = String::from_utf8_lossy(&a.body).to_string();
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            body.contains(&format!("{field} "))
                && body.contains("is beyond")
                && body.contains("plus 1 s"),
            "{body}"
        );
    }
    let s = schedule(&agent).await;
    assert_eq!((s.version, s.applied.len()), (0, 0), "nothing was applied");
    let m = scrape(&h1_client(), app.admin_addr().unwrap()).await;
    for field in ["seq", "detected_us"] {
        assert_eq!(
            m.get(&format!(
                "lockstep_sync_changesets_implausible_total{{field=\"{field}\"}}"
            )),
            Some(&1.0),
            "{m:?}"
        );
    }
    // Numbered by hub time (within the allowance for clock error): applied.
    let now = schedule(&agent).await.now_us;
    let a = send(edit(now + MAX_AHEAD_US / 2, now)).await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{:?}",
        String::from_utf8_lossy(&a.body)
    );
    assert_eq!(
        schedule(&agent).await.applied["web-1"],
        now + MAX_AHEAD_US / 2
    );

    for bad in ["attacker.example:443", "10.0.0.1", "http://10.0.0.1:80"] {
        let body = format!(r#"{{"serve":"{bad}"}}"#);
        let a = agent
            .send(
                Method::POST,
                "/sync/v1/agents/web-1/report",
                Some((Bytes::from(body), "application/json")),
                REQUEST_TIMEOUT,
            )
            .await
            .unwrap();
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(String::from_utf8_lossy(&a.body).contains("is not an ip:port"));
    }
    assert_eq!(
        status_of(
            &agent,
            Method::POST,
            "/sync/v1/agents/web-1/report",
            br#"{"serve":"[::1]:8081"}"#
        )
        .await,
        StatusCode::NO_CONTENT
    );
    app.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn concurrent_advances_after_the_activation_have_exactly_one_winner() {
    let hub = Hub::new();
    let app = start_hub(&hub.sync_yaml("100ms", "0s")).await;
    let c = client(&app, Some(PUBLISH));
    let site = hub.site("site", &[("index.html", "v1")]);
    let now = schedule(&c).await.now_us;
    let o = publish::publish(&c, &site, At::Absolute(now + 600_000), 1, &[])
        .await
        .unwrap();
    let agent = client(&app, Some(AGENT));
    // Before the activation: too early.
    let early = agent
        .json::<Advanced>(
            Method::POST,
            "/sync/v1/cycles/0/advance",
            None::<&()>,
            REQUEST_TIMEOUT,
        )
        .await;
    assert!(
        matches!(
            early,
            Err(ClientError::Status {
                status: StatusCode::CONFLICT,
                ..
            })
        ),
        "{early:?}"
    );
    wait::until(
        "the hub clock to pass the activation",
        Duration::from_secs(3),
        || async { schedule(&c).await.now_us >= now + 600_000 },
    )
    .await;
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let a = client(&app, Some(AGENT));
            tokio::spawn(async move {
                a.json::<Advanced>(
                    Method::POST,
                    "/sync/v1/cycles/0/advance",
                    None::<&()>,
                    REQUEST_TIMEOUT,
                )
                .await
                .unwrap()
            })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.cycle, 1);
        won += usize::from(r.advanced);
    }
    assert_eq!(won, 1, "exactly one caller promotes the staged release");
    let s = schedule(&c).await;
    assert_eq!(
        (s.cycle, s.active, s.staged),
        (1, Some(o.committed.id), None)
    );
    let m = scrape(&h1_client(), app.admin_addr().unwrap()).await;
    assert_eq!(
        m.get("lockstep_sync_cycle_advances_total{by=\"agent\"}"),
        Some(&1.0),
        "{m:?}"
    );
    app.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn the_hub_advances_itself_when_no_agent_does_and_long_polls_wake_at_once() {
    let hub = Hub::new();
    let app = start_hub(&hub.sync_yaml("100ms", "100ms")).await;
    let c = client(&app, Some(PUBLISH));
    let agent = client(&app, Some(AGENT));
    let v = schedule(&agent).await.version;
    let poll = tokio::spawn(async move {
        let started = Instant::now();
        let s: Schedule = agent
            .json(
                Method::GET,
                &format!("/sync/v1/schedule?wait={v}"),
                None::<&()>,
                REQUEST_TIMEOUT,
            )
            .await
            .unwrap();
        (s, started.elapsed())
    });
    // The long poll is parked on the hub (its gauge says so) before anything is published.
    let (metrics_client, admin) = (h1_client(), app.admin_addr().unwrap());
    wait::until(
        "the long poll to be parked on the hub",
        Duration::from_secs(5),
        || async {
            scrape(&metrics_client, admin)
                .await
                .get("lockstep_sync_long_polls_waiting")
                == Some(&1.0)
        },
    )
    .await;
    let site = hub.site("site", &[("index.html", "v1")]);
    let o = publish::publish(&c, &site, At::Next, 1, &[]).await.unwrap();
    let (s, waited) = poll.await.unwrap();
    assert_eq!(
        s.staged,
        Some(o.committed.id),
        "the long poll returns the publish"
    );
    assert!(
        waited < Duration::from_secs(10),
        "it returned when the publish happened, not at its timeout"
    );
    let m = scrape(&metrics_client, admin).await;
    assert_eq!(m.get("lockstep_sync_long_polls_waiting"), Some(&0.0));
    // No agent: the hub promotes the release itself after its grace period.
    wait::until(
        "the hub to advance the cycle itself",
        Duration::from_secs(8),
        || async { schedule(&c).await.active == Some(o.committed.id) },
    )
    .await;
    let m = scrape(&h1_client(), app.admin_addr().unwrap()).await;
    assert_eq!(
        m.get("lockstep_sync_cycle_advances_total{by=\"hub\"}"),
        Some(&1.0)
    );
    app.shutdown(Duration::from_secs(1)).await;
}

/// Every file in the store holds exactly the bytes its name says.
fn assert_store_whole(store: &Path) {
    for sub in ["blobs", "releases"] {
        let mut stack = vec![store.join(sub)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let name = p.file_stem().unwrap().to_string_lossy().to_string();
                assert_eq!(
                    Hash::of(&std::fs::read(&p).unwrap()).to_hex(),
                    name,
                    "{}",
                    p.display()
                );
            }
        }
    }
}

#[tokio::test]
async fn a_restarted_hub_loses_nothing() {
    let hub = Hub::new();
    let yaml = hub.sync_yaml("100ms", "0s");
    let app = start_hub(&yaml).await;
    let c = client(&app, Some(PUBLISH));
    let site = hub.site("site", &[("index.html", "v1"), ("a/b.txt", "b")]);
    let now = schedule(&c).await.now_us;
    let one = publish::publish(&c, &site, At::Absolute(now + 200_000), 2, &[])
        .await
        .unwrap();
    wait::until(
        "release one to activate",
        Duration::from_secs(6),
        || async { schedule(&c).await.active == Some(one.committed.id) },
    )
    .await;
    std::fs::write(site.join("index.html"), "v2").unwrap();
    let two = publish::publish(&c, &site, At::Absolute(now + 60_000_000), 2, &[])
        .await
        .unwrap();
    let before = schedule(&c).await;
    app.shutdown(Duration::from_secs(1)).await;

    let app = start_hub(&yaml).await;
    let c = client(&app, Some(PUBLISH));
    let after = schedule(&c).await;
    assert_eq!(
        (
            after.version,
            after.cycle,
            after.active,
            after.staged,
            after.activation_us
        ),
        (
            before.version,
            before.cycle,
            before.active,
            before.staged,
            before.activation_us
        )
    );
    assert_eq!(after.staged, Some(two.committed.id));
    assert_store_whole(&hub.store());
    // Publishing the same tree again uploads nothing.
    let again = publish::publish(&c, &site, At::Absolute(now + 60_000_000), 2, &[])
        .await
        .unwrap();
    assert_eq!(again.uploaded_blobs, 0);
    // Rollback stages the previous release... there is none yet (one activation so far).
    app.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn the_router_leaves_backends_whose_agent_is_behind_unless_none_is_current() {
    let hub = Hub::new();
    let backends = DemoBackend::start_n(2).await;
    let yaml = format!(
        "{}{}",
        farm_yaml(&backends_yaml(&backends), ""),
        hub.sync_yaml("100ms", "0s")
    );
    let app = start(&yaml).await;
    let names: Vec<String> = backends.iter().map(|b| b.name.clone()).collect();
    let c = client(&app, Some(PUBLISH));
    let agent = client(&app, Some(AGENT));
    let site = hub.site("site", &[("index.html", "v1")]);
    let now = schedule(&c).await.now_us;
    let o = publish::publish(&c, &site, At::Absolute(now + 100_000), 1, &[])
        .await
        .unwrap();
    wait::until(
        "the release to activate",
        Duration::from_secs(6),
        || async { schedule(&c).await.active == Some(o.committed.id) },
    )
    .await;
    let report = |name: &str, active: Option<Hash>| {
        let agent = agent.clone();
        let path = format!("/sync/v1/agents/{name}/report");
        async move {
            let body = serde_json::to_vec(&Report {
                active,
                ..Report::default()
            })
            .unwrap();
            let a = agent
                .send(
                    Method::POST,
                    &path,
                    Some((Bytes::from(body), "application/json")),
                    REQUEST_TIMEOUT,
                )
                .await
                .unwrap();
            assert_eq!(a.status, StatusCode::NO_CONTENT);
        }
    };
    // Both behind: stale content beats none, both keep traffic.
    report(&names[0], None).await;
    report(&names[1], None).await;
    let proxy = proxy_addr(&app);
    let http = h1_client();
    let t = tally(&http, proxy, 20).await;
    assert_eq!(t.len(), 2, "{t:?}");
    // One current: only it takes traffic.
    report(&names[0], Some(o.committed.id)).await;
    wait::until(
        "the backend behind to stop taking traffic",
        Duration::from_secs(3),
        || async {
            tally(&http, proxy, 10)
                .await
                .keys()
                .cloned()
                .collect::<HashSet<_>>()
                == HashSet::from([names[0].clone()])
        },
    )
    .await;
    // It catches up: both again.
    report(&names[1], Some(o.committed.id)).await;
    wait::until(
        "both backends to take traffic again",
        Duration::from_secs(3),
        || async { tally(&http, proxy, 20).await.len() == 2 },
    )
    .await;
    let fleet = publish::fleet(&agent).await.unwrap();
    assert!(fleet.agents.iter().all(|a| a.current), "{fleet:?}");
    assert!(publish::render_fleet(&fleet).contains("current"));
    app.shutdown(Duration::from_secs(1)).await;
}

/// A forged report (`active: null` under web-1's name) takes web-1 out of rotation only until
/// it expires (`sync.report_expiry`, 2 s here): then web-1 takes traffic again, and the fleet
/// (`/sync/v1/agents`, the admin API, `lockstep status`) shows its report as stale, neither
/// current nor behind.
#[tokio::test]
async fn a_report_nobody_renews_stops_steering_the_rotation_when_it_expires() {
    let hub = Hub::new();
    let backends = DemoBackend::start_n(2).await;
    let yaml = format!(
        "{}{}  report_expiry: 2s\n",
        farm_yaml(&backends_yaml(&backends), ""),
        hub.sync_yaml("100ms", "0s")
    );
    let app = start(&yaml).await;
    let names: Vec<String> = backends.iter().map(|b| b.name.clone()).collect();
    let c = client(&app, Some(PUBLISH));
    let agent = client(&app, Some(AGENT));
    let site = hub.site("site", &[("index.html", "v1")]);
    let now = schedule(&c).await.now_us;
    let o = publish::publish(&c, &site, At::Absolute(now + 100_000), 1, &[])
        .await
        .unwrap();
    wait::until(
        "the release to activate",
        Duration::from_secs(6),
        || async { schedule(&c).await.active == Some(o.committed.id) },
    )
    .await;
    let report = |name: &str, active: Option<Hash>| {
        let agent = agent.clone();
        let path = format!("/sync/v1/agents/{name}/report");
        async move {
            let body = serde_json::to_vec(&Report {
                active,
                ..Report::default()
            })
            .unwrap();
            let a = agent
                .send(
                    Method::POST,
                    &path,
                    Some((Bytes::from(body), "application/json")),
                    REQUEST_TIMEOUT,
                )
                .await
                .unwrap();
            assert_eq!(a.status, StatusCode::NO_CONTENT);
        }
    };
    let proxy = proxy_addr(&app);
    let http = h1_client();
    report(&names[1], Some(o.committed.id)).await;
    // Taken before the report leaves: it cannot expire sooner than 2 s after this.
    let forged = Instant::now();
    report(&names[0], None).await;
    let serving = |want: HashSet<String>| {
        let http = http.clone();
        async move {
            tally(&http, proxy, 10)
                .await
                .keys()
                .cloned()
                .collect::<HashSet<_>>()
                == want
        }
    };
    wait::until(
        "the forged report to take web-1 out of rotation",
        Duration::from_secs(2),
        || serving(HashSet::from([names[1].clone()])),
    )
    .await;
    wait::until(
        "web-1 back in rotation once the forged report expired",
        Duration::from_secs(5),
        || serving(names.iter().cloned().collect()),
    )
    .await;
    assert!(
        forged.elapsed() >= Duration::from_secs(2),
        "not before it expired"
    );
    let fleet = publish::fleet(&agent).await.unwrap();
    let view: Vec<(&str, bool, bool)> = fleet
        .agents
        .iter()
        .map(|a| (a.name.as_str(), a.current, a.stale))
        .collect();
    assert_eq!(
        view,
        [
            (names[0].as_str(), false, true),
            (names[1].as_str(), false, true)
        ]
    );
    assert!(
        publish::render_fleet(&fleet).contains("stale"),
        "{}",
        publish::render_fleet(&fleet)
    );
    let api = get_with(&http, app.admin_addr().unwrap(), "/api/agents", &[])
        .await
        .unwrap();
    let api: serde_json::Value = serde_json::from_str(&api.body).unwrap();
    assert_eq!(api["agents"][0]["stale"], true, "{api}");
    let m = scrape(&http, app.admin_addr().unwrap()).await;
    assert_eq!(m.get("lockstep_sync_agents_stale"), Some(&2.0), "{m:?}");
    assert_eq!(m.get("lockstep_sync_agents_behind"), Some(&0.0));
    // Renewed, a report counts again.
    report(&names[0], None).await;
    wait::until(
        "web-1 out of rotation again while its report counts",
        Duration::from_secs(2),
        || serving(HashSet::from([names[1].clone()])),
    )
    .await;
    app.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn the_demo_flips_its_three_backends_to_a_published_directory() {
    let dir = tempfile::tempdir().unwrap();
    // Every port 0: any free one.
    let demo = lockstep::demo::start(Default::default(), dir.path())
        .await
        .unwrap();
    let proxy = proxy_addr(&demo.app);
    let http = h1_client();
    let host = [("host", "static.farm.test")];
    let first = get_with(&http, proxy, "/", &host).await.unwrap();
    assert!(
        first.body.contains("release 1 of the demo site"),
        "{first:?}"
    );
    assert_eq!(
        first.headers.get("x-lockstep-release").unwrap(),
        &demo.first_release.to_hex()
    );

    let token = lockstep::sync::auth::read_token(&dir.path().join("publish.token")).unwrap();
    let url = format!("http://{}", demo.app.sync_addr().unwrap());
    let c = HubClient::hub(&url, Some(token), None).unwrap();
    let site = dir.path().join("site-2");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("index.html"), "<h1>two</h1>").unwrap();
    // Signed with the demo's key: its hub and agents refuse anything else.
    let key =
        lockstep::sync::sign::read_secret_key(&dir.path().join(lockstep::demo::KEY_FILE)).unwrap();
    assert_eq!(key.public(), demo.key);
    let unsigned = publish::publish(&c, &site, At::In(Duration::from_secs(2)), 2, &[]).await;
    let refused = unsigned.unwrap_err().to_string();
    assert!(refused.contains("not signed by a trusted key"), "{refused}");
    let o = publish::publish(&c, &site, At::In(Duration::from_secs(2)), 2, &[key])
        .await
        .unwrap();
    let id = o.committed.id;
    wait::until(
        "the demo agents to flip",
        Duration::from_secs(10),
        || async { demo.agents.iter().all(|a| a.active() == Some(id)) },
    )
    .await;
    for _ in 0..6 {
        let r = get_with(&http, proxy, "/", &host).await.unwrap();
        assert_eq!(r.body, "<h1>two</h1>");
        assert_eq!(r.headers.get("x-lockstep-release").unwrap(), &id.to_hex());
    }

    // The admin API lists the same fleet, once the first agent's advance (which follows its
    // flip) has made the release the hub's active one.
    let admin = demo.app.admin_addr().unwrap();
    let fleet = || async {
        let agents = get_with(&http, admin, "/api/agents", &[]).await.unwrap();
        assert_eq!(agents.status, 200);
        serde_json::from_str::<serde_json::Value>(&agents.body).unwrap()
    };
    wait::until(
        "the admin API to show the release as the hub's active one",
        Duration::from_secs(10),
        || async { fleet().await["schedule"]["active"] == id.to_hex() },
    )
    .await;
    let fleet = fleet().await;
    assert_eq!(fleet["agents"].as_array().map(Vec::len), Some(3), "{fleet}");
    assert_eq!(fleet["schedule"]["active"], id.to_hex());

    // Detect and forward: web-1's editing directory holds the release; an edit there is
    // served by every backend, through the proxy.
    let edit = dir.path().join("edit-1/index.html");
    wait::until(
        "web-1's edit directory to follow the release",
        Duration::from_secs(10),
        || async { std::fs::read_to_string(&edit).is_ok_and(|b| b == "<h1>two</h1>") },
    )
    .await;
    std::fs::write(&edit, "<h1>edited on web-1</h1>").unwrap();
    wait::until(
        "the edit to reach every agent",
        Duration::from_secs(10),
        || async {
            demo.agents.iter().all(|a| {
                a.active_release()
                    .and_then(|r| r.file("index.html").map(|f| f.size))
                    == Some(24)
            })
        },
    )
    .await;
    for _ in 0..6 {
        let r = get_with(&http, proxy, "/", &host).await.unwrap();
        assert_eq!(r.body, "<h1>edited on web-1</h1>");
    }
    demo.shutdown().await;
}

#[tokio::test]
async fn over_tls_the_hub_serves_publishers_and_agents_that_trust_its_ca_only() {
    let hub = Hub::new();
    let cert = TestCert::new(hub.dir.path(), "localhost");
    let other = TestCert::new(hub.dir.path(), "elsewhere");
    let yaml = format!(
        "{}  tls:\n    certificates:\n{}",
        hub.sync_yaml("100ms", "0s"),
        cert.yaml()
    );
    let app = start_hub(&yaml).await;
    let port = app.sync_addr().unwrap().port();
    let url = format!("https://localhost:{port}");
    let trust = ClientTls::ca_file(&cert.cert_path).unwrap();
    let c = HubClient::hub(&url, Some(PUBLISH.into()), Some(&trust)).unwrap();
    let site = hub.site("site", &[("index.html", "over tls")]);
    let o = publish::publish(&c, &site, At::In(Duration::from_millis(500)), 2, &[])
        .await
        .unwrap();

    // Plain HTTP to the TLS port, an https client without a CA, or trusting another one: no.
    let plain = HubClient::hub(
        &format!("http://127.0.0.1:{port}"),
        Some(PUBLISH.into()),
        None,
    )
    .unwrap();
    assert!(plain
        .send(
            Method::GET,
            "/sync/v1/schedule",
            None,
            Duration::from_secs(3)
        )
        .await
        .is_err());
    assert!(matches!(
        HubClient::hub(&url, None, None),
        Err(ClientError::Tls(_))
    ));
    let other = ClientTls::ca_file(&other.cert_path).unwrap();
    let wrong = HubClient::hub(&url, Some(PUBLISH.into()), Some(&other)).unwrap();
    let e = wrong
        .send(Method::GET, "/sync/v1/schedule", None, REQUEST_TIMEOUT)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("TLS"), "{e}");

    // An agent naming the CA stages and serves the release.
    let mut cfg = lockstep::agent::AgentConfig::new(
        "web-1",
        &url,
        &hub.dir.path().join("agent-store"),
        "127.0.0.1:0".parse().unwrap(),
    );
    cfg.token = Some(AGENT.into());
    cfg.tls = Some(lockstep::agent::config::AgentTls {
        trust: lockstep::config::tls::load_trust(&cert.cert_path, None).unwrap(),
        own: None,
        signer: None,
    });
    let agent = lockstep::agent::start(cfg).await.unwrap();
    wait::until(
        "the agent to activate the release over TLS",
        Duration::from_secs(10),
        || async { agent.active() == Some(o.committed.id) },
    )
    .await;
    let r = get(&h1_client(), agent.serve_addr(), "/").await;
    assert_eq!(r.body, "over tls");
    agent.shutdown(Duration::from_secs(1)).await;
    app.shutdown(Duration::from_secs(1)).await;
}

/// Two appliances on one store would break the compare-and-swap and wipe each other's
/// uploads in progress: a second `lockstep serve` on a store in use is refused, naming the
/// holder, and the first keeps its state.
#[tokio::test]
async fn a_second_lockstep_serve_on_the_same_store_is_refused() {
    let hub = Hub::new();
    let yaml = hub.sync_yaml("1s", "2s");
    let app = start_hub(&yaml).await;
    let c = client(&app, Some(PUBLISH));
    let site = hub.site("site", &[("index.html", "v1")]);
    let first = publish::publish(&c, &site, At::Next, 4, &[]).await.unwrap();
    let file = hub.dir.path().join("second.yaml");
    std::fs::write(&file, &yaml).unwrap();
    let out = tokio::task::spawn_blocking(move || run_lockstep(&[&"serve", &"-c", &file]))
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a second appliance started on a store in use:\n{stderr}"
    );
    let want = format!("in use by another process (pid {})", std::process::id());
    assert!(
        stderr.contains(&want),
        "the refusal names the holder ({want}):\n{stderr}"
    );
    // The first one still serves its state.
    assert_eq!(schedule(&c).await.staged, Some(first.committed.id));
    app.shutdown(Duration::from_secs(1)).await;
}
