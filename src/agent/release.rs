//! A release as the agent serves it: the manifest turned into a lookup table of files with
//! their header values ready, the bodies of small files in memory and larger ones read from the
//! (immutable, content-addressed) blob store per request. Built beside the active release while
//! staging, then swapped in whole, so a flip costs one pointer store.
//!
//! [`Release::load`] reads the store (blocking: call it off the async threads); path resolution
//! ([`Release::resolve`], [`decode_path`]) and the `If-None-Match` rule ([`not_modified`]) are
//! pure.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;

use crate::sync::manifest::{Hash, Manifest, ManifestError, ReleaseId};
use crate::sync::store::{FsStore, StoreError};

/// Files up to this size are kept in memory.
pub const MAX_INLINE_BYTES: u64 = 1024 * 1024;
/// At most this many bytes of one release are kept in memory; later files are read from disk.
pub const INLINE_BUDGET_BYTES: u64 = 128 * 1024 * 1024;

/// One file of a release, ready to serve.
#[derive(Debug)]
pub struct File {
    /// Its blob.
    pub hash: Hash,
    /// Bytes.
    pub size: u64,
    /// `Content-Type`.
    pub content_type: HeaderValue,
    /// `ETag`: the blob hash, quoted.
    pub etag: HeaderValue,
    /// The content, when kept in memory.
    pub body: Option<Bytes>,
}

impl File {
    fn new(entry: &crate::sync::manifest::Entry, body: Option<Bytes>) -> File {
        let content_type = HeaderValue::from_str(&entry.content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream"));
        let etag = HeaderValue::from_str(&format!("\"{}\"", entry.hash))
            .expect("hex in quotes is a valid header value");
        File {
            hash: entry.hash,
            size: entry.size,
            content_type,
            etag,
            body,
        }
    }
}

/// A release ready to serve.
pub struct Release {
    id: ReleaseId,
    id_header: HeaderValue,
    manifest: Manifest,
    files: HashMap<Box<str>, File>,
    store: Arc<FsStore>,
}

impl std::fmt::Debug for Release {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Release({}, {} files)",
            self.id.short(),
            self.files.len()
        )
    }
}

/// Why a release cannot be loaded from the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No manifest stored under the id.
    #[error("release {0} has no manifest in the store")]
    NoManifest(ReleaseId),
    /// The stored manifest does not parse or does not hash to its id.
    #[error("release {id}: stored manifest refused: {reason}")]
    BadManifest {
        /// The release.
        id: ReleaseId,
        /// Why.
        reason: String,
    },
    /// A blob is absent or damaged.
    #[error("release {id}: blob {hash} of `{path}` is missing or damaged in the store")]
    Blob {
        /// The release.
        id: ReleaseId,
        /// The blob.
        hash: Hash,
        /// A file that uses it.
        path: String,
    },
}

/// What a request path names in a release.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolved<'a> {
    /// This file.
    File(&'a str),
    /// A directory asked for without its trailing `/`: redirect to this path (with the `/`),
    /// so that relative links in its `index.html` resolve, as nginx does.
    Redirect(String),
    /// Nothing.
    NotFound,
    /// A path that is not valid percent-encoded UTF-8.
    BadPath,
}

impl Release {
    /// Reads release `id` from `store`: its manifest (which must hash to `id`), a check that
    /// every blob is present with its size, and the small bodies (each hashed again: a damaged
    /// blob is removed from the store so that staging fetches it again). Blocking.
    pub fn load(store: &Arc<FsStore>, id: ReleaseId) -> Result<Release, LoadError> {
        let bytes = store.read_release(&id)?.ok_or(LoadError::NoManifest(id))?;
        let manifest = Manifest::from_json(&bytes).map_err(|e| LoadError::BadManifest {
            id,
            reason: e.to_string(),
        })?;
        if manifest.id() != id {
            return Err(LoadError::BadManifest {
                id,
                reason: "it does not hash to the release id".into(),
            });
        }
        Release::build(store, manifest)
    }

    /// A release of `manifest`, whose blobs are all in `store`. Blocking.
    pub fn build(store: &Arc<FsStore>, manifest: Manifest) -> Result<Release, LoadError> {
        Release::build_reusing(store, manifest, None, &HashMap::new())
    }

