//! Watches `watch.dir` and says where to look for changes: inotify (through `notify`), each
//! event turned into the paths it names, debounced by [`Quiet`] on a thread of its own, sent
//! as [`Scope`]s for `detect`.
//!
//! It never reads a file: an event only names a path, and `detect` decides what the path is now
//! (file, directory, gone). So a lost or merged event costs a rescan, never a wrong answer.
//!
//! - The first message is [`Scope::All`] (the initial scan), sent once the watch is in place,
//!   so nothing changed after that scan goes unseen.
//! - Each batch [`Quiet`] releases gives one [`Scope::Paths`]: release paths relative to the
//!   directory, ignored ones dropped, empty batches not sent. A path is named `debounce` after
//!   its last event (the debounce thread sleeps until exactly then: no periodic tick, no
//!   wake-up while nothing waits), and a burst gives at most four scopes per window. A rename
//!   gives both names; a new directory its own path (`detect` rescans it whole, which covers
//!   files created before its watch was added).
//! - Events that only read (open, close without writing) are dropped: `detect` reading the
//!   files must not wake the watcher again.
//! - Events lost (inotify queue overflow: `Flag::Rescan`) or any watcher error give
//!   [`Scope::All`]; so does a name that is not UTF-8 at the top level (deeper, its parent
//!   directory is named, and `detect` reports the name as refused).
//! - Every `rescan_every`, a [`Scope::All`] as a backstop.
//! - The directory itself deleted or moved away: a [`Scope::All`] (`detect` then fails with
//!   `DetectError::Root` until it is back: nothing is removed), and the watch is set up again
//!   as soon as the directory exists (looked for every [`REWATCH_EVERY`]), followed by another
//!   [`Scope::All`]. A path that silently names another directory (a parent renamed, a
//!   symlinked `watch.dir` pointed elsewhere) is noticed at the next periodic rescan and
//!   watched the same way.
//! - Symlinks are not followed into directories (as `detect` does not follow them); a symlink
//!   to a file is seen changing when the link changes, and its target's edits at the next full
//!   rescan.
//!
//! Threads: notify's inotify thread (which classifies each event, under the lock of the
//! watched directory's path) and the debounce thread (which sends the scopes), plus one tokio
//! task for the periodic rescan and re-watching. All stop when the [`Watcher`] is dropped,
//! [`Watcher::stop`] is called, `shutdown` is cancelled or the receiver is dropped: the
//! debounce thread ends when notify's handler (its only sender) is gone.
#![allow(clippy::disallowed_methods)] // I/O shell: schedules the periodic rescan

use std::collections::BTreeSet;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc::{self as std_mpsc, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{Event, RecursiveMode, Watcher as _};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::detect::Scope;
use super::ignore::Ignore;
use super::quiet::Quiet;

/// Events classified but not yet taken by the debounce thread, at most. When full, notify's
/// thread waits, the kernel's inotify queue fills, and its overflow is a full rescan: a burst
/// costs a rescan, never unbounded memory.
pub const NOTES: usize = 4096;

/// How often a vanished watched directory is looked for again.
pub const REWATCH_EVERY: Duration = Duration::from_millis(500);

type Inner = notify::RecommendedWatcher;

/// Why watching cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// The watch cannot be set up (inotify limits, permissions).
    #[error("cannot watch watch.dir {dir}: {source}{hint}")]
    Watch {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: notify::Error,
        /// What to do, when known.
        hint: &'static str,
    },
    /// The directory is missing or not a directory.
    #[error("cannot watch watch.dir {dir}: {source} (create the directory, or fix watch.dir)")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A duration of zero.
    #[error("the watcher's {what} must be above zero")]
    Zero {
        /// Which setting.
        what: &'static str,
    },
    /// Called outside a tokio runtime.
    #[error("the watcher must be started inside a tokio runtime")]
    NoRuntime,
}

