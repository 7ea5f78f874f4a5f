//! The agent's own backend in detect-and-forward: it turns edits made
//! in `watch.dir` (reported by [`super::watcher`], examined by [`super::detect`]) and writes
//! through the agent's API into [`Changeset`]s, and keeps `watch.dir` following the release
//! the agent serves, so that every backend's editing directory holds the fleet's content.
//!
//! One thread owns the directory and its *known state* (path → entry, as last seen or
//! written), so detection and installation never race each other:
//!
//! - **Detect**: the paths a watcher batch names are compared with the known state; the
//!   differences become one changeset (its `prev` hashes taken from the known state), written
//!   to the outbox *before* the known state is saved, so a crash between the two re-detects
//!   rather than loses.
//! - **Install → directory**: when the served release changes, every path it changed is
//!   written into the directory (a `.lockstep-tmp-*` file renamed into place) — but only where
//!   the file on disk is still what the known state says; a file edited and not yet detected is
//!   left alone (it will be detected and resolved by the hub). The known state is updated
//!   first, so the watcher's events for these writes find no difference: an install never
//!   re-triggers forwarding. A temp file a crash left behind (killed between its creation and
//!   its rename) is removed when the thread starts: it is ignored by detection, so nothing
//!   else would ever remove it, and the directory would never equal the release.
//! - **No link followed**: every write, rename and removal in the directory (installs, API
//!   writes, leftovers) goes through a handle on `watch.dir` (`sync::beneath`): a path that
//!   meets a symlink on the way — `watch.dir/a` linking to `/tmp/elsewhere` — is refused with
//!   the link's name, warned about and counted (`refused{what="path"}`); nothing is written
//!   or removed outside the directory.
//! - **First start**: an empty directory is filled from the active release. A non-empty one is
//!   compared with the active release (once the agent has one: nothing is forwarded before);
//!   if it holds something else, it is not forwarded (it would overwrite the fleet with
//!   whatever was lying there): watching is refused with the reason and the fix. To seed a
//!   fleet from a directory, publish it.
//! - **Numbering**: a changeset's sequence number is above the agent's last one, above the
//!   hub's record of this agent (the `applied` of a schedule, sent by the controller as
//!   [`Input::Hub`]), and at least hub time ([`changeset::next_seq`]). Until the agent has
//!   both the hub's record and a measured clock — right after a start, or a reinstall that
//!   wiped the store, or while the hub is away — nothing is numbered: watcher batches are held
//!   (merged) and examined once both are known, API writes answer 503. A reinstalled agent
//!   thus resumes above what the hub recorded of its earlier life instead of reusing numbers
//!   the hub would answer "duplicate" (and the edit would be dropped).
//!
//! State lives in the store as `watch.json`; the outbox under `outbox/`.
#![allow(clippy::disallowed_methods)] // I/O shell: random names for temporary files

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::detect::{self, Files, Ignore, Scope};
use super::messages::{Input, Install, Out, Stored, WriteError};
use super::metrics::AgentMetrics;
use super::outbox::OUTBOX;
use super::release::Release;
use crate::sync::beneath::{BeneathError, Dir};
use crate::sync::changeset::{self, Change, Changeset, Mode};
use crate::sync::manifest::{check_path, content_type, Entry, Hash, Manifest, ReleaseId};
use crate::sync::store::FsStore;

/// Most blob bytes of one detected changeset sent to the peers before they are stored (in
/// immediate mode): a page's fsyncs stay off the forwarding path; bigger files are stored
/// first and read back for the peers.
pub const HOLD_BYTES: u64 = 1024 * 1024;

/// The state file's name in the store (`watch.json`).
pub const STATE_NAME: &str = "watch";

/// The prefix of the temp files [`place`] writes beside their target (under
/// [`super::ignore::OWN_PREFIX`], so never detected as edits).
pub const TMP_PREFIX: &str = ".lockstep-tmp-";

/// What the thread persists.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchState {
    /// The directory's content as last seen or written.
    pub known: Files,
    /// The release the directory was last brought up to.
    pub synced: Option<ReleaseId>,
    /// The last changeset sequence used.
    pub last_seq: u64,
    /// Whether the first start has been handled.
    pub started: bool,
}

/// The settings of the thread.
pub struct Local {
    /// This agent's name (the changesets' origin).
    pub name: String,
    /// What a change becomes.
    pub mode: Mode,
    /// The watched directory, if any.
    pub dir: Option<PathBuf>,
    /// Ignored names.
    pub ignore: Arc<Ignore>,
    /// Largest file forwarded.
    pub max_file_bytes: u64,
    /// The agent's store (blobs, outbox, state).
    pub store: Arc<FsStore>,
    /// Hub time now (µs), as the agent estimates it (`None` before the clock is measured).
    pub hub_now: super::messages::HubNow,
    /// Where new changesets go: to peers at once, to the hub once in the outbox.
    pub out: mpsc::Sender<Out>,
    /// Where immediate ones are installed on this backend at once.
    pub installs: mpsc::Sender<Install>,
    /// The outbox's size against its quota.
    pub outbox: Arc<super::outbox::Usage>,
    /// Metrics.
    pub metrics: Arc<AgentMetrics>,
}

struct Worker {
    cfg: Local,
    state: WatchState,
    /// The manifest of `state.synced`.
    synced: Manifest,
    /// The release served now.
    current: Option<Arc<Release>>,
    /// Why watching is refused, if it is.
    refused: Option<String>,
    /// First start with a non-empty directory and no release yet: wait for one to compare.
    deferred: bool,
    /// The hub's record of this agent: the highest sequence of ours it applied (0: none).
    /// `None` until the controller passes on a schedule; nothing is numbered before.
    hub_seq: Option<u64>,
    /// Watcher batches that came before the agent could number a changeset, or while the
    /// outbox was full.
    held: Option<Scope>,
    /// Whether the last edit found the outbox full (logged once until it has room).
    outbox_full: bool,
}

