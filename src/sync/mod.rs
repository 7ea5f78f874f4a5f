//! Content sync: the data server (hub) and the sidecar agent that stages each release before a
//! scheduled activation time and switches to it at that instant, corrected for the offset
//! between its clock and the hub's (seed 000, every claim).
//!
//! # Layout
//!
//! - [`manifest`]: a release's manifest, its id, path validation                    (pure)
//! - [`changeset`]: a backend's edits, applying them, last-writer-wins resolution    (pure)
//! - [`clock`]: NTP-style offset estimation, hub time → monotonic deadline           (pure)
//! - [`schedule`]: activation times on the cadence grid                              (pure)
//! - [`cycle`]: the hub's state machine — publish, advance (compare-and-swap), rollback (pure)
//! - [`protocol`]: the JSON messages of `/sync/v1/*`
//! - [`store`]: content-addressed blobs, manifests and state on disk, written atomically
//! - [`gc`]: which manifests and blobs a store may drop                             (pure)
//! - [`tree`]: a directory → a manifest and the files holding its blobs
//! - [`auth`]: bearer tokens, compared in constant time
//! - [`client`]: the HTTP(S) client agents, `publish` and `status` use to reach the hub
//! - [`hub`]: the sync API inside `lockstep serve`
//! - [`publish`]: `lockstep publish` — a directory → a release staged on the hub
//! - [`agent`]: `lockstep agent` — bootstrap, staging, clock, precise flip, serving
//!
//! Time on the wire is microseconds since the Unix epoch on the *hub's* clock; agents never
//! trust their own wall clock for a flip, only their monotonic clock and the measured offset.

pub mod agent;
pub mod auth;
pub mod changeset;
pub mod client;
pub mod clock;
pub mod cycle;
pub mod gc;
pub mod hub;
pub mod manifest;
pub mod protocol;
pub mod publish;
pub mod schedule;
pub mod store;
pub mod tree;