/// A running watcher; dropping it stops watching.
#[derive(Debug)]
pub struct Watcher {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Watcher {
    /// Stops watching and waits for the task that owns the watch to end (notify's thread and
    /// the debounce thread follow as soon as they see it).
    pub async fn stop(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Watches `dir` recursively and sends a [`Scope`] to `tx` for every batch of changes (see the
/// module docs). Must be called inside a tokio runtime.
pub fn spawn(
    dir: &Path,
    debounce: Duration,
    rescan_every: Duration,
    ignore: Arc<Ignore>,
    tx: UnboundedSender<Scope>,
    shutdown: CancellationToken,
) -> Result<Watcher, WatchError> {
    check_settings(debounce, rescan_every)?;
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| WatchError::NoRuntime)?;
    let root = match std::env::current_dir() {
        Ok(cwd) => cwd.join(dir),
        Err(_) => dir.to_path_buf(),
    };
    let target = Target::resolve(&root).map_err(|source| WatchError::Dir {
        dir: root.clone(),
        source,
    })?;
    // The directory notify reports paths under. Its lock also orders the scopes: held until
    // the first `All` is sent (and while watching again), so the handler's come after.
    let current = Arc::new(Mutex::new(target.path.clone()));
    let first = current.lock().unwrap_or_else(PoisonError::into_inner);
    let root_gone = Arc::new(Notify::new());
    let (notes, noted) = std_mpsc::sync_channel(NOTES);
    let handler = handler(notes, current.clone(), root_gone.clone(), ignore);
    // Links are not followed into directories, as `detect` does not follow them.
    let config = notify::Config::default().with_follow_symlinks(false);
    let watch_err = |source: notify::Error| WatchError::Watch {
        dir: root.clone(),
        hint: hint(&source),
        source,
    };
    let mut debouncer = Inner::new(handler, config).map_err(watch_err)?;
    debouncer
        .watch(&target.path, RecursiveMode::Recursive)
        .map_err(watch_err)?;
    let debounce_tx = tx.clone();
    std::thread::Builder::new()
        .name("lockstep-watch".into())
        .spawn(move || debounce_loop(&noted, debounce, &debounce_tx))
        .map_err(|e| WatchError::Watch {
            dir: root.clone(),
            hint: "",
            source: notify::Error::io(e),
        })?;
    let _ = tx.send(Scope::All);
    drop(first);
    info!(dir = %root.display(), watched = %target.path.display(), ?debounce, ?rescan_every, "watching watch.dir");

    let stop = shutdown.child_token();
    let task = runtime.spawn(supervise(
        Supervisor {
            debouncer,
            root,
            current,
            rescan_every,
            tx,
            root_gone,
        },
        target,
        stop.clone(),
    ));
    Ok(Watcher { stop, task })
}

fn check_settings(debounce: Duration, rescan_every: Duration) -> Result<(), WatchError> {
    if debounce.is_zero() {
        return Err(WatchError::Zero { what: "debounce" });
    }
    if rescan_every.is_zero() {
        return Err(WatchError::Zero {
            what: "rescan interval",
        });
    }
    Ok(())
}

/// notify's handler (on its thread): each event → what it names, for the debounce thread,
/// paths made relative under `current` (held from the start until the first `All` is sent, so
/// nothing is named before it); a vanished root is told to the supervisor through
/// `root_gone`; watcher errors mean a full rescan.
fn handler(
    notes: std_mpsc::SyncSender<(Scope, bool)>,
    current: Arc<Mutex<PathBuf>>,
    root_gone: Arc<Notify>,
    ignore: Arc<Ignore>,
) -> impl FnMut(notify::Result<Event>) + Send + 'static {
    move |result: notify::Result<Event>| {
        let dir = current.lock().unwrap_or_else(PoisonError::into_inner);
        let (scope, settled) = match result {
            Ok(event) => {
                let batch = batch(&dir, &ignore, std::slice::from_ref(&event));
                if batch.root_gone {
                    warn!(dir = %dir.display(), "watch.dir was deleted or moved away; watching again once it is back");
                    root_gone.notify_one();
                }
                (batch.scope, settles(&event.kind))
            }
            Err(e) => {
                warn!(error = %e, hint = hint(&e), "file watcher error; rescanning watch.dir whole");
                (Some(Scope::All), false)
            }
        };
        // Not held while waiting for room (the supervisor takes it to watch again).
        drop(dir);
        if let Some(scope) = scope {
            let _ = notes.send((scope, settled));
        }
    }
}

/// The debounce thread: what the handler noted goes into [`Quiet`], and each batch it releases
/// goes to `tx` at the instant it is due. Sleeps while nothing waits; ends when the handler is
/// gone (the watch stopped) or `tx`'s receiver is.
fn debounce_loop(
    noted: &std_mpsc::Receiver<(Scope, bool)>,
    window: Duration,
    tx: &UnboundedSender<Scope>,
) {
    let mut quiet = Quiet::new(window);
    loop {
        let next = match quiet.wake_at() {
            None => noted.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(at) => match at.checked_duration_since(Instant::now()) {
                Some(wait) if !wait.is_zero() => noted.recv_timeout(wait),
                _ => Err(RecvTimeoutError::Timeout),
            },
        };
        match next {
            Ok((scope, settled)) => quiet.note(scope, settled, Instant::now()),
            Err(RecvTimeoutError::Timeout) => {
                if let Some(scope) = quiet.release(Instant::now()) {
                    if tx.send(scope).is_err() {
                        return;
                    }
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// The directory notify watches: `watch.dir` resolved (notify does not watch a symlinked root
/// when links are not followed), and which directory that is (device, inode).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    path: PathBuf,
    id: (u64, u64),
}

impl Target {
    fn resolve(root: &Path) -> io::Result<Target> {
        use std::os::unix::fs::MetadataExt;
        let path = root.canonicalize()?;
        let m = std::fs::metadata(&path)?;
        if !m.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            ));
        }
        Ok(Target {
            path,
            id: (m.dev(), m.ino()),
        })
    }
}

/// What the supervising task owns; dropping the debouncer stops notify's threads.
struct Supervisor {
    debouncer: Inner,
    /// `watch.dir`, absolute, as configured.
    root: PathBuf,
    /// The directory the handler strips from event paths.
    current: Arc<Mutex<PathBuf>>,
    rescan_every: Duration,
    tx: UnboundedSender<Scope>,
    root_gone: Arc<Notify>,
}

/// The periodic rescan, and watching again when `watch.dir` went away or names another
/// directory.
async fn supervise(mut s: Supervisor, target: Target, stop: CancellationToken) {
    let start = tokio::time::Instant::now() + s.rescan_every;
    let mut rescan = tokio::time::interval_at(start, s.rescan_every);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // `None` while watch.dir is not watched.
    let mut target = Some(target);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = s.tx.closed() => break,
            _ = rescan.tick() => {
                debug!("periodic rescan of watch.dir");
                let _ = s.tx.send(Scope::All);
                // No event tells when a parent directory is renamed or a symlinked watch.dir
                // is pointed elsewhere: the watch would stay on the old directory.
                if let Some(t) = &target {
                    if Target::resolve(&s.root).ok().as_ref() != Some(t) {
                        warn!(dir = %s.root.display(), "watch.dir now names another directory (or none); watching it again");
                        let _ = s.debouncer.unwatch(&t.path);
                        target = None;
                    }
                }
            }
            _ = s.root_gone.notified() => {
                // A directory moved away keeps its inotify watch under the old name: drop it.
                if let Some(t) = target.take() {
                    let _ = s.debouncer.unwatch(&t.path);
                }
            }
            _ = tokio::time::sleep(REWATCH_EVERY), if target.is_none() => {}
        }
        if target.is_none() {
            target = s.rewatch();
        }
    }
    debug!(dir = %s.root.display(), "stopped watching watch.dir");
}

impl Supervisor {
    /// Watches `watch.dir` again if it is there, and asks for a full scan.
    fn rewatch(&mut self) -> Option<Target> {
        let t = Target::resolve(&self.root).ok()?;
        // Held across the watch, so no scope of the new watch is sent before its `All`.
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        // Walks the tree to add a watch per directory: brief, and rare.
        match self.debouncer.watch(&t.path, RecursiveMode::Recursive) {
            Ok(()) => {
                current.clone_from(&t.path);
                let _ = self.tx.send(Scope::All);
                info!(dir = %self.root.display(), watched = %t.path.display(), "watch.dir is back; watching it again");
                Some(t)
            }
            Err(e) => {
                debug!(error = %e, "watch.dir not watchable yet");
                None
            }
        }
    }
}

/// What to do about a notify error.
fn hint(e: &notify::Error) -> &'static str {
    match e.kind {
        notify::ErrorKind::MaxFilesWatch => {
            " (the inotify watch limit is reached: raise fs.inotify.max_user_watches; until then \
             directories beyond it are only seen by the periodic rescan)"
        }
        notify::ErrorKind::PathNotFound => " (create the directory, or fix watch.dir)",
        _ => "",
    }
}

