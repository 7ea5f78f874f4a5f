//! The messages the agent's tasks and threads send each other, in one place: what the
//! controller installs ([`Install`]), what the local-edit thread is asked ([`Input`]) and
//! tells the forwarder ([`Out`]), how an API write fails ([`WriteError`]), the pointer to
//! the active release that serving reads and flips store ([`Active`]), and the agent's reading
//! of hub time ([`HubNow`]).

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use tokio::sync::oneshot;

use super::detect::Scope;
use super::release::Release;
use crate::sync::changeset::{Applied, Changeset};
use crate::sync::manifest::Hash;

/// The active release, swapped whole at each flip.
pub type Active = Arc<ArcSwapOption<Release>>;

/// Hub time now (µs) as the agent estimates it; `None` until the clock is measured.
pub type HubNow = Arc<dyn Fn() -> Option<u64> + Send + Sync>;

/// Changesets waiting for the controller to install them, at most. The local-edit thread
/// waits for room (back-pressure on the watcher); a peer's direct send finding the queue full
/// is answered 503 (the hub's release brings that edit anyway), so a flood of peer frames
/// cannot grow the agent's memory.
pub const INSTALL_QUEUE: usize = 256;

/// A changeset to install at once.
#[derive(Debug)]
pub struct Install {
    /// The changeset; its blobs are in the store, verified.
    pub cs: Changeset,
    /// From another agent (else this agent's own, immediate mode).
    pub remote: bool,
    /// Small blobs received with it, verified, not yet in the store: served from memory at
    /// once and written by the disk worker before anything that names the release.
    pub blobs: Vec<(crate::sync::manifest::Hash, bytes::Bytes)>,
}

/// A blob the API received and stored: the content of a `PUT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Its hash (its name in the store).
    pub hash: crate::sync::manifest::Hash,
    /// Its length in bytes.
    pub size: u64,
}

/// What the thread is asked to do.
pub enum Input {
    /// The watcher saw these paths change.
    Scope(Scope),
    /// `PUT` (Some) or `DELETE` (None) of a path through the API.
    Write {
        /// The release path.
        path: String,
        /// The new content, already in the store (streamed there by the API).
        content: Option<Stored>,
        /// The outcome.
        reply: oneshot::Sender<Result<Option<String>, WriteError>>,
    },
    /// The served release changed.
    Installed(Arc<Release>),
    /// The hub's record of the changesets it applied, per origin (from a schedule received
    /// once the clock is measured): the local thread numbers its changesets above its own
    /// entry, and numbers none before the first of these.
    Hub(Applied),
    /// Stop.
    Stop,
}

/// Messages waiting for the forwarder, at most: the local thread waits for room to say the
/// outbox has a new entry, and drops a changeset for the peers when full (they get it from
/// the hub).
pub const OUT_QUEUE: usize = 1024;

/// What the local thread tells the forwarder.
#[derive(Debug)]
pub enum Out {
    /// A new immediate changeset: send it to the peers now (before it is durable: a crash
    /// before the outbox write re-detects the edit, and installing twice changes nothing),
    /// with the blobs not in the store yet (the rest are read from it).
    Peers(Changeset, Vec<(Hash, Bytes)>),
    /// The outbox has a new entry for the hub.
    Recorded,
}

/// Why an API write is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// Bad path or size (400/413).
    #[error("{0}")]
    Bad(String),
    /// Too large (413).
    #[error("{0}")]
    TooLarge(String),
    /// No such file to delete (404).
    #[error("{0}")]
    NotFound(String),
    /// The agent could not write (500).
    #[error("{0}")]
    Io(String),
    /// Not now: the agent cannot number a changeset yet (503).
    #[error("{0}")]
    Unavailable(String),
}