    /// As [`Release::build`], taking the files `reuse` already holds (same blob) from it, and
    /// small files from `fresh` (blobs just received and verified, possibly not yet on disk),
    /// instead of the disk: installing a one-file changeset into a large release reads nothing.
    /// Blocking.
    pub fn build_reusing(
        store: &Arc<FsStore>,
        manifest: Manifest,
        reuse: Option<&Release>,
        fresh: &HashMap<Hash, Bytes>,
    ) -> Result<Release, LoadError> {
        let id = manifest.id();
        let mut bodies: HashMap<Hash, Bytes> = HashMap::new();
        let mut budget = INLINE_BUDGET_BYTES;
        let mut files = HashMap::with_capacity(manifest.files().len());
        let mut checked: HashMap<Hash, Option<Bytes>> = HashMap::new();
        if let Some(r) = reuse {
            for f in r.files.values() {
                checked.insert(f.hash, f.body.clone());
                if let Some(b) = &f.body {
                    budget = budget.saturating_sub(f.size);
                    bodies.insert(f.hash, b.clone());
                }
            }
        }
        for (path, entry) in manifest.files() {
            let fresh = fresh
                .get(&entry.hash)
                .filter(|b| b.len() as u64 == entry.size && entry.size <= MAX_INLINE_BYTES);
            if let Some(b) = fresh {
                files.insert(path.as_str().into(), File::new(entry, Some(b.clone())));
                continue;
            }
            if let Some(body) = checked.get(&entry.hash) {
                files.insert(path.as_str().into(), File::new(entry, body.clone()));
                continue;
            }
            let damaged = || {
                // Gone or wrong: drop it so that staging fetches a good copy.
                let _ = std::fs::remove_file(store.blob_path(&entry.hash));
                LoadError::Blob {
                    id,
                    hash: entry.hash,
                    path: path.clone(),
                }
            };
            let body = if let Some(b) = bodies.get(&entry.hash) {
                Some(b.clone())
            } else {
                let blob = store.blob_path(&entry.hash);
                let on_disk = std::fs::metadata(&blob).map(|m| m.len()).ok();
                if on_disk != Some(entry.size) {
                    return Err(damaged());
                }
                if entry.size <= MAX_INLINE_BYTES && entry.size <= budget {
                    let data = std::fs::read(&blob).map_err(|_| damaged())?;
                    if Hash::of(&data) != entry.hash {
                        return Err(damaged());
                    }
                    budget -= entry.size;
                    let b = Bytes::from(data);
                    bodies.insert(entry.hash, b.clone());
                    Some(b)
                } else {
                    None
                }
            };
            files.insert(path.as_str().into(), File::new(entry, body));
        }
        Ok(Release {
            id,
            id_header: HeaderValue::from_str(&id.to_hex()).expect("hex is a valid header value"),
            manifest,
            files,
            store: store.clone(),
        })
    }

    /// The release id.
    pub fn id(&self) -> ReleaseId {
        self.id
    }

    /// The id as an `X-Lockstep-Release` value.
    pub fn id_header(&self) -> &HeaderValue {
        &self.id_header
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// A file by its release path.
    pub fn file(&self, path: &str) -> Option<&File> {
        self.files.get(path)
    }

    /// Where a file's blob lives (for files not kept in memory).
    pub fn blob_path(&self, file: &File) -> PathBuf {
        self.store.blob_path(&file.hash)
    }

    /// What the request path `raw` (as on the wire, starting with `/`, no query) names.
    pub fn resolve(&self, raw: &str) -> Resolved<'_> {
        resolve(raw, |p| self.files.get_key_value(p).map(|(k, _)| &**k))
    }
}

/// Path resolution over any file lookup (pure): `/` and `…/` → their `index.html`; a file by
/// its path; `/dir` whose `dir/index.html` exists → a redirect to `/dir/`.
pub fn resolve<'a>(raw: &str, lookup: impl Fn(&str) -> Option<&'a str>) -> Resolved<'a> {
    let Some(path) = decode_path(raw) else {
        return Resolved::BadPath;
    };
    let rel = path.strip_prefix('/').unwrap_or(&path);
    if rel.is_empty() || rel.ends_with('/') {
        return match lookup(&format!("{rel}index.html")) {
            Some(p) => Resolved::File(p),
            None => Resolved::NotFound,
        };
    }
    if let Some(p) = lookup(rel) {
        return Resolved::File(p);
    }
    if lookup(&format!("{rel}/index.html")).is_some() {
        return Resolved::Redirect(format!("{raw}/"));
    }
    Resolved::NotFound
}

