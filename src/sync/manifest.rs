//! A release's manifest: `{path → (blake3 hash, size, content type)}`, its canonical encoding
//! and its id (the blake3 hash of that encoding), and the rules a path must follow.
//!
//! Pure: no files, no clock. The same manifest always encodes to the same bytes (paths sorted,
//! compact JSON), so a release id names exactly one tree, wherever it was computed.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Largest blob lockstep moves (a file of a release): blobs travel and are verified whole.
pub const MAX_BLOB_BYTES: u64 = 64 * 1024 * 1024;
/// Most files in one release.
pub const MAX_FILES: usize = 1_000_000;
/// Longest path in a release, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;

/// A blake3 hash: a blob's name, and (of a manifest) a release id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hash([u8; 32]);

/// A release id: the hash of the release's canonical manifest.
pub type ReleaseId = Hash;

impl Hash {
    /// The hash of `data`.
    pub fn of(data: &[u8]) -> Hash {
        Hash(*blake3::hash(data).as_bytes())
    }

    /// From a finished hasher.
    pub fn from_hasher(h: &blake3::Hasher) -> Hash {
        Hash(*h.finalize().as_bytes())
    }

    /// The 32 bytes (what a release signature covers, see [`super::sign`]).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// The first 12 hex characters, for logs and status lines.
    pub fn short(&self) -> String {
        let mut s = self.to_hex();
        s.truncate(12);
        s
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.short())
    }
}

/// A string that is not 64 hex characters.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a blake3 hash (64 hex characters)")]
pub struct BadHash(String);

impl FromStr for Hash {
    type Err = BadHash;
    fn from_str(s: &str) -> Result<Hash, BadHash> {
        // blake3 accepts upper case too; ids are written lower case, so insist on it.
        if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(BadHash(s.chars().take(80).collect()));
        }
        blake3::Hash::from_hex(s)
            .map(|h| Hash(*h.as_bytes()))
            .map_err(|_| BadHash(s.chars().take(80).collect()))
    }
}

impl Serialize for Hash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Hash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Hash, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One file of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// blake3 of the content.
    pub hash: Hash,
    /// Bytes.
    pub size: u64,
    /// `Content-Type` the agent serves it with.
    #[serde(rename = "type")]
    pub content_type: String,
}

/// A release's manifest. Build it with [`Manifest::new`] or [`Manifest::from_json`], which
/// check every path; a `Manifest` value is always valid.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Manifest {
    files: BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    files: BTreeMap<String, Entry>,
}

/// Why a manifest or a path is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The path breaks a rule.
    #[error("path `{path}` refused: {reason}")]
    Path {
        /// The path, cut to 200 characters.
        path: String,
        /// Which rule.
        reason: &'static str,
    },
    /// A path is both a file and a directory of other files.
    #[error("path `{0}` is a file and also a directory of other files")]
    FileAndDirectory(String),
    /// A file is larger than [`MAX_BLOB_BYTES`].
    #[error("`{path}` is {size} bytes; the largest file a release may hold is {max} bytes")]
    TooLarge {
        /// The path.
        path: String,
        /// Its size.
        size: u64,
        /// [`MAX_BLOB_BYTES`].
        max: u64,
    },
    /// More than [`MAX_FILES`] files.
    #[error("{0} files; a release holds at most {MAX_FILES}")]
    TooMany(usize),
    /// Not a manifest.
    #[error("not a manifest: {0}")]
    Json(String),
}

/// Checks one release path: relative, `/`-separated, no empty, `.` or `..` segments, no
/// backslash, NUL or other control character, at most [`MAX_PATH_BYTES`].
pub fn check_path(path: &str) -> Result<(), ManifestError> {
    let refuse = |reason| {
        Err(ManifestError::Path {
            path: path.chars().take(200).collect(),
            reason,
        })
    };
    if path.is_empty() {
        return refuse("empty");
    }
    if path.len() > MAX_PATH_BYTES {
        return refuse("longer than 1024 bytes");
    }
    if path.starts_with('/') {
        return refuse("absolute (starts with `/`)");
    }
    if path.contains('\\') {
        return refuse("contains a backslash");
    }
    if path.chars().any(|c| c.is_control()) {
        return refuse("contains NUL or another control character");
    }
    for segment in path.split('/') {
        match segment {
            "" => return refuse("has an empty segment (`//` or a trailing `/`)"),
            "." | ".." => return refuse("has a `.` or `..` segment"),
            _ => {}
        }
    }
    Ok(())
}

/// The `Content-Type` for a path, by its extension.
pub fn content_type(path: &str) -> String {
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    match (mime.type_(), mime.subtype().as_str()) {
        (mime_guess::mime::TEXT, _) | (_, "javascript") | (_, "json") | (_, "xml") => {
            format!("{mime}; charset=utf-8")
        }
        _ => mime.to_string(),
    }
}

impl Manifest {
    /// A manifest of `files`, every path and size checked.
    pub fn new(files: BTreeMap<String, Entry>) -> Result<Manifest, ManifestError> {
        if files.len() > MAX_FILES {
            return Err(ManifestError::TooMany(files.len()));
        }
        for (path, entry) in &files {
            check_path(path)?;
            if entry.size > MAX_BLOB_BYTES {
                return Err(ManifestError::TooLarge {
                    path: path.clone(),
                    size: entry.size,
                    max: MAX_BLOB_BYTES,
                });
            }
            // `a` and `a/b` cannot both be files on disk.
            let mut dir = path.as_str();
            while let Some((parent, _)) = dir.rsplit_once('/') {
                if files.contains_key(parent) {
                    return Err(ManifestError::FileAndDirectory(parent.to_string()));
                }
                dir = parent;
            }
        }
        Ok(Manifest { files })
    }

