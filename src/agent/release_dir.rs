//! The optional `release_dir` a web server (nginx, Apache) serves from:
//!
//! ```text
//! <release_dir>/releases/<id>/…   a copy of each release, made while staging
//! <release_dir>/current           symlink → releases/<id>, swapped atomically at the flip
//! ```
//!
//! A copy is built under a temporary name, flushed to disk and renamed into place, so
//! `releases/<id>` is always whole, also after a crash; `current` is replaced by creating a new symlink beside it and `rename`-ing it over
//! (atomic on POSIX), so a reader of `current/…` sees the old tree or the new one, never none.
//!
//! Nothing under `release_dir` is written, renamed or removed through a symlink: every
//! operation goes through a handle on the directory (`sync::beneath`), so a `releases` (or a
//! directory inside a copy) that is a link is refused with its name, never followed — a web
//! server's user able to write there cannot make the agent write or delete elsewhere. Only
//! `current` is a symlink, and the agent only ever replaces it.
//! Blocking file I/O: call from a blocking task.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::FileType;

use crate::sync::beneath::{BeneathError, Dir};
use crate::sync::manifest::{Manifest, ReleaseId};
use crate::sync::store::FsStore;

/// Name of the symlink to the active release.
pub const CURRENT: &str = "current";

/// The directory holding the copies.
const RELEASES: &str = "releases";

/// What the directory is called in messages.
const RELEASE_DIR: &str = "release_dir";

/// Where release `id` is materialised.
pub fn release_path(dir: &Path, id: &ReleaseId) -> PathBuf {
    dir.join(RELEASES).join(id.to_hex())
}

/// An error with what was being done: a symlink refusal already names its link and says why.
fn ctx(what: &str, path: &Path) -> impl FnOnce(BeneathError) -> io::Error {
    let msg = format!("{what} {}", path.display());
    move |e| {
        if e.is_symlink() {
            return e.into();
        }
        let kind = e.kind();
        let e = io::Error::from(e);
        io::Error::new(kind, format!("{msg}: {e}"))
    }
}

/// Copies every file of `manifest` (release `id`) from the blob store into
/// `releases/<id>/`, unless it is already there.
pub fn materialise(
    dir: &Path,
    id: &ReleaseId,
    manifest: &Manifest,
    store: &FsStore,
) -> io::Result<PathBuf> {
    let dest = release_path(dir, id);
    // The configured directory itself may be a link: the operator's choice.
    fs::create_dir_all(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display())))?;
    let root = Dir::open(dir, RELEASE_DIR).map_err(ctx("cannot open", dir))?;
    let releases_path = dir.join(RELEASES);
    let releases = root
        .create_dirs(Path::new(RELEASES))
        .map_err(ctx("cannot create", &releases_path))?;
    let name = id.to_hex();
    let name = OsStr::new(&name);
    match releases.kind(name).map_err(ctx("cannot read", &dest))? {
        Some(FileType::Directory) => return Ok(dest),
        Some(FileType::Symlink) => {
            return Err(BeneathError::Symlink {
                path: dest,
                area: RELEASE_DIR,
            }
            .into())
        }
        _ => {}
    }
    let tmp_name = format!(".tmp-{}-{}", id.to_hex(), std::process::id());
    let tmp_name = OsStr::new(&tmp_name);
    let tmp = releases_path.join(tmp_name);
    releases
        .remove_tree(tmp_name)
        .map_err(ctx("cannot clear", &tmp))?;
    let result = (|| {
        let copy = releases
            .create_dirs(Path::new(tmp_name))
            .map_err(ctx("cannot create", &tmp))?;
        for (path, entry) in manifest.files() {
            // Manifest paths are relative, `/`-separated, without `.`/`..` (checked when the
            // manifest was parsed), so they stay inside the copy.
            let to = tmp.join(path);
            let rel = Path::new(path);
            let (Some(parent), Some(file)) = (rel.parent(), rel.file_name()) else {
                continue;
            };
            let at = copy
                .create_dirs(parent)
                .map_err(ctx("cannot create", &to))?;
            // The store is the agent's own: its blob is opened by path.
            let mut from = fs::File::open(store.blob_path(&entry.hash)).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot read blob {}: {e}", entry.hash))
            })?;
            let mut out = at.create_new(file).map_err(ctx("cannot write", &to))?;
            let write = |e: io::Error| {
                io::Error::new(e.kind(), format!("cannot write {}: {e}", to.display()))
            };
            io::copy(&mut from, &mut out).map_err(write)?;
            // As `fs::copy`: the copy has the blob's permissions.
            let mode = from.metadata().map_err(write)?.permissions().mode();
            out.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(write)?;
        }
        // One syncfs for the whole copy (files and directories) instead of an fsync per file:
        // what the rename makes visible is on disk, even after a power cut.
        copy.sync_fs().map_err(ctx("cannot sync", &tmp))?;
        releases
            .rename(tmp_name, name)
            .map_err(ctx("cannot rename into", &dest))?;
        releases.sync().map_err(ctx("cannot sync", &releases_path))
    })();
    if result.is_err() {
        let _ = releases.remove_tree(tmp_name);
    }
    result.map(|()| dest)
}

