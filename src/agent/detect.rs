//! What changed in the watched directory (`watch.dir`): the files in a [`Scope`] are read,
//! hashed and compared with what the agent knows the directory holds ([`Files`]), giving the
//! paths added, changed and removed, and the paths refused with a reason an operator can act
//! on.
//!
//! Blocking file I/O, run off the async threads; no watching here (that is `watcher`), no
//! network. Each file in scope is read once, whole, into memory, hashed, and — when it differs
//! from what is known — its bytes are stored as a blob in the agent's store before the change
//! is reported, so a change always names bytes that are stored, whatever the file becomes
//! afterwards. Or, up to `hold_bytes` of them, handed back in memory ([`Detected::held`]): the
//! caller sends them to its peers first and stores them (`FsStore::write_blob`) before it
//! records the change — the fsyncs of a durable write are then off the path of a forwarded
//! edit, and nothing durable names a blob that is not stored.
//!
//! Rules (the walk is `tree::walk`, shared with `lockstep publish`):
//! - a scope path that is a file is compared with the known entry; a directory has its whole
//!   subtree rescanned; a path that is gone removes every known path equal to it or under
//!   `it/`. A scope path under something that is no longer a directory (gone, now a file or a
//!   symlink) is taken as that ancestor, so a deleted tree is removed whole.
//! - [`Ignore`]d paths never appear in the changes; a known path that is ignored now is left
//!   as it is (not reported removed), so adding an ignore glob never deletes content fleet-wide.
//! - refused, never in the changes, and the known entry (or a known subtree under a refused
//!   directory) is *not* reported removed: symlinks leading out of the directory, symlinks to
//!   directories, names that are not UTF-8 or not valid release paths, files over the size
//!   limit, and files or directories the agent may not read (permission denied: refused rather
//!   than failing, so one root-owned file cannot stop detection for everything else).
//! - a symlink to a file inside the directory is resolved (its release path is the link's):
//!   its target is checked to be inside, then opened by that target path.
//! - no open follows a symlink (`sync::beneath`): directories are listed and files read
//!   through a handle on `watch.dir`, and a read whose path meets a link (a file or directory
//!   swapped for one since it was listed or checked) is refused with the link's name, like a
//!   link leading out. A known file that became a link to a secret is never read, whatever the
//!   timing, and is not reported removed either.
//! - a file that vanishes between listing and reading counts as removed; a dangling symlink
//!   counts as no file. Other I/O errors fail with [`DetectError`], naming the path.
//! - the watched directory itself missing is an error, never "everything was removed": a
//!   deleted or unmounted `watch.dir` must not empty the fleet.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::io::{self, Read};
use std::ops::Bound;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use rustix::fs::FileType;

use crate::sync::beneath::{BeneathError, Dir};
use crate::sync::manifest::{check_path, content_type, Entry, Hash, ManifestError, MAX_BLOB_BYTES};
use crate::sync::store::{FsStore, StoreError};
use crate::sync::tree::{classify, walk, Kind, Refusal, Visit};

pub use super::ignore::{Ignore, IgnoreError};

/// What the agent knows the directory holds: release path → manifest entry.
pub type Files = BTreeMap<String, Entry>;

/// What to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// These release paths (relative to the directory, as the watcher reports them): files
    /// or directories, existing or gone. An empty path means the whole directory.
    Paths(BTreeSet<String>),
    /// The whole directory against everything known.
    All,
}

impl Scope {
    /// Adds `other` to this scope (for a consumer draining several at once): `All` absorbs
    /// everything.
    pub fn merge(&mut self, other: Scope) {
        match (self, other) {
            (Scope::All, _) => {}
            (s, Scope::All) => *s = Scope::All,
            (Scope::Paths(a), Scope::Paths(b)) => a.extend(b),
        }
    }
}

/// A path that cannot be synced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The release path (not-UTF-8 names shown lossily).
    pub path: String,
    /// Why, and what to do about it.
    pub reason: String,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// What [`detect`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Detected {
    /// `Some(entry)` = added or changed (its blob is stored, or in `held`), `None` = removed.
    /// Only real differences from what was known.
    pub changes: BTreeMap<String, Option<Entry>>,
    /// Paths refused: never in `changes`, and what was known of them stays.
    pub refused: Vec<Refused>,
    /// Blobs of `changes` read but not stored yet (at most `hold_bytes` of [`detect`]).
    pub held: Vec<(Hash, Bytes)>,
}

