//! Files beneath a directory handle, never through a symlink: what `watch.dir`, `release_dir`
//! and a published directory are read and written with.
//!
//! A [`Dir`] is a directory held open. Every path given to it is relative and plain (no `/` at
//! the start, no `.` or `..`), and is resolved from the handle with no symlink followed on the
//! way or at the end: `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, or — on kernels
//! without it (`ENOSYS`, before Linux 5.6) or where a sandbox forbids it (`EPERM`) — one
//! `openat(…, O_NOFOLLOW | O_DIRECTORY)` per directory, then `O_NOFOLLOW` for the last name.
//! A path that meets a symlink fails with [`BeneathError::Symlink`], naming the link. Content is
//! read from the opened descriptor, never by path again, and renames and unlinks are made
//! relative to the parent's descriptor, so swapping a file or a directory for a symlink between
//! a check and a use can only make the use fail, never lead it elsewhere.
//!
//! Only the handle's own path (the configured directory, which the operator may well have made
//! a symlink) is followed, once, when it is opened. Blocking file I/O; no policy: whether a
//! symlink is an error, a refusal or "try later" is the caller's.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fd::OwnedFd;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, CWD};
use rustix::io::Errno;

/// Why an operation beneath a directory failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BeneathError {
    /// A symlink where a file or directory was expected, on the way or at the end.
    #[error("{path} is a symlink: lockstep never follows links inside {area}")]
    Symlink {
        /// The link.
        path: PathBuf,
        /// What the directory is (`watch.dir`, `release_dir`, …).
        area: &'static str,
    },
    /// A path that is not plain and relative (absolute, or with `.` or `..`).
    #[error("{path}: not a plain relative path inside {area}")]
    NotBeneath {
        /// The path as given.
        path: PathBuf,
        /// What the directory is.
        area: &'static str,
    },
    /// Any other failure.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

impl BeneathError {
    /// Whether a symlink was met.
    pub fn is_symlink(&self) -> bool {
        matches!(self, BeneathError::Symlink { .. })
    }

    /// The I/O error kind (`Other` for a symlink, `InvalidInput` for a path not beneath).
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            BeneathError::Symlink { .. } => io::ErrorKind::Other,
            BeneathError::NotBeneath { .. } => io::ErrorKind::InvalidInput,
            BeneathError::Io { source, .. } => source.kind(),
        }
    }
}

/// For callers that add the path themselves: an I/O failure is its own error (kind and
/// message, without the path); the others keep their whole message.
impl From<BeneathError> for io::Error {
    fn from(e: BeneathError) -> io::Error {
        match e {
            BeneathError::Io { source, .. } => source,
            other => io::Error::new(other.kind(), other),
        }
    }
}

/// A directory held open; see the module docs.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    /// For messages only: never opened again by this path.
    path: PathBuf,
    area: &'static str,
}

impl Dir {
    /// Opens the directory `path` (following it if it is itself a symlink: it is the
    /// configured directory); `area` names it in messages (`"watch.dir"`).
    pub fn open(path: &Path, area: &'static str) -> Result<Dir, BeneathError> {
        let fd = rustix::fs::openat(
            CWD,
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| BeneathError::Io {
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
            area,
        })
    }

    /// The directory's path (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `rel` for reading. Non-blocking, so a FIFO put in a file's place cannot stall the
    /// caller: check the file type with `metadata` (it is the opened file's own).
    pub fn open_file(&self, rel: &Path) -> Result<File, BeneathError> {
        self.resolve(rel, OFlags::RDONLY | OFlags::NONBLOCK)
            .map(File::from)
    }

    /// Opens the directory `rel` (`""`: this one again).
    pub fn open_dir(&self, rel: &Path) -> Result<Dir, BeneathError> {
        let fd = self.resolve(rel, OFlags::RDONLY | OFlags::DIRECTORY)?;
        Ok(self.sub(fd, rel))
    }

    /// Opens the directory `rel`, creating what is missing of it (mode 0777 less the umask,
    /// as `create_dir_all`).
    pub fn create_dirs(&self, rel: &Path) -> Result<Dir, BeneathError> {
        let names = self.names(rel)?;
        let mut cur = self.open_dir(Path::new(""))?;
        for name in names {
            match rustix::fs::mkdirat(&cur.fd, name, Mode::from_raw_mode(0o777)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(cur.io(name, e)),
            }
            cur = cur.child(name)?;
        }
        Ok(cur)
    }

