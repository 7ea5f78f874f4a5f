//! Publisher signatures on releases: Ed25519 (through `ring`) over a domain-separated message
//! — [`RELEASE_CONTEXT`] followed by the release id's 32 bytes, never the bare id, so a
//! signature made for a release can never be replayed as a signature of anything else — and
//! the keys that make and check them.
//!
//! Key files, as `lockstep keygen` writes them:
//!
//! - the secret key: PKCS#8 in PEM (`-----BEGIN PRIVATE KEY-----`, as `openssl genpkey
//!   -algorithm ed25519` writes it too), refused when other users may read or write it, as ssh
//!   refuses such a key;
//! - the public key: one line `lockstep-ed25519 <base64 of the 32 bytes> [comment]`, like an
//!   ssh public key. What agents (`trusted_keys`) and the hub (`sync.trusted_keys`) are given.
//!
//! A key is named in logs and errors by its [`KeyId`]: the first 8 bytes of the blake3 hash of
//! the public key, in hex.
//!
//! Reads and writes key files; no clock, and no randomness of its own (a key is generated
//! from the random source it is given).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::rand::SecureRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::manifest::ReleaseId;

/// What a signed release message starts with (then the release id's 32 bytes).
pub const RELEASE_CONTEXT: &[u8] = b"lockstep-release-v1\0";
/// The first word of a public key line.
pub const ALGORITHM: &str = "lockstep-ed25519";
/// Largest key file read.
const MAX_KEY_FILE: u64 = 64 * 1024;

/// The message a release signature covers.
pub fn release_message(id: &ReleaseId) -> Vec<u8> {
    let mut m = Vec::with_capacity(RELEASE_CONTEXT.len() + 32);
    m.extend_from_slice(RELEASE_CONTEXT);
    m.extend_from_slice(id.as_bytes());
    m
}

/// Why a key or a key file is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Unreadable.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not writable (`keygen`).
    #[error("cannot write key file {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// `keygen` never overwrites a key.
    #[error("{0} exists: lockstep keygen never overwrites a key (remove it first, or choose another --out)")]
    Exists(String),
    /// A secret key other users may read or write.
    #[error("secret key {path} is accessible by other users (mode {mode:o}): `chmod 600 {path}`")]
    Permissions {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// Not a key of the expected form.
    #[error("{what}: {reason}")]
    Malformed {
        /// The file, or what was parsed.
        what: String,
        /// What is wrong.
        reason: String,
    },
}

fn malformed(what: &str, reason: impl Into<String>) -> KeyError {
    KeyError::Malformed {
        what: what.to_string(),
        reason: reason.into(),
    }
}

/// A short name of a public key for logs and errors: the first 8 bytes of its blake3 hash.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId([u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// The ids, comma-separated (`none` for none).
fn list(ids: &[KeyId]) -> String {
    if ids.is_empty() {
        return "none".into();
    }
    ids.iter()
        .map(KeyId::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// From its 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<PublicKey> {
        bytes.try_into().ok().map(PublicKey)
    }

    /// Its 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Its short name.
    pub fn id(&self) -> KeyId {
        let h = blake3::hash(&self.0);
        let mut id = [0u8; 8];
        id.copy_from_slice(&h.as_bytes()[..8]);
        KeyId(id)
    }

    /// Its line in a `.pub` file: `lockstep-ed25519 <base64> [comment]`.
    pub fn to_line(&self, comment: Option<&str>) -> String {
        match comment {
            Some(c) if !c.trim().is_empty() => {
                format!("{ALGORITHM} {} {}", self.base64(), c.trim())
            }
            _ => format!("{ALGORITHM} {}", self.base64()),
        }
    }

    /// Parses a `.pub` file's text (its first line that is neither empty nor a `#` comment):
    /// the key and its comment. `what` names the text in errors.
    pub fn parse(text: &str, what: &str) -> Result<(PublicKey, Option<String>), KeyError> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| malformed(what, format!("empty: expected a line `{ALGORITHM} <base64 key> [comment]` (written by lockstep keygen)")))?;
        let mut words = line.splitn(3, char::is_whitespace);
        let (alg, key) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        if alg != ALGORITHM {
            let hint = if line.starts_with("-----BEGIN") {
                ": this looks like a secret key; give the `.pub` file lockstep keygen wrote beside it"
            } else {
                ""
            };
            return Err(malformed(
                what,
                format!(
                    "not a lockstep public key (expected a line starting `{ALGORITHM} `){hint}"
                ),
            ));
        }
        let bytes = B64
            .decode(key.trim())
            .map_err(|e| malformed(what, format!("the key is not base64: {e}")))?;
        let key = PublicKey::from_bytes(&bytes).ok_or_else(|| {
            malformed(
                what,
                format!("the key is {} bytes; an Ed25519 key is 32", bytes.len()),
            )
        })?;
        let comment = words
            .next()
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty());
        Ok((key, comment))
    }

    fn base64(&self) -> String {
        B64.encode(self.0)
    }

    /// Whether `sig` is this key's signature of `message`.
    fn verifies(&self, message: &[u8], sig: &[u8; 64]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(message, sig)
            .is_ok()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id())
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.base64())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PublicKey, D::Error> {
        let bytes = base64_field(d)?;
        PublicKey::from_bytes(&bytes).ok_or_else(|| {
            serde::de::Error::custom(format!("a public key is 32 bytes, not {}", bytes.len()))
        })
    }
}

