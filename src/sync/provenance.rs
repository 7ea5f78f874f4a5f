//! Where a release the hub built from changesets came from: its [`Provenance`] — the release
//! the changesets were applied to (its *base*) and the changesets — and the check an agent
//! makes before it accepts such a release, which no publisher signed: every path whose entry
//! differs between the base and the release holds exactly what one of the listed changesets
//! sets it to (a removal: nothing), every listed changeset is accepted by the agent's
//! [`ChangesetAuthority`], and the base is itself acceptable (signed by a trusted key, or
//! built the same way, at most [`MAX_DEPTH`] steps down).
//!
//! So a hub can serve, beside the publishers' signed releases, only what those releases plus
//! authorised edits make; it cannot slip in content of its own. How much that holds depends
//! on the authority: [`FarmSigned`] accepts a changeset only with its origin's signature by the
//! key of that agent's farm certificate (agents sign theirs with [`ChangesetSigner`]), so a
//! hub can neither forge nor alter one; [`TrustedOrigins`], for agents without a farm CA,
//! goes by the origin name a changeset claims.
//!
//! The hub keeps provenances short: a release built on a release that has a provenance
//! itself gets its base's base (flattened, see [`extend`]), and only the changesets that
//! still explain a difference are kept, so a chain of edits is one step down to the last
//! signed release and at most one changeset per changed path.
//!
//! Pure: no I/O; the clock that dates certificates is injected.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};

use super::changeset::Changeset;
use super::identity::{Identity, Kind, Revocations};
use super::manifest::{Entry, Manifest, ReleaseId};
use super::sign::SecretKey;

/// Most provenance steps an agent follows down to a signed release.
pub const MAX_DEPTH: usize = 8;

/// The context an agent's changeset signature is made in: never valid as anything else.
pub const CHANGESET_CONTEXT: &[u8] = b"lockstep-changeset-v1\0";

/// The bytes an agent signs for `cs`: the context, then the changeset's JSON (its fields in
/// their fixed order, its paths sorted: the same bytes wherever it is serialised).
pub fn changeset_message(cs: &Changeset) -> Vec<u8> {
    let mut m = CHANGESET_CONTEXT.to_vec();
    // Protocol messages are plain structs: they always serialise.
    m.extend(serde_json::to_vec(cs).expect("changeset serialises"));
    m
}

/// A changeset with its origin's proof that it made it: an Ed25519 signature by the key of
/// the origin agent's farm certificate, and that certificate. The form agents send it in (to
/// the hub, to their peers) and a provenance lists it in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedChangeset {
    /// The changeset, as the hub applied it.
    pub changeset: Changeset,
    /// The origin agent's signature of [`changeset_message`] (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// The origin agent's farm-CA certificate (DER, base64): it names the origin and holds
    /// the key the signature verifies with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
}

/// The wire forms a changeset arrives in: signed, or bare (an agent without a farm
/// certificate, or of an older version).
#[derive(Deserialize)]
#[serde(untagged)]
enum Wire {
    Signed(SignedChangeset),
    Bare(Changeset),
}

impl SignedChangeset {
    /// A changeset without a signature.
    pub fn unsigned(changeset: Changeset) -> SignedChangeset {
        SignedChangeset {
            changeset,
            signature: None,
            certificate: None,
        }
    }

    /// Reads a changeset as agents send it: signed, or a bare changeset.
    pub fn from_json(bytes: &[u8]) -> Result<SignedChangeset, serde_json::Error> {
        match serde_json::from_slice::<Wire>(bytes) {
            Ok(Wire::Signed(s)) => Ok(s),
            Ok(Wire::Bare(cs)) => Ok(SignedChangeset::unsigned(cs)),
            // The untagged error says nothing: report the bare form's, the common one.
            Err(_) => serde_json::from_slice::<Changeset>(bytes).map(SignedChangeset::unsigned),
        }
    }

    /// What it sets `path` to: `None` if it does not touch it, `Some(None)` for a removal.
    fn sets(&self, path: &str) -> Option<Option<&Entry>> {
        self.changeset.changes.get(path).map(|c| c.entry.as_ref())
    }
}

/// Signs this agent's changesets with the key of its farm certificate.
pub struct ChangesetSigner {
    key: SecretKey,
    certificate: String,
}