    /// Creates the file `name` in this directory, which must not exist (not even as a
    /// symlink), for writing; mode 0666 less the umask, as `File::create`.
    pub fn create_new(&self, name: &OsStr) -> Result<File, BeneathError> {
        let name = self.single(name)?;
        rustix::fs::openat(
            &self.fd,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o666),
        )
        .map(File::from)
        .map_err(|e| self.explain_one(name, e))
    }

    /// Renames `from` to `to`, both in this directory (`to` is replaced, whatever it is, and
    /// never followed).
    pub fn rename(&self, from: &OsStr, to: &OsStr) -> Result<(), BeneathError> {
        let (from, to) = (self.single(from)?, self.single(to)?);
        rustix::fs::renameat(&self.fd, from, &self.fd, to).map_err(|e| self.io(to, e))
    }

    /// Removes the file (or symlink: the link itself) `name` of this directory.
    pub fn remove_file(&self, name: &OsStr) -> Result<(), BeneathError> {
        let name = self.single(name)?;
        rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()).map_err(|e| self.io(name, e))
    }

    /// Removes the empty directory `name` of this directory.
    pub fn remove_dir(&self, name: &OsStr) -> Result<(), BeneathError> {
        let name = self.single(name)?;
        rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR).map_err(|e| self.io(name, e))
    }

    /// Removes `name` of this directory and, when it is a directory, everything under it,
    /// never following a symlink (a link is removed, not what it points at). Absent is fine.
    pub fn remove_tree(&self, name: &OsStr) -> Result<(), BeneathError> {
        match self.kind(name)? {
            None => Ok(()),
            Some(FileType::Directory) => {
                let d = self.child(name)?;
                for (entry, kind) in d.entries()? {
                    if kind == FileType::Directory {
                        d.remove_tree(&entry)?;
                    } else {
                        d.remove_file(&entry)?;
                    }
                }
                self.remove_dir(name)
            }
            Some(_) => self.remove_file(name),
        }
    }

    /// What `name` of this directory is itself (a symlink is `Symlink`); `None` when absent.
    pub fn kind(&self, name: &OsStr) -> Result<Option<FileType>, BeneathError> {
        let name = self.single(name)?;
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(self.io(name, e)),
        }
    }

    /// The entries of this directory (not `.` and `..`) with their own types (a symlink is
    /// `Symlink`), in the order the file system gives.
    pub fn entries(&self) -> Result<Vec<(OsString, FileType)>, BeneathError> {
        let here = |e: Errno| BeneathError::Io {
            path: self.path.clone(),
            source: e.into(),
        };
        let mut out = Vec::new();
        for entry in rustix::fs::Dir::read_from(&self.fd).map_err(here)? {
            let entry = entry.map_err(here)?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let kind = match entry.file_type() {
                // Some file systems do not say in the listing: ask.
                FileType::Unknown => match self.kind(name)? {
                    Some(k) => k,
                    // Gone since it was listed.
                    None => continue,
                },
                k => k,
            };
            out.push((name.to_os_string(), kind));
        }
        Ok(out)
    }

    /// Creates the symlink `name` in this directory, pointing at `target` (not resolved).
    pub fn symlink(&self, target: &Path, name: &OsStr) -> Result<(), BeneathError> {
        let name = self.single(name)?;
        rustix::fs::symlinkat(target, &self.fd, name).map_err(|e| self.io(name, e))
    }

    /// Flushes this directory's entries to disk (`fsync`).
    pub fn sync(&self) -> Result<(), BeneathError> {
        rustix::fs::fsync(&self.fd).map_err(|e| BeneathError::Io {
            path: self.path.clone(),
            source: e.into(),
        })
    }

    /// Flushes the whole file system this directory is on (`syncfs`).
    pub fn sync_fs(&self) -> Result<(), BeneathError> {
        rustix::fs::syncfs(&self.fd).map_err(|e| BeneathError::Io {
            path: self.path.clone(),
            source: e.into(),
        })
    }

    /// Opens `rel` with `flags`, following no symlink.
    fn resolve(&self, rel: &Path, flags: OFlags) -> Result<OwnedFd, BeneathError> {
        let names = self.names(rel)?;
        let Some((last, dirs)) = names.split_last() else {
            return rustix::fs::openat(&self.fd, ".", flags | OFlags::CLOEXEC, Mode::empty())
                .map_err(|e| self.io(OsStr::new(""), e));
        };
        let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        match rustix::fs::openat2(&self.fd, rel, flags, Mode::empty(), how) {
            Ok(fd) => Ok(fd),
            // No openat2 here (Linux < 5.6, or a seccomp filter): one name at a time.
            Err(Errno::NOSYS) | Err(Errno::PERM) => self.resolve_stepwise(dirs, last, flags),
            Err(e) => Err(self.explain(&names, e)),
        }
    }

    /// [`Dir::resolve`] without `openat2`: each directory with `O_NOFOLLOW | O_DIRECTORY`,
    /// then the last name with `flags` (which hold `O_NOFOLLOW`).
    fn resolve_stepwise(
        &self,
        dirs: &[&OsStr],
        last: &OsStr,
        flags: OFlags,
    ) -> Result<OwnedFd, BeneathError> {
        let mut at: Option<Dir> = None;
        for name in dirs {
            let next = at.as_ref().unwrap_or(self).child(name)?;
            at = Some(next);
        }
        let at = at.as_ref().unwrap_or(self);
        rustix::fs::openat(&at.fd, last, flags, Mode::empty()).map_err(|e| at.explain_one(last, e))
    }

    /// Opens the directory `name` of this one, not following a symlink.
    fn child(&self, name: &OsStr) -> Result<Dir, BeneathError> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.explain_one(name, e))?;
        Ok(self.sub(fd, Path::new(name)))
    }

    fn sub(&self, fd: OwnedFd, rel: &Path) -> Dir {
        Dir {
            fd,
            path: self.path.join(rel),
            area: self.area,
        }
    }

    /// The names of a plain relative path.
    fn names<'p>(&self, rel: &'p Path) -> Result<Vec<&'p OsStr>, BeneathError> {
        rel.components()
            .map(|c| match c {
                Component::Normal(n) => Ok(n),
                _ => Err(BeneathError::NotBeneath {
                    path: rel.to_path_buf(),
                    area: self.area,
                }),
            })
            .collect()
    }

    /// `name` when it is one plain name.
    fn single<'n>(&self, name: &'n OsStr) -> Result<&'n OsStr, BeneathError> {
        match self.names(Path::new(name))?.as_slice() {
            [one] if one.len() == name.len() => Ok(one),
            _ => Err(BeneathError::NotBeneath {
                path: PathBuf::from(name),
                area: self.area,
            }),
        }
    }

    fn io(&self, name: &OsStr, e: Errno) -> BeneathError {
        BeneathError::Io {
            path: self.path.join(name),
            source: e.into(),
        }
    }

    /// The error of a path that failed to open: a symlink on the way (`ELOOP` when one is met
    /// under `RESOLVE_NO_SYMLINKS` or `O_NOFOLLOW`; `ENOTDIR` when one is in a directory's
    /// place) names the first link; anything else is what it is.
    fn explain(&self, names: &[&OsStr], e: Errno) -> BeneathError {
        if e == Errno::LOOP || e == Errno::NOTDIR {
            let mut prefix = PathBuf::new();
            for name in names {
                prefix.push(name);
                // Walked in order: every earlier name was not a link.
                match rustix::fs::statat(&self.fd, &prefix, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                        return BeneathError::Symlink {
                            path: self.path.join(&prefix),
                            area: self.area,
                        };
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        let rel: PathBuf = names.iter().collect();
        BeneathError::Io {
            path: self.path.join(rel),
            source: e.into(),
        }
    }

    fn explain_one(&self, name: &OsStr, e: Errno) -> BeneathError {
        self.explain(&[name], e)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::{Read, Write};
    use std::os::unix::fs::symlink;

    use super::*;

    struct Fixture {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
    }

    /// `root/` with `a/b.txt`, `outside/` with `secret`, `root/out` → `outside`,
    /// `root/leak.txt` → `outside/secret`, `root/inner.txt` → `a/b.txt`.
    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        fs::create_dir_all(root.join("a")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(root.join("a/b.txt"), "b").unwrap();
        fs::write(outside.join("secret"), "secret").unwrap();
        symlink(&outside, root.join("out")).unwrap();
        symlink(outside.join("secret"), root.join("leak.txt")).unwrap();
        symlink("a/b.txt", root.join("inner.txt")).unwrap();
        Fixture {
            _tmp: tmp,
            root,
            outside,
        }
    }

    fn read(f: Result<File, BeneathError>) -> String {
        let mut s = String::new();
        f.unwrap().read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn opens_files_and_directories_but_never_a_link() {
        let f = fixture();
        let d = Dir::open(&f.root, "watch.dir").unwrap();
        assert_eq!(read(d.open_file(Path::new("a/b.txt"))), "b");
        assert_eq!(
            read(
                d.open_dir(Path::new("a"))
                    .unwrap()
                    .open_file(Path::new("b.txt"))
            ),
            "b"
        );
        for (rel, link) in [
            ("leak.txt", "leak.txt"),
            ("inner.txt", "inner.txt"),
            ("out/secret", "out"),
        ] {
            let e = d.open_file(Path::new(rel)).unwrap_err();
            assert!(e.is_symlink(), "{rel}: {e}");
            assert_eq!(
                e.to_string(),
                format!(
                    "{} is a symlink: lockstep never follows links inside watch.dir",
                    f.root.join(link).display()
                )
            );
        }
        assert!(d.open_dir(Path::new("out")).unwrap_err().is_symlink());
        let gone = d.open_file(Path::new("a/nope")).unwrap_err();
        assert_eq!(gone.kind(), io::ErrorKind::NotFound);
        for bad in ["../outside/secret", "/etc/passwd", "a/../a/b.txt"] {
            let e = d.open_file(Path::new(bad)).unwrap_err();
            assert!(matches!(e, BeneathError::NotBeneath { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn the_stepwise_fallback_refuses_links_the_same_way() {
        let f = fixture();
        let d = Dir::open(&f.root, "watch.dir").unwrap();
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let open = |dirs: &[&str], last: &str| {
            let dirs: Vec<&OsStr> = dirs.iter().map(OsStr::new).collect();
            d.resolve_stepwise(&dirs, OsStr::new(last), flags)
        };
        assert_eq!(read(open(&["a"], "b.txt").map(File::from)), "b");
        assert!(open(&[], "leak.txt").unwrap_err().is_symlink());
        assert!(open(&["out"], "secret").unwrap_err().is_symlink());
    }

    #[test]
    fn creates_renames_and_removes_beneath_without_following() {
        let f = fixture();
        let d = Dir::open(&f.root, "release_dir").unwrap();
        let sub = d.create_dirs(Path::new("x/y")).unwrap();
        sub.create_new(OsStr::new("t"))
            .unwrap()
            .write_all(b"new")
            .unwrap();
        sub.rename(OsStr::new("t"), OsStr::new("z")).unwrap();
        assert_eq!(fs::read(f.root.join("x/y/z")).unwrap(), b"new");
        // Through a link: refused, nothing created outside.
        let e = d.create_dirs(Path::new("out/planted")).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{} is a symlink: lockstep never follows links inside release_dir",
                f.root.join("out").display()
            )
        );
        assert!(!f.outside.join("planted").exists());
        // An existing link is not written through either.
        assert_eq!(
            d.create_new(OsStr::new("leak.txt")).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(fs::read(f.outside.join("secret")).unwrap(), b"secret");
        // A tree with a link in it: the link goes, not what it points at.
        symlink(&f.outside, f.root.join("x/y/out")).unwrap();
        d.remove_tree(OsStr::new("x")).unwrap();
        assert!(!f.root.join("x").exists());
        d.remove_tree(OsStr::new("out")).unwrap();
        assert_eq!(fs::read(f.outside.join("secret")).unwrap(), b"secret");
        d.remove_tree(OsStr::new("nothing")).unwrap();
        assert_eq!(
            d.kind(OsStr::new("leak.txt")).unwrap(),
            Some(FileType::Symlink)
        );
        assert!(d.kind(OsStr::new("a/b.txt")).is_err(), "one name only");
    }
}
