//! The outbox: this agent's changesets not yet delivered to the hub, one fsynced file each
//! (`outbox/<seq>.json`, zero-padded, so names sort oldest first). The local-edit thread writes
//! it, the forwarder drains it, and a store collection keeps every blob it names.

use std::collections::HashSet;
use std::path::PathBuf;

use crate::sync::changeset::Changeset;
use crate::sync::manifest::Hash;
use crate::sync::store::FsStore;

/// The outbox directory's name in the store.
pub const OUTBOX: &str = "outbox";

/// The outbox directory of `store`.
pub fn outbox_dir(store: &FsStore) -> PathBuf {
    store.root().join(OUTBOX)
}

/// The changesets waiting in the outbox, oldest first (their file names are zero-padded
/// sequence numbers). Blocking.
pub fn outbox_files(store: &FsStore) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(outbox_dir(store))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// The blobs the changesets waiting in the outbox name: a store collection must keep them
/// however long the hub stays away. Blocking.
pub fn outbox_blobs(store: &FsStore) -> HashSet<Hash> {
    outbox_files(store)
        .into_iter()
        .filter_map(|p| std::fs::read(p).ok())
        .filter_map(|b| serde_json::from_slice::<Changeset>(&b).ok())
        .flat_map(|cs| {
            cs.changes
                .into_values()
                .filter_map(|c| c.entry.map(|e| e.hash))
                .collect::<Vec<_>>()
        })
        .collect()
}
