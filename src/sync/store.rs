//! Content-addressed storage on disk, for the hub and for each agent.
//!
//! ```text
//! <root>/blobs/ab/abcdef…   a file's bytes, named by their blake3 hash
//! <root>/releases/<id>.json a manifest, named by its hash (the release id)
//! <root>/releases/<id>.sigs.json        the hub's: the publishers' signatures of the release
//! <root>/releases/<id>.provenance.json  the hub's: the changesets it built the release from
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
//!
//! A release's signatures and provenance live beside its manifest and go with it: the
//! collector removes them with the manifest (and any a crash left without one).
//!
//! Old content is collected by [`FsStore::collect`] (what may go is decided by [`super::gc`]).
//! Answering "stored" refreshes a file's modification time, under a lock the collector takes
//! to delete: a blob someone was just told not to upload or fetch is young again and stays.
#![allow(clippy::disallowed_methods)] // I/O shell: file ages for collection

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;

use super::cycle::HubState;
use super::gc::{self, GcError, Listing};
use super::manifest::{Hash, Manifest, ReleaseId};
use super::protocol::{ClusterView, SharedAcme, SharedDrain, SharedReport};
use super::provenance::Provenance;
use super::sign::Signature;

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
    /// A collection that could not be made safely.
    #[error(transparent)]
    Gc(#[from] GcError),
    /// Something to keep beside a release that is not stored.
    #[error("release {0} is not stored")]
    NoRelease(ReleaseId),
    /// The shared store (etcd, `sync.cluster`) did not answer, or refused.
    #[error("etcd: cannot {action}: {reason}")]
    Shared {
        /// What was being done.
        action: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// A value in the shared store that does not parse.
    #[error("etcd key {key} is corrupt ({reason})")]
    CorruptKey {
        /// The key.
        key: String,
        /// The parse error.
        reason: String,
    },
    /// Another process has the store open.
    #[error("the store {path} is in use by another process{}: one process per store (stop it, or give this one its own store)", holder.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Locked {
        /// The store's directory.
        path: PathBuf,
        /// The holder's pid, as it wrote it into the lock file.
        holder: Option<u32>,
    },
}

