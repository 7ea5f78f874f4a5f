//! The ledger of uploads not yet named by a release: blobs a publisher or an agent stored
//! that no commit and no applied changeset has named yet. Until one does, they are garbage
//! the collector takes after `gc_grace`; the ledger bounds how much of it there may be, in
//! bytes ([`sync.upload_quota`](crate::config::sync::Sync::upload_quota)) and in blobs
//! ([`MAX_PENDING_BLOBS`]), so that a party with upload rights (or a buggy publisher looping)
//! cannot fill the disk within one grace period.
//!
//! Pure: the hub passes in the time and the sizes; kept in memory (a restart forgets what is
//! pending, and the collector still takes it).

use std::collections::HashMap;

use crate::sync::manifest::Hash;

/// Most blobs pending at once (the ledger's memory: about 64 bytes each).
pub const MAX_PENDING_BLOBS: usize = 1_000_000;

/// Uploads not yet named by a release, with their sizes and when they came.
#[derive(Debug, Default)]
pub struct Uploads {
    pending: HashMap<Hash, (u64, u64)>,
    bytes: u64,
}

impl Uploads {
    /// Why an upload of `len` more bytes may not be stored under `quota`, if it may not.
    pub fn admit(&self, len: u64, quota: u64) -> Result<(), String> {
        if self.pending.len() >= MAX_PENDING_BLOBS {
            return Err(format!(
                "{} uploaded blobs wait for a commit or a changeset to name them: commit, or let the collector take them after sync.gc_grace",
                self.pending.len()
            ));
        }
        if self.bytes.saturating_add(len) > quota {
            return Err(format!(
                "uploads not yet named by a release hold {} bytes and this one is {len} more, over sync.upload_quota ({quota} bytes): commit what was uploaded, raise the quota, or let the collector take them after sync.gc_grace",
                self.bytes
            ));
        }
        Ok(())
    }

    /// A blob of `len` bytes was stored at `now_us` (no-op when already pending).
    pub fn add(&mut self, hash: Hash, len: u64, now_us: u64) {
        if self.pending.insert(hash, (len, now_us)).is_none() {
            self.bytes += len;
        } else if let Some(old) = self.pending.get_mut(&hash) {
            old.1 = now_us;
        }
    }

    /// These blobs are named by a release or an applied changeset: no longer pending.
    pub fn named<'a>(&mut self, hashes: impl IntoIterator<Item = &'a Hash>) {
        for h in hashes {
            if let Some((len, _)) = self.pending.remove(h) {
                self.bytes -= len;
            }
        }
    }

    /// Forgets uploads older than `cutoff_us`: the collector removes them (or a release
    /// named them meanwhile).
    pub fn expire(&mut self, cutoff_us: u64) {
        let bytes = &mut self.bytes;
        self.pending.retain(|_, (len, at)| {
            let keep = *at >= cutoff_us;
            if !keep {
                *bytes -= *len;
            }
            keep
        });
    }

    /// Bytes pending.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Blobs pending.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing is pending.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> Hash {
        Hash::of(&[n])
    }

    #[test]
    fn admits_within_the_quota_and_frees_what_a_release_names() {
        let mut u = Uploads::default();
        assert!(u.admit(60, 100).is_ok());
        u.add(h(1), 60, 10);
        assert!(u.admit(40, 100).is_ok());
        let e = u.admit(41, 100).unwrap_err();
        assert!(e.contains("sync.upload_quota"), "{e}");
        u.add(h(1), 60, 20);
        assert_eq!(u.bytes(), 60, "the same blob twice counts once");
        u.named([&h(1), &h(2)]);
        assert_eq!((u.bytes(), u.len()), (0, 0));
        assert!(u.admit(100, 100).is_ok());
    }

    #[test]
    fn expiry_forgets_what_the_collector_takes() {
        let mut u = Uploads::default();
        u.add(h(1), 10, 100);
        u.add(h(2), 20, 200);
        u.expire(150);
        assert_eq!((u.bytes(), u.len()), (20, 1));
        u.expire(1_000);
        assert!(u.is_empty());
        assert_eq!(u.bytes(), 0);
    }
}
