//! Agents' changesets at the hub: checked (numbers ahead of the hub's receive time are refused
//! whole, logged and counted: [`crate::sync::changeset::MAX_AHEAD_US`]), answered `duplicate`
//! when already applied and
//! `missing` while blobs are lacking, else resolved against the hub's releases
//! (last writer by hub time wins), applied whole and recorded with the store's
//! compare-and-swap; the conflicts it met are logged, counted and kept for `lockstep status`.
//! The rules are [`crate::sync::changeset`]'s and [`crate::sync::cycle`]'s; this file applies
//! them to stored manifests. Every release it builds is kept with its provenance
//! ([`crate::sync::provenance`]): no publisher signed it, so agents that check signatures
//! accept it by checking it against the signed release it came from.

use std::sync::Arc;

use tracing::{info, warn};

use super::{Hub, HubError};
use crate::sync::changeset::{self, Changeset, ChangesetError, Conflict, Mode, Resolution, Stamp};
use crate::sync::cycle::{Forward, HubState};
use crate::sync::manifest::{Manifest, ManifestError, ReleaseId};
use crate::sync::protocol::{ChangesetReply, ConflictView};
use crate::sync::provenance::{self, SignedChangeset};
use crate::sync::schedule::Rules;
use crate::sync::store::HubStore;

/// Resolved conflicts kept for `lockstep status`.
pub const MAX_CONFLICTS: usize = 64;

/// A changeset the hub applied.
struct Applied {
    /// The release it went into.
    release: ReleaseId,
    /// Concurrent writes it met, resolved.
    conflicts: Vec<Conflict>,
}

impl Hub {
    /// Applies a changeset from an agent: `immediate` changes the active release at
    /// once (and the staged and queued ones, so an activation does not undo them);
    /// `scheduled` makes the next release from the newest pending one. Concurrent edits of a
    /// path resolve last-writer-by-hub-time-wins; the losers are logged, counted and listed in
    /// [`Hub::fleet`]. A changeset whose blobs are not all here is answered `missing`; one
    /// already applied, `duplicate`. Whole or nothing: a refused one changes nothing.
    ///
    /// `receive_us` is the hub time the request arrived: a `seq` or `detected_us` beyond it
    /// by more than the allowance for clock error is refused (and logged and counted).
    pub async fn changeset(
        self: &Arc<Self>,
        cs: Changeset,
        receive_us: u64,
    ) -> Result<ChangesetReply, HubError> {
        self.signed_changeset(SignedChangeset::unsigned(cs), receive_us)
            .await
    }

    /// [`Hub::changeset`] for a changeset with its origin's signature, which the provenance of
    /// the releases it makes keeps for the agents to check.
    pub async fn signed_changeset(
        self: &Arc<Self>,
        signed: SignedChangeset,
        receive_us: u64,
    ) -> Result<ChangesetReply, HubError> {
        let cs = &signed.changeset;
        cs.check().map_err(|e| HubError::Bad(e.to_string()))?;
        if let Err(e) = cs.check_time(receive_us) {
            if let ChangesetError::Ahead {
                field,
                value,
                bound,
                ..
            } = &e
            {
                self.metrics.implausible(*field);
                warn!(origin = %cs.origin, %field, value, bound, "changeset refused: a number is ahead of the hub's clock");
            }
            return Err(HubError::Bad(e.to_string()));
        }
        if already_applied(&self.state(), cs) {
            return Ok(ChangesetReply::duplicate());
        }
        let missing = self.lacking(cs.blobs()).await?;
        if !missing.is_empty() {
            return Ok(ChangesetReply::missing(missing));
        }
        let (name, mode) = (cs.name(), cs.mode);
        let blobs: Vec<crate::sync::manifest::Hash> =
            cs.blobs().into_iter().map(|(h, _)| h).collect();
        let store = self.store.clone();
        let applied = self
            .transition(move |s, now, rules| apply(store.as_ref(), s, now, rules, &signed))
            .await?;
        // Applied by a concurrent call of the same changeset between the two checks.
        let Some(Applied { release, conflicts }) = applied else {
            return Ok(ChangesetReply::duplicate());
        };
        self.pending_uploads().named(blobs.iter());
        self.metrics.changeset(mode);
        info!(changeset = %name, ?mode, release = %release.short(), conflicts = conflicts.len(), "changeset applied");
        self.keep_conflicts(&conflicts);
        Ok(ChangesetReply::applied(release, conflicts))
    }