/// Decodes `%XX` escapes; `None` when an escape is malformed or the result is not UTF-8.
pub fn decode_path(raw: &str) -> Option<String> {
    if !raw.contains('%') {
        return Some(raw.to_string());
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Whether an `If-None-Match` value matches `etag` (weak comparison, RFC 9110 §13.1.2): `*`,
/// or any listed tag equal to it with or without `W/`.
pub fn not_modified(if_none_match: Option<&HeaderValue>, etag: &HeaderValue) -> bool {
    let Some(value) = if_none_match.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let etag = etag.to_str().unwrap_or("");
    value
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

/// Why a manifest fetched from the hub is refused: it does not parse, or its canonical hash
/// is not the id it was asked for.
pub fn check_manifest(id: ReleaseId, bytes: &[u8]) -> Result<Manifest, ManifestError> {
    let manifest = Manifest::from_json(bytes)?;
    if manifest.id() != id {
        return Err(ManifestError::Json(format!(
            "the manifest hashes to {}, not to the release id {}",
            manifest.id().short(),
            id.short()
        )));
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::sync::manifest::Entry;

    fn lookup<'a>(paths: &'a [&'a str]) -> impl Fn(&str) -> Option<&'a str> {
        move |p| paths.iter().copied().find(|x| *x == p)
    }

    #[test]
    fn paths_resolve_to_files_index_pages_and_redirects() {
        let paths = [
            "index.html",
            "docs/index.html",
            "a b.txt",
            "css/site.css",
            "empty/x",
        ];
        let r = |raw| resolve(raw, lookup(&paths));
        assert_eq!(r("/"), Resolved::File("index.html"));
        assert_eq!(r("/index.html"), Resolved::File("index.html"));
        assert_eq!(r("/docs/"), Resolved::File("docs/index.html"));
        assert_eq!(r("/docs"), Resolved::Redirect("/docs/".into()));
        assert_eq!(r("/a%20b.txt"), Resolved::File("a b.txt"));
        assert_eq!(r("/css/site.css"), Resolved::File("css/site.css"));
        assert_eq!(r("/css/"), Resolved::NotFound);
        assert_eq!(r("/empty"), Resolved::NotFound);
        assert_eq!(r("/../index.html"), Resolved::NotFound);
        assert_eq!(r("/%2e%2e/index.html"), Resolved::NotFound);
        assert_eq!(r("/nope"), Resolved::NotFound);
        assert_eq!(r("/%zz"), Resolved::BadPath);
        assert_eq!(r("/%ff"), Resolved::BadPath);
        assert_eq!(r("/%4"), Resolved::BadPath);
        let none: [&str; 0] = [];
        assert_eq!(resolve("/", lookup(&none)), Resolved::NotFound);
    }

    #[test]
    fn if_none_match_follows_weak_comparison() {
        let etag = HeaderValue::from_static("\"abc\"");
        let v = |s: &'static str| Some(HeaderValue::from_static(s));
        assert!(not_modified(v("\"abc\"").as_ref(), &etag));
        assert!(not_modified(v("W/\"abc\"").as_ref(), &etag));
        assert!(not_modified(v("\"x\", \"abc\"").as_ref(), &etag));
        assert!(not_modified(v("*").as_ref(), &etag));
        assert!(!not_modified(v("\"abcd\"").as_ref(), &etag));
        assert!(!not_modified(v("abc").as_ref(), &etag));
        assert!(!not_modified(None, &etag));
    }

    fn manifest(files: &[(&str, &[u8])]) -> Manifest {
        let mut m = BTreeMap::new();
        for (p, data) in files {
            m.insert(
                p.to_string(),
                Entry {
                    hash: Hash::of(data),
                    size: data.len() as u64,
                    content_type: crate::sync::manifest::content_type(p),
                },
            );
        }
        Manifest::new(m).unwrap()
    }

    #[test]
    fn loading_checks_every_blob_and_drops_damaged_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FsStore::open(dir.path()).unwrap());
        let m = manifest(&[("index.html", b"<h1>hi</h1>"), ("big.bin", &[7u8; 2 << 20])]);
        let id = m.id();
        store.write_release(&id, &m.to_json()).unwrap();
        store
            .write_blob(&Hash::of(b"<h1>hi</h1>"), b"<h1>hi</h1>")
            .unwrap();
        assert!(matches!(
            Release::load(&store, id),
            Err(LoadError::Blob { .. })
        ));
        store
            .write_blob(&Hash::of(&[7u8; 2 << 20]), &[7u8; 2 << 20])
            .unwrap();
        let r = Release::load(&store, id).unwrap();
        assert_eq!(r.id(), id);
        let small = r.file("index.html").unwrap();
        assert_eq!(small.body.as_deref(), Some(&b"<h1>hi</h1>"[..]));
        assert_eq!(small.content_type, "text/html; charset=utf-8");
        assert_eq!(
            small.etag,
            format!("\"{}\"", Hash::of(b"<h1>hi</h1>")).as_str()
        );
        let big = r.file("big.bin").unwrap();
        assert!(big.body.is_none(), "files over 1 MiB are read from disk");
        // Same size, other bytes: found damaged on load and removed from the store.
        let blob = store.blob_path(&Hash::of(b"<h1>hi</h1>"));
        std::fs::write(&blob, b"<h1>HI</h1>").unwrap();
        assert!(matches!(
            Release::load(&store, id),
            Err(LoadError::Blob { .. })
        ));
        assert!(!blob.exists());
        assert!(matches!(
            Release::load(&store, Hash::of(b"nothing")),
            Err(LoadError::NoManifest(_))
        ));
    }

    #[test]
    fn manifests_must_hash_to_their_id() {
        let m = manifest(&[("a", b"a")]);
        assert!(check_manifest(m.id(), &m.to_json()).is_ok());
        assert!(check_manifest(Hash::of(b"other"), &m.to_json()).is_err());
        // Non-canonical but equivalent JSON is accepted: the id is the canonical hash.
        let pretty = serde_json::to_vec_pretty(&m).unwrap();
        assert_eq!(check_manifest(m.id(), &pretty).unwrap(), m);
    }
}