impl Local {
    /// Runs on a thread of its own until [`Input::Stop`] or the channel closes. `current` is
    /// the release the agent serves at start.
    pub fn spawn(
        self,
        current: Option<Arc<Release>>,
        rx: mpsc::UnboundedReceiver<Input>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("lockstep-local".into())
            .spawn(move || run(self, current, rx))
    }
}

fn run(cfg: Local, current: Option<Arc<Release>>, mut rx: mpsc::UnboundedReceiver<Input>) {
    let state: WatchState = match cfg.store.read_state(STATE_NAME) {
        Ok(s) => s.unwrap_or_default(),
        Err(e) => {
            error!(error = %e, "watch state unreadable: local edits are not forwarded until it is fixed or removed");
            return;
        }
    };
    let synced = state
        .synced
        .and_then(|id| load_manifest(&cfg.store, id))
        .unwrap_or_default();
    let mut w = Worker {
        cfg,
        state,
        synced,
        current,
        refused: None,
        deferred: false,
        hub_seq: None,
        held: None,
        outbox_full: false,
    };
    w.start();
    while let Some(input) = rx.blocking_recv() {
        match input {
            Input::Stop => break,
            Input::Scope(scope) => w.detect(&scope),
            Input::Installed(r) => {
                w.current = Some(r.clone());
                if w.deferred {
                    w.deferred = false;
                    w.start();
                } else {
                    w.follow(&r);
                }
            }
            Input::Write {
                path,
                content,
                reply,
            } => {
                let _ = reply.send(w.write(&path, content));
            }
            Input::Hub(applied) => w.hub_record(applied.get(&w.cfg.name).copied()),
        }
    }
}

fn load_manifest(store: &FsStore, id: ReleaseId) -> Option<Manifest> {
    let bytes = store.read_release(&id).ok()??;
    Manifest::from_json(&bytes).ok()
}

impl Worker {
    fn save(&self) {
        if let Err(e) = self.cfg.store.write_state(STATE_NAME, &self.state) {
            error!(error = %e, "cannot save the watch state; edits may be detected again after a restart");
        }
    }

    /// First start, or a restart: bring the directory up to the served release, then look
    /// for edits made while the agent was away.
    fn start(&mut self) {
        let Some(dir) = self.cfg.dir.clone() else {
            return;
        };
        if let Err(e) = std::fs::create_dir_all(&dir) {
            self.refuse(format!("cannot create watch.dir {}: {e}", dir.display()));
            return;
        }
        // This thread is the only writer of temp files, and it is writing none now: any
        // there is left over from a run that was killed mid-write.
        let cleared = clear_leftovers(&dir);
        if cleared > 0 {
            info!(dir = %dir.display(), files = cleared, "removed temp files an earlier run left in watch.dir");
        }
        let current = self.current.clone();
        if !self.state.started {
            let empty = std::fs::read_dir(&dir)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if !empty && current.is_none() {
                // Compared with the fleet's release once the agent has it; nothing of the
                // directory is forwarded before.
                info!(dir = %dir.display(), "watch.dir is not empty: waiting for the fleet's release to compare it with before watching");
                self.deferred = true;
                return;
            }
            if !empty {
                // Compare what is there with the release.
                let base = current
                    .as_ref()
                    .map(|r| r.manifest().files().clone())
                    .unwrap_or_default();
                match detect::detect(
                    &dir,
                    &base,
                    &Scope::All,
                    &self.cfg.ignore,
                    self.cfg.max_file_bytes,
                    &self.cfg.store,
                    0,
                ) {
                    Ok(d) if !d.changes.is_empty() => {
                        let first = d.changes.keys().next().cloned().unwrap_or_default();
                        self.refuse(format!(
                            "watch.dir {} is not empty and differs from the active release {} in {} path(s) (e.g. `{first}`): it is not forwarded, so it cannot overwrite the fleet. Empty the directory to start from the fleet's content, or publish it with `lockstep publish` to make it the fleet's",
                            dir.display(),
                            current.as_ref().map(|r| r.id().short()).unwrap_or_default(),
                            d.changes.len()
                        ));
                        return;
                    }
                    Ok(_) => {
                        // Same as the release.
                        self.state.known = base;
                        self.state.synced = current.as_ref().map(|r| r.id());
                        self.synced = current
                            .as_ref()
                            .map(|r| r.manifest().clone())
                            .unwrap_or_default();
                    }
                    Err(e) => {
                        self.refuse(format!("cannot read watch.dir {}: {e}", dir.display()));
                        return;
                    }
                }
            }
            self.state.started = true;
            self.save();
        }
        if let Some(r) = current {
            self.follow(&r);
        }
        info!(dir = %dir.display(), mode = ?self.cfg.mode, known = self.state.known.len(), "watching for local edits");
    }

    fn refuse(&mut self, why: String) {
        error!("{why}");
        self.cfg.metrics.refused("watch_dir");
        self.refused = Some(why);
    }

    /// The sequence number the next changeset would take now, if one may be numbered yet.
    fn next_seq(&self) -> Option<u64> {
        changeset::next_seq(self.state.last_seq, self.hub_seq, (self.cfg.hub_now)())
    }