/// What one collection removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    /// Manifests removed.
    pub releases: usize,
    /// Blobs removed.
    pub blobs: usize,
    /// Bytes freed by the blobs.
    pub bytes: u64,
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
    /// A stored blob opened for reading, with its length.
    fn open_blob(&self, hash: &Hash) -> Result<Option<(File, u64)>, StoreError>;
    /// A blob to receive in pieces, at most `max` bytes (see [`FsStore::blob_sink`]).
    fn blob_sink(&self, max: u64) -> Result<BlobSink, StoreError>;
    /// Stores what `sink` received under `hash` if it hashes to it; true when new.
    fn adopt_blob(&self, sink: BlobSink, hash: &Hash) -> Result<bool, StoreError>;
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
    /// Removes manifests and blobs that `keep` does not need and that are older than `grace`
    /// (see [`gc`]), and with each manifest what is kept beside it.
    fn collect(&self, keep: &[ReleaseId], grace: Duration) -> Result<Collected, StoreError>;
    /// The publishers' signatures kept beside release `id` (none: empty).
    fn signatures(&self, id: &ReleaseId) -> Result<Vec<Signature>, StoreError>;
    /// Adds `sigs` to those kept beside the stored release `id` (one per key, the first
    /// kept); all of them after. Refused when the release is not stored.
    fn add_signatures(
        &self,
        id: &ReleaseId,
        sigs: &[Signature],
    ) -> Result<Vec<Signature>, StoreError>;
    /// The provenance kept beside release `id`, if the hub built it from changesets.
    fn provenance(&self, id: &ReleaseId) -> Result<Option<Provenance>, StoreError>;
    /// Keeps `p` beside the stored release `id`, unless it has one already (the first stays:
    /// either explains the release). Refused when the release is not stored.
    fn put_provenance(&self, id: &ReleaseId, p: &Provenance) -> Result<(), StoreError>;
    /// The state as every writer leaves it, for a store several hubs share (the hub follows
    /// it so its long polls see other hubs' changes); `None` when this process is the only
    /// writer.
    fn changes(&self) -> Option<watch::Receiver<HubState>> {
        None
    }
    /// Whether this hub does what must happen once among the hubs sharing the store (the
    /// hub's own advance of an overdue cycle, the collection of shared manifests): always
    /// for a store of one.
    fn leads(&self) -> bool {
        true
    }
    /// This hub's standing among the hubs sharing the store; `None` for a store of one.
    fn standing(&self) -> Option<ClusterView> {
        None
    }
    /// Passes an agent's report to the other hubs sharing the store (nothing for a store of
    /// one); a failure only delays their view until the agent's next report.
    fn share_report(&self, _report: &SharedReport) -> Result<(), StoreError> {
        Ok(())
    }
    /// The reports the hubs sharing the store received (this one's included), from now on;
    /// taken once, by the hub. `None` for a store of one.
    fn shared_reports(&self) -> Option<tokio::sync::mpsc::Receiver<SharedReport>> {
        None
    }
    /// Passes a backend drained or enabled on this appliance to the others (nothing for a
    /// store of one).
    fn share_drain(&self, _drain: &SharedDrain) -> Result<(), StoreError> {
        Ok(())
    }
    /// The drains shared by every appliance (this one's included): those in force, then each
    /// change; taken once, by the appliance. `None` for a store of one.
    fn shared_drains(&self) -> Option<tokio::sync::mpsc::Receiver<SharedDrain>> {
        None
    }
    /// Passes an ACME certificate or challenge answer to the other appliances (nothing for a
    /// store of one).
    fn share_acme(&self, _item: &SharedAcme) -> Result<(), StoreError> {
        Ok(())
    }
    /// Takes back an ACME challenge answer shared before (its order is over).
    fn unshare_acme(&self, _item: &SharedAcme) -> Result<(), StoreError> {
        Ok(())
    }
    /// What the appliances share of ACME (this one's included): what is there, then each
    /// change; taken once, by the ACME task. `None` for a store of one.
    fn shared_acme(&self) -> Option<tokio::sync::mpsc::Receiver<SharedAcme>> {
        None
    }
}

/// What the hub keeps beside a release's manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Beside {
    Signatures,
    Provenance,
}

impl Beside {
    const ALL: [Beside; 2] = [Beside::Signatures, Beside::Provenance];

    fn suffix(self) -> &'static str {
        match self {
            Beside::Signatures => ".sigs.json",
            Beside::Provenance => ".provenance.json",
        }
    }
}

/// A store in a directory.
pub struct FsStore {
    root: PathBuf,
    /// `<root>/lock`, exclusively locked (flock) for as long as this store is open: two
    /// processes on one store would break the compare-and-swap and wipe each other's `tmp/`.
    _lock: File,
    tmp_seq: AtomicU64,
    /// Serialises state swaps (one process owns a store directory).
    state_lock: Mutex<()>,
    /// Held (shared) while answering "stored" and refreshing the file's time; held alone by
    /// the collector while it re-checks a file's age and deletes it.
    gc_lock: RwLock<()>,
    /// Serialises the read-merge-write of what is kept beside a release.
    beside_lock: Mutex<()>,
}

const HUB_STATE: &str = "state";

/// Takes `<root>/lock` exclusively (without waiting) and writes this process's pid into it;
/// the lock ends when the file is closed, so a crashed holder leaves nothing to clean up.
fn lock(root: &Path) -> Result<File, StoreError> {
    let path = root.join("lock");
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err("cannot open", &path))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            return Err(StoreError::Locked {
                path: root.to_path_buf(),
                holder: text.trim().parse().ok(),
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(io_err("cannot lock", &path)(e)),
    }
    let pid = std::process::id().to_string();
    f.set_len(0)
        .and_then(|()| f.seek(io::SeekFrom::Start(0)).map(|_| ()))
        .and_then(|()| f.write_all(pid.as_bytes()))
        .map_err(io_err("cannot write", &path))?;
    Ok(f)
}