impl std::fmt::Debug for ChangesetSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChangesetSigner")
    }
}

impl ChangesetSigner {
    /// With `key` (the certificate's Ed25519 key) and `certificate` (DER).
    pub fn new(key: SecretKey, certificate: &[u8]) -> ChangesetSigner {
        ChangesetSigner {
            key,
            certificate: B64.encode(certificate),
        }
    }

    /// `cs`, signed.
    pub fn sign(&self, cs: Changeset) -> SignedChangeset {
        let sig = self.key.sign_bytes(&changeset_message(&cs));
        SignedChangeset {
            changeset: cs,
            signature: Some(B64.encode(sig.0)),
            certificate: Some(self.certificate.clone()),
        }
    }
}

/// Accepts changesets signed by their origin: the certificate chains to the farm CA, is not
/// revoked, is valid now, names the agent the changeset claims as its origin, and its key
/// verifies the signature. What the hub serves as a provenance then holds only edits agents
/// made: a compromised hub cannot forge one, nor pass one agent's edit off as another's.
pub struct FarmSigned {
    roots: Vec<rustls_pki_types::TrustAnchor<'static>>,
    crls: Revocations,
    now: Arc<dyn Fn() -> UnixTime + Send + Sync>,
}

impl std::fmt::Debug for FarmSigned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FarmSigned({} roots)", self.roots.len())
    }
}

impl FarmSigned {
    /// Trusting the farm CA `roots` and its revocation lists `crls`, at the time `now` gives.
    pub fn new(
        roots: &rustls::RootCertStore,
        crls: &[rustls_pki_types::CertificateRevocationListDer<'_>],
        now: Arc<dyn Fn() -> UnixTime + Send + Sync>,
    ) -> FarmSigned {
        FarmSigned {
            roots: roots.roots.clone(),
            crls: Revocations::new(crls),
            now,
        }
    }

    fn check(&self, cs: &SignedChangeset) -> Result<(), String> {
        let (Some(sig), Some(cert)) = (&cs.signature, &cs.certificate) else {
            return Err("it is not signed by its origin (no signature and certificate)".into());
        };
        let sig = B64
            .decode(sig)
            .map_err(|e| format!("its signature is not base64: {e}"))?;
        let der = B64
            .decode(cert)
            .map_err(|e| format!("its certificate is not base64: {e}"))?;
        let der = CertificateDer::from(der);
        let ee = webpki::EndEntityCert::try_from(&der)
            .map_err(|e| format!("its certificate does not parse: {e:?}"))?;
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        let crls = self.crls.lists();
        let revocation = match crls.is_empty() {
            true => None,
            false => webpki::RevocationOptionsBuilder::new(&crls)
                .ok()
                .map(|b| b.build()),
        };
        ee.verify_for_usage(
            algs.all,
            &self.roots,
            &[],
            (self.now)(),
            webpki::KeyUsage::client_auth(),
            revocation,
            None,
        )
        .map_err(|e| {
            format!("its certificate is not one of the farm CA's, or is revoked or expired: {e:?}")
        })?;
        let who = Identity::of_cert(&der).map_err(|e| e.to_string())?;
        if who.kind != Kind::Agent || who.name != cs.changeset.origin {
            return Err(format!(
                "it claims origin `{}` but is signed by {who}",
                cs.changeset.origin
            ));
        }
        let ed25519 = algs
            .mapping
            .iter()
            .find(|(scheme, _)| *scheme == rustls::SignatureScheme::ED25519)
            .and_then(|(_, a)| a.first().copied())
            .ok_or("no Ed25519 verifier")?;
        ee.verify_signature(ed25519, &changeset_message(&cs.changeset), &sig)
            .map_err(|_| {
                "its signature does not verify: it was altered, or not made by its origin"
                    .to_string()
            })
    }
}

impl ChangesetAuthority for FarmSigned {
    fn verify(&self, cs: &SignedChangeset) -> Result<(), Unauthorised> {
        self.check(cs).map_err(|reason| Unauthorised {
            changeset: cs.changeset.name(),
            reason,
        })
    }
}

/// `GET /sync/v1/releases/{id}/provenance`: how the hub made release `id` from changesets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// The release the changesets were applied to; `None`: the empty release.
    pub base: Option<ReleaseId>,
    /// The changesets, in the order the hub applied them.
    pub changesets: Vec<SignedChangeset>,
}

