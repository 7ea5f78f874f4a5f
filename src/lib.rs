//! # lockstep
//!
//! A web-farm appliance in one binary: an HTTP/1.1 + h2 reverse proxy that balances requests
//! over pools of backends, a DNS round-robin responder over the same pools, and content sync
//! (arriving with its issue). See `ARCHITECTURE.md` for the map.
//!
//! # Layout
//! - [`cli`]: raw command-line arguments (clap); [`commands`]: what each subcommand does.
//! - [`config`]: YAML → raw structs → `validate()` → typed [`config::Config`].
//! - [`router`]: routes, balancing policies, health state (pure) and the live table.
//! - [`proxy`]: listeners, TLS, the request path, the upstream client.
//! - [`dns`]: the authoritative DNS responder (hickory-server), answers built purely.
//! - [`live`]: the swapped live state (table + clients + listener settings).
//! - [`appliance`]: starts the parts of a config, applies reloads, drains.
//! - [`serve`]: `lockstep serve`: signals, reload socket, systemd notification.
//! - [`admin`]: `/metrics`, `/healthz`, `/ready`, and the reload socket protocol.
//! - [`metrics`]: the Prometheus registry.
//! - [`demo`]: `lockstep demo` and its demo backends.
#![forbid(unsafe_code)]

pub mod admin;
pub mod appliance;
pub mod cli;
pub mod commands;
pub mod config;
pub mod demo;
pub mod dns;
pub mod live;
pub mod metrics;
pub mod proxy;
pub mod router;
pub mod serve;
pub mod sync;
