//! The status page (`/status`) in a real browser: headless Chromium loads it from a running
//! appliance and runs its script against the admin API; the rendered DOM is read back with
//! `--dump-dom` and a screenshot is taken. A backend killed under active health checks turns
//! its row DOWN; the demo farm shows its agents, the next activation's countdown, the last
//! flip's skew and DNS answers.
//!
//! Chromium is required, not optional: without it these tests fail and say how to install it
//! (CI's `.ci/run` installs the Debian package `chromium`). `LOCKSTEP_CHROMIUM` names another
//! binary; `LOCKSTEP_STATUS_SCREENSHOTS=DIR` keeps copies of the screenshots.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use hickory_server::proto::op::{Message, MessageType, OpCode, Query};
use hickory_server::proto::rr::{Name, RecordType};
use lockstep::net::client::HttpClient as HubClient;
use lockstep::publish::{self, At};

/// Longest one Chromium run may take (it starts slowly on 2 busy cores).
const BROWSER_WAIT: Duration = Duration::from_secs(25);

/// Headless Chromium, one fresh profile per run.
struct Chromium {
    exe: String,
    dir: tempfile::TempDir,
    runs: usize,
}

/// What one page load left behind.
struct Rendered {
    /// The DOM after the page's script ran (`--dump-dom`).
    dom: String,
    /// The screenshot (`--screenshot`).
    png: PathBuf,
}

impl Chromium {
    /// Finds Chromium; panics with how to install it when it is not there.
    fn find() -> Chromium {
        // LOCKSTEP_CHROMIUM may name another Chromium or Chrome binary.
        let exe = std::env::var("LOCKSTEP_CHROMIUM").unwrap_or_else(|_| "chromium".into());
        require_tool(&exe, "chromium");
        let o = Command::new(&exe)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run `{exe} --version`: {e}"));
        assert!(
            o.status.success(),
            "`{exe} --version` failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        Chromium {
            exe,
            dir: tempfile::tempdir().expect("temp dir"),
            runs: 0,
        }
    }

    /// Loads `url` in a 1280×900 window, lets its script run for 3 s of virtual time (the
    /// clock stands still while requests are in flight, so every refresh it starts finishes),
    /// then dumps the DOM and takes a screenshot. Blocking: run it off the async threads.
    fn render(&mut self, url: &str) -> Rendered {
        self.runs += 1;
        let run = self.dir.path().join(format!("run-{}", self.runs));
        std::fs::create_dir_all(&run).expect("run dir");
        let png = run.join("status.png");
        let (out, err) = (run.join("dom.html"), run.join("stderr.txt"));
        let started = Instant::now();
        let mut cmd = Command::new(&self.exe);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--virtual-time-budget=3000",
            "--window-size=1280,900",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", run.join("profile").display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(url);
        // Its own process group, so a hung run is stopped with its helpers (on drop).
        let mut chromium = Proc::start(cmd, err.clone(), File::create(&out).expect("dom file"));
        let status = chromium.wait_exit(BROWSER_WAIT);
        let dom = std::fs::read_to_string(&out).unwrap_or_default();
        assert!(
            status.success() && dom.contains("</html>"),
            "chromium {status} on {url}, no DOM; stderr:\n{}",
            tail(&err)
        );
        eprintln!("chromium rendered {url} in {:?}", started.elapsed());
        Rendered { dom, png }
    }
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Renders `url` on a blocking thread (the appliance keeps serving on the runtime).
async fn render(browser: Chromium, url: String) -> (Chromium, Rendered) {
    tokio::task::spawn_blocking(move || {
        let mut b = browser;
        let r = b.render(&url);
        (b, r)
    })
    .await
    .expect("the chromium thread panicked")
}

/// Checks the screenshot is a real PNG of a page with content, and keeps a copy under
/// `LOCKSTEP_STATUS_SCREENSHOTS` when that is set.
fn check_screenshot(png: &Path, keep_as: &str) {
    let bytes = std::fs::read(png).unwrap_or_else(|e| panic!("no screenshot {png:?}: {e}"));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{png:?} is not a PNG"
    );
    // A blank 1280×900 page compresses to a few KB; tables, text and colour take more.
    assert!(
        bytes.len() > 20_000,
        "{png:?} is {} bytes: an empty page?",
        bytes.len()
    );
    if let Ok(dir) = std::env::var("LOCKSTEP_STATUS_SCREENSHOTS") {
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        std::fs::copy(png, Path::new(&dir).join(keep_as)).expect("copy the screenshot");
    }
}