/// A changeset the authority does not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("changeset {changeset} is not accepted: {reason}")]
pub struct Unauthorised {
    /// `origin/seq`.
    pub changeset: String,
    /// Why.
    pub reason: String,
}

/// Decides whether a changeset really comes from an agent allowed to change the content:
/// [`FarmSigned`] (the origin's signature and farm certificate) in a farm with a CA;
/// [`TrustedOrigins`] (the origin's name, as claimed) for agents without one.
pub trait ChangesetAuthority: Send + Sync {
    /// Accepts `cs`, or says why not.
    fn verify(&self, cs: &SignedChangeset) -> Result<(), Unauthorised>;
}

/// Accepts changesets whose origin is one of a configured set of agent names (the agents'
/// `trusted_origins`). The origin is the changeset's own claim: this keeps out edits claimed
/// by any other name, not a hub or an agent-token holder that claims a listed one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedOrigins {
    origins: BTreeSet<String>,
}

impl TrustedOrigins {
    /// Trusting changesets from `origins`.
    pub fn new(origins: impl IntoIterator<Item = String>) -> TrustedOrigins {
        TrustedOrigins {
            origins: origins.into_iter().collect(),
        }
    }
}

impl ChangesetAuthority for TrustedOrigins {
    fn verify(&self, cs: &SignedChangeset) -> Result<(), Unauthorised> {
        let origin = &cs.changeset.origin;
        if self.origins.contains(origin) {
            return Ok(());
        }
        let trusted = if self.origins.is_empty() {
            "none".to_string()
        } else {
            self.origins.iter().cloned().collect::<Vec<_>>().join(", ")
        };
        Err(Unauthorised {
            changeset: cs.changeset.name(),
            reason: format!("its origin `{origin}` is not in trusted_origins (trusted: {trusted})"),
        })
    }
}

/// Why a release built from changesets is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProvenanceError {
    /// A path differs from the base in a way no listed changeset explains.
    #[error("release {release}: `{path}` differs from its base {base} but no listed changeset sets it to that")]
    Unexplained {
        /// The release (short id).
        release: String,
        /// Its base (short id, or `empty`).
        base: String,
        /// The path.
        path: String,
    },
    /// A listed changeset is not accepted.
    #[error("release {release}: {source}")]
    Unauthorised {
        /// The release (short id).
        release: String,
        /// Why.
        source: Unauthorised,
    },
    /// The provenance names the release itself as its base.
    #[error("release {0}: its provenance names itself as its base")]
    Cycle(String),
    /// More steps than [`MAX_DEPTH`] to a signed release.
    #[error("release {0}: more than {MAX_DEPTH} provenance steps down to a signed release")]
    TooDeep(String),
}

fn short(id: Option<ReleaseId>) -> String {
    id.map_or_else(|| "empty".to_string(), |id| id.short())
}

impl Provenance {
    /// Checks one step: every listed changeset is accepted by `authority`, and `release`
    /// differs from `base` (the manifest of [`Provenance::base`]) only where a listed
    /// changeset sets a path to exactly what `release` holds. Whether the base is acceptable
    /// is the caller's next step.
    pub fn check(
        &self,
        authority: &dyn ChangesetAuthority,
        base: &Manifest,
        release: &Manifest,
    ) -> Result<(), ProvenanceError> {
        let id = release.id();
        if self.base == Some(id) {
            return Err(ProvenanceError::Cycle(id.short()));
        }
        for cs in &self.changesets {
            authority
                .verify(cs)
                .map_err(|source| ProvenanceError::Unauthorised {
                    release: id.short(),
                    source,
                })?;
        }
        let mut sets: HashMap<&str, Vec<Option<&Entry>>> = HashMap::new();
        for cs in &self.changesets {
            for (path, change) in &cs.changeset.changes {
                sets.entry(path).or_default().push(change.entry.as_ref());
            }
        }
        for (path, now) in differences(base, release) {
            let explained = sets.get(path).is_some_and(|v| v.contains(&now));
            if !explained {
                return Err(ProvenanceError::Unexplained {
                    release: id.short(),
                    base: short(self.base),
                    path: path.to_string(),
                });
            }
        }
        Ok(())
    }
}

