//! A directory on disk → a [`Manifest`] and where each blob's bytes are (for `lockstep publish`),
//! and the walk both it and the agent's change detection (`agent::detect`) use.
//!
//! Regular files are taken; a symlink is followed only when it stays inside the directory
//! (one pointing out is refused, so a release can never carry `/etc/shadow`); directories
//! reached through symlinks are skipped. Names must be UTF-8 and valid release paths.
//! `walk` and `classify` hold these rules once; what a refusal means (an error for a
//! publish, a reported path for the agent) is the caller's.

use std::collections::{BTreeMap, HashMap};
use std::fs::FileType;
use std::io::Read;
use std::path::{Path, PathBuf};

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
    let mut f = std::fs::File::open(path).map_err(io(path))?;
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
    /// A regular file, or a symlink to one inside the root: its content is taken.
    File,
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
}

/// Classifies the entry at `path` from its own (`lstat`) type; `canonical_root` is the
/// canonical path of the directory being synced.
pub(crate) fn classify(path: &Path, kind: FileType, canonical_root: &Path) -> Kind {
    if kind.is_dir() {
        return Kind::Dir;
    }
    if kind.is_file() {
        return Kind::File;
    }
    if !kind.is_symlink() {
        return Kind::Skip;
    }
    let target = match path.canonicalize() {
        Ok(t) => t,
        Err(e) => return Kind::Refused(Refusal::Broken(e)),
    };
    if !target.starts_with(canonical_root) {
        return Kind::Refused(Refusal::Escapes(target));
    }
    match std::fs::metadata(&target) {
        Ok(m) if m.is_file() => Kind::File,
        Ok(m) if m.is_dir() => Kind::Refused(Refusal::LinkedDir),
        Ok(_) => Kind::Skip,
        Err(e) => Kind::Refused(Refusal::Broken(e)),
    }
}

/// What [`walk`] meets; each call may stop the walk with an error.
pub(crate) trait Visit {
    /// What stops the walk.
    type Error;
    /// A file to take, at release path `rel` (not yet checked with [`check_path`]).
    fn file(&mut self, path: &Path, rel: String) -> Result<(), Self::Error>;
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

/// Walks the directory `dir`, whose release path is `prefix` (`""` for the root), depth
/// first. Entries for which `ignore(rel)` is true are passed over, directories with their
/// whole subtree.
pub(crate) fn walk<V: Visit>(
    dir: PathBuf,
    prefix: String,
    canonical_root: &Path,
    ignore: &dyn Fn(&str) -> bool,
    visit: &mut V,
) -> Result<(), V::Error> {
    let mut stack = vec![(dir, prefix)];
    while let Some((dir, prefix)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                visit.io(&dir, e)?;
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    visit.io(&dir, e)?;
                    continue;
                }
            };
            let path = entry.path();
            let Ok(name) = entry.file_name().into_string() else {
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
            let kind = match entry.file_type() {
                Ok(k) => k,
                Err(e) => {
                    visit.io(&path, e)?;
                    continue;
                }
            };
            match classify(&path, kind, canonical_root) {
                Kind::Dir => stack.push((path, rel)),
                Kind::File => visit.file(&path, rel)?,
                Kind::Skip => {}
                Kind::Refused(why) => visit.refused(&path, Some(rel), why)?,
            }
        }
    }
    Ok(())
}

/// [`scan`]'s visitor: every refusal but a linked directory fails the scan.
struct Scan<'a> {
    root: &'a Path,
    files: BTreeMap<String, Entry>,
    sources: HashMap<Hash, PathBuf>,
}

impl Visit for Scan<'_> {
    type Error = TreeError;

    fn file(&mut self, path: &Path, rel: String) -> Result<(), TreeError> {
        check_path(&rel)?;
        let (hash, size) = hash_file(path)?;
        self.sources
            .entry(hash)
            .or_insert_with(|| path.to_path_buf());
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
                root: self.root.to_path_buf(),
                target,
            }),
            Refusal::LinkedDir => Ok(()),
            Refusal::Broken(source) => Err(io(path)(source)),
        }
    }

    fn io(&mut self, path: &Path, source: std::io::Error) -> Result<(), TreeError> {
        Err(io(path)(source))
    }
}

/// Scans `root`, skipping relative paths for which `ignore` is true.
pub fn scan(root: &Path, ignore: &dyn Fn(&str) -> bool) -> Result<Tree, TreeError> {
    let canonical_root = root.canonicalize().map_err(io(root))?;
    let mut scan = Scan {
        root,
        files: BTreeMap::new(),
        sources: HashMap::new(),
    };
    walk(
        root.to_path_buf(),
        String::new(),
        &canonical_root,
        ignore,
        &mut scan,
    )?;
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
}
