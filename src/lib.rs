//! # lockstep
//!
//! A web-farm appliance in one binary: an HTTP/1.1 + h2 reverse proxy that balances requests
//! over pools of backends, a DNS round-robin responder over the same pools, and content sync
//! (a hub in the appliance, an agent beside every backend). See `ARCHITECTURE.md` for the map
//! and its "Layers" (checked by `tests/layering.rs`).
//!
//! # Layout (highest layer first)
//! - [`commands`]: what each subcommand does; [`cli`]: raw command-line arguments (clap).
//! - [`demo`]: `lockstep demo` and its demo backends.
//! - [`serve`]: `lockstep serve`: signals, reload socket, drain.
//! - [`appliance`]: starts the parts of a config, applies reloads, drains.
//! - [`admin`]: `/metrics`, `/healthz`, `/ready`, `/api/…`, `/status`, the reload socket.
//! - [`publish`]: `lockstep publish` and `lockstep status`, clients of the hub.
//! - [`hub`]: the sync API inside `lockstep serve`; [`agent`]: `lockstep agent`.
//! - [`proxy`]: the request path; [`dns`]: the authoritative DNS responder.
//! - [`live`]: the proxy's swapped live state (table + clients + listener settings).
//! - [`pools`]: the pool table built from a config and the active health checks.
//! - [`net`]: the one network layer: accept loop, HTTP serving, TLS, bodies, responses, clients.
//! - [`config`]: YAML → raw structs → `validate()` → typed [`config::Config`].
//! - [`sync`]: the sync vocabulary: manifests, changesets, clock, schedule, cycle, store.
//! - [`router`]: routes, balancing policies, health state machines (pure).
//! - [`metrics`]: the Prometheus registry; [`systemd`]: sd_notify and the watchdog.
#![forbid(unsafe_code)]

pub mod acme;
pub mod admin;
pub mod agent;
pub mod appliance;
pub mod ca;
pub mod cli;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod demo;
pub mod dns;
pub mod hub;
pub mod live;
pub mod metrics;
pub mod net;
pub mod pools;
pub mod proxy;
pub mod publish;
pub mod router;
pub mod serve;
pub mod sync;
pub mod systemd;
