//! The router: which pool a request goes to, and which backend of that pool serves it.
//!
//! Layout:
//! - [`route`]: first-match host/path table (pure).
//! - [`balance`]: the balancing policies (pure: no sockets, no clock, randomness passed in).
//! - [`ewma`]: decaying latency average used by `p2c_ewma` (time passed in).
//! - [`health`]: active (rise/fall) and passive (ejection with back-off) health state
//!   machines (pure: time passed in).
pub mod balance;
pub mod ewma;
pub mod health;
pub mod route;
