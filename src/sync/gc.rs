//! Garbage collection of a content store (the hub's and each agent's): which manifests and
//! blobs may go. Pure: the store lists what it holds with each file's age, this decides, and
//! the store deletes (re-checking each file's age under its lock, see
//! [`FsStore::collect`](super::store::FsStore::collect)).
//!
//! Kept:
//! - the releases the owner names (the hub: active, previous, staged, queued; an agent:
//!   active, previous, staged), and every manifest younger than `grace` — a publish, a
//!   changeset or a staging in progress writes its manifest before any state names it;
//! - every blob those manifests reference, every blob the owner pins (an agent's changesets
//!   not yet delivered to the hub), and every blob younger than `grace` — uploads and
//!   fetches land before the manifest that names them. A store "touches" a blob whenever it
//!   answers that it has it, so a blob someone was just told not to upload is young again.
//!
//! A named release whose manifest is missing or unreadable stops the collection of blobs
//! altogether: what it references cannot be known, so nothing is deleted on a guess.

use std::collections::HashSet;
use std::time::Duration;

use super::manifest::{Hash, Manifest, ReleaseId};

/// How often a store is collected and how long unused content stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gc {
    /// Time between collections; zero turns collection off.
    pub interval: Duration,
    /// Content younger than this is never removed.
    pub grace: Duration,
}

/// Default time between collections.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(600);
/// Default age below which nothing is removed.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);
/// Shortest grace allowed: uploads and stagings in progress need time to be named.
pub const MIN_GRACE: Duration = Duration::from_secs(1);

impl Default for Gc {
    fn default() -> Gc {
        Gc {
            interval: DEFAULT_INTERVAL,
            grace: DEFAULT_GRACE,
        }
    }
}

/// What a store holds, with each file's age.
#[derive(Debug, Default, Clone)]
pub struct Listing {
    /// Stored manifests.
    pub releases: Vec<(ReleaseId, Duration)>,
    /// Stored blobs.
    pub blobs: Vec<(Hash, Duration)>,
}

/// What may be deleted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Manifests no one needs.
    pub releases: Vec<ReleaseId>,
    /// Blobs no kept manifest references.
    pub blobs: Vec<Hash>,
}

/// Why a collection was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GcError {
    /// A release that must be kept has no readable manifest.
    #[error("release {0} is named but its manifest is missing or unreadable: nothing collected")]
    MissingManifest(ReleaseId),
}

/// The manifests a collection must read: the named releases and every young one.
pub fn manifests_to_read(keep: &[ReleaseId], listing: &Listing, grace: Duration) -> Vec<ReleaseId> {
    let mut ids: Vec<ReleaseId> = keep.to_vec();
    ids.extend(
        listing
            .releases
            .iter()
            .filter(|(_, age)| *age < grace)
            .map(|(id, _)| *id),
    );
    ids.sort_by_key(|id| id.to_hex());
    ids.dedup();
    ids
}

