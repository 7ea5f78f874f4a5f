//! A directory on disk → a [`Manifest`] and where each blob's bytes are (for `lockstep publish`,
//! and for agents detecting local edits).
//!
//! Regular files are taken; a symlink is followed only when it stays inside the directory
//! (one pointing out is refused, so a release can never carry `/etc/shadow`); directories
//! reached through symlinks are skipped. Names must be UTF-8 and valid release paths.

use std::collections::{BTreeMap, HashMap};
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

/// Scans `root`, skipping relative paths for which `ignore` is true.
pub fn scan(root: &Path, ignore: &dyn Fn(&str) -> bool) -> Result<Tree, TreeError> {
    let canonical_root = root.canonicalize().map_err(io(root))?;
    let mut files = BTreeMap::new();
    let mut sources = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(io(&dir))?;
        for entry in entries {
            let entry = entry.map_err(io(&dir))?;
            let path = entry.path();
            let name = entry
                .file_name()
                .into_string()
                .map_err(|_| TreeError::NotUtf8(path.clone()))?;
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            if ignore(&rel) {
                continue;
            }
            let kind = entry.file_type().map_err(io(&path))?;
            if kind.is_dir() {
                stack.push((path, rel));
                continue;
            }
            if kind.is_symlink() {
                let target = path.canonicalize().map_err(io(&path))?;
                if !target.starts_with(&canonical_root) {
                    return Err(TreeError::Escapes {
                        link: path,
                        root: root.to_path_buf(),
                        target,
                    });
                }
                if !target.is_file() {
                    continue;
                }
            } else if !kind.is_file() {
                // Sockets, FIFOs, devices: not content.
                continue;
            }
            check_path(&rel)?;
            let (hash, size) = hash_file(&path)?;
            sources.entry(hash).or_insert(path);
            files.insert(
                rel.clone(),
                Entry {
                    hash,
                    size,
                    content_type: content_type(&rel),
                },
            );
        }
    }
    Ok(Tree {
        manifest: Manifest::new(files)?,
        sources,
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