impl FsStore {
    /// Opens (creating) a store under `root` and clears what an interrupted write left in
    /// `tmp/`.
    pub fn open(root: &Path) -> Result<FsStore, StoreError> {
        fs::create_dir_all(root).map_err(io_err("cannot create", root))?;
        // Locked before anything is touched: `tmp/` below may be another process's.
        let lock = lock(root)?;
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
            _lock: lock,
            tmp_seq: AtomicU64::new(0),
            state_lock: Mutex::new(()),
            gc_lock: RwLock::new(()),
            beside_lock: Mutex::new(()),
        })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob lives.
    pub fn blob_path(&self, hash: &Hash) -> PathBuf {
        FsStore::blob_path_under(&self.root, hash)
    }

    /// Where a blob lives in the store under `root` (for looking at a store another process
    /// holds open, e.g. in tests, without opening it).
    pub fn blob_path_under(root: &Path, hash: &Hash) -> PathBuf {
        let hex = hash.to_hex();
        root.join("blobs").join(&hex[..2]).join(hex)
    }

    fn release_path(&self, id: &ReleaseId) -> PathBuf {
        self.root.join("releases").join(format!("{id}.json"))
    }

    fn beside_path(&self, id: &ReleaseId, what: Beside) -> PathBuf {
        self.root
            .join("releases")
            .join(format!("{id}{}", what.suffix()))
    }

    /// What is kept beside release `id`, parsed; `None` if nothing is.
    fn read_beside<T: DeserializeOwned>(
        &self,
        id: &ReleaseId,
        what: Beside,
    ) -> Result<Option<T>, StoreError> {
        let path = self.beside_path(id, what);
        let Some(bytes) = read_optional(&path)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path,
                reason: e.to_string(),
            })
    }

    /// Writes what is kept beside release `id` as `update` makes it from what is there, while
    /// the release is stored (checked, and its time refreshed, under the collector's shared
    /// lock: it cannot be collected in between).
    fn update_beside<T: DeserializeOwned + Serialize>(
        &self,
        id: &ReleaseId,
        what: Beside,
        update: impl FnOnce(Option<T>) -> Option<T>,
    ) -> Result<Option<T>, StoreError> {
        let _one = self.beside_lock.lock().unwrap_or_else(|p| p.into_inner());
        let _shared = self.gc_lock.read().unwrap_or_else(|p| p.into_inner());
        let release = self.release_path(id);
        if !fs::metadata(&release).is_ok_and(|m| m.is_file()) {
            return Err(StoreError::NoRelease(*id));
        }
        let _ = File::open(&release).and_then(|f| f.set_modified(SystemTime::now()));
        let current = self.read_beside(id, what)?;
        let Some(next) = update(current) else {
            return Ok(None);
        };
        // Plain structs of ids, keys and strings always serialise.
        let bytes = serde_json::to_vec_pretty(&next).expect("serialises");
        self.write_atomic(&self.beside_path(id, what), &bytes)?;
        Ok(Some(next))
    }

    /// Removes what is kept beside releases whose manifest is gone (a crash between the two
    /// removals); under the collector's lock.
    fn collect_orphans(&self) -> Result<(), StoreError> {
        let releases = self.root.join("releases");
        for e in fs::read_dir(&releases)
            .map_err(io_err("cannot list", &releases))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = Beside::ALL.iter().find_map(|w| {
                name.strip_suffix(w.suffix())
                    .and_then(|h| h.parse::<ReleaseId>().ok())
            }) else {
                continue;
            };
            let _alone = self.gc_lock.write().unwrap_or_else(|p| p.into_inner());
            if !self.release_path(&id).exists() {
                match fs::remove_file(e.path()) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => return Err(io_err("cannot remove", &e.path())(err)),
                }
            }
        }
        Ok(())
    }

    /// A fresh name in `tmp/`.
    fn tmp_path(&self) -> PathBuf {
        self.root.join("tmp").join(format!(
            "{}.{}",
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Writes `data` to `dest` atomically: tmp file, fsync, rename, fsync of the directory.
    pub fn write_atomic(&self, dest: &Path, data: &[u8]) -> Result<(), StoreError> {
        let tmp = self.tmp_path();
        let result = (|| {
            let mut f = File::create(&tmp).map_err(io_err("cannot create", &tmp))?;
            f.write_all(data).map_err(io_err("cannot write", &tmp))?;
            self.install(&f, &tmp, dest)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Makes the written temporary file `tmp` (open as `f`) durable and renames it to `dest`,
    /// then makes the rename durable.
    fn install(&self, f: &File, tmp: &Path, dest: &Path) -> Result<(), StoreError> {
        f.sync_all().map_err(io_err("cannot sync", tmp))?;
        {
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
            fs::rename(tmp, dest).map_err(io_err("cannot rename into", dest))?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("cannot sync", dir))
        }
    }

    /// A blob to be received in pieces (at most `max` bytes): written to a temporary file
    /// and hashed on the way, so memory per transfer is the caller's buffer, whatever the
    /// blob's size. Nothing is stored until [`FsStore::adopt_blob`] checks the hash.
    pub fn blob_sink(&self, max: u64) -> Result<BlobSink, StoreError> {
        let tmp = self.tmp_path();
        let file = File::create(&tmp).map_err(io_err("cannot create", &tmp))?;
        Ok(BlobSink {
            tmp,
            file,
            hasher: blake3::Hasher::new(),
            len: 0,
            max,
        })
    }

    /// Stores the blob `sink` received under `hash` if its bytes hash to it (else
    /// [`StoreError::HashMismatch`], and the bytes are dropped). True when it was not stored
    /// before.
    pub fn adopt_blob(&self, mut sink: BlobSink, hash: &Hash) -> Result<bool, StoreError> {
        if Hash::from_hasher(&sink.hasher) != *hash {
            return Err(StoreError::HashMismatch(*hash));
        }
        if self.has_blob(hash) {
            return Ok(false);
        }
        sink.file
            .flush()
            .map_err(io_err("cannot write", &sink.tmp))?;
        self.install(&sink.file, &sink.tmp, &self.blob_path(hash))?;
        // Renamed away: nothing left for the drop to remove.
        sink.tmp = PathBuf::new();
        Ok(true)
    }

    /// A stored blob opened for reading, with its length (its time refreshed, as
    /// [`FsStore::has_blob`]); `None` if absent. An open blob stays readable even if a
    /// collection removes its name meanwhile.
    pub fn open_blob(&self, hash: &Hash) -> Result<Option<(File, u64)>, StoreError> {
        let path = self.blob_path(hash);
        if self.present(&path).is_none() {
            return Ok(None);
        }
        match File::open(&path) {
            Ok(f) => {
                let len = f.metadata().map_err(io_err("cannot read", &path))?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("cannot open", &path)(e)),
        }
    }

    /// Whether the blob is stored (a name in `blobs/` is only ever a whole, verified blob).
    /// A stored blob counts as just used: the collector leaves it alone for its grace period.
    pub fn has_blob(&self, hash: &Hash) -> bool {
        self.present(&self.blob_path(hash)).is_some()
    }

    /// The length of a stored file, refreshing its modification time (see [`FsStore::collect`]).
    fn present(&self, path: &Path) -> Option<u64> {
        let _shared = self.gc_lock.read().unwrap_or_else(|p| p.into_inner());
        let meta = fs::metadata(path).ok().filter(|m| m.is_file())?;
        // Best effort: a file whose time cannot be set is still there.
        let _ = File::open(path).and_then(|f| f.set_modified(SystemTime::now()));
        Some(meta.len())
    }

    /// What the store holds, with each file's age (names that are not hashes are ignored).
    pub fn list(&self) -> Result<Listing, StoreError> {
        let mut listing = Listing::default();
        let releases = self.root.join("releases");
        for e in fs::read_dir(&releases)
            .map_err(io_err("cannot list", &releases))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let (Some(id), Ok(m)) = (
                name.strip_suffix(".json").and_then(|h| h.parse().ok()),
                e.metadata(),
            ) else {
                continue;
            };
            listing.releases.push((id, age(&m)));
        }
        let blobs = self.root.join("blobs");
        for dir in fs::read_dir(&blobs)
            .map_err(io_err("cannot list", &blobs))?
            .flatten()
        {
            let Ok(entries) = fs::read_dir(dir.path()) else {
                continue;
            };
            for e in entries.flatten() {
                let (Ok(hash), Ok(m)) = (
                    e.file_name().to_string_lossy().parse::<Hash>(),
                    e.metadata(),
                ) else {
                    continue;
                };
                if m.is_file() {
                    listing.blobs.push((hash, age(&m)));
                }
            }
        }
        Ok(listing)
    }

    /// Removes the manifests and blobs that the releases in `keep` do not need, that are not
    /// `pinned` and that are older than `grace`; every file's age is checked again, under the
    /// lock [`FsStore::has_blob`] takes, right before it is deleted.
    pub fn collect(
        &self,
        keep: &[ReleaseId],
        pinned: &HashSet<Hash>,
        grace: Duration,
    ) -> Result<Collected, StoreError> {
        let listing = self.list()?;
        let manifests: Vec<(ReleaseId, Option<Manifest>)> =
            gc::manifests_to_read(keep, &listing, grace)
                .into_iter()
                .map(|id| {
                    let m = self
                        .read_release(&id)
                        .ok()
                        .flatten()
                        .and_then(|b| Manifest::from_json(&b).ok());
                    (id, m)
                })
                .collect();
        let plan = gc::plan(keep, &listing, &manifests, pinned, grace)?;
        let mut done = Collected::default();
        let paths = plan
            .releases
            .iter()
            .map(|id| (self.release_path(id), Some(id)))
            .chain(plan.blobs.iter().map(|h| (self.blob_path(h), None)));
        for (path, release) in paths {
            let is_blob = release.is_none();
            let _alone = self.gc_lock.write().unwrap_or_else(|p| p.into_inner());
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            if age(&meta) < grace {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) if is_blob => {
                    done.blobs += 1;
                    done.bytes += meta.len();
                }
                Ok(()) => done.releases += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("cannot remove", &path)(e)),
            }
            if let Some(id) = release {
                // What was kept beside the manifest goes with it (still under the lock).
                for what in Beside::ALL {
                    let p = self.beside_path(id, what);
                    match fs::remove_file(&p) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io_err("cannot remove", &p)(e)),
                    }
                }
            }
        }
        self.collect_orphans()?;
        Ok(done)
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

    /// Whether the manifest is stored (refreshing its time, as [`FsStore::has_blob`]).
    pub fn has_release(&self, id: &ReleaseId) -> bool {
        self.present(&self.release_path(id)).is_some()
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
        if self.present(&path).is_some() {
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

/// Sets a file's modification time `ago` in the past (tests of collection).
#[cfg(test)]
pub(crate) fn age_file(path: &Path, ago: Duration) {
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(SystemTime::now() - ago)
        .unwrap();
}

/// How long ago a file was last modified (zero for a time in the future).
fn age(m: &fs::Metadata) -> Duration {
    m.modified()
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or(Duration::ZERO)
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("cannot read", path)(e)),
    }
}

/// A blob being received into the store (see [`FsStore::blob_sink`]): `Write` appends to a
/// temporary file and to the hash; a write past the limit fails with
/// `io::ErrorKind::FileTooLarge`. Dropped without being adopted, the file is removed.
#[derive(Debug)]
pub struct BlobSink {
    tmp: PathBuf,
    file: File,
    hasher: blake3::Hasher,
    len: u64,
    max: u64,
}

impl BlobSink {
    /// Bytes received so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was received.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The hash of what was received so far.
    pub fn hash(&self) -> Hash {
        Hash::from_hasher(&self.hasher)
    }
}

impl Write for BlobSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.len + buf.len() as u64 > self.max {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("larger than {} bytes", self.max),
            ));
        }
        self.file.write_all(buf)?;
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Drop for BlobSink {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

impl HubStore for FsStore {
    fn has_blob(&self, hash: &Hash) -> Result<bool, StoreError> {
        Ok(FsStore::has_blob(self, hash))
    }
    fn open_blob(&self, hash: &Hash) -> Result<Option<(File, u64)>, StoreError> {
        FsStore::open_blob(self, hash)
    }
    fn blob_sink(&self, max: u64) -> Result<BlobSink, StoreError> {
        FsStore::blob_sink(self, max)
    }
    fn adopt_blob(&self, sink: BlobSink, hash: &Hash) -> Result<bool, StoreError> {
        FsStore::adopt_blob(self, sink, hash)
    }
    fn blob_len(&self, hash: &Hash) -> Result<Option<u64>, StoreError> {
        Ok(self.present(&self.blob_path(hash)))
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
    fn collect(&self, keep: &[ReleaseId], grace: Duration) -> Result<Collected, StoreError> {
        FsStore::collect(self, keep, &HashSet::new(), grace)
    }
    fn signatures(&self, id: &ReleaseId) -> Result<Vec<Signature>, StoreError> {
        Ok(self
            .read_beside(id, Beside::Signatures)?
            .unwrap_or_default())
    }
    fn add_signatures(
        &self,
        id: &ReleaseId,
        sigs: &[Signature],
    ) -> Result<Vec<Signature>, StoreError> {
        let mut all = Vec::new();
        self.update_beside(id, Beside::Signatures, |stored: Option<Vec<Signature>>| {
            all = stored.unwrap_or_default();
            let before = all.len();
            for s in sigs {
                if !all.iter().any(|k| k.key == s.key) {
                    all.push(*s);
                }
            }
            (all.len() > before).then(|| all.clone())
        })?;
        Ok(all)
    }
    fn provenance(&self, id: &ReleaseId) -> Result<Option<Provenance>, StoreError> {
        self.read_beside(id, Beside::Provenance)
    }
    fn put_provenance(&self, id: &ReleaseId, p: &Provenance) -> Result<(), StoreError> {
        self.update_beside(id, Beside::Provenance, |stored: Option<Provenance>| {
            stored.is_none().then(|| p.clone())
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_opens_once_at_a_time_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = FsStore::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("tmp/in-flight"), b"x").unwrap();
        match FsStore::open(dir.path()) {
            Err(
                e @ StoreError::Locked {
                    holder: Some(pid), ..
                },
            ) => {
                assert_eq!(pid, std::process::id());
                assert!(e.to_string().contains("in use by another process"), "{e}");
            }
            other => panic!("a second open must be refused, got {:?}", other.map(|_| ())),
        }
        // The refused open touched nothing of the holder's.
        assert!(dir.path().join("tmp/in-flight").exists());
        drop(first);
        FsStore::open(dir.path()).expect("free again once the holder closed it");
    }

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
        drop(store);
        let store = FsStore::open(dir.path()).unwrap();
        assert_eq!(store.read_blob(&h).unwrap().unwrap(), b"hello");
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert!(store.read_release(&h).unwrap().is_none());
        assert!(store.write_release(&h, b"not it").is_err());
    }

    fn stored_release(store: &FsStore, files: &[&[u8]]) -> ReleaseId {
        let m: std::collections::BTreeMap<String, crate::sync::manifest::Entry> = files
            .iter()
            .enumerate()
            .map(|(i, d)| {
                store.write_blob(&Hash::of(d), d).unwrap();
                let e = crate::sync::manifest::Entry {
                    hash: Hash::of(d),
                    size: d.len() as u64,
                    content_type: "text/plain".into(),
                };
                (format!("f{i}"), e)
            })
            .collect();
        let m = Manifest::new(m).unwrap();
        store.write_release(&m.id(), &m.to_json()).unwrap();
        m.id()
    }

    #[test]
    fn collect_removes_old_unneeded_content_and_spares_what_was_just_used() {
        const HOUR: Duration = Duration::from_secs(3600);
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let keep = stored_release(&store, &[b"shared", b"kept"]);
        let gone = stored_release(&store, &[b"shared", b"gone", b"asked-for"]);
        for p in [
            store.release_path(&keep),
            store.release_path(&gone),
            store.blob_path(&Hash::of(b"shared")),
            store.blob_path(&Hash::of(b"kept")),
            store.blob_path(&Hash::of(b"gone")),
            store.blob_path(&Hash::of(b"asked-for")),
        ] {
            age_file(&p, 2 * HOUR);
        }
        // A publisher is told this old blob is stored: it must outlive the collection.
        assert!(store.has_blob(&Hash::of(b"asked-for")));
        store.write_blob(&Hash::of(b"fresh"), b"fresh").unwrap();

        let done = store.collect(&[keep], &HashSet::new(), HOUR).unwrap();
        assert_eq!(
            done,
            Collected {
                releases: 1,
                blobs: 1,
                bytes: 4
            }
        );
        assert!(store.read_release(&gone).unwrap().is_none());
        assert!(!store.blob_path(&Hash::of(b"gone")).exists());
        for kept in [&b"shared"[..], b"kept", b"asked-for", b"fresh"] {
            assert!(store.blob_path(&Hash::of(kept)).exists(), "{kept:?}");
        }
        assert!(store.read_release(&keep).unwrap().is_some());

        // A named release whose manifest is gone: nothing is collected on a guess.
        std::fs::remove_file(store.release_path(&keep)).unwrap();
        age_file(&store.blob_path(&Hash::of(b"fresh")), 2 * HOUR);
        assert!(matches!(
            store.collect(&[keep], &HashSet::new(), HOUR),
            Err(StoreError::Gc(GcError::MissingManifest(_)))
        ));
        assert!(store.blob_path(&Hash::of(b"fresh")).exists());
    }

    #[test]
    fn signatures_and_provenance_live_beside_their_release_and_go_with_it() {
        use crate::sync::provenance::Provenance;
        use crate::sync::sign::SecretKey;
        const HOUR: Duration = Duration::from_secs(3600);
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let rng = ring::rand::SystemRandom::new();
        let (a, b) = (
            SecretKey::generate(&rng).unwrap().0,
            SecretKey::generate(&rng).unwrap().0,
        );
        let unknown = Hash::of(b"never stored");
        assert!(matches!(
            store.add_signatures(&unknown, &[a.sign_release(&unknown)]),
            Err(StoreError::NoRelease(_))
        ));
        let kept = stored_release(&store, &[b"kept"]);
        let gone = stored_release(&store, &[b"gone"]);
        assert!(HubStore::signatures(&store, &kept).unwrap().is_empty());
        let sa = a.sign_release(&kept);
        assert_eq!(store.add_signatures(&kept, &[sa]).unwrap(), vec![sa]);
        // One per key; another key's is added.
        let sb = b.sign_release(&kept);
        assert_eq!(
            store.add_signatures(&kept, &[sa, sb]).unwrap(),
            vec![sa, sb]
        );
        assert_eq!(store.signatures(&kept).unwrap(), vec![sa, sb]);
        store
            .add_signatures(&gone, &[a.sign_release(&gone)])
            .unwrap();
        let p = Provenance {
            base: Some(kept),
            changesets: vec![],
        };
        store.put_provenance(&gone, &p).unwrap();
        // The first provenance stays.
        let other = Provenance {
            base: None,
            changesets: vec![],
        };
        store.put_provenance(&gone, &other).unwrap();
        assert_eq!(store.provenance(&gone).unwrap(), Some(p));
        assert_eq!(store.provenance(&kept).unwrap(), None);
        // Names that are not manifests are not releases.
        let listed = store.list().unwrap().releases;
        assert_eq!(listed.len(), 2, "{listed:?}");

        // A crash left a signature file without its manifest.
        let orphan = Hash::of(b"orphan");
        std::fs::write(store.beside_path(&orphan, Beside::Signatures), b"[]").unwrap();
        for id in [kept, gone] {
            age_file(&store.release_path(&id), 2 * HOUR);
        }
        store.collect(&[kept], &HashSet::new(), HOUR).unwrap();
        assert_eq!(store.signatures(&kept).unwrap(), vec![sa, sb]);
        assert!(store.read_release(&gone).unwrap().is_none());
        for what in Beside::ALL {
            assert!(!store.beside_path(&gone, what).exists(), "{what:?}");
        }
        assert!(!store.beside_path(&orphan, Beside::Signatures).exists());
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
