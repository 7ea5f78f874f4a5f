//! The agent's persisted state (`<store>/agent.json`): the release it serves and the one
//! before it. Written atomically after every activation, read at start so that a restarted
//! agent serves its release from disk before it talks to the hub.
//!
//! [`StateFile`] is its one writer. A scheduled flip records itself from the flip thread, right
//! after the store and before the controller hears of it, so that an agent killed in the
//! moment after a flip comes back on the release it flipped to (it used to come back on the
//! one before until the hub's schedule flipped it again, or for as long as the hub was out of
//! reach). A record names the release it is for, and is written only while that release is
//! the one served: the controller's record of the same flip, or a late one of an older
//! activation (queued behind other disk work), can never put back the release before it.

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
    /// Held from the look at the served release to the end of the write.
    writing: Mutex<()>,
}

impl StateFile {
    /// The writer of `store`'s state file, for the releases `active` serves.
    pub fn new(store: Arc<FsStore>, active: Active) -> StateFile {
        StateFile {
            store,
            active,
            writing: Mutex::new(()),
        }
    }

    /// Records `state` for `release`, unless another release is served by now (its own
    /// record is then on its way, made after its store). Whether it was written. Blocking.
    pub fn record(&self, release: &Release, state: &AgentState) -> Result<bool, String> {
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let served = self.active.load().as_ref().map(|r| r.id());
        if served != Some(release.id()) || state.active != served {
            return Ok(false);
        }
        if !self.store.has_release(&release.id()) {
            // Built here from changesets: the manifest goes first, so that a restart can load
            // the release the state names.
            self.store
                .write_release(&release.id(), &release.manifest().to_json())
                .map_err(|e| format!("cannot store the release's manifest: {e}"))?;
        }
        self.store
            .write_state(STATE_NAME, state)
            .map_err(|e| format!("cannot record the active release: {e}"))?;
        Ok(true)
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
}
