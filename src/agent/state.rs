//! The agent's persisted state (`<store>/agent.json`): the release it serves and the one
//! before it. Written atomically after every activation, read at start so that a restarted
//! agent serves its release from disk before it talks to the hub.
//!
//! [`StateFile`] is its one writer. A scheduled flip is recorded right after its store by a
//! thread of its own ([`Provisional`]), without waiting for the controller to hear of it and
//! for the disk worker to reach it, so that an agent killed in the moment after a flip comes
//! back on the release it flipped to (it used to come back on the one before until the hub's
//! schedule flipped it again, or for as long as the hub was out of reach). A record names the
//! release it is for, and is written only while that release is the one served: a late record
//! of an older activation (queued behind other disk work) can never put back the release
//! before it; and a flip's own record, made from what was known when it was armed, never
//! replaces the controller's exact one.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::messages::Active;
use super::release::Release;
use crate::sync::changeset::Applied;
use crate::sync::manifest::ReleaseId;
use crate::sync::store::FsStore;

/// The state file's name in the store (`agent.json`).
pub const STATE_NAME: &str = "agent";

/// What the agent must remember across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentState {
    /// The release being served.
    pub active: Option<ReleaseId>,
    /// The release before it (kept for an instant rollback).
    pub previous: Option<ReleaseId>,
    /// Highest changeset sequence per origin the active release includes.
    #[serde(default, skip_serializing_if = "Applied::is_empty")]
    pub applied: Applied,
}

/// Writes `agent.json` (with the manifest it names), only for the release being served.
pub struct StateFile {
    store: Arc<FsStore>,
    active: Active,
    /// The release the last record written was for, and whether it was exact (not a flip's
    /// own, [`Provisional`]); held from the look at the served release to the end of the write.
    last: Mutex<Option<(ReleaseId, bool)>>,
}

impl StateFile {
    /// The writer of `store`'s state file, for the releases `active` serves.
    pub fn new(store: Arc<FsStore>, active: Active) -> StateFile {
        StateFile {
            store,
            active,
            last: Mutex::new(None),
        }
    }

    /// Records `state` for `release`, unless another release is served by now (its own
    /// record is then on its way, made after its store). The release's manifest is stored
    /// either way (a release built here from changesets: a later state may name it as the
    /// previous one). Whether the state was written. Blocking.
    pub fn record(&self, release: &Release, state: &AgentState) -> Result<bool, String> {
        self.write(release, state, true)
    }

    fn write(&self, release: &Release, state: &AgentState, exact: bool) -> Result<bool, String> {
        // Nothing holding the lock can panic half-way; a poisoned one is still consistent.
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if !self.store.has_release(&release.id()) {
            // The manifest first: a restart must be able to load what the state names.
            self.store
                .write_release(&release.id(), &release.manifest().to_json())
                .map_err(|e| format!("cannot store the release's manifest: {e}"))?;
        }
        let served = self.active.load().as_ref().map(|r| r.id());
        if served != Some(release.id()) || state.active != served {
            return Ok(false);
        }
        if !exact && *last == Some((release.id(), true)) {
            // The controller's exact record of this release came first.
            return Ok(false);
        }
        let mut state = state.clone();
        if state.previous.is_some_and(|p| !self.store.has_release(&p)) {
            // Its own record (which stores its manifest) is still queued: a restart could not
            // load it, so it is not named (it comes with the controller's record).
            state.previous = None;
        }
        self.store
            .write_state(STATE_NAME, &state)
            .map_err(|e| format!("cannot record the active release: {e}"))?;
        *last = Some((release.id(), exact));
        Ok(true)
    }
}

/// A scheduled flip's own record, made by its recorder thread right after the store from what
/// the controller knew when it armed the flip: written unless the controller's exact record of
/// the release is already the last one (it came first) or another release is served by now.
pub struct Provisional {
    /// The state file.
    pub file: Arc<StateFile>,
    /// What the flip will have made of the state.
    pub state: AgentState,
}

impl Provisional {
    /// Records the flip to `release`. Blocking.
    pub fn record(self, release: &Release) -> Result<bool, String> {
        self.file.write(release, &self.state, false)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use arc_swap::ArcSwapOption;

    use super::*;
    use crate::sync::manifest::{Entry, Hash, Manifest};

    #[test]
    fn state_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        assert_eq!(store.read_state::<AgentState>(STATE_NAME).unwrap(), None);
        let s = AgentState {
            active: Some(Hash::of(b"2")),
            previous: Some(Hash::of(b"1")),
            applied: [("web-2".to_string(), 9)].into(),
        };
        store.write_state(STATE_NAME, &s).unwrap();
        drop(store);
        let store = FsStore::open(dir.path()).unwrap();
        assert_eq!(store.read_state(STATE_NAME).unwrap(), Some(s));
        assert!(dir.path().join("agent.json").is_file());
    }