/// Value of attribute `name` in the start tag `tag`.
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let len = tag[start..].find('"')?;
    Some(&tag[start..start + len])
}

/// Every table row with attribute `key`: its value → (`data-state`, the row's inner HTML).
fn rows(dom: &str, key: &str, pool: Option<&str>) -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    for (i, _) in dom.match_indices("<tr ") {
        let Some(end) = dom[i..].find('>') else {
            continue;
        };
        let tag = &dom[i..i + end];
        let Some(k) = attr(tag, key) else { continue };
        if pool.is_some() && attr(tag, "data-pool") != pool {
            continue;
        }
        let body_end = dom[i..].find("</tr>").map_or(dom.len(), |e| i + e);
        let state = attr(tag, "data-state").unwrap_or("").to_string();
        out.insert(
            k.to_string(),
            (state, dom[i + end + 1..body_end].to_string()),
        );
    }
    out
}

/// Text of the element with id `id` up to its first child tag.
fn text_of<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let start = at + dom[at..].find('>')? + 1;
    let len = dom[start..].find('<')?;
    Some(&dom[start..start + len])
}

async fn pools(client: &HttpClient, admin: SocketAddr) -> serde_json::Value {
    let r = get(client, admin, "/api/pools").await;
    assert_eq!(r.status, 200, "{r:?}");
    serde_json::from_str(&r.body).expect("/api/pools is JSON")
}

/// `backend` → `up` from `/api/pools` (pool `www`).
async fn up(client: &HttpClient, admin: SocketAddr) -> BTreeMap<String, bool> {
    let v = pools(client, admin).await;
    v["pools"][0]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| (b["name"].as_str().unwrap().to_owned(), b["up"] == true))
        .collect()
}