/// Why detection failed (nothing is reported: the caller retries at the next event or rescan).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DetectError {
    /// The watched directory cannot be opened.
    #[error("watch.dir {dir}: {source}; nothing is detected until it is back")]
    Root {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Reading a file or directory failed.
    #[error("watch.dir: cannot read {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A blob could not be stored.
    #[error("agent store: {0}")]
    Store(#[from] StoreError),
}

/// Compares the files of `dir` in `scope` with `known`. Each file read (≤ `max_file_bytes`,
/// and never over [`MAX_BLOB_BYTES`]) is hashed with blake3; the blob of each added or
/// changed file is stored in `store` (blobs already there are left alone), except up to
/// `hold_bytes` of them, which are returned in [`Detected::held`] for the caller to store.
/// Content types come from `manifest::content_type`. See the module docs for the rules.
pub fn detect(
    dir: &Path,
    known: &Files,
    scope: &Scope,
    ignore: &Ignore,
    max_file_bytes: u64,
    store: &FsStore,
    hold_bytes: u64,
) -> Result<Detected, DetectError> {
    let canonical_root = dir.canonicalize().map_err(|source| DetectError::Root {
        dir: dir.to_path_buf(),
        source,
    })?;
    let handle = Dir::open(dir, "watch.dir").map_err(|e| DetectError::Root {
        dir: dir.to_path_buf(),
        source: e.into(),
    })?;
    let mut d = Detector {
        root: dir,
        handle: &handle,
        known,
        ignore,
        limit: Limit::new(max_file_bytes),
        store,
        hold_bytes,
        seen: HashSet::new(),
        protected: BTreeSet::new(),
        out: Detected::default(),
    };
    let regions = match scope {
        Scope::Paths(paths) if !paths.contains("") => d.regions(paths)?,
        _ => BTreeSet::from([String::new()]),
    };
    for region in &regions {
        d.scan(region, &canonical_root)?;
    }
    for region in &regions {
        d.removals(region);
    }
    Ok(d.out)
}

/// The size limit and where it comes from (for the reason given).
#[derive(Debug, Clone, Copy)]
struct Limit {
    bytes: u64,
    from_config: bool,
}

impl Limit {
    fn new(max_file_bytes: u64) -> Limit {
        Limit {
            bytes: max_file_bytes.min(MAX_BLOB_BYTES),
            from_config: max_file_bytes <= MAX_BLOB_BYTES,
        }
    }

    fn refusal(&self, size: u64) -> String {
        let what = if self.from_config {
            "watch.max_file_size"
        } else {
            "the largest file a release may hold"
        };
        format!(
            "{} is over {what} ({}): refused; the other backends keep the previous version",
            human(size),
            human(self.bytes)
        )
    }
}

/// `80 MiB`, `1.5 KiB`, `12 bytes`.
fn human(bytes: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;
    let scaled = |unit: u64, name: &str| {
        let s = format!("{:.1}", bytes as f64 / unit as f64);
        format!("{} {name}", s.strip_suffix(".0").unwrap_or(&s))
    };
    if bytes >= MIB {
        scaled(MIB, "MiB")
    } else if bytes >= KIB {
        scaled(KIB, "KiB")
    } else {
        format!("{bytes} bytes")
    }
}

/// A path that is not there (any more): the file, or a directory on the way, is gone.
fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

struct Detector<'a> {
    root: &'a Path,
    /// `root` held open: every listing and read goes through it.
    handle: &'a Dir,
    known: &'a Files,
    ignore: &'a Ignore,
    limit: Limit,
    store: &'a FsStore,
    /// Blob bytes that may still be held in memory rather than stored.
    hold_bytes: u64,
    /// Paths read this time (present, not refused).
    seen: HashSet<String>,
    /// Refused paths: what is known at or under them is kept.
    protected: BTreeSet<String>,
    out: Detected,
}

