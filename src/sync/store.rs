//! Content-addressed storage on disk, for the hub and for each agent.
//!
//! ```text
//! <root>/blobs/ab/abcdef…   a file's bytes, named by their blake3 hash
//! <root>/releases/<id>.json a manifest, named by its hash (the release id)
//! <root>/<state>.json       the hub's cycle state or the agent's active/previous releases
//! <root>/tmp/               files being written
//! ```
//!
//! Every write goes to `tmp/`, is fsynced, renamed into place and the directory fsynced, so a
//! crash at any point leaves either the old file or the whole new one — never a torn one — and a
//! name in `blobs/` or `releases/` always holds exactly the bytes its hash names (they are
//! checked before they are written). State is written last and only names what is already
//! stored. The hub reaches its store through [`HubStore`], the seam where a distributed store
//! (etcd's transactions give the same compare-and-swap) can come later.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::cycle::HubState;
use super::manifest::{Hash, ReleaseId};

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The file system refused (a full disk shows here as "No space left on device").
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// A state file that does not parse.
    #[error("{path} is corrupt ({reason}); move it away to start from an empty state")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        reason: String,
    },
    /// Bytes that do not hash to the name they were to be stored under.
    #[error("content does not match its hash {0}")]
    HashMismatch(Hash),
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The hub's storage: blobs, manifests and the cycle state with a compare-and-swap.
pub trait HubStore: Send + Sync + 'static {
    /// Whether the blob is stored.
    fn has_blob(&self, hash: &Hash) -> Result<bool, StoreError>;
    /// The blob's bytes.
    fn get_blob(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError>;
    /// A stored blob's length, `None` if absent.
    fn blob_len(&self, hash: &Hash) -> Result<Option<u64>, StoreError>;
    /// Stores a blob; refuses bytes that do not hash to `hash`.
    fn put_blob(&self, hash: &Hash, data: &[u8]) -> Result<(), StoreError>;
    /// A manifest's canonical bytes.
    fn get_release(&self, id: &ReleaseId) -> Result<Option<Vec<u8>>, StoreError>;
    /// Stores a manifest; refuses bytes that do not hash to `id`.
    fn put_release(&self, id: &ReleaseId, manifest: &[u8]) -> Result<(), StoreError>;
    /// The current state (the default when none was ever written).
    fn state(&self) -> Result<HubState, StoreError>;
    /// Replaces the state with `new` if its version is still `expected`; false if another
    /// writer got there first.
    fn swap_state(&self, expected: u64, new: &HubState) -> Result<bool, StoreError>;
}

/// A store in a directory.
pub struct FsStore {
    root: PathBuf,
    tmp_seq: AtomicU64,
    /// Serialises state swaps (one process owns a store directory).
    state_lock: Mutex<()>,
}

const HUB_STATE: &str = "state";