/// One A query over UDP; returns once it is answered.
async fn dns_query(server: SocketAddr, name: &str) {
    let mut m = Message::new(0x5157, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(&m.to_vec().unwrap(), server).await.unwrap();
    let mut buf = [0u8; 1500];
    tokio::time::timeout(Duration::from_secs(3), socket.recv_from(&mut buf))
        .await
        .expect("no DNS answer within 3s")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_backend_health_and_a_backend_going_down() {
    let browser = Chromium::find();
    let webs = DemoBackend::start_n(3).await;
    let pool = "    balance: round_robin\n    \
                health: { path: /healthz, interval: 100ms, timeout: 500ms, rise: 1, fall: 1 }\n";
    let yaml = farm_yaml(&backends_yaml(&webs), pool)
        + "dns:\n  bind: \"127.0.0.1:0\"\n  zones:\n    - name: farm.test\n      \
           nameservers: [ns.provider.example]\n      records:\n        - { name: www, pool: www }\n";
    let app = start(&yaml).await;
    let client = h1_client();
    let admin = app.admin_addr().expect("admin listener");
    let url = format!("http://{admin}/status");

    let page = get(&client, admin, "/status").await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.headers["content-type"], "text/html; charset=utf-8",
        "{page:?}"
    );
    assert_eq!(page.headers["cache-control"], "no-store");

    // One DNS answer, counted before the browser looks.
    dns_query(app.dns_addr().expect("dns"), "www.farm.test").await;
    let c = &client;
    wait::until(
        "/api/dns to count the query",
        Duration::from_secs(3),
        || async move {
            let r = get(c, admin, "/api/dns").await;
            serde_json::from_str::<serde_json::Value>(&r.body).is_ok_and(|v| v["total"] == 1)
        },
    )
    .await;
    wait::until(
        "every backend to be up",
        Duration::from_secs(5),
        || async move { up(c, admin).await.values().all(|u| *u) },
    )
    .await;

    let (browser, first) = render(browser, url.clone()).await;
    let r = rows(&first.dom, "data-backend", Some("www"));
    let states: Vec<(&str, &str)> = r.iter().map(|(k, v)| (k.as_str(), v.0.as_str())).collect();
    assert_eq!(
        states,
        [("web-1", "up"), ("web-2", "up"), ("web-3", "up")],
        "{}",
        first.dom
    );
    for (name, (_, row)) in &r {
        let web = webs.iter().find(|w| &w.name == name).unwrap();
        assert!(
            row.contains(&web.addr.to_string()) && row.contains(">up<"),
            "{name}'s row: {row}"
        );
    }
    assert!(first.dom.contains("3 of 3 available"), "{}", first.dom);
    // No sync hub here: its section stays hidden. DNS: the one answer.
    assert!(first.dom.contains("id=\"sync\" hidden"), "{}", first.dom);
    assert!(!first.dom.contains("id=\"dns\" hidden"), "{}", first.dom);
    assert_eq!(text_of(&first.dom, "dns-total"), Some("1"), "{}", first.dom);
    assert!(first
        .dom
        .contains("<tr data-qtype=\"A\" data-rcode=\"NOERROR\">"));
    assert!(
        !first.dom.contains("class=\"stale\""),
        "the page thinks the appliance is not answering:\n{}",
        first.dom
    );
    check_screenshot(&first.png, "status-all-up.png");

    webs[1].kill().await;
    wait::until(
        "the checks to take web-2 down (50 intervals)",
        Duration::from_secs(5),
        || async move { up(c, admin).await.get("web-2") == Some(&false) },
    )
    .await;

    let (_browser, second) = render(browser, url).await;
    let r = rows(&second.dom, "data-backend", Some("www"));
    let states: Vec<(&str, &str)> = r.iter().map(|(k, v)| (k.as_str(), v.0.as_str())).collect();
    assert_eq!(
        states,
        [("web-1", "up"), ("web-2", "down"), ("web-3", "up")],
        "{}",
        second.dom
    );
    assert!(
        r["web-2"].1.contains(">DOWN<"),
        "web-2's row: {}",
        r["web-2"].1
    );
    assert!(second.dom.contains("2 of 3 available"), "{}", second.dom);
    check_screenshot(&second.png, "status-backend-down.png");
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shows_its_agents_the_next_activation_and_the_last_flips_skew() {
    let browser = Chromium::find();
    let dir = tempfile::tempdir().unwrap();
    let demo = lockstep::demo::start(Default::default(), dir.path())
        .await
        .unwrap();
    let client = h1_client();
    let admin = demo.app.admin_addr().expect("admin listener");

    // A second release, staged to activate in an hour: the page counts down to it.
    let token = lockstep::sync::auth::read_token(&dir.path().join("publish.token")).unwrap();
    let hub = HubClient::hub(
        &format!("http://{}", demo.app.sync_addr().unwrap()),
        Some(token),
        None,
    )
    .unwrap();
    let site = dir.path().join("site-2");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("index.html"), "<h1>two</h1>").unwrap();
    let key =
        lockstep::sync::sign::read_secret_key(&dir.path().join(lockstep::demo::KEY_FILE)).unwrap();
    let staged = publish::publish(&hub, &site, At::In(Duration::from_secs(3600)), 2, &[key])
        .await
        .unwrap()
        .committed
        .id;
    let first = demo.first_release;
    // Every agent has reported the first flip and staged the second release.
    let c = &client;
    wait::until(
        "the agents to report the first flip and the staged release",
        Duration::from_secs(15),
        || async move {
            let r = get(c, admin, "/api/agents").await;
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&r.body) else {
                return false;
            };
            v["last_flip_skew"]["agents"] == 3
                && v["agents"].as_array().is_some_and(|a| {
                    a.iter()
                        .all(|a| a["report"]["staged"] == staged.to_hex() && a["current"] == true)
                })
        },
    )
    .await;

    let (_browser, page) = render(browser, format!("http://{admin}/status")).await;
    let dom = &page.dom;
    let agents = rows(dom, "data-agent", None);
    assert_eq!(
        agents.keys().collect::<Vec<_>>(),
        ["web-1", "web-2", "web-3"],
        "{dom}"
    );
    for (name, (state, row)) in &agents {
        assert_eq!(state, "current", "{name}: {row}");
        assert!(
            row.contains(&first.short()) && row.contains(&staged.short()),
            "{name}'s row names neither its active nor its staged release: {row}"
        );
    }
    let countdown = text_of(dom, "countdown").unwrap_or_default();
    assert!(
        countdown.starts_with("in 59 min") || countdown.starts_with("in 1 h"),
        "countdown {countdown:?}\n{dom}"
    );
    let skew = text_of(dom, "skew").unwrap_or_default();
    // The spread, unsigned: `150µs`, `1.234ms`.
    assert!(
        skew.starts_with(|c: char| c.is_ascii_digit()) && skew.ends_with('s'),
        "skew {skew:?}\n{dom}"
    );
    assert!(dom.contains("3 agent(s) flipped to"), "{dom}");
    // The demo's two pools, each backend up; DNS is shown (no query yet).
    for pool in ["www", "static"] {
        let r = rows(dom, "data-backend", Some(pool));
        assert_eq!(r.len(), 3, "pool {pool}: {dom}");
        assert!(r.values().all(|(s, _)| s == "up"), "pool {pool}: {r:?}");
    }
    assert!(!dom.contains("id=\"dns\" hidden"), "{dom}");
    check_screenshot(&page.png, "status-demo.png");
    demo.shutdown().await;
}

