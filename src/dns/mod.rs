//! The DNS round-robin responder: authoritative answers for the farm's names, each name bound
//! to a pool answering with the pool's available backends, rotated.
//!
//! Built on hickory-server (its message types decode and encode every query the UDP fast path
//! does not take, its `RequestHandler` is the seam); lockstep reads the UDP socket itself so
//! the common query can skip hickory's decoding and per-datagram task, and serves TCP through
//! its own accept loop so connections can be capped. hickory's types stay inside this module.
//! The answer itself is a pure function ([`answer::answer`]) of the zone view, the pool health
//! and a rotation turn.
//!
//! - [`zone`]: the zone view built from the config, one per config generation.
//! - [`view`]: the zones + pool table of one generation, swapped whole at reload.
//! - [`answer`]: zone view + health + rotation turn + question → records and rcode (pure).
//! - [`fast`]: the UDP fast path: the common A/AAAA query answered from the raw datagram into
//!   a buffer (pure, no allocation); everything else goes to the handler.
//! - [`handler`]: the hickory request handler: opcode, EDNS, one question, metrics; the
//!   fast path's metrics, and the slow path for UDP datagrams and TCP queries.
//! - [`rrl`]: response-rate limiting of UDP answers per client prefix, with slip: a fixed
//!   table of token buckets (pure, `now` passed in).
//! - [`server`]: binds UDP and TCP on one address and serves them until cancelled: UDP with
//!   lockstep's own receive loop (rate limiter, fast path, else the handler), TCP through
//!   [`tcp`].
//! - [`tcp`]: DNS over TCP: the accept loop with a connection cap, length-prefixed queries,
//!   the idle timeout.
//! - [`udp_batch`]: the UDP loop's syscalls, a batch at a time (`recvmmsg` / `sendmmsg` on
//!   Linux) into and out of per-slot buffers.
//! - [`metrics`]: queries by type and rcode, answer latency, fail-open answers, rate-limited
//!   answers, TCP connections.

pub mod answer;
pub mod error;
pub mod fast;
pub mod handler;
pub mod metrics;
pub mod rrl;
pub mod server;
pub mod tcp;
pub mod udp_batch;
pub mod view;
pub mod zone;

pub use error::DnsError;
pub use handler::DnsHandler;
pub use metrics::DnsMetrics;
pub use server::{bind, keep, serve, Bound};
pub use zone::Zones;
