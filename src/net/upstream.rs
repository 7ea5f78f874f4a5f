//! The upstream side: hyper-util's pooled HTTP/1.1 client, keep-alive connections reused
//! across requests and across reloads.
//!
//! A pool's [`Clients`] hold one client per worker thread, made on first use there. A client
//! shared by every worker would hand a request arriving on one worker to a connection task
//! living on another (hyper-util runs each connection as a task of the runtime that opened it),
//! so every request would cost wake-ups across threads; with one client per thread a request,
//! its upstream connection and its response stay on one thread, as in nginx's workers.

use std::cell::RefCell;
use std::sync::{Arc, Weak};
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::ResponseFuture;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::RequestBody;

/// A pooled client to backends.
pub type Client = hyper_util::client::legacy::Client<HttpConnector, RequestBody>;

/// How long an unused keep-alive connection to a backend is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);
/// Idle connections kept per backend.
const POOL_MAX_IDLE: usize = 256;

/// A client whose connects give up after `connect_timeout`.
pub fn client(connect_timeout: Duration) -> Client {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.enforce_http(true);
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(POOL_MAX_IDLE)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// The clients of one pool, one per thread that sends its requests. Cloning shares them (a
/// reload that keeps the pool keeps its connections).
#[derive(Clone, Debug)]
pub struct Clients(Arc<Settings>);

#[derive(Debug)]
struct Settings {
    connect_timeout: Duration,
}

thread_local! {
    /// This thread's clients, by the pool's [`Clients`] they belong to. The `Weak` keeps the
    /// key's address from being reused while the entry exists; entries of dropped pools are
    /// removed when a new one is added.
    static LOCAL: RefCell<Vec<(Weak<Settings>, Client)>> = const { RefCell::new(Vec::new()) };
}

impl Clients {
    /// Clients whose connects give up after `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Clients {
        Clients(Arc::new(Settings { connect_timeout }))
    }

    /// Sends `req` with this thread's client.
    pub fn request(&self, req: http::Request<RequestBody>) -> ResponseFuture {
        LOCAL.with(|local| {
            let mut local = local.borrow_mut();
            let key = Arc::as_ptr(&self.0);
            if let Some((_, c)) = local.iter().find(|(w, _)| w.as_ptr() == key) {
                return c.request(req);
            }
            local.retain(|(w, _)| w.strong_count() > 0);
            let c = client(self.0.connect_timeout);
            let f = c.request(req);
            local.push((Arc::downgrade(&self.0), c));
            f
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_gets_its_own_client_and_dropped_pools_leave() {
        let count = || LOCAL.with(|l| l.borrow().len());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let a = Clients::new(Duration::from_secs(1));
        let req = || {
            http::Request::get("http://127.0.0.1:9/")
                .body(RequestBody::Empty)
                .unwrap()
        };
        drop(a.request(req()));
        drop(a.clone().request(req()));
        assert_eq!(
            count(),
            1,
            "one client per pool and thread, shared by clones"
        );
        let on_other_thread = {
            let a = a.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let _guard = rt.enter();
                drop(a.request(req()));
                LOCAL.with(|l| l.borrow().len())
            })
            .join()
            .unwrap()
        };
        assert_eq!(on_other_thread, 1);
        assert_eq!(count(), 1, "the other thread's client is its own");
        drop(a);
        let b = Clients::new(Duration::from_secs(1));
        drop(b.request(req()));
        assert_eq!(
            count(),
            1,
            "the dropped pool's client left when another came"
        );
    }
}
