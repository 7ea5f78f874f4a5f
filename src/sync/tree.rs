//! A directory on disk → a [`Manifest`] and where each blob's bytes are (for `lockstep publish`),
//! and the walk both it and the agent's change detection (`agent::detect`) use.
//!
//! Regular files are taken; a symlink is followed only when it stays inside the directory
//! (one pointing out is refused, so a release can never carry `/etc/shadow`); directories
//! reached through symlinks are skipped. Names must be UTF-8 and valid release paths.
//! Every directory is listed and every file read through a [`Dir`] handle on the root with no
//! symlink followed (`sync::beneath`): a symlink to a file inside is resolved by path and
//! checked, then its *target* is opened beneath the root, so a file or directory swapped for a
//! link between the check and the read makes the read fail ([`Refusal::Link`]), never read
//! what the link points at.
//! `walk` and `classify` hold these rules once; what a refusal means (an error for a
//! publish, a reported path for the agent) is the caller's.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use rustix::fs::FileType;

use super::beneath::{BeneathError, Dir};
use super::manifest::{
    check_path, content_type, Entry, Hash, Manifest, ManifestError, MAX_BLOB_BYTES,
};

/// A scanned directory.
#[derive(Debug, Clone)]
pub struct Tree {
    /// Its manifest.
    pub manifest: Manifest,
    /// A file holding each blob.
    pub sources: HashMap<Hash, PathBuf>,
}

/// Why a directory cannot become a release.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TreeError {
    /// Reading failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A name that is not UTF-8.
    #[error("{0}: file names must be UTF-8")]
    NotUtf8(PathBuf),
    /// A symlink leading out of the directory.
    #[error("{link} points outside {root} (to {target}): releases only carry files inside the directory")]
    Escapes {
        /// The link.
        link: PathBuf,
        /// The scanned directory.
        root: PathBuf,
        /// Where it leads.
        target: PathBuf,
    },
    /// A symlink met where a file or directory was read (one swapped in while scanning).
    #[error(transparent)]
    Link(BeneathError),
    /// Something other than a regular file where one was listed.
    #[error("{0}: replaced by something that is not a regular file while it was read")]
    NotAFile(PathBuf),
    /// A refused path or size.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TreeError + '_ {
    move |source| TreeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The blake3 hash and size of a file, read in chunks; refuses files over [`MAX_BLOB_BYTES`].
pub fn hash_file(path: &Path) -> Result<(Hash, u64), TreeError> {
    let f = std::fs::File::open(path).map_err(io(path))?;
    hash_open(f, path)
}

/// [`hash_file`] of a file already open (`path` for messages).
fn hash_open(mut f: File, path: &Path) -> Result<(Hash, u64), TreeError> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > MAX_BLOB_BYTES {
            return Err(ManifestError::TooLarge {
                path: path.display().to_string(),
                size,
                max: MAX_BLOB_BYTES,
            }
            .into());
        }
        hasher.update(&buf[..n]);
    }
    Ok((Hash::from_hasher(&hasher), size))
}

/// What an entry of the directory is, for a release.
#[derive(Debug)]
pub(crate) enum Kind {
    /// A directory (not a symlink to one): walked.
    Dir,
    /// A regular file: its content is taken.
    File,
    /// A symlink to a regular file inside the root: the target's content is taken; the path
    /// of the target relative to the root (what is opened beneath it).
    Link(PathBuf),
    /// Not content: a socket, FIFO or device, or a symlink to one.
    Skip,
    /// Cannot be taken.
    Refused(Refusal),
}

/// Why an entry cannot be taken.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// Its name is not UTF-8.
    NotUtf8,
    /// A symlink leading out of the root, to this canonical target.
    Escapes(PathBuf),
    /// A symlink to a directory: never followed (it could loop, or double the tree).
    LinkedDir,
    /// A symlink that cannot be resolved: dangling (`NotFound`), a loop, no permission.
    Broken(std::io::Error),
    /// A symlink met while reading: a file or directory replaced by one since it was
    /// listed, or a link's target path that holds one now.
    Link(BeneathError),
}