impl Detector<'_> {
    /// The disjoint subtrees to rescan for `paths`: each path, or its first ancestor that is
    /// no longer a real directory; none inside another.
    fn regions(&self, paths: &BTreeSet<String>) -> Result<BTreeSet<String>, DetectError> {
        let mut dirs: HashSet<&str> = HashSet::new();
        let mut regions = BTreeSet::new();
        for path in paths {
            if self.ignore.is_ignored(path) {
                continue;
            }
            let mut region = path.as_str();
            for (i, _) in path.match_indices('/') {
                let ancestor = &path[..i];
                if dirs.contains(ancestor) {
                    continue;
                }
                match std::fs::symlink_metadata(self.root.join(ancestor)) {
                    Ok(m) if m.file_type().is_dir() => {
                        dirs.insert(ancestor);
                    }
                    // Gone, a file or a symlink now: that ancestor is what changed.
                    Ok(_) => {
                        region = ancestor;
                        break;
                    }
                    Err(e) if is_gone(&e) || e.kind() == io::ErrorKind::PermissionDenied => {
                        region = ancestor;
                        break;
                    }
                    Err(source) => {
                        return Err(DetectError::Io {
                            path: self.root.join(ancestor),
                            source,
                        })
                    }
                }
            }
            regions.insert(region.to_string());
        }
        // A region inside another is covered by it.
        let nested: Vec<String> = regions
            .iter()
            .filter(|r| r.match_indices('/').any(|(i, _)| regions.contains(&r[..i])))
            .cloned()
            .collect();
        for r in nested {
            regions.remove(&r);
        }
        Ok(regions)
    }

    /// Reads what is at `region` now (`""` = the whole directory).
    fn scan(&mut self, region: &str, canonical_root: &Path) -> Result<(), DetectError> {
        // A copy of the reference, so the walk's filter does not borrow `self`.
        let ignore: &Ignore = self.ignore;
        let filter = |rel: &str| ignore.ignores_last(rel);
        let handle: &Dir = self.handle;
        if region.is_empty() {
            return walk(handle, String::new(), canonical_root, &filter, self);
        }
        if let Err(e) = check_path(region) {
            self.refuse(region, bad_path(&e));
            return Ok(());
        }
        let full = self.root.join(region);
        // Only a first look: what is read is opened through the handle.
        let kind = match std::fs::symlink_metadata(&full) {
            Ok(m) => FileType::from_raw_mode(m.mode()),
            Err(e) => return self.io(&full, e),
        };
        match classify(&full, kind, canonical_root) {
            Kind::Dir => walk(handle, region.to_string(), canonical_root, &filter, self),
            Kind::File => self.file(&full, region.to_string(), Path::new(region)),
            Kind::Link(target) => self.file(&full, region.to_string(), &target),
            Kind::Skip => Ok(()),
            Kind::Refused(why) => self.refused(&full, Some(region.to_string()), why),
        }
    }

    /// Reports known paths at or under `region` that were not seen, unless ignored or refused.
    fn removals(&mut self, region: &str) {
        let known = self.known;
        let gone = |(path, _): (&String, &Entry)| {
            !self.seen.contains(path) && !self.ignore.is_ignored(path) && !self.is_protected(path)
        };
        let removed: Vec<String> = if region.is_empty() {
            known
                .iter()
                .filter(|e| gone(*e))
                .map(|(p, _)| p.clone())
                .collect()
        } else {
            let under = format!("{region}/");
            known
                .get_key_value(region)
                .into_iter()
                .chain(
                    known
                        .range::<str, _>((Bound::Included(under.as_str()), Bound::Unbounded))
                        .take_while(|(p, _)| p.starts_with(&under)),
                )
                .filter(|e| gone(*e))
                .map(|(p, _)| p.clone())
                .collect()
        };
        for path in removed {
            self.out.changes.insert(path, None);
        }
    }

    /// Whether `path` or a directory on the way to it was refused.
    fn is_protected(&self, path: &str) -> bool {
        !self.protected.is_empty()
            && (self.protected.contains(path)
                || path
                    .match_indices('/')
                    .any(|(i, _)| self.protected.contains(&path[..i])))
    }

    fn refuse(&mut self, rel: &str, reason: String) {
        self.protected.insert(rel.to_string());
        self.out.refused.push(Refused {
            path: rel.to_string(),
            reason,
        });
    }

    /// The release path of `path` for a message, lossy when it is not UTF-8.
    fn display(&self, path: &Path) -> String {
        path.strip_prefix(self.root)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned()
    }
}