    /// Parses and checks a manifest.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let raw: RawManifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
        Manifest::new(raw.files)
    }

    /// The canonical encoding: compact JSON, paths sorted.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising a BTreeMap of plain structs cannot fail.
        serde_json::to_vec(self).expect("manifest serialises")
    }

    /// The release id: the hash of the canonical encoding.
    pub fn id(&self) -> ReleaseId {
        Hash::of(&self.to_json())
    }

    /// Files by path, sorted.
    pub fn files(&self) -> &BTreeMap<String, Entry> {
        &self.files
    }

    /// One file.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.files.get(path)
    }

    /// Whether `dir` (no trailing `/`; empty = the root) holds any file.
    pub fn is_dir(&self, dir: &str) -> bool {
        if dir.is_empty() {
            return !self.files.is_empty();
        }
        let prefix = format!("{dir}/");
        self.files
            .range(prefix.clone()..)
            .next()
            .is_some_and(|(p, _)| p.starts_with(&prefix))
    }

    /// Total bytes of the files.
    pub fn total_bytes(&self) -> u64 {
        self.files.values().map(|e| e.size).sum()
    }

    /// The distinct blobs, each once.
    pub fn blobs(&self) -> Vec<(Hash, u64)> {
        let mut seen = std::collections::HashSet::new();
        self.files
            .values()
            .filter(|e| seen.insert(e.hash))
            .map(|e| (e.hash, e.size))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(data: &[u8]) -> Entry {
        Entry {
            hash: Hash::of(data),
            size: data.len() as u64,
            content_type: "text/plain".into(),
        }
    }

    #[test]
    fn paths_that_escape_or_confuse_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/./b",
            "a//b",
            "a/",
            "a\\b",
            "a\0b",
            "a\nb",
            ".",
            "..",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_path(&"a".repeat(MAX_PATH_BYTES + 1)).is_err());
        for good in [
            "index.html",
            "a/b/c.css",
            ".well-known/x",
            "é/ü.txt",
            "a..b",
            "...x",
        ] {
            assert!(check_path(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn id_is_stable_and_names_the_content() {
        let mut files = BTreeMap::new();
        files.insert("b.txt".to_string(), entry(b"b"));
        files.insert("a.txt".to_string(), entry(b"a"));
        let m = Manifest::new(files.clone()).unwrap();
        let again = Manifest::from_json(&m.to_json()).unwrap();
        assert_eq!(m.id(), again.id());
        assert!(std::str::from_utf8(&m.to_json())
            .unwrap()
            .starts_with(r#"{"files":{"a.txt""#));
        files.insert("a.txt".to_string(), entry(b"A"));
        assert_ne!(Manifest::new(files).unwrap().id(), m.id());
    }

    #[test]
    fn file_and_directory_clash_and_bad_json_are_refused() {
        let mut files = BTreeMap::new();
        files.insert("a".to_string(), entry(b"1"));
        files.insert("a-b".to_string(), entry(b"2"));
        files.insert("a/b".to_string(), entry(b"3"));
        assert_eq!(
            Manifest::new(files).unwrap_err(),
            ManifestError::FileAndDirectory("a".into())
        );
        assert!(Manifest::from_json(
            b"{\"files\":{\"../x\":{\"hash\":\"00\",\"size\":1,\"type\":\"x\"}}}"
        )
        .is_err());
        let h = Hash::of(b"x");
        let escaping = format!(r#"{{"files":{{"../x":{{"hash":"{h}","size":1,"type":"x"}}}}}}"#);
        assert!(matches!(
            Manifest::from_json(escaping.as_bytes()),
            Err(ManifestError::Path { .. })
        ));
        assert!(Manifest::from_json(b"[]").is_err());
        let too_big = format!(
            r#"{{"files":{{"x":{{"hash":"{h}","size":{},"type":"x"}}}}}}"#,
            MAX_BLOB_BYTES + 1
        );
        assert!(matches!(
            Manifest::from_json(too_big.as_bytes()),
            Err(ManifestError::TooLarge { .. })
        ));
    }

    #[test]
    fn hashes_parse_only_as_lower_case_hex() {
        let h = Hash::of(b"abc");
        assert_eq!(h.to_hex().parse::<Hash>().unwrap(), h);
        assert!(h.to_hex().to_uppercase().parse::<Hash>().is_err());
        assert!("zz".parse::<Hash>().is_err());
    }

    #[test]
    fn directories_and_types() {
        let mut files = BTreeMap::new();
        files.insert("docs/index.html".to_string(), entry(b"1"));
        files.insert("docsx".to_string(), entry(b"2"));
        let m = Manifest::new(files).unwrap();
        assert!(m.is_dir("docs"));
        assert!(!m.is_dir("doc"));
        assert!(m.is_dir(""));
        assert_eq!(content_type("a/index.html"), "text/html; charset=utf-8");
        assert_eq!(content_type("x.png"), "image/png");
        assert_eq!(content_type("noext"), "application/octet-stream");
    }
}