/// Points `current` at `releases/<id>` atomically.
pub fn switch_current(dir: &Path, id: &ReleaseId) -> io::Result<()> {
    let target = Path::new(RELEASES).join(id.to_hex());
    let root = Dir::open(dir, RELEASE_DIR).map_err(ctx("cannot open", dir))?;
    let tmp_name = format!(".{CURRENT}.tmp-{}", std::process::id());
    let tmp_name = OsStr::new(&tmp_name);
    let tmp = dir.join(tmp_name);
    let _ = root.remove_file(tmp_name);
    root.symlink(&target, tmp_name)
        .map_err(ctx("cannot create symlink", &tmp))?;
    let current = dir.join(CURRENT);
    // `rename` replaces `current` itself, never what it points at.
    if let Err(e) = root.rename(tmp_name, OsStr::new(CURRENT)) {
        let _ = root.remove_file(tmp_name);
        let kind = e.kind();
        let e = io::Error::from(e);
        return Err(io::Error::new(
            kind,
            format!(
                "cannot replace {} with a symlink to {} ({e}); if it is a directory, move it away",
                current.display(),
                target.display()
            ),
        ));
    }
    root.sync().map_err(ctx("cannot sync", dir))
}

/// Removes the `.tmp-*` copies an interrupted run left under `releases/` (call at start,
/// before any staging).
pub fn clear_leftovers(dir: &Path) {
    let Ok(releases) = Dir::open(dir, RELEASE_DIR).and_then(|r| r.open_dir(Path::new(RELEASES)))
    else {
        return;
    };
    for (name, _) in releases.entries().into_iter().flatten() {
        if name.to_string_lossy().starts_with(".tmp-") {
            let _ = releases.remove_tree(&name);
        }
    }
}