impl Visit for Detector<'_> {
    type Error = DetectError;

    /// An I/O error at `path`: gone is absent, unreadable is refused, anything else fails.
    fn io(&mut self, path: &Path, source: io::Error) -> Result<(), DetectError> {
        if is_gone(&source) {
            return Ok(());
        }
        if source.kind() == io::ErrorKind::PermissionDenied {
            let rel = self.display(path);
            self.refuse(
                &rel,
                format!("cannot be read ({source}): refused; the other backends keep the previous version"),
            );
            return Ok(());
        }
        Err(DetectError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    fn refused(
        &mut self,
        path: &Path,
        rel: Option<String>,
        why: Refusal,
    ) -> Result<(), DetectError> {
        let rel = rel.unwrap_or_else(|| self.display(path));
        let reason = match why {
            Refusal::NotUtf8 => "the name is not UTF-8: refused; rename it".to_string(),
            Refusal::Escapes(target) => format!(
                "symlink points outside {} (to {}): refused",
                self.root.display(),
                target.display()
            ),
            Refusal::LinkedDir => {
                "symlink to a directory: refused (directories are not followed; link each file or copy the directory in)".to_string()
            }
            // A dangling symlink is simply not a file.
            Refusal::Broken(e) if is_gone(&e) => return Ok(()),
            Refusal::Broken(e) => format!("symlink cannot be resolved ({e}): refused"),
            Refusal::Link(e) => link_met(&e),
        };
        self.refuse(&rel, reason);
        Ok(())
    }

    /// Reads, hashes and compares one file; stores its blob when it is a change.
    fn file(&mut self, path: &Path, rel: String, source: &Path) -> Result<(), DetectError> {
        if let Err(e) = check_path(&rel) {
            self.refuse(&rel, bad_path(&e));
            return Ok(());
        }
        let data = match self.read(source) {
            Ok(Content::Data(d)) => d,
            Ok(Content::Absent) => return Ok(()),
            Ok(Content::TooLarge(size)) => {
                let reason = self.limit.refusal(size);
                self.refuse(&rel, reason);
                return Ok(());
            }
            Err(e) if e.is_symlink() => {
                self.refuse(&rel, link_met(&e));
                return Ok(());
            }
            Err(e) => return self.io(path, e.into()),
        };
        let entry = Entry {
            hash: Hash::of(&data),
            size: data.len() as u64,
            content_type: content_type(&rel),
        };
        if self.known.get(&rel) != Some(&entry) {
            if entry.size <= self.hold_bytes && !self.store.has_blob(&entry.hash) {
                self.hold_bytes -= entry.size;
                self.out.held.push((entry.hash, Bytes::from(data)));
            } else {
                self.store.write_blob(&entry.hash, &data)?;
            }
            self.out.changes.insert(rel.clone(), Some(entry));
        }
        self.seen.insert(rel);
        Ok(())
    }
}

impl Detector<'_> {
    /// The whole content of `source` (beneath the root, no link followed), at most the limit.
    fn read(&self, source: &Path) -> Result<Content, BeneathError> {
        let mut f = match self.handle.open_file(source) {
            Ok(f) => f,
            Err(e) if is_gone(&io::Error::from(e.kind())) => return Ok(Content::Absent),
            Err(e) => return Err(e),
        };
        let failed = |e: io::Error| BeneathError::Io {
            path: self.root.join(source),
            source: e,
        };
        let meta = f.metadata().map_err(failed)?;
        if !meta.is_file() {
            // Replaced by a directory (or other) since it was listed.
            return Ok(Content::Absent);
        }
        if meta.len() > self.limit.bytes {
            return Ok(Content::TooLarge(meta.len()));
        }
        // The length is at most the limit (≤ 64 MiB), so it fits a usize.
        let mut data = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        (&mut f)
            .take(self.limit.bytes + 1)
            .read_to_end(&mut data)
            .map_err(failed)?;
        if data.len() as u64 > self.limit.bytes {
            // It grew while being read.
            return Ok(Content::TooLarge(data.len() as u64));
        }
        Ok(Content::Data(data))
    }
}

/// What reading a file gave.
enum Content {
    Data(Vec<u8>),
    /// Gone since it was listed.
    Absent,
    /// Over the limit: its size (at least).
    TooLarge(u64),
}

/// The reason for a path whose read met a symlink (named in `e`).
fn link_met(e: &BeneathError) -> String {
    format!("{e}: refused; the other backends keep the previous version")
}