/// What a list of events means.
#[derive(Debug, PartialEq, Eq)]
struct Batch {
    /// What to send, if anything.
    scope: Option<Scope>,
    /// The watched directory itself was deleted or moved away.
    root_gone: bool,
}

/// Turns events into a scope.
fn batch(root: &Path, ignore: &Ignore, events: &[Event]) -> Batch {
    let mut paths = BTreeSet::new();
    let mut all = false;
    let mut root_gone = false;
    for event in events {
        if event.need_rescan() {
            all = true;
            continue;
        }
        if !changes_content(&event.kind) {
            continue;
        }
        for path in &event.paths {
            match release_path(root, path) {
                Rel::Outside => {}
                Rel::Root => {
                    if matches!(
                        event.kind,
                        EventKind::Remove(_)
                            | EventKind::Modify(notify::event::ModifyKind::Name(_))
                    ) {
                        root_gone = true;
                        all = true;
                    }
                }
                Rel::Path(rel) => {
                    if !ignore.is_ignored(&rel) {
                        paths.insert(rel);
                    }
                }
                Rel::NotUtf8 { parent } if parent.is_empty() => all = true,
                Rel::NotUtf8 { parent } => {
                    if !ignore.is_ignored(&parent) {
                        paths.insert(parent);
                    }
                }
            }
        }
    }
    let scope = if all {
        Some(Scope::All)
    } else if paths.is_empty() {
        None
    } else {
        Some(Scope::Paths(paths))
    };
    Batch { scope, root_gone }
}

