//! Content sync: the data server (hub) and the sidecar agent that stages each release before a
//! scheduled activation time and switches to it at that instant, corrected for the offset
//! between its clock and the hub's.
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
//! - [`beneath`]: open, create, rename, remove beneath a directory handle, never through a symlink
//! - [`auth`]: bearer tokens, compared in constant time
//! - [`caller`]: who calls — a farm-CA certificate, or a token from loopback — acting only as itself (pure)
//! - [`identity`]: the party a farm-CA certificate names (`urn:lockstep:<kind>:<name>`) (pure)
//! - [`provenance`]: what a hub-built release was made of, and the check agents make of it (pure)
//! - [`sign`]: publisher keys and Ed25519 release signatures; the trusted keys that check them
//!
//! Time on the wire is microseconds since the Unix epoch on the *hub's* clock; agents never
//! trust their own wall clock for a flip, only their monotonic clock and the measured offset.

pub mod auth;
pub mod beneath;
pub mod caller;
pub mod changeset;
pub mod clock;
pub mod cycle;
pub mod gc;
pub mod identity;
pub mod manifest;
pub mod protocol;
pub mod provenance;
pub mod schedule;
pub mod sign;
pub mod store;
pub mod tree;