    /// The hub's record of this agent (`None`: the hub has applied nothing of it yet); the
    /// batches held until now are examined once a changeset may be numbered.
    fn hub_record(&mut self, seq: Option<u64>) {
        let seq = seq.unwrap_or(0);
        let first = self.hub_seq.is_none();
        self.hub_seq = Some(self.hub_seq.unwrap_or(0).max(seq));
        if first {
            let (hub_seq, last_seq) = (seq, self.state.last_seq);
            if hub_seq > last_seq {
                info!(hub_seq, last_seq, "the hub recorded later changesets of this agent than its store did (a reinstall or a restored store): numbering resumes above the hub's record");
            }
            info!(hub_seq, last_seq, "local edits are numbered from now on");
        }
        if self.next_seq().is_some() {
            if let Some(scope) = self.held.take() {
                self.detect(&scope);
            }
        }
    }

    /// A watcher batch: the differences become one changeset.
    fn detect(&mut self, scope: &Scope) {
        let Some(dir) = self.cfg.dir.clone() else {
            return;
        };
        if self.refused.is_some() || self.deferred {
            return;
        }
        if self.next_seq().is_none() {
            if self.held.is_none() {
                info!("local edits wait for the hub: a changeset is numbered only once the hub's clock is measured and its record of this agent is known");
            }
            match &mut self.held {
                Some(held) => held.merge(scope.clone()),
                None => self.held = Some(scope.clone()),
            }
            return;
        }
        // Batches held while the outbox was full are examined with this one.
        let scope = match self.held.take() {
            Some(mut held) => {
                held.merge(scope.clone());
                held
            }
            None => scope.clone(),
        };
        // In immediate mode small blobs go to the peers before they are stored (see `emit`).
        let hold = match self.cfg.mode {
            Mode::Immediate => HOLD_BYTES,
            Mode::Scheduled => 0,
        };
        let d = match detect::detect(
            &dir,
            &self.state.known,
            &scope,
            &self.cfg.ignore,
            self.cfg.max_file_bytes,
            &self.cfg.store,
            hold,
        ) {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "examining watch.dir failed; the next batch or rescan tries again");
                return;
            }
        };
        for r in &d.refused {
            warn!(path = %r.path, "{}", r.reason);
            self.cfg.metrics.refused("path");
        }
        if d.changes.is_empty() {
            return;
        }
        let changes = d
            .changes
            .into_iter()
            .map(|(path, entry)| {
                let prev = self.state.known.get(&path).map(|e| e.hash);
                (path, Change { entry, prev })
            })
            .collect();
        if let Err(why) = self.outbox_room(&changes) {
            // Not recorded: the files stay as they are and are detected again once the hub
            // has taken what waits (the next schedule re-examines this batch).
            self.held = Some(scope);
            if !std::mem::replace(&mut self.outbox_full, true) {
                warn!("{why}");
            }
            self.cfg.metrics.refused("outbox_full");
            return;
        }
        self.outbox_full = false;
        self.emit(changes, d.held);
    }

    /// Whether the outbox has room for a changeset of `changes`.
    fn outbox_room(&self, changes: &BTreeMap<String, Change>) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        let bytes = changes
            .values()
            .filter_map(|c| c.entry.as_ref())
            .filter(|e| seen.insert(e.hash))
            .map(|e| e.size)
            .sum();
        self.cfg.outbox.room_for(bytes)
    }

    /// Records `changes` as a changeset: outbox first, then the known state, then onwards.
    /// Callers have checked that a changeset may be numbered. `held`: blobs of `changes` not
    /// stored yet ([`detect::Detected::held`]): sent to the peers from memory, then stored
    /// before anything durable (this backend's release, the outbox) names them. Not stored
    /// (a full disk), the changeset is not recorded and the edit is detected again.
    fn emit(
        &mut self,
        changes: BTreeMap<String, Change>,
        held: Vec<(Hash, Bytes)>,
    ) -> Option<String> {
        // Sequence numbers are hub-time µs, strictly increasing and above the hub's record: one
        // reused after a crash or a reinstall would be taken by the hub for a duplicate.
        let (Some(seq), Some(now)) = (self.next_seq(), (self.cfg.hub_now)()) else {
            warn!("a changeset cannot be numbered yet; the edit is detected again later");
            return None;
        };
        let cs = Changeset {
            origin: self.cfg.name.clone(),
            seq,
            mode: self.cfg.mode,
            base: self.current.as_ref().map(|r| r.id()),
            detected_us: now,
            changes,
        };
        if let Err(e) = cs.check() {
            warn!(error = %e, "local changeset refused");
            self.cfg.metrics.refused("changeset");
            return None;
        }
        if cs.mode == Mode::Immediate {
            // The fast path first: the peers (best effort: when the forwarder is behind, they
            // get it from the hub), with the blobs not stored yet from memory.
            if self
                .cfg
                .out
                .try_send(Out::Peers(cs.clone(), held.clone()))
                .is_err()
            {
                debug!(changeset = %cs.name(), "forwarder busy; peers get this changeset from the hub");
            }
        }
        for (hash, data) in &held {
            if let Err(e) = self.cfg.store.write_blob(hash, data) {
                error!(error = %e, "cannot store a detected file's blob; the edit will be detected again");
                return None;
            }
        }
        if cs.mode == Mode::Immediate {
            // Then this backend. Waits for room: the watcher's batches pile up (merged).
            let _ = self.cfg.installs.blocking_send(Install {
                cs: cs.clone(),
                remote: false,
                blobs: Vec::new(),
            });
        }
        if let Err(e) = write_outbox(&self.cfg.store, &cs) {
            error!(error = %e, "cannot write the outbox; the edit will be detected again");
            return None;
        }
        self.cfg.outbox.add(&cs);
        for (path, c) in &cs.changes {
            match &c.entry {
                Some(e) => self.state.known.insert(path.clone(), e.clone()),
                None => self.state.known.remove(path),
            };
        }
        self.state.last_seq = seq;
        self.save();
        self.cfg
            .metrics
            .changes_detected
            .inc_by(cs.changes.len() as u64);
        info!(changeset = %cs.name(), paths = cs.changes.len(), mode = ?cs.mode, "local edit detected");
        let _ = self.cfg.out.blocking_send(Out::Recorded);
        Some(cs.name())
    }

    /// The served release changed: bring the directory along where it has no pending edit.
    fn follow(&mut self, release: &Release) {
        if self.state.synced == Some(release.id()) {
            return;
        }
        let Some(dir) = self.cfg.dir.clone() else {
            // No directory: the known state is the release (the `prev` of API writes).
            self.state.known = release.manifest().files().clone();
            self.state.synced = Some(release.id());
            self.synced = release.manifest().clone();
            return;
        };
        if self.refused.is_some() {
            return;
        }
        let root = match Dir::open(&dir, WATCH_DIR) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "cannot open watch.dir to bring it up to the release; the next release tries again");
                return;
            }
        };
        let diff = changeset::diff(self.synced.files(), release.manifest().files());
        let (mut written, mut kept) = (0usize, 0usize);
        // Removals first, so that a file can take the place of a removed directory.
        let order = diff
            .iter()
            .filter(|(_, c)| c.entry.is_none())
            .chain(diff.iter().filter(|(_, c)| c.entry.is_some()));
        for (path, change) in order {
            let known = self.state.known.get(path).cloned();
            if known.as_ref() == change.entry.as_ref() {
                continue;
            }
            if on_disk(&root, path) != known.as_ref().map(|e| e.hash) {
                // Edited here and not yet detected: the hub will resolve it.
                kept += 1;
                continue;
            }
            let outcome = match &change.entry {
                Some(e) => {
                    // In memory when just received (its blob may still be on its way to disk).
                    let body = release.file(path).and_then(|f| f.body.clone());
                    place(&self.cfg.store, &root, path, e, body)
                }
                None => remove(&root, path),
            };
            match outcome {
                Ok(()) => {
                    match &change.entry {
                        Some(e) => self.state.known.insert(path.clone(), e.clone()),
                        None => self.state.known.remove(path),
                    };
                    written += 1;
                }
                Err(e) => {
                    if e.is_symlink() {
                        self.cfg.metrics.refused("path");
                    }
                    warn!(path = %path, error = %e, "cannot bring the file in watch.dir up to the release")
                }
            }
        }
        self.state.synced = Some(release.id());
        self.synced = release.manifest().clone();
        self.save();
        debug!(release = %release.id().short(), written, kept, "watch.dir follows the served release");
    }

    /// The entry an API write of `c` at `path` records: within `watch.max_file_size`, its
    /// content in the store.
    fn written_entry(&self, path: &str, c: Stored) -> Result<Entry, WriteError> {
        if c.size > self.cfg.max_file_bytes {
            return Err(WriteError::TooLarge(format!(
                "{} bytes is over watch.max_file_size ({} bytes)",
                c.size, self.cfg.max_file_bytes
            )));
        }
        if !self.cfg.store.has_blob(&c.hash) {
            return Err(WriteError::Io(format!(
                "the content {} left the store before it was recorded: retry",
                c.hash.short()
            )));
        }
        Ok(Entry {
            hash: c.hash,
            size: c.size,
            content_type: content_type(path),
        })
    }

    /// Puts an API write into `watch.dir` (when the agent has one and is not refusing it):
    /// the file placed, or removed for `None`.
    fn write_into_dir(&self, path: &str, entry: Option<&Entry>) -> Result<(), WriteError> {
        let (Some(dir), None) = (&self.cfg.dir, &self.refused) else {
            return Ok(());
        };
        let r = Dir::open(dir, WATCH_DIR).and_then(|root| match entry {
            Some(e) => place(&self.cfg.store, &root, path, e, None),
            None => remove(&root, path),
        });
        match r {
            Ok(()) => Ok(()),
            // Refused like a link found by detection: the request cannot be done as asked.
            Err(e) if e.is_symlink() => {
                warn!(path = %path, error = %e, "write refused");
                self.cfg.metrics.refused("path");
                Err(WriteError::Bad(format!("writing into watch.dir: {e}")))
            }
            Err(e) => Err(WriteError::Io(format!("writing into watch.dir: {e}"))),
        }
    }

    /// An API write.
    fn write(&mut self, path: &str, content: Option<Stored>) -> Result<Option<String>, WriteError> {
        check_path(path).map_err(|e| WriteError::Bad(e.to_string()))?;
        if self.next_seq().is_none() {
            return Err(WriteError::Unavailable(
                "the agent has not heard from the hub yet (its clock and its record of this agent), without which the write cannot be numbered: retry shortly".into(),
            ));
        }
        if self.cfg.ignore.is_ignored(path) {
            return Err(WriteError::Bad(format!(
                "`{path}` matches watch.ignore: it would never be forwarded"
            )));
        }
        let prev = self.state.known.get(path).cloned();
        let entry = match content {
            Some(c) => Some(self.written_entry(path, c)?),
            None if prev.is_none() => {
                return Err(WriteError::NotFound(format!("no file `{path}` to delete")))
            }
            None => None,
        };
        if entry == prev {
            return Ok(None);
        }
        // Before the file is touched: a refused write leaves nothing behind.
        let room = self.outbox_room(
            &[(
                path.to_string(),
                Change {
                    entry: entry.clone(),
                    prev: None,
                },
            )]
            .into(),
        );
        if let Err(why) = room {
            self.cfg.metrics.refused("outbox_full");
            return Err(WriteError::Unavailable(why));
        }
        self.write_into_dir(path, entry.as_ref())?;
        let change = Change {
            entry,
            prev: prev.map(|e| e.hash),
        };
        let name = self.emit([(path.to_string(), change)].into(), Vec::new());
        match name {
            Some(n) => Ok(Some(n)),
            None => Err(WriteError::Io(
                "the change could not be recorded: see the agent's log".into(),
            )),
        }
    }
}