/// Whether an event says its change is complete, so its paths need not wait for the window:
/// a file closed after writing, renamed (into place, or away), or removed.
fn settles(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(notify::event::ModifyKind::Name(_))
            | EventKind::Remove(_)
    )
}

/// Whether an event kind can mean a change: reads (open, close without writing, access) and
/// notify's meta events cannot.
fn changes_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Other => false,
        EventKind::Any | EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
    }
}

/// Where an event's path is, relative to the watched directory.
#[derive(Debug, PartialEq, Eq)]
enum Rel {
    /// Not under it.
    Outside,
    /// The directory itself.
    Root,
    /// A release path (`/`-separated).
    Path(String),
    /// A name that is not UTF-8, under `parent` (`""` = the directory itself).
    NotUtf8 { parent: String },
}

fn release_path(root: &Path, path: &Path) -> Rel {
    let Ok(rest) = path.strip_prefix(root) else {
        return Rel::Outside;
    };
    let mut rel = String::new();
    for component in rest.components() {
        let Component::Normal(name) = component else {
            return Rel::Outside;
        };
        let Some(name) = name.to_str() else {
            return Rel::NotUtf8 { parent: rel };
        };
        if !rel.is_empty() {
            rel.push('/');
        }
        rel.push_str(name);
    }
    if rel.is_empty() {
        Rel::Root
    } else {
        Rel::Path(rel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, Flag, ModifyKind, RemoveKind, RenameMode};
    use std::fs;
    use std::time::Instant;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    const WAIT: Duration = Duration::from_secs(10);

    fn ev(kind: EventKind, paths: &[&Path]) -> Event {
        let mut e = Event::new(kind);
        for p in paths {
            e = e.add_path(p.to_path_buf());
        }
        e
    }

    fn set(list: &[&str]) -> Option<Scope> {
        Some(Scope::Paths(list.iter().map(|p| p.to_string()).collect()))
    }

    #[test]
    fn batches_name_release_paths_and_drop_reads_ignored_and_outside_paths() {
        let root = Path::new("/srv/www-edit");
        let ig = Ignore::default();
        let write = EventKind::Modify(ModifyKind::Data(notify::event::DataChange::Any));
        let b = batch(
            root,
            &ig,
            &[
                ev(write, &[&root.join("a/b.html")]),
                ev(EventKind::Create(CreateKind::Folder), &[&root.join("new")]),
                ev(
                    EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
                    &[&root.join("old.css"), &root.join("new.css")],
                ),
                ev(
                    EventKind::Access(AccessKind::Close(AccessMode::Write)),
                    &[&root.join("closed.txt")],
                ),
                ev(EventKind::Remove(RemoveKind::File), &[&root.join("gone")]),
                // Reads (detect's own), ignored names, other places, the root's metadata.
                ev(
                    EventKind::Access(AccessKind::Open(AccessMode::Any)),
                    &[&root.join("r")],
                ),
                ev(
                    EventKind::Access(AccessKind::Close(AccessMode::Read)),
                    &[&root.join("r")],
                ),
                ev(write, &[&root.join(".a/.b.html.swp")]),
                ev(write, &[&root.join(".lockstep-tmp-3")]),
                ev(write, &[Path::new("/srv/www-editx/a")]),
                ev(
                    EventKind::Modify(ModifyKind::Metadata(notify::event::MetadataKind::Any)),
                    &[root],
                ),
            ],
        );
        assert_eq!(
            b,
            Batch {
                scope: set(&[
                    "a/b.html",
                    "closed.txt",
                    "gone",
                    "new",
                    "new.css",
                    "old.css"
                ]),
                root_gone: false,
            }
        );
        let only_reads = [ev(
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            &[&root.join("r")],
        )];
        assert_eq!(batch(root, &ig, &only_reads).scope, None);
        assert_eq!(batch(root, &ig, &[]).scope, None);
    }

    #[test]
    fn lost_events_and_a_vanished_root_mean_a_full_rescan() {
        let root = Path::new("/srv/www-edit");
        let ig = Ignore::default();
        let overflow = ev(EventKind::Other, &[]).set_flag(Flag::Rescan);
        let b = batch(
            root,
            &ig,
            &[
                ev(EventKind::Create(CreateKind::File), &[&root.join("x")]),
                overflow,
            ],
        );
        assert_eq!(
            b,
            Batch {
                scope: Some(Scope::All),
                root_gone: false
            }
        );

        for kind in [
            EventKind::Remove(RemoveKind::Folder),
            EventKind::Modify(ModifyKind::Name(RenameMode::From)),
        ] {
            let b = batch(root, &ig, &[ev(kind, &[root])]);
            assert_eq!(
                b,
                Batch {
                    scope: Some(Scope::All),
                    root_gone: true
                }
            );
        }
    }

    #[test]
    fn names_that_are_not_utf8_name_their_directory() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let root = Path::new("/w");
        let bad = OsStr::from_bytes(b"caf\xe9");
        assert_eq!(
            release_path(root, &root.join("a/b").join(bad).join("c")),
            Rel::NotUtf8 {
                parent: "a/b".into()
            }
        );
        let ig = Ignore::default();
        let create = EventKind::Create(CreateKind::File);
        assert_eq!(
            batch(root, &ig, &[ev(create, &[&root.join("a").join(bad)])]).scope,
            set(&["a"])
        );
        assert_eq!(
            batch(root, &ig, &[ev(create, &[&root.join(bad)])]).scope,
            Some(Scope::All)
        );
        assert_eq!(release_path(root, Path::new("/w")), Rel::Root);
        assert_eq!(release_path(root, Path::new("/x/w/a")), Rel::Outside);
    }

    struct Watched {
        _tmp: tempfile::TempDir,
        dir: PathBuf,
        rx: UnboundedReceiver<Scope>,
        watcher: Watcher,
    }

    fn start(debounce_ms: u64, rescan: Duration, setup: impl FnOnce(&Path)) -> Watched {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("www-edit");
        fs::create_dir(&dir).unwrap();
        setup(&dir);
        let (tx, rx) = unbounded_channel();
        let watcher = spawn(
            &dir,
            Duration::from_millis(debounce_ms),
            rescan,
            Arc::new(Ignore::default()),
            tx,
            CancellationToken::new(),
        )
        .unwrap();
        Watched {
            _tmp: tmp,
            dir,
            rx,
            watcher,
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    impl Watched {
        async fn next(&mut self) -> Scope {
            tokio::time::timeout(WAIT, self.rx.recv())
                .await
                .expect("a scope within the wait")
                .expect("the watcher is running")
        }

        /// Receives until `done` holds for the paths named so far (or an `All` arrives);
        /// returns the messages.
        async fn until(&mut self, done: impl Fn(&BTreeSet<String>) -> bool) -> Vec<Scope> {
            let mut seen = BTreeSet::new();
            let mut got = Vec::new();
            while !done(&seen) {
                let s = self.next().await;
                got.push(s.clone());
                match s {
                    Scope::All => break,
                    Scope::Paths(p) => seen.extend(p),
                }
            }
            got
        }
    }

    fn names(scopes: &[Scope]) -> BTreeSet<String> {
        let mut all = BTreeSet::new();
        for s in scopes {
            if let Scope::Paths(p) = s {
                all.extend(p.iter().cloned());
            }
        }
        all
    }

    #[tokio::test]
    async fn first_a_full_scan_then_each_write_is_named() {
        let mut w = start(10, HOUR, |d| fs::write(d.join("old.html"), "o").unwrap());
        assert_eq!(w.next().await, Scope::All);
        fs::write(w.dir.join("index.html"), "<h1>hi</h1>").unwrap();
        let got = w.until(|s| s.contains("index.html")).await;
        assert!(names(&got).contains("index.html"), "{got:?}");
        assert!(!got.contains(&Scope::All), "{got:?}");
        // A new directory is named (detect rescans it whole), and so are files in it.
        fs::create_dir_all(w.dir.join("docs/deep")).unwrap();
        fs::write(w.dir.join("docs/deep/x.html"), "x").unwrap();
        let got = w.until(|s| s.contains("docs")).await;
        assert!(names(&got).contains("docs"), "{got:?}");
        w.watcher.stop().await;
    }

    #[tokio::test]
    async fn a_closed_file_is_named_at_once_and_one_still_written_a_window_after_its_last_write() {
        use std::io::Write;
        let window = Duration::from_millis(1500);
        let mut w = start(1500, HOUR, |_| {});
        assert_eq!(w.next().await, Scope::All);
        // open, write, close: the writer is done, nothing to wait for.
        let t = Instant::now();
        fs::write(w.dir.join("done.html"), "x").unwrap();
        let got = w.until(|s| s.contains("done.html")).await;
        assert!(
            t.elapsed() < window / 2,
            "a closed file waited {:?}: {got:?}",
            t.elapsed()
        );
        // Still open for writing: named only once it has been quiet for the window.
        let mut f = fs::File::create(w.dir.join("open.bin")).unwrap();
        f.write_all(b"part one").unwrap();
        let t = Instant::now();
        let got = w.until(|s| s.contains("open.bin")).await;
        assert!(
            t.elapsed() >= window - Duration::from_millis(100),
            "a file being written was named after {:?}: {got:?}",
            t.elapsed()
        );
        drop(f);
        w.watcher.stop().await;
    }

    #[tokio::test]
    async fn a_burst_of_writes_comes_in_few_batches_covering_every_file() {
        // A 50 ms window: with 10 ms, a test thread starved by the rest of the suite on two
        // cores wrote the burst slowly enough to make a batch of every few files (278 once).
        let mut w = start(50, HOUR, |d| fs::create_dir(d.join("burst")).unwrap());
        assert_eq!(w.next().await, Scope::All);
        let files: BTreeSet<String> = (0..1000).map(|i| format!("burst/f{i}.html")).collect();
        for f in &files {
            fs::write(w.dir.join(f), f).unwrap();
        }
        let got = w.until(|s| files.is_subset(s)).await;
        assert!(
            got.contains(&Scope::All) || files.is_subset(&names(&got)),
            "{got:?}"
        );
        assert!(got.len() < 250, "{} messages for 1000 writes", got.len());
        println!("1000 writes: {} messages", got.len());
    }

    #[tokio::test]
    async fn a_rename_names_both_files() {
        let mut w = start(10, HOUR, |d| {
            fs::write(d.join("a.html"), "a").unwrap();
            fs::create_dir(d.join("dir")).unwrap();
        });
        assert_eq!(w.next().await, Scope::All);
        fs::rename(w.dir.join("a.html"), w.dir.join("b.html")).unwrap();
        let got = w
            .until(|s| s.contains("a.html") && s.contains("b.html"))
            .await;
        assert!(!got.contains(&Scope::All), "{got:?}");
        fs::rename(w.dir.join("dir"), w.dir.join("moved")).unwrap();
        let got = w.until(|s| s.contains("dir") && s.contains("moved")).await;
        assert!(!got.contains(&Scope::All), "{got:?}");
    }

    #[tokio::test]
    async fn ignored_files_and_detects_own_reads_produce_nothing() {
        let mut w = start(10, HOUR, |d| {
            for i in 0..20 {
                fs::write(d.join(format!("f{i}.html")), "x").unwrap();
            }
        });
        assert_eq!(w.next().await, Scope::All);
        // What detect does: read every file (open, read, close).
        let tmp = tempfile::tempdir().unwrap();
        let store = crate::sync::store::FsStore::open(tmp.path()).unwrap();
        let ig = Ignore::default();
        let d = super::super::detect::detect(
            &w.dir,
            &Default::default(),
            &Scope::All,
            &ig,
            1 << 20,
            &store,
            0,
        )
        .unwrap();
        assert_eq!(d.changes.len(), 20);
        for junk in [".index.html.swp", "x~", ".#x", ".lockstep-tmp-1"] {
            fs::write(w.dir.join(junk), "junk").unwrap();
        }
        fs::write(w.dir.join("marker.html"), "m").unwrap();
        let got = w.until(|s| s.contains("marker.html")).await;
        assert_eq!(
            names(&got),
            BTreeSet::from(["marker.html".to_string()]),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn the_periodic_rescan_fires() {
        let mut w = start(10, Duration::from_millis(200), |_| {});
        assert_eq!(w.next().await, Scope::All);
        assert_eq!(w.next().await, Scope::All);
        assert_eq!(w.next().await, Scope::All);
    }

    #[tokio::test]
    async fn a_deleted_and_recreated_directory_is_watched_again() {
        let mut w = start(10, HOUR, |d| fs::write(d.join("a.html"), "a").unwrap());
        assert_eq!(w.next().await, Scope::All);
        fs::remove_dir_all(&w.dir).unwrap();
        let got = w.until(|_| false).await;
        assert_eq!(got.last(), Some(&Scope::All));
        fs::create_dir(&w.dir).unwrap();
        // Watched again: an All for the new directory, then its writes are named.
        let got = w.until(|_| false).await;
        assert_eq!(got.last(), Some(&Scope::All), "{got:?}");
        fs::write(w.dir.join("back.html"), "b").unwrap();
        let got = w.until(|s| s.contains("back.html")).await;
        assert!(names(&got).contains("back.html"), "{got:?}");
    }

    #[tokio::test]
    async fn a_symlinked_directory_pointed_elsewhere_is_followed_at_the_next_rescan() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, link) = (
            tmp.path().join("a"),
            tmp.path().join("b"),
            tmp.path().join("www-edit"),
        );
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        std::os::unix::fs::symlink(&a, &link).unwrap();
        let (tx, mut rx) = unbounded_channel();
        let rescan = Duration::from_millis(200);
        let _w = spawn(
            &link,
            Duration::from_millis(10),
            rescan,
            Arc::new(Ignore::default()),
            tx,
            CancellationToken::new(),
        )
        .unwrap();
        assert_eq!(
            tokio::time::timeout(WAIT, rx.recv()).await.unwrap(),
            Some(Scope::All)
        );
        // Watched through the link.
        fs::write(a.join("first.html"), "f").unwrap();
        loop {
            match tokio::time::timeout(WAIT, rx.recv())
                .await
                .unwrap()
                .unwrap()
            {
                Scope::Paths(p) if p.contains("first.html") => break,
                Scope::Paths(p) => panic!("{p:?}"),
                Scope::All => {}
            }
        }
        // Switched the way deploy scripts do: a new link renamed over the old one.
        std::os::unix::fs::symlink(&b, tmp.path().join("next")).unwrap();
        fs::rename(tmp.path().join("next"), &link).unwrap();
        // Until the switch is noticed only rescans come; then writes in `b` are named.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "writes in the new directory never named"
            );
            fs::write(b.join("probe.html"), "p").unwrap();
            match tokio::time::timeout(WAIT, rx.recv())
                .await
                .unwrap()
                .unwrap()
            {
                Scope::Paths(p) if p.contains("probe.html") => break,
                _ => {}
            }
        }
    }

    #[tokio::test]
    async fn stopping_releases_the_channel() {
        let mut w = start(10, HOUR, |_| {});
        assert_eq!(w.next().await, Scope::All);
        drop(w.watcher);
        fs::write(w.dir.join("late.html"), "l").unwrap();
        // Every sender is dropped once notify's threads and the task are gone.
        let end = tokio::time::timeout(WAIT, async {
            while let Some(s) = w.rx.recv().await {
                assert_ne!(s, Scope::All, "no rescan after stopping");
            }
        });
        end.await
            .expect("the channel closes after the watcher stops");
    }

    #[tokio::test]
    async fn bad_settings_and_missing_directories_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let (tx, _rx) = unbounded_channel();
        let go = |dir: &Path, debounce: Duration, rescan: Duration| {
            spawn(
                dir,
                debounce,
                rescan,
                Arc::new(Ignore::default()),
                tx.clone(),
                CancellationToken::new(),
            )
        };
        let ms = Duration::from_millis(10);
        assert!(matches!(
            go(tmp.path(), Duration::ZERO, HOUR),
            Err(WatchError::Zero { .. })
        ));
        assert!(matches!(
            go(tmp.path(), ms, Duration::ZERO),
            Err(WatchError::Zero { .. })
        ));
        let err = go(&tmp.path().join("nope"), ms, HOUR).unwrap_err();
        assert!(
            err.to_string()
                .contains("create the directory, or fix watch.dir"),
            "{err}"
        );
    }

    #[test]
    fn outside_a_runtime_is_an_error() {
        let (tx, _rx) = unbounded_channel();
        let tmp = tempfile::tempdir().unwrap();
        let r = spawn(
            tmp.path(),
            Duration::from_millis(10),
            HOUR,
            Arc::new(Ignore::default()),
            tx,
            CancellationToken::new(),
        );
        assert!(matches!(r, Err(WatchError::NoRuntime)));
    }
}