    fn release(store: &Arc<FsStore>, name: &str) -> Arc<Release> {
        let mut files = BTreeMap::new();
        let blob = Hash::of(name.as_bytes());
        store.write_blob(&blob, name.as_bytes()).unwrap();
        files.insert(
            format!("{name}.html"),
            Entry {
                hash: blob,
                size: name.len() as u64,
                content_type: "text/html".into(),
            },
        );
        let manifest = Manifest::new(files).unwrap();
        Arc::new(Release::build(store, manifest).unwrap())
    }

    fn state_of(r: &Release, previous: Option<&Release>) -> AgentState {
        AgentState {
            active: Some(r.id()),
            previous: previous.map(Release::id),
            applied: Applied::default(),
        }
    }

    /// Only the served release's state is written; a late record of the release before it
    /// (the controller's, behind other disk work) leaves the newer one in place.
    #[test]
    fn only_the_served_release_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FsStore::open(dir.path()).unwrap());
        let active: Active = Arc::new(ArcSwapOption::empty());
        let file = StateFile::new(store.clone(), active.clone());
        let (a, b) = (release(&store, "a"), release(&store, "b"));
        active.store(Some(a.clone()));
        assert!(file.record(&a, &state_of(&a, None)).unwrap());
        active.store(Some(b.clone()));
        assert!(file.record(&b, &state_of(&b, Some(&a))).unwrap());
        // A's record, late: refused, B's stays.
        assert!(!file.record(&a, &state_of(&a, None)).unwrap());
        let on_disk: AgentState = store.read_state(STATE_NAME).unwrap().unwrap();
        assert_eq!(on_disk, state_of(&b, Some(&a)));
        // A state that does not name the release it is recorded for is refused too.
        assert!(!file.record(&b, &state_of(&a, None)).unwrap());
        // The manifest of a release built here goes to the store with its state.
        assert!(store.has_release(&b.id()));
    }

    /// A refused record still stores its release's manifest (a later state may name it as the
    /// previous one); a state never names a previous release the store cannot load.
    #[test]
    fn a_refused_record_stores_its_manifest_and_no_state_names_an_unloadable_release() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FsStore::open(dir.path()).unwrap());
        let active: Active = Arc::new(ArcSwapOption::empty());
        let file = StateFile::new(store.clone(), active.clone());
        let (c1, c2, c3) = (
            release(&store, "c1"),
            release(&store, "c2"),
            release(&store, "c3"),
        );
        assert!(!store.has_release(&c1.id()), "built in memory");
        // Two installs in a row, the first's record reached after the second is served.
        active.store(Some(c2.clone()));
        assert!(!file.record(&c1, &state_of(&c1, None)).unwrap());
        assert!(
            store.has_release(&c1.id()),
            "the refused record's manifest is stored"
        );
        assert!(file.record(&c2, &state_of(&c2, Some(&c1))).unwrap());
        // A previous release whose own record has not run yet is not named.
        active.store(Some(c3.clone()));
        let fresh = release(&store, "never-recorded");
        assert!(file.record(&c3, &state_of(&c3, Some(&fresh))).unwrap());
        let on_disk: AgentState = store.read_state(STATE_NAME).unwrap().unwrap();
        assert_eq!(on_disk, state_of(&c3, None));
    }

    /// A flip's own record is written when nothing was recorded since its store, and never
    /// over a record made since (the controller's exact one).
    #[test]
    fn a_flips_own_record_never_replaces_a_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FsStore::open(dir.path()).unwrap());
        let active: Active = Arc::new(ArcSwapOption::empty());
        let file = Arc::new(StateFile::new(store.clone(), active.clone()));
        let (a, b) = (release(&store, "a"), release(&store, "b"));
        active.store(Some(a.clone()));
        assert!(file.record(&a, &state_of(&a, None)).unwrap());
        let provisional = |previous| Provisional {
            file: file.clone(),
            state: state_of(&b, previous),
        };
        // The flip to B: its own record first, then the controller's.
        active.store(Some(b.clone()));
        assert!(provisional(None).record(&b).unwrap());
        assert!(file.record(&b, &state_of(&b, Some(&a))).unwrap());
        let on_disk: AgentState = store.read_state(STATE_NAME).unwrap().unwrap();
        assert_eq!(on_disk, state_of(&b, Some(&a)));
        // The controller's first (the recorder thread was slow): the flip's own is dropped.
        assert!(!provisional(None).record(&b).unwrap());
        let on_disk: AgentState = store.read_state(STATE_NAME).unwrap().unwrap();
        assert_eq!(on_disk, state_of(&b, Some(&a)));
    }
}