/// Decides what goes. `manifests` are those [`manifests_to_read`] named, `None` where one could
/// not be read; `pinned` are blobs something other than a release still needs (an agent's
/// changesets waiting for the hub).
pub fn plan(
    keep: &[ReleaseId],
    listing: &Listing,
    manifests: &[(ReleaseId, Option<Manifest>)],
    pinned: &HashSet<Hash>,
    grace: Duration,
) -> Result<Plan, GcError> {
    let mut referenced: HashSet<Hash> = pinned.clone();
    for (id, m) in manifests {
        match m {
            Some(m) => referenced.extend(m.files().values().map(|e| e.hash)),
            // A named release must have its manifest; a young one that cannot be read is
            // being written or is damaged, and is neither used nor deleted here.
            None if keep.contains(id) => return Err(GcError::MissingManifest(*id)),
            None => {}
        }
    }
    let releases = listing
        .releases
        .iter()
        .filter(|(id, age)| *age >= grace && !keep.contains(id))
        .map(|(id, _)| *id)
        .collect();
    let blobs = listing
        .blobs
        .iter()
        .filter(|(h, age)| *age >= grace && !referenced.contains(h))
        .map(|(h, _)| *h)
        .collect();
    Ok(Plan { releases, blobs })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::sync::manifest::Entry;

    const HOUR: Duration = Duration::from_secs(3600);
    const OLD: Duration = Duration::from_secs(2 * 3600);
    const YOUNG: Duration = Duration::from_secs(60);

    fn manifest(files: &[&[u8]]) -> Manifest {
        let m: BTreeMap<String, Entry> = files
            .iter()
            .enumerate()
            .map(|(i, d)| {
                (
                    format!("f{i}"),
                    Entry {
                        hash: Hash::of(d),
                        size: d.len() as u64,
                        content_type: "text/plain".into(),
                    },
                )
            })
            .collect();
        Manifest::new(m).unwrap()
    }

    #[test]
    fn unreferenced_old_content_goes_and_everything_needed_or_young_stays() {
        let active = manifest(&[b"shared", b"a-only"]);
        let previous = manifest(&[b"shared", b"p-only"]);
        let dropped = manifest(&[b"shared", b"d-only"]);
        let young = manifest(&[b"y-only"]);
        let listing = Listing {
            releases: vec![
                (active.id(), OLD),
                (previous.id(), OLD),
                (dropped.id(), OLD),
                (young.id(), YOUNG),
            ],
            blobs: vec![
                (Hash::of(b"shared"), OLD),
                (Hash::of(b"a-only"), OLD),
                (Hash::of(b"p-only"), OLD),
                (Hash::of(b"d-only"), OLD),
                (Hash::of(b"y-only"), OLD), // old blob, re-used by a young manifest
                (Hash::of(b"fresh-upload"), YOUNG),
            ],
        };
        let keep = [active.id(), previous.id()];
        let read = manifests_to_read(&keep, &listing, HOUR);
        assert_eq!(read.len(), 3, "the two named and the young one");
        assert!(!read.contains(&dropped.id()));
        let manifests: Vec<_> = [&active, &previous, &young]
            .iter()
            .map(|m| (m.id(), Some((*m).clone())))
            .collect();
        let p = plan(&keep, &listing, &manifests, &HashSet::new(), HOUR).unwrap();
        assert_eq!(p.releases, vec![dropped.id()]);
        assert_eq!(p.blobs, vec![Hash::of(b"d-only")]);
        // A blob an undelivered changeset needs is pinned.
        let pinned: HashSet<Hash> = [Hash::of(b"d-only")].into();
        let p = plan(&keep, &listing, &manifests, &pinned, HOUR).unwrap();
        assert!(p.blobs.is_empty());
        let p = plan(&keep, &listing, &manifests, &HashSet::new(), HOUR).unwrap();
        assert_eq!(p.releases, vec![dropped.id()]);
        assert_eq!(p.blobs, vec![Hash::of(b"d-only")]);
    }

    #[test]
    fn a_named_release_without_its_manifest_stops_the_collection() {
        let active = manifest(&[b"a"]);
        let listing = Listing {
            releases: vec![],
            blobs: vec![(Hash::of(b"a"), OLD)],
        };
        let none = HashSet::new();
        let err = plan(
            &[active.id()],
            &listing,
            &[(active.id(), None)],
            &none,
            HOUR,
        )
        .unwrap_err();
        assert_eq!(err, GcError::MissingManifest(active.id()));
        // A young manifest that could not be read is only skipped.
        let other = manifest(&[b"b"]);
        let p = plan(
            &[active.id()],
            &listing,
            &[(active.id(), Some(active.clone())), (other.id(), None)],
            &none,
            HOUR,
        )
        .unwrap();
        assert!(p.blobs.is_empty());
    }

    #[test]
    fn with_no_grace_only_what_is_named_survives() {
        let active = manifest(&[b"a"]);
        let old = manifest(&[b"b"]);
        let listing = Listing {
            releases: vec![(active.id(), YOUNG), (old.id(), YOUNG)],
            blobs: vec![(Hash::of(b"a"), YOUNG), (Hash::of(b"b"), YOUNG)],
        };
        let p = plan(
            &[active.id()],
            &listing,
            &[(active.id(), Some(active.clone()))],
            &HashSet::new(),
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(p.releases, vec![old.id()]);
        assert_eq!(p.blobs, vec![Hash::of(b"b")]);
    }
}
