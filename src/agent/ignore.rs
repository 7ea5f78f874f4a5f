//! Which paths of the watched directory are not content: editor temporaries, OS litter and
//! the agent's own temporaries. Used by the watcher (events for ignored paths are dropped) and
//! by change detection (ignored paths are never walked, read or reported).
//!
//! Pure: matches strings, touches no file.

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// The prefix of the agent's own temporary files in the watched directory (always ignored).
pub const OWN_PREFIX: &str = ".lockstep-";

/// The ignore rules of a watched directory.
///
/// A glob without `/` matches a file or directory *name*; a glob with `/` matches the whole
/// release path (`drafts/**`; a leading `/` is dropped). `*` never crosses a `/`. A path is
/// ignored when any of its directories is: a file inside an ignored directory is ignored too,
/// as a walk never enters an ignored directory. Names starting with [`OWN_PREFIX`] are always
/// ignored.
#[derive(Debug, Clone)]
pub struct Ignore {
    names: GlobSet,
    paths: GlobSet,
}

/// A glob that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IgnoreError {
    /// The glob and why.
    #[error("ignore glob `{glob}` is not valid: {reason}")]
    BadGlob {
        /// The glob as written.
        glob: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl Ignore {
    /// The default globs: vim's swap and write-test files (`*.swp`, `*.swo`, `*.swn`, `*.swx`,
    /// `4913`), backups (`*~`), emacs lock and autosave files (`.#*`, `#*#`), JetBrains' safe
    /// write temporaries, Kate's swap files, GNOME's `.goutputstream-*`, LibreOffice locks,
    /// and OS litter (`.DS_Store`, `._*` AppleDouble files, `Thumbs.db`, `desktop.ini`). None
    /// is content a site serves on purpose; all of it appears and vanishes as people edit.
    pub const DEFAULTS: &'static [&'static str] = &[
        "*.swp",
        "*.swo",
        "*.swn",
        "*.swx",
        "4913",
        "*~",
        ".#*",
        "#*#",
        "*___jb_tmp___",
        "*___jb_old___",
        "*.kate-swp",
        ".goutputstream-*",
        ".~lock.*#",
        ".DS_Store",
        "._*",
        "Thumbs.db",
        "desktop.ini",
    ];

    /// Ignores exactly `globs` (plus [`OWN_PREFIX`] names); the error names the bad glob.
    /// [`Ignore::default`] is `Ignore::new(DEFAULTS)`.
    pub fn new<S: AsRef<str>>(globs: &[S]) -> Result<Ignore, IgnoreError> {
        let mut names = GlobSetBuilder::new();
        let mut paths = GlobSetBuilder::new();
        for glob in globs {
            let glob = glob.as_ref();
            let bad = |reason: String| IgnoreError::BadGlob {
                glob: glob.to_string(),
                reason,
            };
            let pattern = glob.strip_prefix('/').unwrap_or(glob);
            if pattern.is_empty() {
                return Err(bad("it is empty".into()));
            }
            let built = GlobBuilder::new(pattern)
                .literal_separator(true)
                .build()
                .map_err(|e| bad(e.kind().to_string()))?;
            if glob.contains('/') {
                paths.add(built);
            } else {
                names.add(built);
            }
        }
        let build = |b: GlobSetBuilder| {
            b.build().map_err(|e| IgnoreError::BadGlob {
                glob: e.glob().unwrap_or_default().to_string(),
                reason: e.kind().to_string(),
            })
        };
        Ok(Ignore {
            names: build(names)?,
            paths: build(paths)?,
        })
    }

    /// Whether `rel_path` (a release path: relative, `/`-separated) or any directory on the
    /// way to it is ignored.
    pub fn is_ignored(&self, rel_path: &str) -> bool {
        let mut end = 0;
        for segment in rel_path.split('/') {
            end += segment.len();
            if self.ignores_last(&rel_path[..end]) {
                return true;
            }
            end += 1;
        }
        false
    }

    /// Whether the last segment of `rel_path` is ignored (its directories already checked).
    pub(crate) fn ignores_last(&self, rel_path: &str) -> bool {
        let name = rel_path.rsplit('/').next().unwrap_or(rel_path);
        name.starts_with(OWN_PREFIX)
            || self.names.is_match(name)
            || (!self.paths.is_empty() && self.paths.is_match(rel_path))
    }
}

impl Default for Ignore {
    fn default() -> Ignore {
        // DEFAULTS are fixed, valid globs (`defaults_are_valid` checks them).
        Ignore::new(Ignore::DEFAULTS).expect("the default ignore globs are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_globs_match_names_or_whole_paths() {
        let ig = Ignore::new(&["*.bak", "/drafts/*", "private/**"]).unwrap();
        assert!(ig.is_ignored("a.bak"));
        assert!(ig.is_ignored("deep/er/a.bak"));
        assert!(ig.is_ignored("drafts/x.html"));
        assert!(
            ig.is_ignored("drafts/sub/x.html"),
            "inside an ignored directory"
        );
        assert!(!ig.is_ignored("drafts"));
        assert!(
            !ig.is_ignored("site/drafts/x.html"),
            "path globs are anchored"
        );
        assert!(ig.is_ignored("private/a/b.html"));
        assert!(!ig.is_ignored("x.swp"), "exactly the globs given");
        assert!(ig.is_ignored(".lockstep-x"), "always");
    }

    #[test]
    fn bad_globs_are_named() {
        let err = Ignore::new(&["ok.*", "a[b"]).unwrap_err();
        assert!(matches!(&err, IgnoreError::BadGlob { glob, .. } if glob == "a[b"));
        assert!(
            err.to_string()
                .starts_with("ignore glob `a[b` is not valid: "),
            "{err}"
        );
        assert!(Ignore::new(&[""]).is_err());
        assert!(Ignore::new(&["/"]).is_err());
    }

    #[test]
    fn defaults_are_valid() {
        for glob in Ignore::DEFAULTS {
            Ignore::new(&[glob]).unwrap();
        }
    }

    #[test]
    fn defaults_catch_editor_files_and_leave_content_alone() {
        let ig = Ignore::default();
        for junk in [
            ".index.html.swp",
            "css/.a.css.swo",
            "4913",
            "x~",
            ".#x",
            "#x#",
            "a.html___jb_tmp___",
            ".~lock.report.odt#",
            ".DS_Store",
            "img/._logo.png",
            ".lockstep-tmp-1",
        ] {
            assert!(ig.is_ignored(junk), "{junk}");
        }
        for content in [
            "index.html",
            "a.swf",
            "4913.html",
            "x~y",
            ".well-known/x",
            "#x",
        ] {
            assert!(!ig.is_ignored(content), "{content}");
        }
    }
}
