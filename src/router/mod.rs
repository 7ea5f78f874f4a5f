//! The router: which pool a request goes to, and which backend of that pool serves it.
//!
//! Layout:
//! - [`route`]: first-match host/path table (pure).
//! - [`balance`]: the balancing policies (pure: no sockets, no clock, randomness passed in).
//! - [`ewma`]: decaying latency average used by `p2c_ewma` (time passed in).
//! - [`health`]: active (rise/fall) and passive (ejection with back-off) health state
//!   machines (pure: time passed in).
//! - [`rules`]: what a route does besides choosing a pool: redirects, fixed responses,
//!   header edits, prefix rewrites, HSTS (pure).
//! - [`ratelimit`]: per-client token buckets of a route's rate limit (pure: time passed in).
pub mod balance;
pub mod ewma;
pub mod health;
pub mod ratelimit;
pub mod route;
pub mod rules;