/// Classifies the entry at `path` from its own (`lstat`) type; `canonical_root` is the
/// canonical path of the directory being synced.
pub(crate) fn classify(path: &Path, kind: FileType, canonical_root: &Path) -> Kind {
    match kind {
        FileType::Directory => return Kind::Dir,
        FileType::RegularFile => return Kind::File,
        FileType::Symlink => {}
        _ => return Kind::Skip,
    }
    let target = match path.canonicalize() {
        Ok(t) => t,
        Err(e) => return Kind::Refused(Refusal::Broken(e)),
    };
    let Ok(inside) = target.strip_prefix(canonical_root) else {
        return Kind::Refused(Refusal::Escapes(target));
    };
    match std::fs::metadata(&target) {
        Ok(m) if m.is_file() => Kind::Link(inside.to_path_buf()),
        Ok(m) if m.is_dir() => Kind::Refused(Refusal::LinkedDir),
        Ok(_) => Kind::Skip,
        Err(e) => Kind::Refused(Refusal::Broken(e)),
    }
}

/// What [`walk`] meets; each call may stop the walk with an error.
pub(crate) trait Visit {
    /// What stops the walk.
    type Error;
    /// A file to take, at release path `rel` (not yet checked with [`check_path`]); its
    /// content is at `source` beneath the root (`rel` itself, or a link's target): open it
    /// with [`Dir::open_file`], never by `path`.
    fn file(&mut self, path: &Path, rel: String, source: &Path) -> Result<(), Self::Error>;
    /// An entry that cannot be taken; `rel` is `None` when the name is not UTF-8.
    fn refused(
        &mut self,
        path: &Path,
        rel: Option<String>,
        why: Refusal,
    ) -> Result<(), Self::Error>;
    /// Listing a directory or reading an entry's type failed.
    fn io(&mut self, path: &Path, source: std::io::Error) -> Result<(), Self::Error>;
}

/// Walks the directory `prefix` of `root` (`""` for the root itself), depth first, through
/// directory handles (a directory swapped for a symlink is refused, not listed). Entries for
/// which `ignore(rel)` is true are passed over, directories with their whole subtree.
pub(crate) fn walk<V: Visit>(
    root: &Dir,
    prefix: String,
    canonical_root: &Path,
    ignore: &dyn Fn(&str) -> bool,
    visit: &mut V,
) -> Result<(), V::Error> {
    let mut stack = vec![prefix];
    while let Some(prefix) = stack.pop() {
        let dir = root.path().join(&prefix);
        let entries = match root.open_dir(Path::new(&prefix)).and_then(|d| d.entries()) {
            Ok(e) => e,
            Err(e) if e.is_symlink() => {
                visit.refused(&dir, Some(prefix), Refusal::Link(e))?;
                continue;
            }
            Err(e) => {
                visit.io(&dir, e.into())?;
                continue;
            }
        };
        for (name, kind) in entries {
            let path = dir.join(&name);
            let Ok(name) = name.into_string() else {
                visit.refused(&path, None, Refusal::NotUtf8)?;
                continue;
            };
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            if ignore(&rel) {
                continue;
            }
            match classify(&path, kind, canonical_root) {
                Kind::Dir => stack.push(rel),
                Kind::File => {
                    let source = PathBuf::from(&rel);
                    visit.file(&path, rel, &source)?
                }
                Kind::Link(target) => visit.file(&path, rel, &target)?,
                Kind::Skip => {}
                Kind::Refused(why) => visit.refused(&path, Some(rel), why)?,
            }
        }
    }
    Ok(())
}

/// [`scan`]'s visitor: every refusal but a linked directory fails the scan.
struct Scan<'a> {
    root: &'a Dir,
    files: BTreeMap<String, Entry>,
    sources: HashMap<Hash, PathBuf>,
}

impl Visit for Scan<'_> {
    type Error = TreeError;

    fn file(&mut self, path: &Path, rel: String, source: &Path) -> Result<(), TreeError> {
        check_path(&rel)?;
        let f = match self.root.open_file(source) {
            Ok(f) => f,
            Err(e) if e.is_symlink() => return Err(TreeError::Link(e)),
            Err(e) => return Err(io(path)(e.into())),
        };
        if !f.metadata().map_err(io(path))?.is_file() {
            return Err(TreeError::NotAFile(path.to_path_buf()));
        }
        let (hash, size) = hash_open(f, path)?;
        // The file itself (a link's target), for `publish` to read again (and check).
        self.sources
            .entry(hash)
            .or_insert_with(|| self.root.path().join(source));
        let content_type = content_type(&rel);
        self.files.insert(
            rel,
            Entry {
                hash,
                size,
                content_type,
            },
        );
        Ok(())
    }

    fn refused(&mut self, path: &Path, _: Option<String>, why: Refusal) -> Result<(), TreeError> {
        match why {
            Refusal::NotUtf8 => Err(TreeError::NotUtf8(path.to_path_buf())),
            Refusal::Escapes(target) => Err(TreeError::Escapes {
                link: path.to_path_buf(),
                root: self.root.path().to_path_buf(),
                target,
            }),
            Refusal::LinkedDir => Ok(()),
            Refusal::Broken(source) => Err(io(path)(source)),
            Refusal::Link(e) => Err(TreeError::Link(e)),
        }
    }

    fn io(&mut self, path: &Path, source: std::io::Error) -> Result<(), TreeError> {
        Err(io(path)(source))
    }
}

