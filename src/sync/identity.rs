//! Who a party of the farm is: the identity a farm-CA certificate carries (see `lockstep ca`).
//!
//! Every certificate the farm CA issues names exactly one party in a URI subject alternative
//! name, `urn:lockstep:<kind>:<name>` (`urn:lockstep:agent:web-1`, `urn:lockstep:publisher:ci`,
//! `urn:lockstep:hub:lb-1`). Once rustls has verified a peer's chain against the farm CA and
//! its revocation list, that URI is who the peer is: the hub lets an agent report, send
//! changesets and register a `serve` address only under its own name, and an agent takes a
//! peer's changeset only from the agent that made it. Pure: parsing only, no I/O.

use std::fmt;

use rustls_pki_types::CertificateDer;

use super::auth::Role;

/// The URI prefix of a lockstep identity.
pub const URI_PREFIX: &str = "urn:lockstep:";
/// Longest party name.
pub const MAX_NAME_BYTES: usize = 64;

/// What a party is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A backend's sync agent.
    Agent,
    /// Someone who publishes releases (`lockstep publish`).
    Publisher,
    /// An appliance's hub.
    Hub,
}

impl Kind {
    /// The word used in URIs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Agent => "agent",
            Kind::Publisher => "publisher",
            Kind::Hub => "hub",
        }
    }

    /// The kind a word names.
    pub fn parse(word: &str) -> Option<Kind> {
        match word {
            "agent" => Some(Kind::Agent),
            "publisher" => Some(Kind::Publisher),
            "hub" => Some(Kind::Hub),
            _ => None,
        }
    }

    /// The sync API role this kind acts in (a hub calls no hub API).
    pub fn role(self) -> Option<Role> {
        match self {
            Kind::Agent => Some(Role::Agent),
            Kind::Publisher => Some(Role::Publish),
            Kind::Hub => Some(Role::Hub),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A party: what it is and its name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// Agent, publisher or hub.
    pub kind: Kind,
    /// Its name (for an agent, the backend's name in the pools).
    pub name: String,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.name)
    }
}

/// Why a certificate names no lockstep party.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Not a parsable X.509 certificate.
    #[error("not a certificate lockstep can parse: {0}")]
    Parse(String),
    /// No `urn:lockstep:` URI.
    #[error("the certificate names no lockstep party (no urn:lockstep:<kind>:<name> URI): issue it with `lockstep ca issue`")]
    Missing,
    /// More than one.
    #[error("the certificate names more than one lockstep party")]
    Several,
    /// A `urn:lockstep:` URI that does not parse.
    #[error("`{0}` is not urn:lockstep:<agent|publisher|hub>:<name>")]
    Malformed(String),
}

/// Whether `name` may name a party: 1–64 of `A–Z a–z 0–9 . _ -`, not `.` or `..`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Identity {
    /// An identity, if `name` is a valid party name.
    pub fn new(kind: Kind, name: &str) -> Option<Identity> {
        valid_name(name).then(|| Identity {
            kind,
            name: name.to_string(),
        })
    }

    /// The URI a certificate carries for this party.
    pub fn uri(&self) -> String {
        format!("{URI_PREFIX}{}:{}", self.kind, self.name)
    }

    /// The party a `urn:lockstep:` URI names; `None` for URIs of other schemes.
    pub fn from_uri(uri: &str) -> Option<Result<Identity, IdentityError>> {
        let rest = uri.strip_prefix(URI_PREFIX)?;
        let bad = || IdentityError::Malformed(uri.to_string());
        Some(
            rest.split_once(':')
                .and_then(|(kind, name)| Identity::new(Kind::parse(kind)?, name))
                .ok_or_else(bad),
        )
    }

    /// The party a (verified) certificate names: its one `urn:lockstep:` URI.
    pub fn of_cert(cert: &CertificateDer<'_>) -> Result<Identity, IdentityError> {
        let ee = webpki::EndEntityCert::try_from(cert)
            .map_err(|e| IdentityError::Parse(format!("{e:?}")))?;
        let mut found = None;
        for uri in ee.valid_uri_names() {
            if let Some(id) = Identity::from_uri(uri) {
                if found.is_some() {
                    return Err(IdentityError::Several);
                }
                found = Some(id?);
            }
        }
        found.ok_or(IdentityError::Missing)
    }
}

/// The farm CA's revocation lists, consulted on every request as well as at the handshake:
/// a connection made before a revocation is refused from the next request on.
#[derive(Default)]
pub struct Revocations(Vec<webpki::CertRevocationList<'static>>);

impl fmt::Debug for Revocations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Revocations({} lists)", self.0.len())
    }
}

impl Revocations {
    /// From DER revocation lists (ones that do not parse were refused when the config was
    /// checked, and are skipped here).
    pub fn new(crls: &[rustls_pki_types::CertificateRevocationListDer<'_>]) -> Revocations {
        Revocations(
            crls.iter()
                .filter_map(|c| webpki::OwnedCertRevocationList::from_der(c).ok())
                .map(webpki::CertRevocationList::from)
                .collect(),
        )
    }

    /// The parsed lists (for a chain check that takes them, as webpki's does).
    pub fn lists(&self) -> Vec<&webpki::CertRevocationList<'static>> {
        self.0.iter().collect()
    }

    /// Whether `cert`'s serial number is on a list.
    pub fn revoked(&self, cert: &CertificateDer<'_>) -> bool {
        if self.0.is_empty() {
            return false;
        }
        let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
            return false;
        };
        self.0
            .iter()
            .any(|l| matches!(l.find_serial(ee.serial()), Ok(Some(_))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip() {
        for kind in [Kind::Agent, Kind::Publisher, Kind::Hub] {
            let id = Identity::new(kind, "web-1.a_b").unwrap();
            assert_eq!(Identity::from_uri(&id.uri()), Some(Ok(id)));
        }
    }

    #[test]
    fn other_uris_are_not_ours_and_bad_ones_are_errors() {
        assert_eq!(Identity::from_uri("https://example.com/"), None);
        for bad in [
            "urn:lockstep:agent",
            "urn:lockstep:root:web-1",
            "urn:lockstep:agent:",
            "urn:lockstep:agent:..",
            "urn:lockstep:agent:web/1",
            "urn:lockstep:agent:a:b",
        ] {
            assert!(
                matches!(Identity::from_uri(bad), Some(Err(_))),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn names() {
        for good in ["web-1", "a", "A.b_c-9", &"x".repeat(64)] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", ".", "..", "a b", "a/b", "é", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn kinds_map_to_roles() {
        assert_eq!(Kind::Agent.role(), Some(Role::Agent));
        assert_eq!(Kind::Publisher.role(), Some(Role::Publish));
        assert_eq!(Kind::Hub.role(), Some(Role::Hub));
        assert_eq!(Kind::parse("agent"), Some(Kind::Agent));
        assert_eq!(Kind::parse("root"), None);
    }
}
