//! What this agent trusts, and why it refuses a release: with `trusted_keys`, only a release
//! signed by one of them, or one the hub built from changesets whose provenance checks down
//! to such a release ([`crate::sync::provenance`]). The stager (`Stager::verify`) asks before
//! it fetches a release's blobs and again once the release is built, just before it can be
//! activated; a refused release is never staged, so never activated, and the active one keeps
//! serving.
//!
//! The signatures and provenances come from the hub (`GET /releases/{id}/signatures`,
//! `/provenance`), but the hub is not what is trusted: a signature verifies or not, and a
//! provenance is checked against manifests whose hashes are their ids. Releases already
//! found acceptable as the base of another are remembered (bases are shared by every
//! release built on them).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tracing::info;

use crate::sync::manifest::ReleaseId;
use crate::sync::provenance::{
    ChangesetAuthority, FarmSigned, ProvenanceError, SignedChangeset, TrustedOrigins, Unauthorised,
};
use crate::sync::sign::{KeyId, TrustedKeys, Unsigned};

/// Most releases remembered as acceptable.
const REMEMBERED: usize = 1024;

/// What this agent trusts: the publisher keys, and the authority over changesets in the
/// releases the hub builds.
pub struct Trust {
    keys: TrustedKeys,
    authority: Arc<dyn ChangesetAuthority>,
    accepted: Mutex<HashSet<ReleaseId>>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust").field("keys", &self.keys).finish()
    }
}

impl Trust {
    /// Trusting releases `keys` signed and changesets `authority` accepts.
    pub fn new(keys: TrustedKeys, authority: Arc<dyn ChangesetAuthority>) -> Trust {
        Trust {
            keys,
            authority,
            accepted: Mutex::new(HashSet::new()),
        }
    }

    /// From an agent's config: `None` without `trusted_keys`; changesets as
    /// [`changeset_authority`] decides.
    pub fn from_config(config: &super::AgentConfig) -> Option<Arc<Trust>> {
        let keys = config.trusted_keys.clone()?;
        let authority = changeset_authority(config)?;
        Some(Arc::new(Trust::new(keys, authority)))
    }

    /// Whether a changeset sent straight from a peer may be installed.
    pub fn accepts_changeset(&self, cs: &SignedChangeset) -> Result<(), Unauthorised> {
        self.authority.verify(cs)
    }

    /// The publisher keys.
    pub fn keys(&self) -> &TrustedKeys {
        &self.keys
    }

    /// The authority over changesets.
    pub fn authority(&self) -> &dyn ChangesetAuthority {
        self.authority.as_ref()
    }

    /// Whether `id` was found acceptable before (as the base of another release).
    pub fn remembered(&self, id: &ReleaseId) -> bool {
        self.accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// Remembers `ids` as acceptable.
    pub fn remember(&self, ids: &[ReleaseId]) {
        let mut accepted = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
        if accepted.len() + ids.len() > REMEMBERED {
            accepted.clear();
        }
        accepted.extend(ids.iter().copied());
    }
}

/// Who may change this agent's content through changesets (a peer's, or in a release the
/// hub built). In a farm with a CA (the agent has its own farm certificate, `tls:`): a
/// changeset its origin signed with its farm certificate ([`FarmSigned`]), whatever else is
/// configured. Without one, with `trusted_keys`: by the origin it claims, `trusted_origins`
/// and the agent itself when it has `watch:` (its own edits come back in the hub's releases).
/// Otherwise (a loopback farm without keys): `None`, anyone the agent API lets in.
pub fn changeset_authority(config: &super::AgentConfig) -> Option<Arc<dyn ChangesetAuthority>> {
    if let Some(tls) = config.tls.as_ref().filter(|t| t.own.is_some()) {
        // The certificates' validity is read on the wall clock, as in the TLS handshakes.
        let now = Arc::new(rustls_pki_types::UnixTime::now);
        return Some(Arc::new(FarmSigned::new(
            &tls.trust.roots,
            &tls.trust.crls,
            now,
        )));
    }
    config.trusted_keys.as_ref()?;
    let mut origins = config.trusted_origins.clone();
    if config.watch.is_some() {
        origins.push(config.name.clone());
    }
    Some(Arc::new(TrustedOrigins::new(origins)))
}

/// Why a release is refused: nothing of it is staged or activated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// Signed by no trusted key, and the hub did not build it from changesets.
    #[error("{0}")]
    Unsigned(Unsigned),
    /// Signed by no trusted key, and the provenance the hub gives for it does not check.
    #[error("{unsigned}; the hub built it from changesets, but that is refused: {source}")]
    Provenance {
        /// What the signatures were.
        unsigned: Unsigned,
        /// Why the provenance is refused.
        source: ProvenanceError,
    },
    /// Built by the hub on a release that is refused.
    #[error("release {} was built by the hub on release {}, which is refused: {source}", release.short(), base.short())]
    Base {
        /// The release.
        release: ReleaseId,
        /// Its base.
        base: ReleaseId,
        /// Why the base is refused.
        source: Box<Refused>,
    },
}

impl Refused {
    /// The keys whose (untrusted) signatures the refused release carried, for logs.
    pub fn signed_by(&self) -> Vec<KeyId> {
        match self {
            Refused::Unsigned(u) | Refused::Provenance { unsigned: u, .. } => u.signed_by.clone(),
            Refused::Base { source, .. } => source.signed_by(),
        }
    }
}

/// Why a release was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// The agent checks nothing (no `trusted_keys`).
    Unchecked,
    /// A trusted key signed it.
    Signed(KeyId),
    /// The hub built it from changesets on a release `key` signed (`None`: on the empty
    /// release), `steps` provenance steps down.
    Built {
        /// The key of the signed release at the bottom.
        key: Option<KeyId>,
        /// Provenance steps followed.
        steps: usize,
    },
}

/// `r` (why `refused_id` is refused) as the reason for the release `chain` starts with: each
/// release of `chain` was built on the next, the last on `refused_id`.
pub fn refused(r: Refused, refused_id: ReleaseId, chain: &[ReleaseId]) -> Refused {
    let mut e = r;
    let mut below = refused_id;
    for above in chain.iter().rev() {
        e = Refused::Base {
            release: *above,
            base: below,
            source: Box::new(e),
        };
        below = *above;
    }
    e
}

/// Logs an accepted release (the key that vouches for it).
pub fn log_accepted(id: ReleaseId, a: Accepted) {
    match a {
        Accepted::Unchecked => {}
        Accepted::Signed(key) => {
            info!(release = %id.short(), %key, "release signed by a trusted key")
        }
        Accepted::Built { key, steps } => {
            info!(release = %id.short(), key = ?key.map(|k| k.to_string()), steps, "release built by the hub from accepted changesets on a trusted release")
        }
    }
}
