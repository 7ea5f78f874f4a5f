//! The outbox: this agent's changesets not yet delivered to the hub, one fsynced file each
//! (`outbox/<seq>.json`, zero-padded, so names sort oldest first). The local-edit thread writes
//! it, the forwarder drains it, and a store collection keeps every blob it names.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// Most changesets waiting in the outbox. Past it (the hub away for long, edits going on),
/// new edits wait on disk, undetected, until the hub takes the waiting ones.
pub const MAX_ENTRIES: u64 = 10_000;
/// Most bytes of content the waiting changesets name: the store keeps those blobs however
/// long the hub stays away.
pub const MAX_BYTES: u64 = 4 << 30;
/// Most changesets kept in `outbox/refused/` for the operator; the oldest go first.
pub const MAX_REFUSED: usize = 1_000;

/// The outbox's size, kept by the writer (the local-edit thread) and the drainer (the
/// forwarder); counted once from disk at start.
#[derive(Debug, Default)]
pub struct Usage {
    entries: AtomicU64,
    bytes: AtomicU64,
}

impl Usage {
    /// The outbox of `store` as it is on disk. Blocking.
    pub fn scan(store: &FsStore) -> Usage {
        let usage = Usage::default();
        for cs in outbox_files(store)
            .into_iter()
            .filter_map(|p| std::fs::read(p).ok())
            .filter_map(|b| serde_json::from_slice::<Changeset>(&b).ok())
        {
            usage.add(&cs);
        }
        usage
    }

    /// `cs` was written to the outbox.
    pub fn add(&self, cs: &Changeset) {
        self.entries.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(content_bytes(cs), Ordering::Relaxed);
    }

    /// `cs` left the outbox (delivered, or set aside).
    pub fn remove(&self, cs: &Changeset) {
        let _ = self
            .entries
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
        let b = content_bytes(cs);
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(b))
            });
    }

    /// A usage of `entries` changesets naming `bytes` (tests).
    #[cfg(test)]
    pub fn set(&self, entries: u64, bytes: u64) {
        self.entries.store(entries, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
    }

    /// Why a changeset naming `bytes` more does not fit, if it does not.
    pub fn room_for(&self, bytes: u64) -> Result<(), String> {
        over_quota(
            self.entries.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
            bytes,
            MAX_ENTRIES,
            MAX_BYTES,
        )
    }
}

/// The content bytes a changeset names (each blob once).
pub fn content_bytes(cs: &Changeset) -> u64 {
    cs.blobs().iter().map(|(_, n)| n).sum()
}

/// Why one more changeset of `add` bytes does not fit beside `entries` changesets naming
/// `bytes` (pure).
pub fn over_quota(
    entries: u64,
    bytes: u64,
    add: u64,
    max_entries: u64,
    max_bytes: u64,
) -> Result<(), String> {
    if entries >= max_entries {
        return Err(format!(
            "the outbox holds {entries} changesets, its limit: the hub has not taken them; edits wait until it does"
        ));
    }
    if bytes.saturating_add(add) > max_bytes {
        return Err(format!(
            "the outbox's changesets name {bytes} bytes and this one {add} more, over its limit of {max_bytes}: the hub has not taken them; edits wait until it does"
        ));
    }
    Ok(())
}

/// Removes the oldest entries of `outbox/refused/` beyond `keep`; how many went. Blocking.
pub fn trim_refused(store: &FsStore, keep: usize) -> usize {
    let dir = outbox_dir(store).join("refused");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    if files.len() <= keep {
        return 0;
    }
    // Zero-padded sequence numbers: the name order is the age order.
    files.sort();
    let extra = files.len() - keep;
    files
        .iter()
        .take(extra)
        .filter(|p| std::fs::remove_file(p).is_ok())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_counts_entries_and_bytes() {
        assert!(over_quota(0, 0, 10, 2, 100).is_ok());
        assert!(over_quota(1, 90, 10, 2, 100).is_ok());
        let e = over_quota(2, 0, 0, 2, 100).unwrap_err();
        assert!(e.contains("2 changesets"), "{e}");
        let e = over_quota(1, 95, 10, 2, 100).unwrap_err();
        assert!(e.contains("over its limit of 100"), "{e}");
    }

    #[test]
    fn usage_follows_adds_and_removes_and_never_underflows() {
        use crate::sync::changeset::{Change, Mode};
        use crate::sync::manifest::Entry;
        let entry = Entry {
            hash: Hash::of(b"x"),
            size: 7,
            content_type: "text/plain".into(),
        };
        let cs = Changeset {
            origin: "a".into(),
            seq: 1,
            mode: Mode::Immediate,
            base: None,
            detected_us: 1,
            changes: [
                (
                    "x".to_string(),
                    Change {
                        entry: Some(entry.clone()),
                        prev: None,
                    },
                ),
                (
                    "y".to_string(),
                    Change {
                        entry: Some(entry),
                        prev: None,
                    },
                ),
            ]
            .into(),
        };
        let u = Usage::default();
        u.add(&cs);
        u.add(&cs);
        assert!(u.room_for(MAX_BYTES - 14).is_ok());
        assert!(u.room_for(MAX_BYTES - 13).is_err());
        u.remove(&cs);
        u.remove(&cs);
        u.remove(&cs);
        assert_eq!(u.entries.load(Ordering::Relaxed), 0);
        assert_eq!(u.bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn trimming_refused_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let refused = outbox_dir(&store).join("refused");
        std::fs::create_dir_all(&refused).unwrap();
        for seq in 1..=5u64 {
            std::fs::write(refused.join(format!("{seq:020}.json")), "{}").unwrap();
        }
        assert_eq!(trim_refused(&store, 3), 2);
        let mut left: Vec<String> = std::fs::read_dir(&refused)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                format!("{:020}.json", 3),
                format!("{:020}.json", 4),
                format!("{:020}.json", 5)
            ]
        );
        assert_eq!(trim_refused(&store, 3), 0);
    }
}