/// What the directory is called in messages.
const WATCH_DIR: &str = "watch.dir";

/// The hash of the regular file at `path` (None when missing, not a regular file, a symlink or
/// behind one, or unreadable).
fn on_disk(root: &Dir, path: &str) -> Option<Hash> {
    let mut f = root.open_file(Path::new(path)).ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut data).ok()?;
    Some(Hash::of(&data))
}

/// The parent directory and the name of release path `path`.
fn split(path: &str) -> Result<(&Path, &OsStr), BeneathError> {
    let rel = Path::new(path);
    match (rel.parent(), rel.file_name()) {
        (Some(parent), Some(name)) => Ok((parent, name)),
        _ => Err(BeneathError::NotBeneath {
            path: rel.to_path_buf(),
            area: WATCH_DIR,
        }),
    }
}

/// Writes blob `e` at `path` beneath `root`: a temp file beside it, then a rename; missing
/// directories are created; nothing through a symlink.
fn place(
    store: &FsStore,
    root: &Dir,
    path: &str,
    e: &Entry,
    body: Option<Bytes>,
) -> Result<(), BeneathError> {
    let (parent, name) = split(path)?;
    let parent = root.create_dirs(parent)?;
    let failed = |source: std::io::Error| BeneathError::Io {
        path: root.path().join(path),
        source,
    };
    let data = match body {
        Some(b) => b.to_vec(),
        None => store
            .read_blob(&e.hash)
            .map_err(|err| failed(std::io::Error::other(err.to_string())))?
            .ok_or_else(|| {
                failed(std::io::Error::other(format!(
                    "blob {} is not in the store",
                    e.hash
                )))
            })?,
    };
    let tmp = format!("{TMP_PREFIX}{}", rand::random::<u64>());
    let tmp = OsStr::new(&tmp);
    let mut f = parent.create_new(tmp)?;
    let written = f.write_all(&data).and_then(|_| f.sync_data());
    drop(f);
    let placed = written
        .map_err(|source| BeneathError::Io {
            path: parent.path().join(tmp),
            source,
        })
        .and_then(|()| parent.rename(tmp, name));
    if placed.is_err() {
        let _ = parent.remove_file(tmp);
    }
    placed
}