    /// Logs and counts the conflicts a changeset met and keeps the last [`MAX_CONFLICTS`].
    fn keep_conflicts(&self, conflicts: &[Conflict]) {
        if conflicts.is_empty() {
            return;
        }
        let now = self.now_us();
        let mut kept = self.conflicts.lock().unwrap_or_else(|p| p.into_inner());
        for c in conflicts {
            self.metrics.conflicts.inc();
            warn!(
                path = %c.path,
                winner = %c.winner.origin,
                winner_us = c.winner.at_us,
                loser = %if c.loser.origin.is_empty() { "a publish" } else { &c.loser.origin },
                loser_us = c.loser.at_us,
                "concurrent edits of one path: the later by hub time wins"
            );
            if kept.len() == MAX_CONFLICTS {
                kept.pop_front();
            }
            kept.push_back(ConflictView {
                conflict: c.clone(),
                resolved_us: now,
            });
        }
    }
}

/// Whether the hub has applied `cs` already (sequences rise per origin).
fn already_applied(s: &HubState, cs: &Changeset) -> bool {
    s.applied.get(&cs.origin) >= Some(&cs.seq)
}

/// The transition of a changeset against state `s`: the next state and what was applied, or
/// nothing when it is already applied. Blocking: reads and writes manifests in `store`.
fn apply(
    store: &dyn HubStore,
    s: &HubState,
    now: u64,
    rules: &Rules,
    signed: &SignedChangeset,
) -> Result<(Option<HubState>, Option<Applied>), HubError> {
    let cs = &signed.changeset;
    if already_applied(s, cs) {
        return Ok((None, None));
    }
    let target = match cs.mode {
        Mode::Immediate => s.active,
        Mode::Scheduled => s.newest(),
    };
    let current = load(store, target)?;
    let r = changeset::resolve(&current, &s.stamps, cs);
    let release = rebase(store, target, &current, &r, signed)?;
    let f = forward(cs, &r);
    let next = match cs.mode {
        Mode::Immediate => {
            // The staged and queued releases take the edit too, so an activation keeps it.
            let carry = |id: Option<ReleaseId>| match id {
                Some(_) => rebase(store, id, &load(store, id)?, &r, signed).map(Some),
                None => Ok(None),
            };
            let staged = carry(s.staged.map(|x| x.id))?;
            let queued = carry(s.queued.map(|x| x.id))?;
            s.forward_immediate(f, release, staged, queued, now)
        }
        Mode::Scheduled => s.forward_scheduled(f, release, now, rules).0,
    };
    let applied = Applied {
        release,
        conflicts: r.conflicts,
    };
    Ok((Some(next), Some(applied)))
}

/// What the changeset wrote, for the state's version vector and path stamps.
fn forward(cs: &Changeset, r: &Resolution) -> Forward {
    let stamp = Stamp {
        at_us: cs.detected_us,
        origin: cs.origin.clone(),
    };
    Forward {
        origin: cs.origin.clone(),
        seq: cs.seq,
        written: r.apply.keys().map(|p| (p.clone(), stamp.clone())).collect(),
    }
}

/// `base` (the manifest of release `base_id`) with the resolved changes applied, stored with
/// its provenance: the new release's id.
fn rebase(
    store: &dyn HubStore,
    base_id: Option<ReleaseId>,
    base: &Manifest,
    r: &Resolution,
    signed: &SignedChangeset,
) -> Result<ReleaseId, HubError> {
    let m = changeset::apply(base, &r.apply).map_err(|e: ManifestError| {
        HubError::Bad(format!(
            "changeset {} refused: {e}",
            signed.changeset.name()
        ))
    })?;
    let id = m.id();
    store.put_release(&id, &m.to_json())?;
    record_provenance(store, base_id, base, &m, signed)?;
    Ok(id)
}

/// Keeps beside `release` how it was made — `cs` applied to release `base_id` — so that
/// agents can check it against a signed release. Flattened: when the base was itself built
/// from changesets, onto the base's base. Nothing for a release that is signed or explained
/// already, or that the changeset left as it was.
fn record_provenance(
    store: &dyn HubStore,
    base_id: Option<ReleaseId>,
    base: &Manifest,
    release: &Manifest,
    signed: &SignedChangeset,
) -> Result<(), HubError> {
    let id = release.id();
    if Some(id) == base_id || !store.signatures(&id)?.is_empty() || store.provenance(&id)?.is_some()
    {
        return Ok(());
    }
    let base_provenance = match base_id {
        Some(b) if store.signatures(&b)?.is_empty() => store.provenance(&b)?,
        _ => None,
    };
    let loaded;
    let root = match &base_provenance {
        Some(p) => {
            loaded = load(store, p.base)?;
            &loaded
        }
        None => base,
    };
    let p = provenance::extend(base_id, base_provenance, signed.clone(), root, release);
    if p.base == Some(id) {
        // Edited back to its root: the root's signatures are its own.
        return Ok(());
    }
    store.put_provenance(&id, &p)?;
    Ok(())
}

