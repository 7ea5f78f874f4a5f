//! What the hub keeps beside a release so that agents can decide whether to trust it: the
//! publishers' signatures (given with each commit, kept through the store, served to agents)
//! and, for a release the hub built from changesets, its provenance (written by
//! `changesets`). The hub checks that each signature it is given verifies for the release —
//! a bad one is refused at the commit — and, with `sync.trusted_keys`, refuses to stage a
//! release none of those keys signed. Agents check for themselves either way: the hub is not
//! what they trust.

use std::sync::Arc;

use tracing::info;

use super::{blocking, Hub, HubError};
use crate::sync::manifest::ReleaseId;
use crate::sync::protocol::{Provenance, Signatures};
use crate::sync::sign::{KeyId, Signature};

impl Hub {
    /// The signatures kept beside release `id` (404 for a release the hub does not have).
    pub async fn signatures(self: &Arc<Self>, id: ReleaseId) -> Result<Signatures, HubError> {
        let hub = self.clone();
        blocking(move || {
            if hub.store.get_release(&id)?.is_none() {
                return Err(HubError::NotFound(format!("no release {id}")));
            }
            Ok(Signatures {
                signatures: hub.store.signatures(&id)?,
            })
        })
        .await
    }

    /// How the hub built release `id` from changesets (404 for a release it did not build).
    pub async fn provenance(self: &Arc<Self>, id: ReleaseId) -> Result<Provenance, HubError> {
        let hub = self.clone();
        blocking(move || hub.store.provenance(&id))
            .await?
            .ok_or_else(|| {
                HubError::NotFound(format!(
                    "release {id} was not built by the hub from changesets (a publisher's release carries signatures instead)"
                ))
            })
    }

    /// Keeps `sigs` beside the stored release `id`, each checked to verify for it; with
    /// `sync.trusted_keys`, refuses (and keeps nothing) unless the release then carries a
    /// trusted key's signature. Blocking work on the store's pool.
    pub(super) async fn sign(
        self: &Arc<Self>,
        id: ReleaseId,
        sigs: Vec<Signature>,
    ) -> Result<(), HubError> {
        if let Some(bad) = sigs.iter().find(|s| !s.verifies(&id)) {
            return Err(HubError::Bad(format!(
                "the signature by key {} does not verify for release {id}: sign this release's id (lockstep publish --sign-key signs what it uploads)",
                bad.key.id()
            )));
        }
        let hub = self.clone();
        let trusted = self.settings().trusted_keys.clone();
        let given: Vec<KeyId> = sigs.iter().map(|s| s.key.id()).collect();
        let by = blocking(move || {
            let mut all = hub.store.signatures(&id)?;
            all.extend(sigs.iter().copied());
            let by = match &trusted {
                Some(t) => Some(t.verify(&id, &all)?),
                None => None,
            };
            if !sigs.is_empty() {
                hub.store.add_signatures(&id, &sigs)?;
            }
            Ok::<_, HubError>(by)
        })
        .await?;
        if !given.is_empty() || by.is_some() {
            info!(release = %id.short(), signed_by = ?given, trusted_key = ?by, "release signatures kept");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::testing::{self, manual, release, S};
    use crate::hub::Settings;
    use crate::sync::protocol::CommitState;
    use crate::sync::sign::{SecretKey, TrustedKeys};

    fn key() -> SecretKey {
        SecretKey::generate(&ring::rand::SystemRandom::new())
            .unwrap()
            .0
    }

    fn trusting(fx: &testing::Fixture, keys: &[&SecretKey]) {
        let s = fx.hub.settings();
        fx.hub.set_settings(Settings {
            trusted_keys: Some(TrustedKeys::new(keys.iter().map(|k| k.public()))),
            ..(*s).clone()
        });
    }

    #[tokio::test]
    async fn signatures_given_with_a_commit_are_checked_kept_and_served() {
        let (clock, _) = manual(100 * S);
        let fx = testing::hub(clock);
        let (a, b) = (key(), key());
        let v1 = release(&fx.hub, &[("index.html", "v1")]).await;
        let v2 = release(&fx.hub, &[("index.html", "v2")]).await;
        assert!(fx.hub.signatures(v1).await.unwrap().signatures.is_empty());
        // A signature of another release is refused, and nothing is staged.
        let e = fx
            .hub
            .commit(v1, None, vec![a.sign_release(&v2)])
            .await
            .unwrap_err();
        assert!(matches!(e, HubError::Bad(_)), "{e:?}");
        assert!(e.to_string().contains("does not verify"), "{e}");
        assert_eq!(fx.hub.state().staged, None);

        fx.hub
            .commit(v1, None, vec![a.sign_release(&v1)])
            .await
            .unwrap();
        fx.hub
            .commit(v1, None, vec![b.sign_release(&v1)])
            .await
            .unwrap();
        let kept = fx.hub.signatures(v1).await.unwrap().signatures;
        assert_eq!(kept, vec![a.sign_release(&v1), b.sign_release(&v1)]);
        let unknown = crate::sync::manifest::Hash::of(b"unknown");
        assert!(matches!(
            fx.hub.signatures(unknown).await,
            Err(HubError::NotFound(_))
        ));
        assert!(matches!(
            fx.hub.provenance(v1).await,
            Err(HubError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn a_hub_with_trusted_keys_stages_only_what_one_of_them_signed() {
        let (clock, _) = manual(100 * S);
        let fx = testing::hub(clock);
        let (trusted, other) = (key(), key());
        trusting(&fx, &[&trusted]);
        let v1 = release(&fx.hub, &[("index.html", "v1")]).await;
        for sigs in [vec![], vec![other.sign_release(&v1)]] {
            let e = fx.hub.commit(v1, None, sigs).await.unwrap_err();
            assert!(matches!(e, HubError::Untrusted(_)), "{e:?}");
            assert!(e.to_string().contains("not signed by a trusted key"), "{e}");
        }
        assert_eq!(fx.hub.state().staged, None);
        assert!(
            fx.hub.signatures(v1).await.unwrap().signatures.is_empty(),
            "a refused commit keeps nothing"
        );
        let c = fx
            .hub
            .commit(v1, None, vec![trusted.sign_release(&v1)])
            .await
            .unwrap();
        assert_eq!(c.state, CommitState::Staged);
        // Committed again without signatures: the kept one still counts.
        let c = fx.hub.commit(v1, None, vec![]).await.unwrap();
        assert_eq!(c.state, CommitState::Staged);
    }
}