/// Removes the [`place`] temp files under `dir` (symlinks are not followed); how many.
fn clear_leftovers(dir: &Path) -> usize {
    let Ok(root) = Dir::open(dir, WATCH_DIR) else {
        return 0;
    };
    let mut removed = 0;
    // Relative paths, not open handles: a wide tree would hold too many descriptors.
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(d) = root.open_dir(&rel) else { continue };
        let Ok(entries) = d.entries() else { continue };
        for (name, kind) in entries {
            if kind == rustix::fs::FileType::Directory {
                stack.push(rel.join(&name));
            } else if kind == rustix::fs::FileType::RegularFile
                && name.to_string_lossy().starts_with(TMP_PREFIX)
            {
                match d.remove_file(&name) {
                    Ok(()) => removed += 1,
                    Err(err) => {
                        warn!(error = %err, "cannot remove a leftover temp file")
                    }
                }
            }
        }
    }
    removed
}

/// Removes `path` beneath `root`, and its parent directories left empty; nothing through a
/// symlink.
fn remove(root: &Dir, path: &str) -> Result<(), BeneathError> {
    let (parent, name) = split(path)?;
    let gone = |e: &BeneathError| e.kind() == std::io::ErrorKind::NotFound;
    match root.open_dir(parent).and_then(|p| p.remove_file(name)) {
        Ok(()) => {}
        Err(e) if gone(&e) => {}
        Err(e) => return Err(e),
    }
    let mut dir = parent;
    while let (Some(up), Some(name)) = (dir.parent(), dir.file_name()) {
        if root.open_dir(up).and_then(|u| u.remove_dir(name)).is_err() {
            break;
        }
        dir = up;
    }
    Ok(())
}