fn bad_path(e: &ManifestError) -> String {
    match e {
        ManifestError::Path { reason, .. } => format!("the name {reason}: refused; rename it"),
        other => format!("{other}: refused"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    const MIB: u64 = 1024 * 1024;

    struct Site {
        _tmp: tempfile::TempDir,
        dir: PathBuf,
        outside: PathBuf,
        store: FsStore,
        known: Files,
        ignore: Ignore,
    }

    impl Site {
        fn new() -> Site {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("www-edit");
            let outside = tmp.path().join("outside");
            fs::create_dir_all(&dir).unwrap();
            fs::create_dir_all(&outside).unwrap();
            let store = FsStore::open(&tmp.path().join("store")).unwrap();
            Site {
                _tmp: tmp,
                dir,
                outside,
                store,
                known: Files::new(),
                ignore: Ignore::default(),
            }
        }

        fn write(&self, rel: &str, data: &str) {
            let p = self.dir.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, data).unwrap();
        }

        fn try_detect(&self, scope: &Scope) -> Result<Detected, DetectError> {
            detect(
                &self.dir,
                &self.known,
                scope,
                &self.ignore,
                MIB,
                &self.store,
                0,
            )
        }

        fn detect(&self, scope: &Scope) -> Detected {
            self.try_detect(scope).unwrap()
        }

        /// Detects and takes the changes as known, as the agent will.
        fn sync(&mut self, scope: &Scope) -> Detected {
            let d = self.detect(scope);
            for (path, change) in &d.changes {
                match change {
                    Some(e) => self.known.insert(path.clone(), e.clone()),
                    None => self.known.remove(path),
                };
            }
            d
        }
    }

    fn paths(list: &[&str]) -> Scope {
        Scope::Paths(list.iter().map(|p| p.to_string()).collect())
    }

    fn changed(d: &Detected) -> Vec<(&str, bool)> {
        d.changes
            .iter()
            .map(|(p, e)| (p.as_str(), e.is_some()))
            .collect()
    }

    #[test]
    fn add_change_unchanged_and_remove_of_a_file() {
        let mut s = Site::new();
        s.write("index.html", "<h1>v1</h1>");
        s.write("css/a.css", "a{}");
        let d = s.sync(&Scope::All);
        assert_eq!(changed(&d), [("css/a.css", true), ("index.html", true)]);
        let e = &d.changes["index.html"].as_ref().unwrap();
        assert_eq!(e.hash, Hash::of(b"<h1>v1</h1>"));
        assert_eq!(e.size, 11);
        assert_eq!(e.content_type, "text/html; charset=utf-8");

        // Nothing changed: nothing reported, by path or whole.
        assert_eq!(s.detect(&paths(&["index.html"])), Detected::default());
        assert_eq!(s.detect(&Scope::All), Detected::default());

        s.write("index.html", "<h1>v2</h1>");
        let d = s.sync(&paths(&["index.html"]));
        assert_eq!(changed(&d), [("index.html", true)]);
        assert_eq!(s.known["index.html"].hash, Hash::of(b"<h1>v2</h1>"));

        fs::remove_file(s.dir.join("index.html")).unwrap();
        let d = s.sync(&paths(&["index.html"]));
        assert_eq!(changed(&d), [("index.html", false)]);
        assert_eq!(s.known.keys().collect::<Vec<_>>(), ["css/a.css"]);
        assert!(d.refused.is_empty());
    }

    #[test]
    fn blobs_hold_exactly_the_bytes_hashed() {
        let mut s = Site::new();
        s.write("a.txt", "alpha");
        s.write("b/c.txt", "gamma");
        let d = s.sync(&Scope::All);
        for entry in d.changes.values().flatten() {
            let blob = s.store.read_blob(&entry.hash).unwrap().unwrap();
            assert_eq!(Hash::of(&blob), entry.hash);
            assert_eq!(blob.len() as u64, entry.size);
        }
        assert_eq!(
            s.store.read_blob(&Hash::of(b"gamma")).unwrap().unwrap(),
            b"gamma"
        );
    }

    #[test]
    fn renames_of_a_file_and_of_a_directory() {
        let mut s = Site::new();
        s.write("a.html", "A");
        s.write("docs/x.html", "X");
        s.write("docs/deep/y.css", "Y");
        s.sync(&Scope::All);

        fs::rename(s.dir.join("a.html"), s.dir.join("b.html")).unwrap();
        let d = s.sync(&paths(&["a.html", "b.html"]));
        assert_eq!(changed(&d), [("a.html", false), ("b.html", true)]);

        fs::rename(s.dir.join("docs"), s.dir.join("guide")).unwrap();
        let d = s.sync(&paths(&["docs", "guide"]));
        assert_eq!(
            changed(&d),
            [
                ("docs/deep/y.css", false),
                ("docs/x.html", false),
                ("guide/deep/y.css", true),
                ("guide/x.html", true),
            ]
        );
        assert_eq!(
            d.changes["guide/x.html"].as_ref().unwrap().hash,
            Hash::of(b"X")
        );
    }

    #[test]
    fn a_deleted_tree_is_removed_whole_even_when_named_by_a_nested_path() {
        let mut s = Site::new();
        s.write("keep.html", "k");
        s.write("docs-old.html", "o");
        s.write("docs/a.html", "a");
        s.write("docs/sub/b.html", "b");
        s.write("docs/sub/deeper/c.html", "c");
        s.sync(&Scope::All);
        fs::remove_dir_all(s.dir.join("docs")).unwrap();
        // The watcher may only name the deepest file it saw go.
        let d = s.sync(&paths(&["docs/sub/deeper/c.html"]));
        assert_eq!(
            changed(&d),
            [
                ("docs/a.html", false),
                ("docs/sub/b.html", false),
                ("docs/sub/deeper/c.html", false),
            ]
        );
        assert_eq!(
            s.known.keys().collect::<Vec<_>>(),
            ["docs-old.html", "keep.html"]
        );
    }

    #[test]
    fn a_directory_replaced_by_a_file_and_back() {
        let mut s = Site::new();
        s.write("x/y.html", "y");
        s.sync(&Scope::All);
        fs::remove_dir_all(s.dir.join("x")).unwrap();
        s.write("x", "now a file");
        let d = s.sync(&paths(&["x/y.html"]));
        assert_eq!(changed(&d), [("x", true), ("x/y.html", false)]);
        fs::remove_file(s.dir.join("x")).unwrap();
        s.write("x/z.html", "z");
        let d = s.sync(&paths(&["x"]));
        assert_eq!(changed(&d), [("x", false), ("x/z.html", true)]);
    }

    #[test]
    fn symlinks_inside_are_followed_and_those_leading_out_refused() {
        let mut s = Site::new();
        s.write("index.html", "home");
        s.write("assets/logo.svg", "<svg/>");
        symlink(s.dir.join("index.html"), s.dir.join("home.html")).unwrap();
        symlink("assets/logo.svg", s.dir.join("logo.svg")).unwrap();
        let d = s.sync(&Scope::All);
        assert_eq!(
            changed(&d),
            [
                ("assets/logo.svg", true),
                ("home.html", true),
                ("index.html", true),
                ("logo.svg", true),
            ]
        );
        assert_eq!(s.known["home.html"].hash, Hash::of(b"home"));
        assert!(d.refused.is_empty());

        // A known file replaced by a link to a secret: refused, and not removed either.
        fs::write(s.outside.join("passwd"), "root:x:0:0").unwrap();
        fs::remove_file(s.dir.join("index.html")).unwrap();
        symlink(s.outside.join("passwd"), s.dir.join("index.html")).unwrap();
        for scope in [paths(&["index.html"]), Scope::All] {
            let d = s.detect(&scope);
            // home.html now leads out too (through index.html).
            let refused: Vec<_> = d.refused.iter().map(|r| r.path.as_str()).collect();
            assert!(refused.contains(&"index.html"), "{d:?}");
            assert!(!d.changes.contains_key("index.html"), "{d:?}");
            let r = d.refused.iter().find(|r| r.path == "index.html").unwrap();
            assert!(
                r.to_string().starts_with(&format!(
                    "index.html: symlink points outside {} (to ",
                    s.dir.display()
                )),
                "{r}"
            );
            assert!(r.reason.ends_with("passwd): refused"), "{r}");
        }
        assert!(s
            .store
            .read_blob(&Hash::of(b"root:x:0:0"))
            .unwrap()
            .is_none());

        // A dangling link is no file.
        fs::remove_file(s.dir.join("assets/logo.svg")).unwrap();
        let d = s.detect(&paths(&["assets/logo.svg", "logo.svg"]));
        assert_eq!(
            changed(&d),
            [("assets/logo.svg", false), ("logo.svg", false)]
        );
        assert!(d.refused.is_empty());
    }

    /// The race of the security issue: a file of watch.dir swapped back and forth for a
    /// symlink to a secret (an editor's save, or someone with write access to watch.dir) while
    /// edits are detected. Whatever moment the swap hits (between listing and opening, between
    /// `lstat` and reading), the secret's bytes are never read into a change nor stored as a
    /// blob, by one path or by the whole tree.
    #[test]
    fn a_file_swapped_for_a_link_to_a_secret_never_ships_the_secret() {
        let mut s = Site::new();
        let secret = s.outside.join("agent.token");
        fs::write(&secret, "TOP-SECRET-TOKEN").unwrap();
        let leaked = Hash::of(b"TOP-SECRET-TOKEN");
        s.write("page.html", "public");
        s.write("docs/inner.html", "public");
        s.sync(&Scope::All);

        // Detection runs for as long as the flipper takes to swap the file 20 000 times.
        let flipper = {
            let dir = s.dir.clone();
            std::thread::spawn(move || {
                // Renamed over the file, so `page.html` is always there: a file or a link.
                let tmp = dir.join(".lockstep-tmp-flip");
                for i in 0..20_000u64 {
                    let _ = fs::remove_file(&tmp);
                    if i % 2 == 0 {
                        symlink(&secret, &tmp).unwrap();
                    } else {
                        fs::write(&tmp, "public").unwrap();
                    }
                    fs::rename(&tmp, dir.join("page.html")).unwrap();
                }
            })
        };
        let mut rounds = 0;
        while !flipper.is_finished() {
            for scope in [
                paths(&["page.html"]),
                paths(&["docs", "page.html"]),
                Scope::All,
            ] {
                // An I/O error is "try again later"; what matters is what was read.
                if let Ok(d) = s.try_detect(&scope) {
                    for e in d.changes.values().flatten() {
                        assert_ne!(e.hash, leaked, "the secret was read as a change: {d:?}");
                    }
                }
                assert!(
                    s.store.read_blob(&leaked).unwrap().is_none(),
                    "the secret was stored as a blob (round {rounds})"
                );
            }
            rounds += 1;
        }
        flipper.join().unwrap();
        assert!(rounds > 100, "the race was not exercised");
    }

    #[test]
    fn symlinked_directories_are_refused_and_keep_what_was_known() {
        let mut s = Site::new();
        s.write("docs/a.html", "a");
        s.sync(&Scope::All);
        fs::rename(s.dir.join("docs"), s.dir.join("real-docs")).unwrap();
        symlink("real-docs", s.dir.join("docs")).unwrap();
        let d = s.detect(&paths(&["docs", "real-docs"]));
        assert_eq!(changed(&d), [("real-docs/a.html", true)]);
        assert_eq!(d.refused.len(), 1);
        assert_eq!(d.refused[0].path, "docs");
        assert!(d.refused[0].reason.contains("symlink to a directory"));
        // The same by the whole tree, and through a path under the link.
        let all = s.detect(&Scope::All);
        assert_eq!(all, d);
        assert_eq!(s.detect(&paths(&["docs/a.html", "real-docs"])), d);
    }

    #[test]
    fn files_over_the_limit_are_refused_with_a_reason() {
        let mut s = Site::new();
        s.write("big.iso", "small at first");
        s.sync(&Scope::All);
        fs::write(s.dir.join("big.iso"), vec![0u8; (MIB + 1) as usize]).unwrap();
        let d = s.detect(&paths(&["big.iso"]));
        assert!(d.changes.is_empty(), "the known version stays: {d:?}");
        assert_eq!(
            d.refused[0].to_string(),
            "big.iso: 1 MiB is over watch.max_file_size (1 MiB): refused; \
             the other backends keep the previous version"
        );
        let d = detect(
            &s.dir,
            &s.known,
            &Scope::All,
            &s.ignore,
            80 * MIB,
            &s.store,
            0,
        )
        .unwrap();
        assert_eq!(changed(&d), [("big.iso", true)]);
        let d = detect(
            &s.dir,
            &s.known,
            &Scope::All,
            &s.ignore,
            512 * 1024,
            &s.store,
            0,
        )
        .unwrap();
        assert!(d.refused[0]
            .reason
            .starts_with("1 MiB is over watch.max_file_size (512 KiB)"));
        assert!(Limit::new(u64::MAX)
            .refusal(80 * MIB)
            .contains("80 MiB is over the largest file a release may hold (64 MiB)"));
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(12), "12 bytes");
    }

    #[test]
    fn default_ignores_and_the_agents_own_temporaries() {
        let mut s = Site::new();
        for name in [
            ".index.html.swp",
            "x~",
            ".#x",
            "#x#",
            "4913",
            ".DS_Store",
            ".lockstep-tmp-1",
            "sub/.lockstep-tmp-2",
        ] {
            s.write(name, "junk");
        }
        s.write("index.html", "real");
        let d = s.sync(&Scope::All);
        assert_eq!(changed(&d), [("index.html", true)]);
        let d = s.detect(&paths(&[".index.html.swp", "x~", ".lockstep-tmp-1", "sub"]));
        assert_eq!(d, Detected::default());
        assert!(s.ignore.is_ignored(".lockstep-tmp-9/inner.html"));
        assert!(!s.ignore.is_ignored("index.html"));
        assert!(!s.ignore.is_ignored("a.swf"));
    }

    #[test]
    fn custom_globs_and_known_paths_that_are_ignored_now() {
        let ig = Ignore::new(&["*.bak", "/drafts/*"]).unwrap();
        let mut s = Site::new();
        s.ignore = ig;
        s.write("drafts/new.html", "d");
        s.write("page.html.bak", "b");
        s.write("page.html", "p");
        let d = s.sync(&Scope::All);
        assert_eq!(changed(&d), [("page.html", true)]);
        // A known path that is ignored now stays known: adding a glob deletes nothing.
        s.known
            .insert("old.bak".into(), s.known["page.html"].clone());
        assert_eq!(s.detect(&Scope::All), Detected::default());
        assert_eq!(
            s.detect(&paths(&["old.bak", "drafts"])),
            Detected::default()
        );
    }

    #[test]
    fn names_that_cannot_be_release_paths_are_refused() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let mut s = Site::new();
        s.write("ok.html", "ok");
        s.write("a\\b.html", "backslash");
        fs::write(s.dir.join(OsStr::from_bytes(b"caf\xe9.html")), "latin-1").unwrap();
        let d = s.sync(&Scope::All);
        assert_eq!(changed(&d), [("ok.html", true)]);
        let mut reasons: Vec<String> = d.refused.iter().map(|r| r.to_string()).collect();
        reasons.sort();
        assert_eq!(
            reasons,
            [
                "a\\b.html: the name contains a backslash: refused; rename it",
                "caf\u{fffd}.html: the name is not UTF-8: refused; rename it",
            ]
        );
    }

    #[test]
    fn unreadable_files_are_refused_not_fatal() {
        use std::os::unix::fs::PermissionsExt;
        let mut s = Site::new();
        s.write("secret.html", "s");
        s.write("open.html", "o");
        s.sync(&Scope::All);
        s.write("secret.html", "changed");
        let secret = s.dir.join("secret.html");
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o000)).unwrap();
        s.write("open.html", "o2");
        if fs::read(&secret).is_ok() {
            return; // Running as root: permissions do not apply (see the next test).
        }
        let d = s.detect(&Scope::All);
        assert_eq!(changed(&d), [("open.html", true)]);
        assert_eq!(d.refused[0].path, "secret.html");
        assert!(
            d.refused[0].reason.starts_with("cannot be read ("),
            "{:?}",
            d.refused
        );
    }

    #[test]
    fn blobs_up_to_the_hold_are_handed_back_unstored_the_rest_stored() {
        let s = Site::new();
        s.write("small.html", "0123456789");
        s.write("big.html", &"x".repeat(100));
        let d = detect(&s.dir, &s.known, &Scope::All, &s.ignore, MIB, &s.store, 50).unwrap();
        assert_eq!(changed(&d), [("big.html", true), ("small.html", true)]);
        let small = Hash::of(b"0123456789");
        let big = Hash::of("x".repeat(100).as_bytes());
        assert_eq!(d.held, [(small, Bytes::from_static(b"0123456789"))]);
        assert!(!s.store.has_blob(&small), "held, not stored");
        assert!(s.store.has_blob(&big), "over the hold: stored");
        s.store.write_blob(&small, &d.held[0].1).unwrap();
        assert_eq!(s.store.read_blob(&small).unwrap().unwrap(), b"0123456789");
    }

    #[test]
    fn io_errors_gone_is_absent_denied_is_refused_others_fail() {
        let mut s = Site::new();
        s.write("locked/a.html", "a");
        s.sync(&Scope::All);
        let handle = Dir::open(&s.dir, "watch.dir").unwrap();
        let mut d = Detector {
            root: &s.dir,
            handle: &handle,
            known: &s.known,
            ignore: &s.ignore,
            limit: Limit::new(MIB),
            store: &s.store,
            hold_bytes: 0,
            seen: HashSet::new(),
            protected: BTreeSet::new(),
            out: Detected::default(),
        };
        let locked = s.dir.join("locked");
        let err = |k: io::ErrorKind| io::Error::from(k);
        d.io(&locked, err(io::ErrorKind::NotFound)).unwrap();
        d.io(&locked, err(io::ErrorKind::NotADirectory)).unwrap();
        assert!(d.out.refused.is_empty());
        d.io(&locked, err(io::ErrorKind::PermissionDenied)).unwrap();
        assert_eq!(d.out.refused[0].path, "locked");
        assert!(d.out.refused[0].reason.starts_with("cannot be read ("));
        // What was known under the unreadable directory is kept.
        d.removals("locked");
        assert!(d.out.changes.is_empty());
        let e = d.io(&locked, err(io::ErrorKind::Other)).unwrap_err();
        assert!(e.to_string().starts_with("watch.dir: cannot read "), "{e}");
    }

    #[test]
    fn one_path_does_not_walk_the_tree_and_a_missing_root_is_an_error() {
        let mut s = Site::new();
        s.write("a.html", "a");
        s.sync(&Scope::All);
        // Something a walk would report, elsewhere in the tree.
        symlink(&s.outside, s.dir.join("out")).unwrap();
        s.write("a.html", "a2");
        let d = s.detect(&paths(&["a.html"]));
        assert_eq!(changed(&d), [("a.html", true)]);
        assert!(d.refused.is_empty());
        assert_eq!(s.detect(&Scope::All).refused.len(), 1);
        // "" in a scope is the whole tree.
        assert_eq!(s.detect(&paths(&[""])).refused.len(), 1);

        fs::remove_dir_all(&s.dir).unwrap();
        for scope in [Scope::All, paths(&["a.html"])] {
            let err = s.try_detect(&scope).unwrap_err();
            assert!(matches!(err, DetectError::Root { .. }), "{err}");
            assert!(err
                .to_string()
                .contains("nothing is detected until it is back"));
        }
    }

    #[test]
    fn a_symlinked_watch_dir_is_scanned_through_its_link() {
        let mut s = Site::new();
        s.write("a.html", "a");
        let link = s.outside.join("www-link");
        symlink(&s.dir, &link).unwrap();
        // An inner link written through the outer one still stays inside.
        symlink(link.join("a.html"), s.dir.join("b.html")).unwrap();
        s.dir = link;
        let d = s.sync(&Scope::All);
        assert_eq!(changed(&d), [("a.html", true), ("b.html", true)]);
        assert!(d.refused.is_empty(), "{:?}", d.refused);
    }

    #[test]
    fn scopes_merge() {
        let mut a = paths(&["x"]);
        a.merge(paths(&["y"]));
        assert_eq!(a, paths(&["x", "y"]));
        a.merge(Scope::All);
        assert_eq!(a, Scope::All);
        a.merge(paths(&["z"]));
        assert_eq!(a, Scope::All);
    }

    /// `cargo test --lib agent::detect -- --ignored --nocapture`: a full scan of 10 000
    /// small files (debug build; release is several times faster).
    #[test]
    #[ignore]
    fn ten_thousand_files() {
        let mut s = Site::new();
        for i in 0..10_000 {
            s.write(&format!("d{}/f{i}.html", i % 100), &format!("<p>{i}</p>"));
        }
        let t = std::time::Instant::now();
        let d = s.sync(&Scope::All);
        println!("first scan (stores 10 000 blobs): {:?}", t.elapsed());
        assert_eq!(d.changes.len(), 10_000);
        let t = std::time::Instant::now();
        let d = s.detect(&Scope::All);
        println!("rescan, nothing changed: {:?}", t.elapsed());
        assert!(d.changes.is_empty());
    }
}
