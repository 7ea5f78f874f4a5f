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
//! Blocking file I/O: call from a blocking task.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::sync::manifest::{Manifest, ReleaseId};
use crate::sync::store::FsStore;

/// Name of the symlink to the active release.
pub const CURRENT: &str = "current";

/// Where release `id` is materialised.
pub fn release_path(dir: &Path, id: &ReleaseId) -> PathBuf {
    dir.join("releases").join(id.to_hex())
}

fn ctx(what: &str, path: &Path) -> impl FnOnce(io::Error) -> io::Error {
    let msg = format!("{what} {}", path.display());
    move |e| io::Error::new(e.kind(), format!("{msg}: {e}"))
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
    if dest.is_dir() {
        return Ok(dest);
    }
    let releases = dir.join("releases");
    fs::create_dir_all(&releases).map_err(ctx("cannot create", &releases))?;
    let tmp = releases.join(format!(".tmp-{}-{}", id.to_hex(), std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(ctx("cannot clear", &tmp))?;
    }
    let result = (|| {
        fs::create_dir_all(&tmp).map_err(ctx("cannot create", &tmp))?;
        for (path, entry) in manifest.files() {
            // Manifest paths are relative, `/`-separated, without `.`/`..` (checked when the
            // manifest was parsed), so they stay inside `tmp`.
            let to = tmp.join(path);
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent).map_err(ctx("cannot create", parent))?;
            }
            fs::copy(store.blob_path(&entry.hash), &to).map_err(ctx("cannot write", &to))?;
        }
        // One syncfs for the whole copy (files and directories) instead of an fsync per file:
        // what the rename makes visible is on disk, even after a power cut.
        fs::File::open(&tmp)
            .and_then(|d| rustix::fs::syncfs(&d).map_err(io::Error::from))
            .map_err(ctx("cannot sync", &tmp))?;
        fs::rename(&tmp, &dest).map_err(ctx("cannot rename into", &dest))?;
        fs::File::open(&releases)
            .and_then(|d| d.sync_all())
            .map_err(ctx("cannot sync", &releases))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result.map(|()| dest)
}

/// Points `current` at `releases/<id>` atomically.
pub fn switch_current(dir: &Path, id: &ReleaseId) -> io::Result<()> {
    let target = Path::new("releases").join(id.to_hex());
    let tmp = dir.join(format!(".{CURRENT}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&target, &tmp).map_err(ctx("cannot create symlink", &tmp))?;
    let current = dir.join(CURRENT);
    if let Err(e) = fs::rename(&tmp, &current) {
        let _ = fs::remove_file(&tmp);
        return Err(io::Error::new(
            e.kind(),
            format!(
                "cannot replace {} with a symlink to {} ({e}); if it is a directory, move it away",
                current.display(),
                target.display()
            ),
        ));
    }
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ctx("cannot sync", dir))
}

/// Removes the `.tmp-*` copies an interrupted run left under `releases/` (call at start,
/// before any staging).
pub fn clear_leftovers(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir.join("releases")) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(".tmp-") {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Removes the copies of releases other than `keep`. Copies in progress (`.tmp-*`) are left
/// to their writer; leftovers of interrupted ones are cleared when the agent starts.
pub fn prune(dir: &Path, keep: &[ReleaseId]) -> io::Result<()> {
    let releases = dir.join("releases");
    let entries = match fs::read_dir(&releases) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ctx("cannot list", &releases)(e)),
    };
    let keep: Vec<String> = keep.iter().map(|k| k.to_hex()).collect();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        // A `.tmp-*` directory is a copy staging is writing right now: never pull it away.
        if !keep.contains(&name) && !name.starts_with(".tmp-") {
            let p = e.path();
            fs::remove_dir_all(&p).map_err(ctx("cannot remove", &p))?;
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
}