/// Scans `root`, skipping relative paths for which `ignore` is true.
pub fn scan(root: &Path, ignore: &dyn Fn(&str) -> bool) -> Result<Tree, TreeError> {
    let canonical_root = root.canonicalize().map_err(io(root))?;
    let dir = Dir::open(root, "the published directory").map_err(|e| io(root)(e.into()))?;
    let mut scan = Scan {
        root: &dir,
        files: BTreeMap::new(),
        sources: HashMap::new(),
    };
    walk(&dir, String::new(), &canonical_root, ignore, &mut scan)?;
    Ok(Tree {
        manifest: Manifest::new(scan.files)?,
        sources: scan.sources,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_files_follows_inner_links_and_refuses_outer_ones() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("site");
        std::fs::create_dir_all(root.join("css")).unwrap();
        std::fs::write(root.join("index.html"), "<h1>hi</h1>").unwrap();
        std::fs::write(root.join("css/a.css"), "a{}").unwrap();
        std::fs::write(root.join("copy.swp"), "junk").unwrap();
        std::os::unix::fs::symlink(root.join("index.html"), root.join("home.html")).unwrap();
        let tree = scan(&root, &|p| p.ends_with(".swp")).unwrap();
        let paths: Vec<_> = tree.manifest.files().keys().cloned().collect();
        assert_eq!(paths, ["css/a.css", "home.html", "index.html"]);
        assert_eq!(tree.sources.len(), 2, "identical files share a blob");
        let e = tree.manifest.get("index.html").unwrap();
        assert_eq!(e.hash, Hash::of(b"<h1>hi</h1>"));
        assert_eq!(e.content_type, "text/html; charset=utf-8");

        std::fs::write(dir.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("leak")).unwrap();
        assert!(matches!(
            scan(&root, &|_| false),
            Err(TreeError::Escapes { .. })
        ));
    }

    /// `lockstep publish` scanning a directory where a file is swapped back and forth for a
    /// symlink to a secret: no scan ever hashes the secret's bytes into a manifest.
    #[test]
    fn a_file_swapped_for_a_link_to_a_secret_is_never_scanned() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("site");
        std::fs::create_dir_all(&root).unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "TOP-SECRET").unwrap();
        std::fs::write(root.join("page.html"), "public").unwrap();
        // The scans run for as long as the flipper takes to swap the file 20 000 times.
        let flips = Arc::new(AtomicU64::new(0));
        let flipper = {
            let (flips, root) = (flips.clone(), root.clone());
            std::thread::spawn(move || {
                let tmp = root.join("flip.swp");
                for i in 0..20_000u64 {
                    let _ = std::fs::remove_file(&tmp);
                    if i % 2 == 0 {
                        std::os::unix::fs::symlink(&secret, &tmp).unwrap();
                    } else {
                        std::fs::write(&tmp, "public").unwrap();
                    }
                    std::fs::rename(&tmp, root.join("page.html")).unwrap();
                    flips.store(i + 1, Ordering::Relaxed);
                }
            })
        };
        let leaked = Hash::of(b"TOP-SECRET");
        let mut scans = 0;
        while !flipper.is_finished() {
            // A scan that meets the link refuses it (an error); one that does not must not
            // have read the secret.
            if let Ok(tree) = scan(&root, &|p| p.ends_with(".swp")) {
                assert!(
                    tree.manifest.files().values().all(|e| e.hash != leaked),
                    "the secret was scanned (after {} flips): {:?}",
                    flips.load(Ordering::Relaxed),
                    tree.manifest
                );
                assert!(!tree.sources.contains_key(&leaked));
            }
            scans += 1;
        }
        flipper.join().unwrap();
        assert!(scans > 100, "the race was not exercised");
    }
}
