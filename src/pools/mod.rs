//! The pools of backends as they live while the appliance runs: the table built from a checked
//! config (routes, pools, per-backend state and health snapshots), swapped on reload, and the
//! active health-check tasks that feed it.
//!
//! Layout:
//! - [`table`]: the live table built from a config and swapped on reload (state, no I/O).
//! - [`checker`]: the active health-check tasks (I/O).
//!
//! The decisions themselves (routes, balancing, health state machines) are the pure policies of
//! [`crate::router`]; this module only holds their state and runs the checks.
pub mod checker;
pub mod table;
