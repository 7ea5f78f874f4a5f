//! # lockstep
//!
//! A web-farm appliance in one binary.
#![forbid(unsafe_code)]

pub mod router;