fn base64_field<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    B64.decode(s.as_bytes())
        .map_err(|e| serde::de::Error::custom(format!("not base64: {e}")))
}

/// The 64 bytes of an Ed25519 signature (base64 on the wire).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SigBytes(pub [u8; 64]);

impl fmt::Debug for SigBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigBytes(..)")
    }
}

impl Serialize for SigBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(self.0))
    }
}

impl<'de> Deserialize<'de> for SigBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SigBytes, D::Error> {
        let bytes = base64_field(d)?;
        bytes.as_slice().try_into().map(SigBytes).map_err(|_| {
            serde::de::Error::custom(format!(
                "an Ed25519 signature is 64 bytes, not {}",
                bytes.len()
            ))
        })
    }
}

/// A key's signature of a release: `{"key": "<base64>", "sig": "<base64>"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// The key that signed.
    pub key: PublicKey,
    /// Its signature of [`release_message`].
    pub sig: SigBytes,
}

impl Signature {
    /// Whether this is `key`'s signature of release `id`.
    pub fn verifies(&self, id: &ReleaseId) -> bool {
        self.key.verifies(&release_message(id), &self.sig.0)
    }
}

/// A secret key, able to sign releases.
pub struct SecretKey {
    pair: Ed25519KeyPair,
    public: PublicKey,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.public.id())
    }
}

impl SecretKey {
    /// A new key from `rng`, and its PKCS#8 PEM text.
    pub fn generate(rng: &dyn SecureRandom) -> Result<(SecretKey, String), KeyError> {
        let doc = Ed25519KeyPair::generate_pkcs8(rng)
            .map_err(|_| malformed("a new key", "the system's random source failed"))?;
        let pem = ed25519_pem(doc.as_ref())
            .ok_or_else(|| malformed("a new key", "ring wrote an unexpected PKCS#8 form"))?;
        let key = SecretKey::from_pkcs8(doc.as_ref(), "a new key")?;
        Ok((key, pem))
    }

    /// From a PEM text holding a PKCS#8 Ed25519 key; `what` names it in errors.
    pub fn from_pem(text: &[u8], what: &str) -> Result<SecretKey, KeyError> {
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(text).map_err(|e| {
            malformed(
                what,
                format!("no PKCS#8 private key (`-----BEGIN PRIVATE KEY-----`): {e}"),
            )
        })?;
        SecretKey::from_pkcs8(der.secret_pkcs8_der(), what)
    }

    fn from_pkcs8(der: &[u8], what: &str) -> Result<SecretKey, KeyError> {
        // v1 (OpenSSL's) or v2 (ring's, with the public key, checked against the seed).
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| malformed(what, format!("not an Ed25519 private key: {e}")))?;
        // ring's public key is always 32 bytes.
        let public = PublicKey::from_bytes(pair.public_key().as_ref())
            .ok_or_else(|| malformed(what, "unexpected public key length"))?;
        Ok(SecretKey { pair, public })
    }

    /// Its public key.
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// Signs `message` (the caller gives it its context, as [`release_message`] does).
    pub fn sign_bytes(&self, message: &[u8]) -> SigBytes {
        let sig = self.pair.sign(message);
        let mut bytes = [0u8; 64];
        // An Ed25519 signature is always 64 bytes.
        bytes.copy_from_slice(sig.as_ref());
        SigBytes(bytes)
    }

    /// Signs release `id`.
    pub fn sign_release(&self, id: &ReleaseId) -> Signature {
        let sig = self.pair.sign(&release_message(id));
        let mut bytes = [0u8; 64];
        // An Ed25519 signature is always 64 bytes.
        bytes.copy_from_slice(sig.as_ref());
        Signature {
            key: self.public,
            sig: SigBytes(bytes),
        }
    }
}

