//! Gentle with backends, end to end: a backend that comes back takes a growing share of the
//! requests over `slow_start`, and `max_connections` keeps a backend's concurrent requests
//! under its limit, the rest waiting in the pool's bounded queue or answered 503 when it is
//! full or they waited `queue.timeout`.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use common::*;

/// A backend answering after `delay` that records how many requests it held at once.
struct Busy {
    addr: SocketAddr,
    now: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

async fn busy_backend(delay: Duration) -> Busy {
    let socket = bind().await;
    let addr = socket.local_addr().unwrap();
    let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n, m) = (now.clone(), most.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            let (n, m) = (n.clone(), m.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let (n, m) = (n.clone(), m.clone());
                    async move {
                        let held = n.fetch_add(1, Ordering::SeqCst) + 1;
                        m.fetch_max(held, Ordering::SeqCst);
                        tokio::time::sleep(delay).await;
                        n.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done\n"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Busy { addr, now, most }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_comes_back_ramps_up_over_slow_start() {
    let webs = DemoBackend::start_n(2).await;
    let pool = "    balance: round_robin\n    slow_start: 3s\n    \
                health: { path: /healthz, interval: 100ms, timeout: 500ms, rise: 1, fall: 1 }\n";
    let app = start(&farm_yaml(&backends_yaml(&webs), pool)).await;
    let client = h1_client();
    let addr = proxy_addr(&app);
    // At start, no ramp: both take their turn.
    let counts = tally(&client, addr, 100).await;
    assert_eq!(counts.get("web-2").copied(), Some(50), "{counts:?}");

    webs[1].set_unhealthy(true);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tally(&client, addr, 10).await.contains_key("web-2") {
        assert!(Instant::now() < deadline, "web-2 never went down");
    }
    webs[1].set_unhealthy(false);
    let back = Instant::now();
    while !tally(&client, addr, 20).await.contains_key("web-2") {
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "web-2 never came back"
        );
    }
    // Its share of each half second from its return: growing, from a few per cent to half.
    let mut shares = Vec::new();
    let mut window = 0;
    while back.elapsed() < Duration::from_millis(4000) {
        let (mut mine, mut all) = (0, 0);
        let until = back + Duration::from_millis(500 * (window + 1));
        while Instant::now() < until {
            let c = tally(&client, addr, 10).await;
            mine += c.get("web-2").copied().unwrap_or(0);
            all += c.values().sum::<usize>();
        }
        shares.push(mine as f64 / all.max(1) as f64);
        window += 1;
    }
    let text = format!("{shares:.2?}");
    eprintln!("slow start shares: {text}");
    // Round robin over two: a backend at share f of its traffic takes about f/2.
    assert!(shares[0] < 0.2, "first half second {text}");
    assert!(shares[2] > shares[0], "{text}");
    assert!(
        shares.last().copied().unwrap_or(0.0) > 0.4,
        "after the ramp {text}"
    );
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_queue_a_burst_and_refuse_what_the_queue_cannot_hold() {
    let b = busy_backend(Duration::from_millis(300)).await;
    let backends = format!(
        "      - {{ name: slow, address: \"{}\", max_connections: 2 }}\n",
        b.addr
    );
    let app = start(&farm_yaml(
        &backends,
        "    queue: { max: 3, timeout: 2s }\n    retries: 0\n",
    ))
    .await;
    let addr = proxy_addr(&app);
    let started = Instant::now();
    let burst: Vec<_> = (0..10)
        .map(|_| tokio::spawn(async move { get_with(&h1_client(), addr, "/", &[]).await }))
        .collect();
    let mut statuses = Vec::new();
    for r in burst {
        statuses.push(r.await.unwrap().expect("an answer").status.as_u16());
    }
    statuses.sort_unstable();
    // Two at once, three waiting: five served; the five that found the queue full, 503 at once.
    assert_eq!(statuses, [200, 200, 200, 200, 200, 503, 503, 503, 503, 503]);
    assert_eq!(
        b.most.load(Ordering::SeqCst),
        2,
        "never more than max_connections at once"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(550),
        "the queued ones waited for a place: {:?}",
        started.elapsed()
    );
    assert_eq!(b.now.load(Ordering::SeqCst), 0);
    let m = get(&h1_client(), app.admin_addr().unwrap(), "/metrics")
        .await
        .body;
    assert!(
        m.contains("lockstep_queue_refused_total{pool=\"www\",reason=\"full\"} 5"),
        "{m}"
    );
    assert!(m.contains("lockstep_queue_depth{pool=\"www\"} 0"), "{m}");
    app.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waits_past_queue_timeout_gets_503() {
    let b = busy_backend(Duration::from_millis(1500)).await;
    let backends = format!(
        "      - {{ name: slow, address: \"{}\", max_connections: 1 }}\n",
        b.addr
    );
    let app = start(&farm_yaml(
        &backends,
        "    queue: { max: 10, timeout: 200ms }\n    retries: 0\n",
    ))
    .await;
    let addr = proxy_addr(&app);
    let first = tokio::spawn(async move { get_with(&h1_client(), addr, "/", &[]).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    let late = get_with(&h1_client(), addr, "/", &[]).await.unwrap();
    let waited = t.elapsed();
    assert_eq!(late.status, 503, "{late:?}");
    assert!(late.body.contains("queue.timeout"), "{}", late.body);
    assert!(
        waited >= Duration::from_millis(190) && waited < Duration::from_millis(1200),
        "{waited:?}"
    );
    assert_eq!(first.await.unwrap().unwrap().status, 200);
    let m = get(&h1_client(), app.admin_addr().unwrap(), "/metrics")
        .await
        .body;
    assert!(
        m.contains("lockstep_queue_refused_total{pool=\"www\",reason=\"timeout\"} 1"),
        "{m}"
    );
    app.shutdown(Duration::from_millis(200)).await;
}

/// A client that gives up while its request waits in the queue gives its place back: the next
/// request finds room in the queue instead of a queue that stays full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_while_queued_leaves_the_queue() {
    let b = busy_backend(Duration::from_millis(800)).await;
    let backends = format!(
        "      - {{ name: slow, address: \"{}\", max_connections: 1 }}\n",
        b.addr
    );
    let app = start(&farm_yaml(
        &backends,
        "    queue: { max: 1, timeout: 5s }\n    retries: 0\n",
    ))
    .await;
    let addr = proxy_addr(&app);
    let first = tokio::spawn(async move { get_with(&h1_client(), addr, "/", &[]).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Queued, then its client goes away.
    let gone = tokio::spawn(async move { get_with(&h1_client(), addr, "/", &[]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    gone.abort();
    let _ = gone.await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The one place is free again: this one waits and is served.
    let next = get_with(&h1_client(), addr, "/", &[]).await.unwrap();
    assert_eq!(next.status, 200, "{next:?}");
    assert_eq!(first.await.unwrap().unwrap().status, 200);
    let m = get(&h1_client(), app.admin_addr().unwrap(), "/metrics")
        .await
        .body;
    assert!(m.contains("lockstep_queue_depth{pool=\"www\"} 0"), "{m}");
    assert!(
        !m.contains("lockstep_queue_refused_total{pool=\"www\",reason=\"full\"} 1"),
        "{m}"
    );
    app.shutdown(Duration::from_millis(200)).await;
}