/// The manifest of release `id` (an empty one for no release).
fn load(store: &dyn HubStore, id: Option<ReleaseId>) -> Result<Manifest, HubError> {
    let Some(id) = id else {
        return Ok(Manifest::default());
    };
    let bytes = store
        .get_release(&id)?
        .ok_or_else(|| HubError::NotFound(format!("release {id} is not stored")))?;
    Ok(Manifest::from_json(&bytes)?)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::hub::testing::{self, entry, files, manual, release, set, S};
    use crate::sync::changeset::Change;
    use crate::sync::cycle::Advancer;
    use crate::sync::manifest::Hash;
    use crate::sync::protocol::ChangesetState;

    /// A changeset from `origin` writing `data` to `path` over `prev`.
    fn edit(
        origin: &str,
        seq: u64,
        mode: Mode,
        path: &str,
        prev: Option<&str>,
        data: &str,
    ) -> Changeset {
        Changeset {
            origin: origin.into(),
            seq,
            mode,
            base: None,
            detected_us: seq * S,
            changes: BTreeMap::from([(
                path.to_string(),
                Change {
                    entry: Some(entry(data)),
                    prev: prev.map(|p| Hash::of(p.as_bytes())),
                },
            )]),
        }
    }

    async fn put(hub: &Arc<Hub>, data: &str) {
        hub.put_blob(Hash::of(data.as_bytes()), data.as_bytes().to_vec())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_changeset_naming_a_missing_blob_is_answered_missing_until_it_is_put() {
        let (clock, _) = manual(100 * S);
        let fx = testing::hub(clock);
        let cs = edit("web1", 1, Mode::Immediate, "new.html", None, "fresh");
        let reply = fx.hub.changeset(cs.clone(), 100 * S).await.unwrap();
        assert_eq!(reply.state, ChangesetState::Missing);
        assert_eq!(reply.missing, vec![Hash::of(b"fresh")]);
        assert_eq!(reply.release, None);
        assert_eq!(fx.hub.state().version, 0, "nothing was applied");

        put(&fx.hub, "fresh").await;
        let reply = fx.hub.changeset(cs, 100 * S).await.unwrap();
        assert_eq!(reply.state, ChangesetState::Applied);
        let release = reply.release.unwrap();
        assert_eq!(
            fx.hub.state().active,
            Some(release),
            "immediate: active at once"
        );
        assert_eq!(
            files(&fx.hub, release).await,
            BTreeMap::from([("new.html".to_string(), Hash::of(b"fresh"))])
        );
        assert_eq!(fx.hub.state().applied.get("web1"), Some(&1));
    }

    #[tokio::test]
    async fn a_changeset_sequence_already_applied_is_a_duplicate_and_changes_nothing() {
        let (clock, _) = manual(100 * S);
        let fx = testing::hub(clock);
        put(&fx.hub, "five").await;
        let first = fx
            .hub
            .changeset(
                edit("web1", 5, Mode::Immediate, "a.html", None, "five"),
                fx.hub.now_us(),
            )
            .await
            .unwrap();
        assert_eq!(first.state, ChangesetState::Applied);
        let state = fx.hub.state();
        for seq in [5, 3] {
            // Even with other content: the sequence says the hub has it.
            put(&fx.hub, "other").await;
            let again = fx
                .hub
                .changeset(
                    edit("web1", seq, Mode::Immediate, "a.html", None, "other"),
                    fx.hub.now_us(),
                )
                .await
                .unwrap();
            assert_eq!(again.state, ChangesetState::Duplicate, "seq {seq}");
            assert_eq!((again.release, again.missing.len()), (None, 0));
        }
        assert_eq!(fx.hub.state(), state);
        // Another origin's sequence 5 is its own.
        let other = fx
            .hub
            .changeset(
                edit("web2", 5, Mode::Immediate, "b.html", None, "other"),
                fx.hub.now_us(),
            )
            .await
            .unwrap();
        assert_eq!(other.state, ChangesetState::Applied);
    }

    /// The security issue's numbers: `seq = u64::MAX` would answer every later edit of its
    /// origin "duplicate"; a `detected_us` a day ahead would win every conflict. Both are
    /// refused whole against the receive time, counted by field, and the origin's honest edits
    /// still apply.
    #[tokio::test]
    async fn numbers_ahead_of_the_receive_time_are_refused_and_counted() {
        let (clock, _) = manual(100 * S);
        let fx = testing::hub(clock);
        put(&fx.hub, "forged").await;
        let mut silencer = edit("web1", 1, Mode::Immediate, "a.html", None, "forged");
        silencer.seq = u64::MAX;
        let mut winner = edit("web1", 2, Mode::Immediate, "a.html", None, "forged");
        winner.detected_us = 100 * S + 86_400 * S;
        let mut just_over = edit("web1", 3, Mode::Immediate, "a.html", None, "forged");
        just_over.detected_us = 100 * S + changeset::MAX_AHEAD_US + 1;
        for (cs, field) in [
            (silencer, "seq"),
            (winner, "detected_us"),
            (just_over, "detected_us"),
        ] {
            let e = fx.hub.changeset(cs, 100 * S).await.unwrap_err();
            let HubError::Bad(text) = &e else {
                panic!("{e:?}")
            };
            let bound = (100 * S + changeset::MAX_AHEAD_US).to_string();
            assert!(
                text.contains(&format!("{field} ")) && text.contains(&bound),
                "{text}"
            );
        }
        assert_eq!(fx.hub.state().version, 0, "nothing was applied");
        assert!(fx.hub.state().applied.is_empty());
        let refused = |field| {
            fx.metrics
                .implausible
                .get_or_create(&crate::hub::metrics::FieldLabels { field })
                .get()
        };
        assert_eq!((refused("seq"), refused("detected_us")), (1, 2));
        // web1's honest edit, numbered by hub time, is applied.
        put(&fx.hub, "honest").await;
        let honest = edit("web1", 99, Mode::Immediate, "a.html", None, "honest");
        let reply = fx.hub.changeset(honest, 100 * S).await.unwrap();
        assert_eq!(reply.state, ChangesetState::Applied);
    }

    /// A hub whose store recorded numbers ahead of its clock (accepted before the bound, or a
    /// clock stepped back) brings them back at start, so the origin's edits apply again.
    #[tokio::test]
    async fn a_hub_heals_numbers_recorded_ahead_of_its_clock_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn HubStore> =
            Arc::new(crate::sync::store::FsStore::open(dir.path()).unwrap());
        let poisoned = HubState {
            version: 3,
            applied: [("web1".to_string(), u64::MAX)].into(),
            ..HubState::default()
        };
        assert!(store.swap_state(0, &poisoned).unwrap());
        let (clock, _) = manual(100 * S);
        let hub = Hub::new(
            store.clone(),
            testing::settings(),
            clock,
            crate::hub::HubMetrics::default(),
        )
        .unwrap();
        assert_eq!(hub.state().applied["web1"], 100 * S);
        assert_eq!(store.state().unwrap(), hub.state(), "written back");
        put(&hub, "after").await;
        // web1 numbers its next edit by hub time, above the record.
        let mut cs = edit("web1", 101, Mode::Immediate, "a.html", None, "after");
        cs.seq = 101 * S;
        let reply = hub.changeset(cs, 101 * S).await.unwrap();
        assert_eq!(reply.state, ChangesetState::Applied);
    }

    #[tokio::test]
    async fn an_immediate_changeset_is_carried_into_the_staged_release() {
        let (clock, now) = manual(100 * S);
        let fx = testing::hub(clock);
        let v1 = release(&fx.hub, &[("index.html", "v1"), ("a.html", "a1")]).await;
        fx.hub.commit(v1, None, vec![]).await.unwrap();
        set(&now, 110 * S);
        fx.hub.advance(0, Advancer::Agent).await.unwrap();
        let v2 = release(&fx.hub, &[("index.html", "v2"), ("a.html", "a1")]).await;
        fx.hub.commit(v2, None, vec![]).await.unwrap();
        put(&fx.hub, "a2").await;
        let reply = fx
            .hub
            .changeset(
                edit("web1", 1, Mode::Immediate, "a.html", Some("a1"), "a2"),
                fx.hub.now_us(),
            )
            .await
            .unwrap();
        let s = fx.hub.state();
        assert_eq!(s.active, reply.release);
        let active = files(&fx.hub, s.active.unwrap()).await;
        assert_eq!(active["a.html"], Hash::of(b"a2"));
        assert_eq!(active["index.html"], Hash::of(b"v1"));
        // The activation at 120 s must not undo the edit.
        let staged = s.staged.unwrap();
        assert_eq!(staged.at_us, 120 * S);
        let staged = files(&fx.hub, staged.id).await;
        assert_eq!(staged["a.html"], Hash::of(b"a2"));
        assert_eq!(staged["index.html"], Hash::of(b"v2"));
    }

    #[tokio::test]
    async fn releases_built_from_changesets_keep_a_provenance_down_to_the_signed_release() {
        use crate::sync::provenance::TrustedOrigins;
        let (clock, now) = manual(100 * S);
        let fx = testing::hub(clock);
        let key = crate::sync::sign::SecretKey::generate(&ring::rand::SystemRandom::new())
            .unwrap()
            .0;
        let v1 = release(&fx.hub, &[("index.html", "v1"), ("a.html", "a1")]).await;
        fx.hub
            .commit(v1, None, vec![key.sign_release(&v1)])
            .await
            .unwrap();
        set(&now, 110 * S);
        fx.hub.advance(0, Advancer::Agent).await.unwrap();
        let manifest = |id| {
            let hub = fx.hub.clone();
            async move { Manifest::from_json(&hub.release(id).await.unwrap()).unwrap() }
        };
        let web = TrustedOrigins::new(["web1".to_string(), "web2".to_string()]);
        let mut seq = 0;
        let mut last = v1;
        for (origin, path, prev, data) in [
            ("web1", "a.html", Some("a1"), "a2"),
            ("web2", "b.html", None, "b"),
            ("web1", "a.html", Some("a2"), "a3"),
        ] {
            seq += 1;
            put(&fx.hub, data).await;
            let reply = fx
                .hub
                .changeset(
                    edit(origin, seq, Mode::Immediate, path, prev, data),
                    fx.hub.now_us(),
                )
                .await
                .unwrap();
            let id = reply.release.unwrap();
            assert_ne!(id, last);
            let p = fx.hub.provenance(id).await.unwrap();
            assert_eq!(p.base, Some(v1), "flattened onto the signed release");
            p.check(&web, &manifest(v1).await, &manifest(id).await)
                .unwrap();
            last = id;
        }
        // The first edit of a.html was written again: only the last two explain anything.
        let p = fx.hub.provenance(last).await.unwrap();
        let names: Vec<String> = p.changesets.iter().map(|c| c.changeset.name()).collect();
        assert_eq!(names, ["web2/2", "web1/3"]);
        // No publisher signed the built releases; the signed one has no provenance.
        assert!(fx.hub.signatures(last).await.unwrap().signatures.is_empty());
        assert!(fx.hub.provenance(v1).await.is_err());
    }

    #[tokio::test]
    async fn a_scheduled_changeset_is_staged_for_the_next_activation() {
        let (clock, _) = manual(100 * S);
        let fx = testing::hub(clock);
        put(&fx.hub, "s").await;
        let reply = fx
            .hub
            .changeset(
                edit("web1", 1, Mode::Scheduled, "s.html", None, "s"),
                fx.hub.now_us(),
            )
            .await
            .unwrap();
        assert_eq!(reply.state, ChangesetState::Applied);
        let s = fx.hub.schedule();
        assert_eq!((s.active, s.staged), (None, reply.release));
        assert_eq!(s.activation_us, Some(110 * S));
    }

    #[tokio::test]
    async fn crossed_edits_resolve_to_the_later_by_hub_time_and_are_kept_for_status() {
        let (clock, _) = manual(100 * S);
        let fx = testing::hub(clock);
        put(&fx.hub, "late").await;
        put(&fx.hub, "early").await;
        // web2's edit was detected later (seq 9 → 9 s) but arrives first.
        let late = edit("web2", 9, Mode::Immediate, "p.html", None, "late");
        assert_eq!(
            fx.hub.changeset(late, 100 * S).await.unwrap().conflicts,
            vec![]
        );
        // web1 did not see it (prev: no file) and was earlier: it loses.
        let early = edit("web1", 2, Mode::Immediate, "p.html", None, "early");
        let reply = fx.hub.changeset(early, 100 * S).await.unwrap();
        assert_eq!(reply.state, ChangesetState::Applied);
        assert_eq!(reply.conflicts.len(), 1);
        let c = &reply.conflicts[0];
        assert_eq!(
            (c.winner.origin.as_str(), c.loser.origin.as_str()),
            ("web2", "web1")
        );
        let active = files(&fx.hub, fx.hub.state().active.unwrap()).await;
        assert_eq!(active["p.html"], Hash::of(b"late"));
        let fleet = fx.hub.fleet();
        assert_eq!(fleet.conflicts.len(), 1);
        assert_eq!(fleet.conflicts[0].conflict, *c);
        assert_eq!(fleet.conflicts[0].resolved_us, 100 * S);
        assert_eq!(fx.metrics.conflicts.get(), 1);
    }
}