/// `der` as PEM with `label`, 64 columns.
/// The fixed head of an Ed25519 private key in PKCS#8 v1 (RFC 8410): SEQUENCE, version 0,
/// the algorithm (id-Ed25519), then the 32-byte seed as an OCTET STRING in an OCTET STRING.
const PKCS8_V1_HEAD: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// An Ed25519 private key (PKCS#8 v1 or v2, as ring writes it) as a PKCS#8 v1 PEM: the form
/// every tool reads (OpenSSL 3.0, and so curl, refuses ring's v2 with the public key).
pub fn ed25519_pem(pkcs8: &[u8]) -> Option<String> {
    // v1 and v2 share the head up to the seed, but for the version and the outer length.
    let ok = pkcs8.len() >= 48
        && pkcs8[0] == 0x30
        && pkcs8[2..5] == [0x02, 0x01, pkcs8[4]]
        && matches!(pkcs8[4], 0 | 1)
        && pkcs8[5..16] == PKCS8_V1_HEAD[5..16];
    if !ok {
        return None;
    }
    let mut v1 = PKCS8_V1_HEAD.to_vec();
    v1.extend_from_slice(&pkcs8[16..48]);
    Some(pem("PRIVATE KEY", &v1))
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // Base64 is ASCII.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn read_small(path: &Path) -> Result<Vec<u8>, KeyError> {
    use std::io::Read;
    let shown = path.display().to_string();
    let read_err = |source| KeyError::Read {
        path: shown.clone(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(read_err)?
        .take(MAX_KEY_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_KEY_FILE {
        return Err(malformed(&shown, "larger than a key file can be"));
    }
    Ok(bytes)
}

/// Reads a secret key file. A file other users may read or write is refused.
pub fn read_secret_key(path: &Path) -> Result<SecretKey, KeyError> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| KeyError::Read {
        path: shown.clone(),
        source,
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions { path: shown, mode });
        }
    }
    let _ = meta;
    SecretKey::from_pem(&read_small(path)?, &shown)
}

/// Reads a public key file (`.pub`).
pub fn read_public_key(path: &Path) -> Result<PublicKey, KeyError> {
    let shown = path.display().to_string();
    let bytes = read_small(path)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| malformed(&shown, "not text"))?;
    PublicKey::parse(text, &shown).map(|(k, _)| k)
}

/// `PATH.pub`: where the public half of the key at `secret` is written.
pub fn public_path(secret: &Path) -> PathBuf {
    let mut p = secret.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

/// Writes a new key pair: the secret key to `out` (mode 0600) and the public key to
/// `out.pub` (0644). Refuses to overwrite either; leaves neither behind on failure.
pub fn write_key_pair(
    out: &Path,
    comment: Option<&str>,
    rng: &dyn SecureRandom,
) -> Result<PublicKey, KeyError> {
    if let Some(c) = comment {
        if c.chars().any(char::is_control) {
            return Err(malformed("the comment", "must be one line of text"));
        }
    }
    let public_file = public_path(out);
    for p in [out, public_file.as_path()] {
        if p.symlink_metadata().is_ok() {
            return Err(KeyError::Exists(p.display().to_string()));
        }
    }
    let (key, secret_pem) = SecretKey::generate(rng)?;
    let public_line = format!("{}\n", key.public().to_line(comment));
    write_new(out, secret_pem.as_bytes(), 0o600)?;
    if let Err(e) = write_new(&public_file, public_line.as_bytes(), 0o644) {
        let _ = std::fs::remove_file(out);
        return Err(e);
    }
    Ok(key.public())
}

/// Creates `path` (never replacing a file) with `mode` and writes `data`, synced.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), KeyError> {
    use std::io::Write;
    let shown = path.display().to_string();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    let _ = mode;
    let mut f = options.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            KeyError::Exists(shown.clone())
        } else {
            KeyError::Write {
                path: shown.clone(),
                source,
            }
        }
    })?;
    let written = f.write_all(data).and_then(|()| f.sync_all());
    written.map_err(|source| {
        let _ = std::fs::remove_file(path);
        KeyError::Write {
            path: shown,
            source,
        }
    })
}