/// The paths whose entry differs between `base` and `release`, with `release`'s entry
/// (`None`: removed).
fn differences<'a>(
    base: &'a Manifest,
    release: &'a Manifest,
) -> impl Iterator<Item = (&'a str, Option<&'a Entry>)> {
    let changed = release
        .files()
        .iter()
        .filter(|(p, e)| base.get(p) != Some(*e))
        .map(|(p, e)| (p.as_str(), Some(e)));
    let removed = base
        .files()
        .keys()
        .filter(|p| release.get(p).is_none())
        .map(|p| (p.as_str(), None));
    changed.chain(removed)
}

/// The provenance of `release`, made by applying `cs` to the release `base`. When `base` was
/// itself built from changesets (`base_provenance`), the new one is flattened onto the base's
/// base: the changesets of both, applied to the same root. `root` is the manifest of the
/// resulting [`Provenance::base`]; changesets that explain no difference between it and
/// `release` any more (every path they set was set again later) are dropped.
pub fn extend(
    base: Option<ReleaseId>,
    base_provenance: Option<Provenance>,
    cs: SignedChangeset,
    root: &Manifest,
    release: &Manifest,
) -> Provenance {
    let (base, mut changesets) = match base_provenance {
        Some(p) => (p.base, p.changesets),
        None => (base, Vec::new()),
    };
    changesets.push(cs);
    changesets.retain(|cs| {
        cs.changeset.changes.keys().any(|p| {
            let now = release.get(p);
            root.get(p) != now && cs.sets(p) == Some(now)
        })
    });
    Provenance { base, changesets }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::sync::changeset::{self, Change, Mode};
    use crate::sync::manifest::Hash;

    fn e(data: &str) -> Entry {
        Entry {
            hash: Hash::of(data.as_bytes()),
            size: data.len() as u64,
            content_type: "text/plain".into(),
        }
    }

    fn m(files: &[(&str, &str)]) -> Manifest {
        Manifest::new(files.iter().map(|(p, d)| (p.to_string(), e(d))).collect()).unwrap()
    }

    fn cs(origin: &str, seq: u64, changes: &[(&str, Option<&str>)]) -> SignedChangeset {
        SignedChangeset::unsigned(Changeset {
            origin: origin.into(),
            seq,
            mode: Mode::Scheduled,
            base: None,
            detected_us: seq,
            changes: changes
                .iter()
                .map(|(p, d)| {
                    let change = Change {
                        entry: d.map(e),
                        prev: None,
                    };
                    (p.to_string(), change)
                })
                .collect::<BTreeMap<_, _>>(),
        })
    }

    fn applied(base: &Manifest, css: &[&SignedChangeset]) -> Manifest {
        let mut out = base.clone();
        for c in css {
            let changes: BTreeMap<String, Option<Entry>> = c
                .changeset
                .changes
                .iter()
                .map(|(p, ch)| (p.clone(), ch.entry.clone()))
                .collect();
            out = changeset::apply(&out, &changes).unwrap();
        }
        out
    }

    fn web() -> TrustedOrigins {
        TrustedOrigins::new(["web-1".to_string(), "web-2".to_string()])
    }

    #[test]
    fn a_release_made_of_its_base_and_the_listed_changesets_is_accepted() {
        let base = m(&[("a", "1"), ("b", "2"), ("gone", "3")]);
        let c1 = cs("web-1", 1, &[("a", Some("1x")), ("gone", None)]);
        let c2 = cs("web-2", 4, &[("new", Some("4"))]);
        let release = applied(&base, &[&c1, &c2]);
        let p = Provenance {
            base: Some(base.id()),
            changesets: vec![c1, c2],
        };
        p.check(&web(), &base, &release).unwrap();
        // A changeset that lost a conflict on a path (the hub kept the other write) still
        // explains the rest: the release keeping the base's entry is no difference at all.
        let partly = cs("web-1", 5, &[("a", Some("lost")), ("c", Some("5"))]);
        let kept = applied(&base, &[&cs("web-1", 5, &[("c", Some("5"))])]);
        let p = Provenance {
            base: Some(base.id()),
            changesets: vec![partly],
        };
        p.check(&web(), &base, &kept).unwrap();
    }

    #[test]
    fn content_no_changeset_explains_is_refused_naming_the_path() {
        let base = m(&[("a", "1"), ("b", "2")]);
        let c1 = cs("web-1", 1, &[("a", Some("1x"))]);
        let honest = applied(&base, &[&c1]);
        let p = Provenance {
            base: Some(base.id()),
            changesets: vec![c1.clone()],
        };
        // The hub slipped in a file of its own, changed another, removed a third.
        for evil in [
            applied(&honest, &[&cs("hub", 1, &[("evil.js", Some("x"))])]),
            applied(&honest, &[&cs("hub", 1, &[("b", Some("x"))])]),
            applied(&honest, &[&cs("hub", 1, &[("b", None)])]),
            applied(&base, &[&cs("hub", 1, &[("a", Some("other"))])]),
        ] {
            let err = p.check(&web(), &base, &evil).unwrap_err();
            assert!(matches!(err, ProvenanceError::Unexplained { .. }), "{err}");
        }
        // A base other than the one the changesets went into: its differences are unexplained.
        let other = m(&[("a", "1"), ("b", "X")]);
        assert!(p.check(&web(), &other, &honest).is_err());
        // Itself as its base.
        let selfish = Provenance {
            base: Some(honest.id()),
            changesets: vec![c1],
        };
        assert!(matches!(
            selfish.check(&web(), &honest, &honest),
            Err(ProvenanceError::Cycle(_))
        ));
    }

    #[test]
    fn a_changeset_the_authority_refuses_refuses_the_release() {
        let base = m(&[("a", "1")]);
        let c = cs("web-9", 1, &[("a", Some("2"))]);
        let release = applied(&base, &[&c]);
        let p = Provenance {
            base: Some(base.id()),
            changesets: vec![c],
        };
        let e = p.check(&web(), &base, &release).unwrap_err().to_string();
        assert!(
            e.contains("web-9/1") && e.contains("trusted_origins") && e.contains("web-1, web-2"),
            "{e}"
        );
        let none = TrustedOrigins::default();
        assert!(p.check(&none, &base, &release).is_err());
    }

    #[test]
    fn extending_flattens_onto_the_root_and_drops_changesets_overwritten_later() {
        let root = m(&[("a", "1"), ("b", "1")]);
        let c1 = cs("web-1", 1, &[("a", Some("2"))]);
        let r1 = applied(&root, &[&c1]);
        let p1 = extend(Some(root.id()), None, c1.clone(), &root, &r1);
        assert_eq!(p1.base, Some(root.id()));
        let c2 = cs("web-2", 2, &[("b", Some("2"))]);
        let r2 = applied(&r1, &[&c2]);
        let p2 = extend(Some(r1.id()), Some(p1), c2.clone(), &root, &r2);
        assert_eq!(p2.base, Some(root.id()), "one step down to the root");
        assert_eq!(p2.changesets, vec![c1, c2.clone()]);
        p2.check(&web(), &root, &r2).unwrap();
        // `a` written again: the first changeset explains nothing any more.
        let c3 = cs("web-1", 3, &[("a", Some("3"))]);
        let r3 = applied(&r2, &[&c3]);
        let p3 = extend(Some(r2.id()), Some(p2), c3.clone(), &root, &r3);
        assert_eq!(p3.changesets, vec![c2, c3]);
        p3.check(&web(), &root, &r3).unwrap();
        // Written back to the root's content: nothing left to explain.
        let c4 = cs("web-1", 4, &[("a", Some("1")), ("b", Some("1"))]);
        let r4 = applied(&r3, &[&c4]);
        assert_eq!(r4.id(), root.id());
        let p4 = extend(Some(r3.id()), Some(p3), c4, &root, &r4);
        assert!(p4.changesets.is_empty());
    }

    #[test]
    fn provenance_keeps_its_json() {
        let p = Provenance {
            base: None,
            changesets: vec![cs("web-1", 1, &[("a", None)])],
        };
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["base"], serde_json::Value::Null);
        assert_eq!(json["changesets"][0]["changeset"]["origin"], "web-1");
        assert!(json["changesets"][0].get("signature").is_none());
        assert_eq!(serde_json::from_value::<Provenance>(json).unwrap(), p);
    }
}
