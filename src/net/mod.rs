//! The one network layer every listener and every control-plane call goes through.
//!
//! Layout:
//! - [`accept`]: the accept loop (TCP or unix socket) with back-off on accept errors,
//!   connections spawned on a `TaskTracker` so shutdown can drain them.
//! - [`server`]: one HTTP connection served (TLS handshake with a deadline, then HTTP/1.1 by
//!   [`h1`] or HTTP/2 by [`h2`] as ALPN or the h2c preface says, graceful close at shutdown)
//!   and [`server::HttpServer`], the accept loop + connection serving that the admin, hub,
//!   agent and demo listeners use.
//! - [`h1`], [`h2`]: lockstep's own server connections (HTTP/1.1 on `httparse`; HTTP/2 with
//!   its own frames, HPACK and flow control, every stream polled in its connection's task);
//!   [`date`]: their `Date`.
//! - [`bind`]: listening sockets (`SO_REUSEADDR`, `SO_REUSEPORT` for several workers).
//! - [`idle`]: the idle-connection timeout wrapper.
//! - [`limit`]: per-listener connection caps shared by the workers accepting on it.
//! - [`slice`]: short CPU slices for the control plane's thread, which shares a core with
//!   the data path (it pauses after a slice of continuous work).
//! - [`tls`]: the rustls server config (SNI among several certificates, ALPN h2 / http/1.1).
//! - [`acme`]: the certificates ACME ordered and the challenge answers, read by the listeners.
//! - [`body`]: the body types of the proxy, the one bounded body reader and the one way a
//!   large body is streamed to disk.
//! - [`file_body`]: a response body from memory or streamed from a file (agent and hub).
//! - [`respond`]: the one set of response helpers (text, JSON, `{"error": …}`).
//! - [`client`]: the control-plane HTTP(S) client (hub, peer and admin calls).
//! - [`upstream`]: the data-path client to backends (pooled per worker thread), also used by
//!   the active health checks.
//! - [`proxy_protocol`]: HAProxy's PROXY protocol v1/v2: read from trusted balancers at
//!   accept, written to backends of a pool with `send_proxy`.
//!
//! It knows nothing of routing, DNS or sync: it is handed bound sockets, services and a
//! shutdown token, never an address string to bind on its own.
pub mod accept;
pub mod acme;
pub mod bind;
pub mod body;
pub mod client;
pub mod date;
pub mod file_body;
pub mod h1;
pub mod h2;
pub mod idle;
pub mod limit;
pub mod proxy_protocol;
pub mod respond;
pub mod server;
pub mod slice;
pub mod tls;
pub mod upstream;