/// A release none of whose signatures is a trusted key's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("release {} is not signed by a trusted key: {}; trusted: {}", release.short(), signed(signed_by, invalid), list(trusted))]
pub struct Unsigned {
    /// The release.
    pub release: ReleaseId,
    /// Keys whose signature of it verifies, none of them trusted.
    pub signed_by: Vec<KeyId>,
    /// Keys whose signature does not verify for this release (made for another one, or
    /// damaged).
    pub invalid: Vec<KeyId>,
    /// The keys that would have been accepted.
    pub trusted: Vec<KeyId>,
}

fn signed(by: &[KeyId], invalid: &[KeyId]) -> String {
    let mut s = match by {
        [] => "it carries no valid signature".to_string(),
        by => format!("signed by {} (not trusted)", list(by)),
    };
    if !invalid.is_empty() {
        s.push_str(&format!(
            "; signatures by {} do not verify for it",
            list(invalid)
        ));
    }
    s
}

/// The publisher keys whose signature makes a release acceptable.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: BTreeMap<KeyId, PublicKey>,
}

impl fmt::Debug for TrustedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.keys.keys()).finish()
    }
}

impl TrustedKeys {
    /// Trusting `keys`.
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> TrustedKeys {
        TrustedKeys {
            keys: keys.into_iter().map(|k| (k.id(), k)).collect(),
        }
    }

    /// The trusted keys' ids.
    pub fn ids(&self) -> Vec<KeyId> {
        self.keys.keys().copied().collect()
    }

    /// How many keys are trusted.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is trusted (nothing verifies).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `key` is trusted.
    pub fn contains(&self, key: &PublicKey) -> bool {
        self.keys.get(&key.id()) == Some(key)
    }

