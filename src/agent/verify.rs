//! Whether this agent may serve a release: with `trusted_keys`, only a release signed by one
//! of them, or one the hub built from changesets whose provenance checks down to such a
//! release ([`crate::sync::provenance`]). The stager asks before it fetches a release's
//! blobs and again once the release is built, just before it can be activated; a refused
//! release is never staged, so never activated, and the active one keeps serving.
//!
//! The signatures and provenances come from the hub (`GET /releases/{id}/signatures`,
//! `/provenance`), but the hub is not what is trusted: a signature verifies or not, and a
//! provenance is checked against manifests whose hashes are their ids. Releases already
//! found acceptable as the base of another are remembered (bases are shared by every
//! release built on them).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use http::{Method, StatusCode};
use tracing::{debug, info};

use super::stage::{StageError, Stager};
use crate::net::client::REQUEST_TIMEOUT;
use crate::sync::manifest::{Manifest, ReleaseId};
use crate::sync::protocol::{Provenance, Signatures, PREFIX};
use crate::sync::provenance::{
    ChangesetAuthority, ProvenanceError, SignedChangeset, TrustedOrigins, Unauthorised, MAX_DEPTH,
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

    /// From an agent's config: `None` without `trusted_keys`. Changesets are accepted from
    /// `trusted_origins`, and from the agent itself when it has `watch:` (its own edits come
    /// back in the hub's releases). This is where the agents' changeset signatures (issue 14,
    /// the farm CA) replace [`TrustedOrigins`].
    pub fn from_config(config: &super::AgentConfig) -> Option<Arc<Trust>> {
        let keys = config.trusted_keys.clone()?;
        let mut origins = config.trusted_origins.clone();
        if config.watch.is_some() {
            origins.push(config.name.clone());
        }
        Some(Arc::new(Trust::new(
            keys,
            Arc::new(TrustedOrigins::new(origins)),
        )))
    }

    /// Whether a changeset sent straight from a peer may be installed.
    pub fn accepts_changeset(&self, cs: &SignedChangeset) -> Result<(), Unauthorised> {
        self.authority.verify(cs)
    }

    fn remembered(&self, id: &ReleaseId) -> bool {
        self.accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    fn remember(&self, ids: &[ReleaseId]) {
        let mut accepted = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
        if accepted.len() + ids.len() > REMEMBERED {
            accepted.clear();
        }
        accepted.extend(ids.iter().copied());
    }
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

impl Stager {
    /// Whether release `id` (whose manifest, checked against `id`, is `manifest`) may be
    /// served: its signatures, else its provenance down to a signed release.
    pub(super) async fn verify(
        &self,
        id: ReleaseId,
        manifest: &Manifest,
    ) -> Result<Accepted, StageError> {
        let Some(trust) = &self.trust else {
            return Ok(Accepted::Unchecked);
        };
        // The chain walked down so far: each release was built on the next.
        let mut chain: Vec<ReleaseId> = Vec::new();
        let (mut cid, mut below): (ReleaseId, Option<Manifest>) = (id, None);
        loop {
            if !chain.is_empty() && trust.remembered(&cid) {
                trust.remember(&chain);
                return Ok(Accepted::Built {
                    key: None,
                    steps: chain.len(),
                });
            }
            let unsigned = match trust.keys.verify(&cid, &self.signatures(cid).await?) {
                Ok(key) => {
                    chain.push(cid);
                    trust.remember(&chain);
                    return Ok(match chain.len() {
                        1 => Accepted::Signed(key),
                        n => Accepted::Built {
                            key: Some(key),
                            steps: n - 1,
                        },
                    });
                }
                Err(u) => u,
            };
            let Some(p) = self.provenance(cid).await? else {
                return Err(refused(Refused::Unsigned(unsigned), cid, &chain));
            };
            if chain.len() >= MAX_DEPTH {
                let source = ProvenanceError::TooDeep(id.short());
                return Err(refused(
                    Refused::Provenance { unsigned, source },
                    cid,
                    &chain,
                ));
            }
            let base = match p.base {
                Some(b) => self.manifest(b).await?,
                None => Manifest::default(),
            };
            let built = below.as_ref().unwrap_or(manifest);
            if let Err(source) = p.check(trust.authority.as_ref(), &base, built) {
                return Err(refused(
                    Refused::Provenance { unsigned, source },
                    cid,
                    &chain,
                ));
            }
            debug!(release = %cid.short(), base = ?p.base.map(|b| b.short()), changesets = p.changesets.len(), "provenance checked");
            chain.push(cid);
            match p.base {
                Some(b) => (cid, below) = (b, Some(base)),
                None => {
                    trust.remember(&chain);
                    return Ok(Accepted::Built {
                        key: None,
                        steps: chain.len(),
                    });
                }
            }
        }
    }

    /// `GET /releases/{id}/signatures`.
    async fn signatures(
        &self,
        id: ReleaseId,
    ) -> Result<Vec<crate::sync::sign::Signature>, StageError> {
        let s: Signatures = self
            .client
            .json(
                Method::GET,
                &format!("{PREFIX}/releases/{id}/signatures"),
                None::<&()>,
                REQUEST_TIMEOUT,
            )
            .await
            .map_err(|source| StageError::Hub {
                what: format!("the signatures of release {}", id.short()),
                source,
            })?;
        Ok(s.signatures)
    }

    /// `GET /releases/{id}/provenance`; `None` when the hub did not build it (404).
    async fn provenance(&self, id: ReleaseId) -> Result<Option<Provenance>, StageError> {
        let got = self
            .client
            .json(
                Method::GET,
                &format!("{PREFIX}/releases/{id}/provenance"),
                None::<&()>,
                REQUEST_TIMEOUT,
            )
            .await;
        match got {
            Ok(p) => Ok(Some(p)),
            Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => Ok(None),
            Err(source) => Err(StageError::Hub {
                what: format!("the provenance of release {}", id.short()),
                source,
            }),
        }
    }
}

/// `r` (why `refused_id` is refused) as the reason for the release `chain` starts with: each
/// release of `chain` was built on the next, the last on `refused_id`.
fn refused(r: Refused, refused_id: ReleaseId, chain: &[ReleaseId]) -> StageError {
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
    StageError::Untrusted(Box::new(e))
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