/// The last 15 minutes as sparklines: with a point every 200 ms, a second of traffic through
/// a rate-limited route shows as a line per pool and backend (requests per second, 5xx share,
/// p50/p99 latency, queue) and one for the route's refusals, drawn by the page as inline SVG.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_draws_the_recent_history_as_sparklines() {
    let browser = Chromium::find();
    let webs = DemoBackend::start_n(2).await;
    // A TLS listener whose certificate runs out in ten days: the page says so in red.
    let dir = tempfile::tempdir().unwrap();
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let not_after = now_s + 10 * 86_400 + 3_600;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["www.farm.test".to_string()]).unwrap();
    params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.path().join("c.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("c.key"), key.serialize_pem()).unwrap();
    let yaml = format!(
        "listeners:\n  - {{ name: http, bind: \"127.0.0.1:0\" }}\n\
         \x20 - name: https\n    bind: \"127.0.0.1:0\"\n    tls: {{ certificates: [{{ cert: \"{0}/c.pem\", key: \"{0}/c.key\" }}] }}\n\
         routes:\n  - {{ name: site, pool: www, rate_limit: {{ requests: 50, per: 1s }} }}\n\
         pools:\n  - name: www\n    backends:\n{1}\
         admin:\n  bind: \"127.0.0.1:0\"\n  history_interval: 200ms\n",
        dir.path().display(),
        backends_yaml(&webs)
    );
    let app = start(&yaml).await;
    let client = h1_client();
    let (admin, proxy) = (app.admin_addr().expect("admin"), proxy_addr(&app));
    let until = Instant::now() + Duration::from_millis(1500);
    let (mut ok, mut limited) = (0, 0);
    while Instant::now() < until {
        match get(&client, proxy, "/").await.status.as_u16() {
            200 => ok += 1,
            429 => limited += 1,
            s => panic!("status {s}"),
        }
    }
    assert!(ok > 0 && limited > 0, "{ok} served, {limited} limited");
    let h: serde_json::Value =
        serde_json::from_str(&get(&client, admin, "/api/history").await.body).unwrap();
    let rps = h["pools"][0]["series"]["rps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        rps.iter().any(|v| v.as_f64().is_some_and(|r| r > 0.0)),
        "{h}"
    );
    assert_eq!(h["limited"][0][0], "site", "{h}");

    let (_browser, shown) = render(browser, format!("http://{admin}/status")).await;
    let dom = &shown.dom;
    assert!(!dom.contains("id=\"history\" hidden"), "{dom}");
    for name in ["www", "www/web-1", "www/web-2"] {
        assert!(
            dom.contains(&format!("data-history=\"{name}\"")),
            "{name}: {dom}"
        );
    }
    // Lines with points, not empty frames.
    let drawn =
        dom.matches("<polyline points=\"").count() - dom.matches("<polyline points=\"\"").count();
    assert!(drawn >= 9, "{drawn} lines drawn:\n{dom}");
    assert!(dom.contains("Rate limit of route site"), "{dom}");
    // The certificate, ten days from its end: in the table, marked, and in the metrics.
    assert!(
        dom.contains("<tr data-certificate=\"www.farm.test\" data-state=\"soon\">")
            && dom.contains(">10 days<"),
        "{dom}"
    );
    let metrics = get(&client, admin, "/metrics").await.body;
    assert!(
        metrics.contains(&format!(
            "lockstep_tls_certificate_expiry_timestamp_seconds{{listener=\"https\",certificate=\"www.farm.test\"}} {not_after}"
        )),
        "{metrics}"
    );
    check_screenshot(&shown.png, "status-history.png");
    app.shutdown(Duration::from_millis(200)).await;
}