/// Removes the copies of releases other than `keep`. Copies in progress (`.tmp-*`) are left
/// to their writer; leftovers of interrupted ones are cleared when the agent starts.
pub fn prune(dir: &Path, keep: &[ReleaseId]) -> io::Result<()> {
    let releases_path = dir.join(RELEASES);
    let releases = match Dir::open(dir, RELEASE_DIR).and_then(|r| r.open_dir(Path::new(RELEASES))) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ctx("cannot list", &releases_path)(e)),
    };
    let entries = releases
        .entries()
        .map_err(ctx("cannot list", &releases_path))?;
    let keep: Vec<String> = keep.iter().map(|k| k.to_hex()).collect();
    for (name, _) in entries {
        let name_str = name.to_string_lossy();
        // A `.tmp-*` directory is a copy staging is writing right now: never pull it away.
        if !keep.iter().any(|k| *k == name_str) && !name_str.starts_with(".tmp-") {
            let p = releases_path.join(&name);
            releases
                .remove_tree(&name)
                .map_err(ctx("cannot remove", &p))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::sync::manifest::{Entry, Hash};

    fn release(store: &FsStore, files: &[(&str, &[u8])]) -> Manifest {
        let mut m = BTreeMap::new();
        for (p, d) in files {
            store.write_blob(&Hash::of(d), d).unwrap();
            m.insert(
                p.to_string(),
                Entry {
                    hash: Hash::of(d),
                    size: d.len() as u64,
                    content_type: "text/plain".into(),
                },
            );
        }
        Manifest::new(m).unwrap()
    }

    #[test]
    fn copies_then_switches_then_prunes() {
        let s = tempfile::tempdir().unwrap();
        let store = FsStore::open(s.path()).unwrap();
        let www = tempfile::tempdir().unwrap();
        let m1 = release(&store, &[("index.html", b"one"), ("a/b.txt", b"b")]);
        let m2 = release(&store, &[("index.html", b"two")]);
        let (id1, id2) = (m1.id(), m2.id());
        materialise(www.path(), &id1, &m1, &store).unwrap();
        materialise(www.path(), &id2, &m2, &store).unwrap();
        switch_current(www.path(), &id1).unwrap();
        let cur = www.path().join(CURRENT);
        assert_eq!(fs::read(cur.join("index.html")).unwrap(), b"one");
        assert_eq!(fs::read(cur.join("a/b.txt")).unwrap(), b"b");
        switch_current(www.path(), &id2).unwrap();
        assert_eq!(fs::read(cur.join("index.html")).unwrap(), b"two");
        assert_eq!(
            fs::read_link(&cur).unwrap(),
            Path::new("releases").join(id2.to_hex())
        );
        // Nothing but `current` and `releases` beside it: the temporary link is gone.
        assert_eq!(fs::read_dir(www.path()).unwrap().count(), 2);
        prune(www.path(), &[id2]).unwrap();
        assert!(!release_path(www.path(), &id1).exists());
        assert!(release_path(www.path(), &id2).exists());
    }

    #[test]
    fn a_directory_in_the_way_is_a_clear_error() {
        let s = tempfile::tempdir().unwrap();
        let store = FsStore::open(s.path()).unwrap();
        let www = tempfile::tempdir().unwrap();
        let m = release(&store, &[("x", b"x")]);
        materialise(www.path(), &m.id(), &m, &store).unwrap();
        fs::create_dir_all(www.path().join("current/old")).unwrap();
        let e = switch_current(www.path(), &m.id()).unwrap_err();
        assert!(e.to_string().contains("move it away"), "{e}");
    }

    /// Nothing under `release_dir` is written or removed through a symlink: a `releases`
    /// that is a link out of it is refused by the copy and by the pruning, and what it
    /// points at is left alone.
    #[test]
    fn a_symlinked_releases_directory_is_refused_not_followed() {
        let s = tempfile::tempdir().unwrap();
        let store = FsStore::open(s.path()).unwrap();
        let www = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::create_dir_all(outside.path().join("precious")).unwrap();
        std::os::unix::fs::symlink(outside.path(), www.path().join("releases")).unwrap();
        let m = release(&store, &[("index.html", b"one"), ("a/b.txt", b"b")]);
        let e = materialise(www.path(), &m.id(), &m, &store).unwrap_err();
        let link = www.path().join("releases");
        assert_eq!(
            e.to_string(),
            format!(
                "{} is a symlink: lockstep never follows links inside release_dir",
                link.display()
            )
        );
        let e = prune(www.path(), &[m.id()]).unwrap_err();
        assert!(e.to_string().contains("is a symlink"), "{e}");
        clear_leftovers(www.path());
        let left: Vec<_> = fs::read_dir(outside.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["precious"]);
    }

    /// A `releases/<id>` that is a symlink (somebody else's tree) is refused, not taken for
    /// the copy and served.
    #[test]
    fn a_symlinked_release_copy_is_refused() {
        let s = tempfile::tempdir().unwrap();
        let store = FsStore::open(s.path()).unwrap();
        let www = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let m = release(&store, &[("index.html", b"one")]);
        fs::create_dir_all(www.path().join("releases")).unwrap();
        std::os::unix::fs::symlink(outside.path(), release_path(www.path(), &m.id())).unwrap();
        let e = materialise(www.path(), &m.id(), &m, &store).unwrap_err();
        assert!(e.to_string().contains("is a symlink"), "{e}");
    }
}