impl FsStore {
    /// Opens (creating) a store under `root` and clears what an interrupted write left in
    /// `tmp/`.
    pub fn open(root: &Path) -> Result<FsStore, StoreError> {
        for sub in ["blobs", "releases", "tmp"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        }
        let tmp = root.join("tmp");
        if let Ok(entries) = fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(FsStore {
            root: root.to_path_buf(),
            tmp_seq: AtomicU64::new(0),
            state_lock: Mutex::new(()),
        })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob lives.
    pub fn blob_path(&self, hash: &Hash) -> PathBuf {
        let hex = hash.to_hex();
        self.root.join("blobs").join(&hex[..2]).join(hex)
    }

    fn release_path(&self, id: &ReleaseId) -> PathBuf {
        self.root.join("releases").join(format!("{id}.json"))
    }

    /// Writes `data` to `dest` atomically: tmp file, fsync, rename, fsync of the directory.
    pub fn write_atomic(&self, dest: &Path, data: &[u8]) -> Result<(), StoreError> {
        let tmp = self.root.join("tmp").join(format!(
            "{}.{}",
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut f = File::create(&tmp).map_err(io_err("cannot create", &tmp))?;
            f.write_all(data).map_err(io_err("cannot write", &tmp))?;
            f.sync_all().map_err(io_err("cannot sync", &tmp))?;
            let dir = dest.parent().unwrap_or(&self.root);
            if !dir.is_dir() {
                fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
                // The new directory's entry must be durable too, or a crash could lose it
                // while state written later names what it holds.
                let parent = dir.parent().unwrap_or(&self.root);
                File::open(parent)
                    .and_then(|d| d.sync_all())
                    .map_err(io_err("cannot sync", parent))?;
            }
            fs::rename(&tmp, dest).map_err(io_err("cannot rename into", dest))?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("cannot sync", dir))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Whether the blob is stored (a name in `blobs/` is only ever a whole, verified blob).
    pub fn has_blob(&self, hash: &Hash) -> bool {
        self.blob_path(hash).is_file()
    }

    /// The blob's bytes, `None` if absent.
    pub fn read_blob(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        read_optional(&self.blob_path(hash))
    }

    /// Stores a blob after checking its hash; a blob already stored is left alone.
    pub fn write_blob(&self, hash: &Hash, data: &[u8]) -> Result<(), StoreError> {
        if Hash::of(data) != *hash {
            return Err(StoreError::HashMismatch(*hash));
        }
        if self.has_blob(hash) {
            return Ok(());
        }
        self.write_atomic(&self.blob_path(hash), data)
    }

    /// A manifest's bytes, `None` if absent.
    pub fn read_release(&self, id: &ReleaseId) -> Result<Option<Vec<u8>>, StoreError> {
        read_optional(&self.release_path(id))
    }

    /// Stores a manifest after checking it hashes to `id`.
    pub fn write_release(&self, id: &ReleaseId, manifest: &[u8]) -> Result<(), StoreError> {
        if Hash::of(manifest) != *id {
            return Err(StoreError::HashMismatch(*id));
        }
        let path = self.release_path(id);
        if path.is_file() {
            return Ok(());
        }
        self.write_atomic(&path, manifest)
    }

    /// Reads `<name>.json`, `None` if it was never written.
    pub fn read_state<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let path = self.root.join(format!("{name}.json"));
        match read_optional(&path)? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt {
                        path,
                        reason: e.to_string(),
                    })
            }
        }
    }

    /// Writes `<name>.json` atomically.
    pub fn write_state<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StoreError> {
        let path = self.root.join(format!("{name}.json"));
        // Plain structs of ids and numbers always serialise.
        let bytes = serde_json::to_vec_pretty(value).expect("state serialises");
        self.write_atomic(&path, &bytes)
    }
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("cannot read", path)(e)),
    }
}

impl HubStore for FsStore {
    fn has_blob(&self, hash: &Hash) -> Result<bool, StoreError> {
        Ok(FsStore::has_blob(self, hash))
    }
    fn get_blob(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        self.read_blob(hash)
    }
    fn blob_len(&self, hash: &Hash) -> Result<Option<u64>, StoreError> {
        let path = self.blob_path(hash);
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("cannot stat", &path)(e)),
        }
    }
    fn put_blob(&self, hash: &Hash, data: &[u8]) -> Result<(), StoreError> {
        self.write_blob(hash, data)
    }
    fn get_release(&self, id: &ReleaseId) -> Result<Option<Vec<u8>>, StoreError> {
        self.read_release(id)
    }
    fn put_release(&self, id: &ReleaseId, manifest: &[u8]) -> Result<(), StoreError> {
        self.write_release(id, manifest)
    }
    fn state(&self) -> Result<HubState, StoreError> {
        Ok(self.read_state(HUB_STATE)?.unwrap_or_default())
    }
    fn swap_state(&self, expected: u64, new: &HubState) -> Result<bool, StoreError> {
        // A poisoned lock only means another swap panicked; the file is still whole.
        let _guard = self.state_lock.lock().unwrap_or_else(|p| p.into_inner());
        if HubStore::state(self)?.version != expected {
            return Ok(false);
        }
        self.write_state(HUB_STATE, new)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_and_releases_are_checked_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let h = Hash::of(b"hello");
        assert!(matches!(
            store.write_blob(&h, b"HELLO"),
            Err(StoreError::HashMismatch(_))
        ));
        assert!(!store.has_blob(&h));
        store.write_blob(&h, b"hello").unwrap();
        std::fs::write(dir.path().join("tmp/leftover"), b"x").unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        assert_eq!(store.read_blob(&h).unwrap().unwrap(), b"hello");
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert!(store.read_release(&h).unwrap().is_none());
        assert!(store.write_release(&h, b"not it").is_err());
    }

    #[test]
    fn state_swaps_only_from_the_expected_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let s0 = HubStore::state(&store).unwrap();
        let s1 = HubState {
            version: 1,
            cycle: 3,
            ..HubState::default()
        };
        assert!(store.swap_state(0, &s1).unwrap());
        assert!(!store.swap_state(0, &s1).unwrap());
        assert_eq!(HubStore::state(&store).unwrap(), s1);
        assert_ne!(s0, s1);
        std::fs::write(dir.path().join("state.json"), b"{torn").unwrap();
        assert!(matches!(
            HubStore::state(&store),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
