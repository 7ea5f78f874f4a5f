//! Configuration errors: each one names the file, the line and column, what is wrong and
//! what to do about it, like `nginx -t`.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where in a config file something was written (1-based; 0 when unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    /// 1-based line, 0 when unknown.
    pub line: u64,
    /// 1-based column, 0 when unknown.
    pub column: u64,
}

impl Pos {
    /// Position of a spanned YAML value.
    pub fn of<T>(s: &serde_saphyr::Spanned<T>) -> Pos {
        Pos {
            line: s.referenced.line(),
            column: s.referenced.column(),
        }
    }
}

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in.
    pub file: PathBuf,
    /// Where in the file; `line == 0` for whole-file problems (unreadable, empty).
    pub pos: Pos,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl ConfigError {
    /// A problem at `pos` in `file`.
    pub fn at(file: &Path, pos: Pos, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            pos,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.pos.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.pos.line,
                self.pos.column,
                self.message
            )
        }
    }
}

/// Every problem found in one config file (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// What to say of a pool name that names no pool: the nearest one, or the pools there are.
pub fn unknown_pool(name: &str, pools: &std::collections::HashMap<String, usize>) -> String {
    match nearest(name, pools.keys().map(String::as_str)) {
        Some(n) => format!("did you mean `{n}`?"),
        None if pools.is_empty() => "there are no pools: add one under `pools:`".to_string(),
        None => {
            let mut names: Vec<&str> = pools.keys().map(String::as_str).collect();
            names.sort_unstable();
            format!("pools are: {}", names.join(", "))
        }
    }
}

/// The valid name closest to `got` (edit distance at most a third of its length, at least 2),
/// for "did you mean" hints.
pub fn nearest<'a>(got: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (got.len() / 3).max(2);
    candidates
        .into_iter()
        .map(|c| (levenshtein(got, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_finds_typos_and_ignores_strangers() {
        let keys = ["listeners", "routes", "pools", "dns", "sync", "admin"];
        assert_eq!(nearest("listner", keys), Some("listeners"));
        assert_eq!(nearest("pool", keys), Some("pools"));
        assert_eq!(nearest("frobnicate", keys), None);
    }

    #[test]
    fn display_has_file_line_column() {
        let e = ConfigError::at(Path::new("a.yaml"), Pos { line: 3, column: 7 }, "bad");
        assert_eq!(e.to_string(), "a.yaml:3:7: bad");
        let e = ConfigError::at(Path::new("a.yaml"), Pos::default(), "unreadable");
        assert_eq!(e.to_string(), "a.yaml: unreadable");
    }
}