/// Writes `cs` as `outbox/<seq>.json`, durably.
pub fn write_outbox(store: &FsStore, cs: &Changeset) -> Result<(), crate::sync::store::StoreError> {
    let path = store
        .root()
        .join(OUTBOX)
        .join(format!("{:020}.json", cs.seq));
    // Protocol messages are plain structs: they always serialise.
    store.write_atomic(
        &path,
        &serde_json::to_vec(cs).expect("changeset serialises"),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A release of `files` (path, content), built from memory.
    fn release(store: &Arc<FsStore>, files: &[(&str, &str)]) -> Arc<Release> {
        let mut entries = BTreeMap::new();
        let mut fresh = HashMap::new();
        for (path, body) in files {
            let data = Bytes::from(body.to_string());
            let hash = Hash::of(&data);
            entries.insert(
                path.to_string(),
                Entry {
                    hash,
                    size: data.len() as u64,
                    content_type: content_type(path),
                },
            );
            fresh.insert(hash, data);
        }
        let manifest = Manifest::new(entries).unwrap();
        Arc::new(Release::build_reusing(store, manifest, None, &fresh).unwrap())
    }

    /// Runs the thread on `dir` serving `current` until it has handled its start.
    fn run_start(store: &Arc<FsStore>, dir: &Path, current: Option<Arc<Release>>) {
        let (out, _out_rx) = mpsc::channel(crate::agent::messages::OUT_QUEUE);
        let (installs, _installs_rx) = mpsc::channel(crate::agent::messages::INSTALL_QUEUE);
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Input::Stop).unwrap();
        Local {
            name: "a".into(),
            mode: Mode::Immediate,
            dir: Some(dir.to_path_buf()),
            ignore: Arc::new(Ignore::default()),
            max_file_bytes: 1 << 20,
            store: store.clone(),
            hub_now: Arc::new(|| Some(1)),
            out,
            installs,
            outbox: Arc::default(),
            metrics: Arc::new(AgentMetrics::new()),
        }
        .spawn(current, rx)
        .unwrap()
        .join()
        .unwrap();
    }

    /// Every regular file under `dir`, by relative path.
    fn files(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else {
                    let rel = e.path().strip_prefix(dir).unwrap().to_owned();
                    out.push(rel.to_string_lossy().to_string());
                }
            }
        }
        out.sort();
        out
    }

    /// An agent killed while writing a file into watch.dir (between the temp file's creation
    /// and its rename) leaves the temp file: the restarted thread removes it, so the
    /// directory comes to hold exactly the release.
    #[test]
    fn temp_files_left_by_a_killed_run_are_removed_at_start() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(FsStore::open(&tmp.path().join("store")).unwrap());
        let dir = tmp.path().join("edit");
        // The earlier run had started on an empty directory, then was killed mid-write.
        let state = WatchState {
            started: true,
            ..WatchState::default()
        };
        store.write_state(STATE_NAME, &state).unwrap();
        std::fs::create_dir_all(dir.join("docs")).unwrap();
        std::fs::write(dir.join(format!("{TMP_PREFIX}17")), "half").unwrap();
        std::fs::write(dir.join(format!("docs/{TMP_PREFIX}4")), "half").unwrap();
        // Not ours: left alone.
        std::fs::write(dir.join("docs/.lockstep-tmp"), "other").unwrap();

        let r = release(&store, &[("index.html", "start"), ("docs/a.txt", "a")]);
        run_start(&store, &dir, Some(r));

        assert_eq!(
            files(&dir),
            ["docs/.lockstep-tmp", "docs/a.txt", "index.html"]
        );
        assert_eq!(std::fs::read(dir.join("index.html")).unwrap(), b"start");
    }

    /// A first start on a directory holding only such a leftover fills it from the release:
    /// the leftover does not make it "not empty" (which would defer or refuse watching).
    #[test]
    fn a_directory_holding_only_a_leftover_temp_file_is_filled_as_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(FsStore::open(&tmp.path().join("store")).unwrap());
        let dir = tmp.path().join("edit");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{TMP_PREFIX}3")), "half").unwrap();

        let r = release(&store, &[("index.html", "fleet")]);
        run_start(&store, &dir, Some(r));

        assert_eq!(files(&dir), ["index.html"]);
        let state: WatchState = store.read_state(STATE_NAME).unwrap().unwrap();
        assert!(state.started);
    }

    /// `data` put in the store, as the API does before it asks for a write.
    fn stored(store: &FsStore, data: &[u8]) -> Stored {
        let hash = Hash::of(data);
        store.write_blob(&hash, data).unwrap();
        Stored {
            hash,
            size: data.len() as u64,
        }
    }

    /// Runs the thread on `dir` with `metrics`, handling `writes` (path, body) after its
    /// start; what each write answered.
    fn run_writes(
        store: &Arc<FsStore>,
        dir: &Path,
        current: Option<Arc<Release>>,
        metrics: &Arc<AgentMetrics>,
        writes: &[(&str, Option<&str>)],
    ) -> Vec<Result<Option<String>, WriteError>> {
        let (out, _out_rx) = mpsc::channel(crate::agent::messages::OUT_QUEUE);
        let (installs, _installs_rx) = mpsc::channel(crate::agent::messages::INSTALL_QUEUE);
        let (tx, rx) = mpsc::unbounded_channel();
        // The hub has no record of this agent: writes may be numbered.
        tx.send(Input::Hub(changeset::Applied::new())).unwrap();
        let mut replies = Vec::new();
        for (path, body) in writes {
            let (reply, answer) = tokio::sync::oneshot::channel();
            tx.send(Input::Write {
                path: path.to_string(),
                content: body.map(|b| stored(store, b.as_bytes())),
                reply,
            })
            .unwrap();
            replies.push(answer);
        }
        tx.send(Input::Stop).unwrap();
        Local {
            name: "a".into(),
            mode: Mode::Immediate,
            dir: Some(dir.to_path_buf()),
            ignore: Arc::new(Ignore::default()),
            max_file_bytes: 1 << 20,
            store: store.clone(),
            hub_now: Arc::new(|| Some(1)),
            out,
            installs,
            outbox: Arc::default(),
            metrics: metrics.clone(),
        }
        .spawn(current, rx)
        .unwrap()
        .join()
        .unwrap();
        replies
            .into_iter()
            .map(|r| r.blocking_recv().unwrap())
            .collect()
    }

    /// A reinstalled agent (empty store) whose clock says hub time is 4 000 µs while the hub
    /// recorded its sequence 5 000 from before: edits wait for the hub's record (a write is
    /// answered "not now"), then are numbered above it — not at 4 000, which the hub would
    /// answer "duplicate".
    #[test]
    fn edits_wait_for_the_hubs_record_and_are_numbered_above_it() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(FsStore::open(&tmp.path().join("store")).unwrap());
        let dir = tmp.path().join("edit");
        std::fs::create_dir_all(&dir).unwrap();
        let (out, mut out_rx) = mpsc::channel(crate::agent::messages::OUT_QUEUE);
        let (installs, _installs_rx) = mpsc::channel(crate::agent::messages::INSTALL_QUEUE);
        let (tx, rx) = mpsc::unbounded_channel();
        // Started on an empty directory (a reinstall), then edited.
        let state = WatchState {
            started: true,
            ..WatchState::default()
        };
        store.write_state(STATE_NAME, &state).unwrap();
        std::fs::write(dir.join("first.txt"), "after reinstall").unwrap();
        tx.send(Input::Scope(Scope::All)).unwrap();
        let (reply, early) = tokio::sync::oneshot::channel();
        tx.send(Input::Write {
            path: "api.txt".into(),
            content: Some(stored(&store, b"api")),
            reply,
        })
        .unwrap();
        let record: changeset::Applied =
            [("a".to_string(), 5_000), ("b".to_string(), 9_000)].into();
        tx.send(Input::Hub(record)).unwrap();
        let (reply, late) = tokio::sync::oneshot::channel();
        tx.send(Input::Write {
            path: "api.txt".into(),
            content: Some(stored(&store, b"api")),
            reply,
        })
        .unwrap();
        tx.send(Input::Stop).unwrap();
        Local {
            name: "a".into(),
            mode: Mode::Immediate,
            dir: Some(dir.clone()),
            ignore: Arc::new(Ignore::default()),
            max_file_bytes: 1 << 20,
            store: store.clone(),
            hub_now: Arc::new(|| Some(4_000)),
            out,
            installs,
            outbox: Arc::default(),
            metrics: Arc::new(AgentMetrics::new()),
        }
        .spawn(None, rx)
        .unwrap()
        .join()
        .unwrap();

        assert!(matches!(
            early.blocking_recv().unwrap(),
            Err(WriteError::Unavailable(_))
        ));
        assert_eq!(
            late.blocking_recv().unwrap().unwrap().as_deref(),
            Some("a/5002")
        );
        let mut sent = Vec::new();
        let mut held = Vec::new();
        while let Ok(o) = out_rx.try_recv() {
            if let Out::Peers(cs, blobs) = o {
                sent.push((
                    cs.seq,
                    cs.detected_us,
                    cs.changes.keys().cloned().collect::<Vec<_>>(),
                ));
                held.push(blobs);
            }
        }
        // The detected file's blob went to the peers from memory, and was stored before the
        // changeset was recorded; the API write's blob was stored before it was sent.
        let first = Hash::of(b"after reinstall");
        assert_eq!(held[0], [(first, Bytes::from_static(b"after reinstall"))]);
        assert!(held[1].is_empty());
        assert!(store.has_blob(&first));
        assert_eq!(
            sent,
            [
                (5_001, 4_000, vec!["first.txt".to_string()]),
                (5_002, 4_000, vec!["api.txt".to_string()])
            ],
            "the held edit first, above the hub's record of `a` (not `b`'s)"
        );
        let state: WatchState = store.read_state(STATE_NAME).unwrap().unwrap();
        assert_eq!(state.last_seq, 5_002);
    }

    /// A full outbox (the hub away for long): an API write is answered "not now", a watcher
    /// edit is left on disk unrecorded; once the hub has taken what waits, the next schedule
    /// brings the held edit in.
    #[test]
    fn a_full_outbox_holds_edits_until_the_hub_takes_what_waits() {
        use crate::agent::metrics::WhatLabels;
        use crate::agent::outbox::{outbox_files, Usage, MAX_ENTRIES};
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(FsStore::open(&tmp.path().join("store")).unwrap());
        let dir = tmp.path().join("edit");
        std::fs::create_dir_all(&dir).unwrap();
        store
            .write_state(
                STATE_NAME,
                &WatchState {
                    started: true,
                    ..WatchState::default()
                },
            )
            .unwrap();
        let (out, _out_rx) = mpsc::channel(crate::agent::messages::OUT_QUEUE);
        let (installs, _installs_rx) = mpsc::channel(crate::agent::messages::INSTALL_QUEUE);
        let (tx, rx) = mpsc::unbounded_channel();
        let usage = Arc::new(Usage::default());
        usage.set(MAX_ENTRIES, 0);
        let metrics = Arc::new(AgentMetrics::new());
        let thread = Local {
            name: "a".into(),
            mode: Mode::Scheduled,
            dir: Some(dir.clone()),
            ignore: Arc::new(Ignore::default()),
            max_file_bytes: 1 << 20,
            store: store.clone(),
            hub_now: Arc::new(|| Some(4_000)),
            out,
            installs,
            outbox: usage.clone(),
            metrics: metrics.clone(),
        }
        .spawn(None, rx)
        .unwrap();
        let write = |path: &str| {
            let (reply, answer) = tokio::sync::oneshot::channel();
            tx.send(Input::Write {
                path: path.into(),
                content: Some(stored(&store, path.as_bytes())),
                reply,
            })
            .unwrap();
            answer.blocking_recv().unwrap()
        };

        tx.send(Input::Hub(changeset::Applied::new())).unwrap();
        std::fs::write(dir.join("edit.txt"), "made while the hub was away").unwrap();
        tx.send(Input::Scope(Scope::All)).unwrap();
        match write("api.txt") {
            Err(WriteError::Unavailable(why)) => assert!(why.contains("outbox holds"), "{why}"),
            other => panic!("a write into a full outbox: {other:?}"),
        }
        assert!(outbox_files(&store).is_empty());
        let full = metrics
            .refused
            .get_or_create(&WhatLabels {
                what: "outbox_full",
            })
            .get();
        assert_eq!(full, 2);

        usage.set(0, 0);
        tx.send(Input::Hub(changeset::Applied::new())).unwrap();
        assert!(write("api.txt").is_ok());
        tx.send(Input::Stop).unwrap();
        thread.join().unwrap();
        let waiting: Vec<Changeset> = outbox_files(&store)
            .iter()
            .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
            .collect();
        let paths: Vec<Vec<String>> = waiting
            .iter()
            .map(|cs| cs.changes.keys().cloned().collect())
            .collect();
        assert_eq!(
            paths,
            [vec!["edit.txt".to_string()], vec!["api.txt".to_string()]]
        );
    }

    /// Without a clock estimate nothing is numbered, even with the hub's record.
    #[test]
    fn nothing_is_numbered_without_a_clock_estimate() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(FsStore::open(&tmp.path().join("store")).unwrap());
        let dir = tmp.path().join("edit");
        std::fs::create_dir_all(&dir).unwrap();
        let state = WatchState {
            started: true,
            ..WatchState::default()
        };
        store.write_state(STATE_NAME, &state).unwrap();
        std::fs::write(dir.join("x.txt"), "x").unwrap();
        let (out, mut out_rx) = mpsc::channel(crate::agent::messages::OUT_QUEUE);
        let (installs, _installs_rx) = mpsc::channel(crate::agent::messages::INSTALL_QUEUE);
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Input::Hub(changeset::Applied::new())).unwrap();
        tx.send(Input::Scope(Scope::All)).unwrap();
        tx.send(Input::Stop).unwrap();
        Local {
            name: "a".into(),
            mode: Mode::Immediate,
            dir: Some(dir),
            ignore: Arc::new(Ignore::default()),
            max_file_bytes: 1 << 20,
            store: store.clone(),
            hub_now: Arc::new(|| None),
            out,
            installs,
            outbox: Arc::default(),
            metrics: Arc::new(AgentMetrics::new()),
        }
        .spawn(None, rx)
        .unwrap()
        .join()
        .unwrap();
        assert!(out_rx.try_recv().is_err(), "nothing sent");
        assert!(crate::agent::outbox::outbox_files(&store).is_empty());
    }

    fn refused_paths(metrics: &AgentMetrics) -> u64 {
        metrics
            .refused
            .get_or_create(&super::super::metrics::WhatLabels { what: "path" })
            .get()
    }

    /// The security issue's second attack: `watch.dir/a` is a symlink out of the tree. API
    /// writes (`PUT`/`DELETE /content/a/…`) and installs from the fleet under `a/` are
    /// refused with a reason naming the link, counted, and nothing outside is written or
    /// removed.
    #[test]
    fn writes_never_follow_a_symlinked_directory_out_of_watch_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(FsStore::open(&tmp.path().join("store")).unwrap());
        let dir = tmp.path().join("edit");
        let outside = tmp.path().join("elsewhere");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("victim.html"), "precious").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("a")).unwrap();
        // The agent knows `a/victim.html` (as if `a` had been a real directory).
        let victim = Entry {
            hash: Hash::of(b"precious"),
            size: 8,
            content_type: content_type("a/victim.html"),
        };
        store.write_blob(&victim.hash, b"precious").unwrap();
        let state = WatchState {
            known: [("a/victim.html".to_string(), victim)].into(),
            started: true,
            ..WatchState::default()
        };
        store.write_state(STATE_NAME, &state).unwrap();
        let metrics = Arc::new(AgentMetrics::new());

        let answers = run_writes(
            &store,
            &dir,
            None,
            &metrics,
            &[
                ("a/new.html", Some("planted")),
                ("a/victim.html", Some("overwritten")),
                ("a/victim.html", None),
                ("ok.html", Some("fine")),
            ],
        );
        for a in &answers[..3] {
            let e = a.as_ref().unwrap_err();
            assert!(matches!(e, WriteError::Bad(_)), "{e:?}");
            assert!(
                e.to_string().contains(&format!(
                    "{} is a symlink: lockstep never follows links inside watch.dir",
                    dir.join("a").display()
                )),
                "{e}"
            );
        }
        assert!(answers[3].as_ref().unwrap().is_some(), "{:?}", answers[3]);
        assert_eq!(refused_paths(&metrics), 3);
        assert_eq!(files(&outside), ["victim.html"]);
        assert_eq!(
            std::fs::read(outside.join("victim.html")).unwrap(),
            b"precious"
        );
        assert_eq!(std::fs::read(dir.join("ok.html")).unwrap(), b"fine");

        // An install from the fleet under the link: not written, counted.
        let metrics = Arc::new(AgentMetrics::new());
        let r = release(
            &store,
            &[
                ("a/victim.html", "precious"),
                ("a/fleet.html", "from the fleet"),
                ("ok.html", "fine"),
            ],
        );
        run_writes(&store, &dir, Some(r), &metrics, &[]);
        assert_eq!(files(&outside), ["victim.html"]);
        assert_eq!(
            std::fs::read(outside.join("victim.html")).unwrap(),
            b"precious"
        );
        assert_eq!(refused_paths(&metrics), 1);
    }
}
