//! The integration tests' helpers, one set for every test binary: this module owns the
//! in-process appliance (started from YAML text with every listener on `127.0.0.1:0`, its
//! real addresses read back from it) and re-exports the submodules, each of which owns one
//! thing:
//!
//! - [`wait`]: the one way to wait on a condition (a deadline, and the name of what is awaited
//!   in the panic message);
//! - [`client`]: the one [`Reply`] type and the HTTP clients (hyper for async tests, one
//!   blocking hand-written client for process tests, raw bytes);
//! - [`process`]: real processes, the addresses they bound read back from their logs, and
//!   [`require_tool`] for external tools;
//! - [`backends`]: the backends a proxy under test talks to;
//! - [`metrics`]: the Prometheus text parser;
//! - [`tls`]: test certificates and a TLS client;
//! - [`farm`]: the sync end-to-end harness (a hub and agents as real processes);
//! - [`pebble`]: a real ACME CA.
//!
//! Nothing here mocks the appliance: every helper opens real sockets on loopback.
#![allow(dead_code, unused_imports)] // Each test binary uses a different subset.

pub mod backends;
pub mod client;
pub mod etcd;
pub mod farm;
pub mod metrics;
pub mod pebble;
pub mod process;
pub mod tls;
pub mod wait;

pub use backends::*;
pub use client::*;
pub use metrics::*;
pub use process::*;
pub use tls::*;

use std::net::SocketAddr;
use std::path::Path;

use lockstep::appliance::Appliance;
use lockstep::config::Config;

/// Parses YAML config text; panics with every config error when it is refused.
pub fn config(yaml: &str) -> Config {
    match lockstep::config::parse(Path::new("test.yaml"), yaml) {
        Ok(c) => c,
        Err(e) => panic!("test config refused:\n{e}\n--- config ---\n{yaml}"),
    }
}

/// Starts the appliance from YAML text.
pub async fn start(yaml: &str) -> Appliance {
    match Appliance::start(config(yaml)).await {
        Ok(a) => a,
        Err(e) => panic!("appliance did not start: {e}"),
    }
}

/// The simplest farm config: listener `http`, every request to pool `www` over `backends`,
/// with `pool_extra` (indented YAML keys such as `    retries: 0\n`) added to the pool.
pub fn farm_yaml(backends: &str, pool_extra: &str) -> String {
    farm_yaml_with("", backends, pool_extra)
}

/// [`farm_yaml`] with `listener_extra` (indented keys such as `    trusted_proxies: [...]\n`)
/// added to the listener.
pub fn farm_yaml_with(listener_extra: &str, backends: &str, pool_extra: &str) -> String {
    format!(
        "listeners:\n  - name: http\n    bind: \"127.0.0.1:0\"\n{listener_extra}\
         routes:\n  - {{ path_prefix: \"/\", pool: www }}\n\
         pools:\n  - name: www\n{pool_extra}    backends:\n{backends}\
         admin:\n  bind: \"127.0.0.1:0\"\n"
    )
}

/// The proxy listener `http` of `app`.
pub fn proxy_addr(app: &Appliance) -> SocketAddr {
    app.local_addr("http").expect("listener `http` is running")
}