    /// The trusted key that signed release `id` among `sigs`, or what the signatures were.
    pub fn verify(&self, id: &ReleaseId, sigs: &[Signature]) -> Result<KeyId, Unsigned> {
        let (mut signed_by, mut invalid) = (Vec::new(), Vec::new());
        for s in sigs {
            if !s.verifies(id) {
                invalid.push(s.key.id());
            } else if self.contains(&s.key) {
                return Ok(s.key.id());
            } else {
                signed_by.push(s.key.id());
            }
        }
        signed_by.dedup();
        invalid.dedup();
        Err(Unsigned {
            release: *id,
            signed_by,
            invalid,
            trusted: self.ids(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::manifest::Hash;
    use ring::rand::SystemRandom;

    fn key() -> SecretKey {
        SecretKey::generate(&SystemRandom::new()).unwrap().0
    }

    #[test]
    fn a_signature_verifies_for_its_release_and_key_only() {
        let (a, b) = (key(), key());
        let (id, other) = (Hash::of(b"release 1"), Hash::of(b"release 2"));
        let sig = a.sign_release(&id);
        assert!(sig.verifies(&id));
        assert!(!sig.verifies(&other), "an altered id does not verify");
        // Never the bare id: a signature of the id's bytes alone is not a release signature.
        let bare = a.pair.sign(id.as_bytes());
        let mut bytes = [0u8; 64];
        bytes.copy_from_slice(bare.as_ref());
        let bare = Signature {
            key: a.public(),
            sig: SigBytes(bytes),
        };
        assert!(!bare.verifies(&id));

        let trust_a = TrustedKeys::new([a.public()]);
        assert_eq!(trust_a.verify(&id, &[sig]), Ok(a.public().id()));
        // b's valid signature is not trusted; a's signature moved to b's key never verifies.
        let by_b = b.sign_release(&id);
        let e = trust_a.verify(&id, &[by_b]).unwrap_err();
        assert_eq!(e.signed_by, vec![b.public().id()]);
        let msg = e.to_string();
        assert!(msg.contains(&b.public().id().to_string()), "{msg}");
        assert!(msg.contains("not signed by a trusted key"), "{msg}");
        assert!(msg.contains(&a.public().id().to_string()), "{msg}");
        let forged = Signature {
            key: a.public(),
            sig: by_b.sig,
        };
        let e = trust_a.verify(&id, &[forged]).unwrap_err();
        assert_eq!((e.signed_by.len(), e.invalid), (0, vec![a.public().id()]));
        // Altered id: a's signature of `id` does not make `other` acceptable.
        let e = trust_a.verify(&other, &[sig]).unwrap_err();
        assert!(e.to_string().contains("do not verify"), "{e}");
        assert!(TrustedKeys::new([a.public(), b.public()])
            .verify(&id, &[by_b, sig])
            .is_ok());
        assert_eq!(
            trust_a.verify(&id, &[]).unwrap_err().to_string(),
            format!(
                "release {} is not signed by a trusted key: it carries no valid signature; trusted: {}",
                id.short(),
                a.public().id()
            )
        );
    }

    #[test]
    fn signatures_and_keys_roundtrip_as_text() {
        let a = key();
        let id = Hash::of(b"x");
        let sig = a.sign_release(&id);
        let json = serde_json::to_string(&sig).unwrap();
        assert!(json.starts_with(r#"{"key":""#), "{json}");
        let back: Signature = serde_json::from_str(&json).unwrap();
        assert_eq!(back, sig);
        assert!(back.verifies(&id));
        let short = json.replace(&B64.encode(sig.sig.0), &B64.encode([1u8; 10]));
        assert!(serde_json::from_str::<Signature>(&short).is_err());

        let line = a.public().to_line(Some("ops@farm  "));
        assert!(line.starts_with("lockstep-ed25519 ") && line.ends_with(" ops@farm"));
        let (k, c) = PublicKey::parse(&format!("# mine\n\n{line}\n"), "k.pub").unwrap();
        assert_eq!((k, c.as_deref()), (a.public(), Some("ops@farm")));
        let (k, c) = PublicKey::parse(&a.public().to_line(None), "k.pub").unwrap();
        assert_eq!((k, c), (a.public(), None));
    }

    #[test]
    fn malformed_key_files_are_refused_with_the_reason() {
        let a = key();
        for (text, reason) in [
            ("", "empty"),
            ("ssh-ed25519 AAAA", "not a lockstep public key"),
            ("-----BEGIN PRIVATE KEY-----", "looks like a secret key"),
            ("lockstep-ed25519 !!!", "not base64"),
            ("lockstep-ed25519 AAAA", "is 3 bytes"),
        ] {
            let e = PublicKey::parse(text, "k.pub").unwrap_err().to_string();
            assert!(
                e.starts_with("k.pub: ") && e.contains(reason),
                "{text:?}: {e}"
            );
        }
        for text in [
            &b"garbage"[..],
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ] {
            assert!(SecretKey::from_pem(text, "k").is_err());
        }
        let line = a.public().to_line(None);
        assert!(SecretKey::from_pem(line.as_bytes(), "k").is_err());
    }

    #[test]
    fn keygen_writes_a_private_secret_and_a_public_line_and_never_overwrites() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("publisher.key");
        let public = write_key_pair(&out, Some("release key"), &SystemRandom::new()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&out), 0o600);
        let pub_file = public_path(&out);
        assert_eq!(pub_file, dir.path().join("publisher.key.pub"));
        assert_eq!(read_public_key(&pub_file).unwrap(), public);
        let secret = read_secret_key(&out).unwrap();
        assert_eq!(secret.public(), public);
        assert!(std::fs::read_to_string(&out)
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let before = std::fs::read(&out).unwrap();
        assert!(matches!(
            write_key_pair(&out, None, &SystemRandom::new()),
            Err(KeyError::Exists(_))
        ));
        assert_eq!(std::fs::read(&out).unwrap(), before, "never overwritten");
        // A stray .pub alone also stops it, and no secret is left behind.
        let other = dir.path().join("other.key");
        std::fs::write(public_path(&other), "x").unwrap();
        assert!(matches!(
            write_key_pair(&other, None, &SystemRandom::new()),
            Err(KeyError::Exists(_))
        ));
        assert!(!other.exists());

        // Readable by the group or everyone: refused, naming the fix.
        for m in [0o640, 0o604, 0o660] {
            std::fs::set_permissions(&out, std::fs::Permissions::from_mode(m)).unwrap();
            let e = read_secret_key(&out).unwrap_err();
            assert!(matches!(e, KeyError::Permissions { .. }), "{m:o}");
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(read_secret_key(&out).is_ok());
        assert!(matches!(
            read_public_key(&dir.path().join("missing.pub")),
            Err(KeyError::Read { .. })
        ));
    }

    #[test]
    fn an_openssl_pkcs8_v1_key_is_accepted() {
        // `openssl genpkey -algorithm ed25519` (PKCS#8 v1, no public key inside).
        let pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----\n";
        let k = SecretKey::from_pem(pem.as_bytes(), "openssl.key").unwrap();
        let id = Hash::of(b"r");
        assert!(k.sign_release(&id).verifies(&id));
    }
}
