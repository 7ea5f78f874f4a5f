//! The upstream side: hyper-util's pooled HTTP/1.1 client, one per pool (connect timeouts
//! differ per pool), keep-alive connections reused across requests and across reloads.

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
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
