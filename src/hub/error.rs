//! Why a hub operation failed: one error enum for every [`super::Hub`] operation, which the
//! HTTP face maps to a status. Vocabulary only: no I/O.

use crate::sync::cycle::CycleError;
use crate::sync::manifest::ManifestError;
use crate::sync::sign::Unsigned;
use crate::sync::store::StoreError;

/// Why a hub operation failed; the sync API maps each to a status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// Malformed input (400).
    #[error("{0}")]
    Bad(String),
    /// A refused manifest (400).
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A body over its limit (413).
    #[error("{0}")]
    TooLarge(String),
    /// A quota is used up (507).
    #[error("{0}")]
    Full(String),
    /// Unknown release or blob (404).
    #[error("{0}")]
    NotFound(String),
    /// Not possible now (409).
    #[error("{0}")]
    Conflict(String),
    /// The other hubs cannot help now (503): a blob none of them has, fewer hubs storing a
    /// release than `sync.cluster.replicas`.
    #[error("{0}")]
    Unavailable(String),
    /// A release no trusted key signed, committed to a hub with `sync.trusted_keys` (403).
    #[error(transparent)]
    Untrusted(#[from] Unsigned),
    /// The store failed (500; a full disk reads "No space left on device").
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl From<CycleError> for HubError {
    fn from(e: CycleError) -> HubError {
        HubError::Conflict(e.to_string())
    }
}
