//! The agent's persisted state (`<store>/agent.json`): the release it serves and the one
//! before it. Written atomically after every flip, read at start so that a restarted agent
//! serves its release from disk before it talks to the hub.

use serde::{Deserialize, Serialize};

use crate::sync::changeset::Applied;
use crate::sync::manifest::ReleaseId;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::manifest::Hash;
    use crate::sync::store::FsStore;

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
}
