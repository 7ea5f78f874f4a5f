//! The farm CA that lockstep manages (`lockstep ca init | issue | revoke | list`): the one
//! authority whose certificates say who each party of the farm is.
//!
//! A CA directory holds `ca.crt` (the farm CA: give it to every party as its `ca`), `ca.key`
//! (0600; never leaves the appliance), `ca.json` (what was issued, to whom, and what is
//! revoked) and `crl.pem` (the revocation list the hub and agents load). Every certificate
//! carries its party as a `urn:lockstep:<kind>:<name>` URI ([`crate::sync::identity`]), is
//! valid for client and server authentication (agents and hubs serve too), and may carry DNS
//! names and IP addresses for the listeners it serves. Keys are Ed25519; an agent's key also
//! signs its changesets.
//!
//! I/O shell: reads the clock for validity dates and the OS random source for serial numbers.
#![allow(clippy::disallowed_methods)] // I/O shell: certificate dates and random serials.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber, PKCS_ED25519,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::sync::identity::{Identity, Kind};

/// Default lifetime of an issued certificate.
pub const DEFAULT_DAYS: u32 = 397;
/// Lifetime of the CA itself.
const CA_DAYS: i64 = 3650;
/// How long a revocation list is current (lockstep reloads it; nothing enforces this date).
const CRL_DAYS: i64 = 365;

/// Why a CA operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `ca init` on a directory that already holds a CA.
    #[error("{0} already holds a farm CA (ca.key): refusing to overwrite it")]
    Exists(PathBuf),
    /// No CA there.
    #[error("{0} holds no farm CA: create one with `lockstep ca init --dir {0}`")]
    Missing(PathBuf),
    /// A file of the CA is damaged.
    #[error("{path}: {message}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Certificate generation failed.
    #[error("cannot make the certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// A bad argument.
    #[error("{0}")]
    Bad(String),
}

/// One certificate the CA issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    /// The party's name.
    pub name: String,
    /// What it is.
    pub kind: String,
    /// Serial number, hex.
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
    /// Unix seconds of the revocation, if revoked.
    #[serde(default)]
    pub revoked: Option<i64>,
}

/// A one-time join token, as kept: only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Join {
    /// blake3 of the token, hex.
    hash: String,
    /// The agent it makes.
    name: String,
    /// Addresses and names its certificate serves under.
    ips: Vec<IpAddr>,
    dns: Vec<String>,
    /// Unix seconds after which it is void.
    expires: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    farm: String,
    crl_number: u64,
    issued: Vec<Issued>,
    #[serde(default)]
    joins: Vec<Join>,
}

/// An Ed25519 public key (32 bytes) a joining agent sends: the certificate is made for it,
/// and its private key never leaves the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ed25519Public(pub [u8; 32]);

impl rcgen::PublicKeyData for Ed25519Public {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &PKCS_ED25519
    }
}

/// What redeeming a join token gives the new agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joined {
    /// The agent's name (from the token).
    pub name: String,
    /// Its certificate, PEM.
    pub cert: String,
    /// The farm CA, PEM.
    pub ca: String,
    /// The revocation list, PEM.
    pub crl: String,
}

/// The fingerprint of a CA certificate (blake3 of its DER, hex) that `lockstep agent join`
/// pins before it sends its token.
pub fn fingerprint(ca_pem: &str) -> Option<String> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).ok()?;
    Some(blake3::hash(&der).to_hex().to_string())
}

/// A farm CA, opened from its directory.
pub struct Ca {
    dir: PathBuf,
    key: KeyPair,
    /// The CA certificate's parameters: its name and key identifier method, what signing needs.
    params: CertificateParams,
    state: State,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ca({})", self.dir.display())
    }
}

/// A certificate and its key, PEM.
#[derive(Debug)]
pub struct IssuedPem {
    /// The record kept in `ca.json`.
    pub issued: Issued,
    /// The certificate.
    pub cert: String,
    /// Its private key (PKCS#8).
    pub key: String,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn days(n: i64) -> time::Duration {
    time::Duration::days(n)
}

/// Makes `dir` (and its parents) if missing, the last 0700: a directory of secrets.
pub fn private_dir(dir: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

/// Writes `bytes` to `path` through a temporary file (`path` + `.tmp.PID`, removed if
/// anything fails) and a rename, with `mode`.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    // A leftover of a write that died with the process of the same pid.
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
        .map_err(io(&tmp))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(io(path)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Writes a new file, refusing to replace one.
pub fn create_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    if path.exists() {
        return Err(CaError::Bad(format!(
            "{} exists: refusing to overwrite it (remove it first)",
            path.display()
        )));
    }
    write_file(path, bytes, mode)
}

fn ca_params(farm: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("lockstep farm CA {farm}"));
    dn.push(DnType::OrganizationName, "lockstep");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.key_identifier_method = KeyIdMethod::Sha256;
    p
}

fn random_serial() -> Vec<u8> {
    use rand::Rng;
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // no leading zero byte
    b.to_vec()
}

/// An Ed25519 key as PKCS#8 v1 PEM, the form OpenSSL (and so curl) reads too.
pub fn key_pem(key: &KeyPair) -> Result<String, CaError> {
    crate::sync::sign::ed25519_pem(key.serialized_der())
        .ok_or_else(|| CaError::Bad("an Ed25519 key in an unexpected PKCS#8 form".into()))
}

/// `bytes` as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of hex `s` (either case); `None` if it is not hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    // Hex digits only (no sign, no multi-byte characters to split).
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Ca {
    /// The CA certificate's path in `dir`.
    pub fn cert_path(dir: &Path) -> PathBuf {
        dir.join("ca.crt")
    }

    /// The revocation list's path in `dir`.
    pub fn crl_path(dir: &Path) -> PathBuf {
        dir.join("crl.pem")
    }

    /// Creates a CA for the farm `farm` in `dir` (created 0700 if missing).
    pub fn init(dir: &Path, farm: &str) -> Result<Ca, CaError> {
        if dir.join("ca.key").exists() {
            return Err(CaError::Exists(dir.to_path_buf()));
        }
        private_dir(dir)?;
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        let mut params = ca_params(farm);
        params.not_before = now() - days(1);
        params.not_after = now() + days(CA_DAYS);
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        let cert = params.self_signed(&key)?;
        write_file(&dir.join("ca.key"), key_pem(&key)?.as_bytes(), 0o600)?;
        write_file(&Ca::cert_path(dir), cert.pem().as_bytes(), 0o644)?;
        let ca = Ca {
            dir: dir.to_path_buf(),
            key,
            params,
            state: State {
                farm: farm.to_string(),
                ..State::default()
            },
        };
        ca.save()?;
        Ok(ca)
    }

    /// Opens the CA in `dir`.
    pub fn open(dir: &Path) -> Result<Ca, CaError> {
        let key_path = dir.join("ca.key");
        if !key_path.exists() {
            return Err(CaError::Missing(dir.to_path_buf()));
        }
        let pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let key = KeyPair::from_pem(&pem).map_err(|e| CaError::Damaged {
            path: key_path.clone(),
            message: e.to_string(),
        })?;
        let state_path = dir.join("ca.json");
        let text = std::fs::read(&state_path).map_err(io(&state_path))?;
        let state: State = serde_json::from_slice(&text).map_err(|e| CaError::Damaged {
            path: state_path,
            message: e.to_string(),
        })?;
        // Signing needs the issuer's name and key only: the same parameters give the name and
        // key identifier of the `ca.crt` handed out.
        let params = ca_params(&state.farm);
        Ok(Ca {
            dir: dir.to_path_buf(),
            key,
            params,
            state,
        })
    }

    fn save(&self) -> Result<(), CaError> {
        let json = serde_json::to_vec_pretty(&self.state).expect("CA state serialises");
        write_file(&self.dir.join("ca.json"), &json, 0o600)?;
        self.write_crl()
    }

    /// Issues a certificate for `who`, valid for `days`, naming `dns` and `ips` for the
    /// listeners it serves.
    pub fn issue(
        &mut self,
        who: &Identity,
        dns: &[String],
        ips: &[IpAddr],
        valid_days: u32,
    ) -> Result<IssuedPem, CaError> {
        let p = self.leaf_params(who, dns, ips, valid_days)?;
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        let (issued, cert) = self.sign(p, who, &key)?;
        Ok(IssuedPem {
            issued,
            cert,
            key: key_pem(&key)?,
        })
    }

    /// [`Ca::issue`], written into `out` (made if missing) as `NAME.crt` and `NAME.key`
    /// (0600), refusing to replace either: the record and the two paths.
    pub fn issue_into(
        &mut self,
        who: &Identity,
        dns: &[String],
        ips: &[IpAddr],
        valid_days: u32,
        out: &Path,
    ) -> Result<(Issued, PathBuf, PathBuf), CaError> {
        let crt = out.join(format!("{}.crt", who.name));
        let key = out.join(format!("{}.key", who.name));
        for f in [&crt, &key] {
            if f.exists() {
                return Err(CaError::Bad(format!(
                    "{} exists: refusing to overwrite it (remove it first)",
                    f.display()
                )));
            }
        }
        // Before the issue is recorded: a certificate is only recorded once it can be written.
        std::fs::create_dir_all(out).map_err(|source| CaError::Io {
            path: out.to_path_buf(),
            source,
        })?;
        let issued = self.issue(who, dns, ips, valid_days)?;
        create_file(&key, issued.key.as_bytes(), 0o600)?;
        create_file(&crt, issued.cert.as_bytes(), 0o644)?;
        Ok((issued.issued, crt, key))
    }

    fn leaf_params(
        &self,
        who: &Identity,
        dns: &[String],
        ips: &[IpAddr],
        valid_days: u32,
    ) -> Result<CertificateParams, CaError> {
        if valid_days == 0 {
            return Err(CaError::Bad("--days must be at least 1".into()));
        }
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, who.name.clone());
        dn.push(DnType::OrganizationalUnitName, who.kind.as_str());
        p.distinguished_name = dn;
        let uri = who
            .uri()
            .try_into()
            .map_err(|_| CaError::Bad(format!("bad name {}", who.name)))?;
        p.subject_alt_names.push(SanType::URI(uri));
        for d in dns {
            let name = d
                .clone()
                .try_into()
                .map_err(|_| CaError::Bad(format!("`{d}` is not a DNS name")))?;
            p.subject_alt_names.push(SanType::DnsName(name));
        }
        for ip in ips {
            p.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        // A day back: agents whose clocks run behind (the flip corrects for it, TLS does not)
        // must accept a certificate issued just now.
        p.not_before = now() - days(1);
        p.not_after = now() + days(valid_days as i64);
        Ok(p)
    }

    fn sign(
        &mut self,
        mut p: CertificateParams,
        who: &Identity,
        key: &impl rcgen::PublicKeyData,
    ) -> Result<(Issued, String), CaError> {
        let serial = random_serial();
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        let not_after = p.not_after.unix_timestamp();
        let cert = p.signed_by(key, &Issuer::from_params(&self.params, &self.key))?;
        let issued = Issued {
            name: who.name.clone(),
            kind: who.kind.as_str().to_string(),
            serial: hex(&serial),
            not_after,
            revoked: None,
        };
        self.state.issued.push(issued.clone());
        self.save()?;
        Ok((issued, cert.pem()))
    }

    /// Makes a one-time token that lets the agent `name` obtain its certificate from the hub
    /// (`lockstep agent join`) within `ttl_secs`. Only the token's hash is kept.
    pub fn join_token(
        &mut self,
        name: &str,
        ips: &[IpAddr],
        dns: &[String],
        ttl_secs: i64,
    ) -> Result<String, CaError> {
        if Identity::new(Kind::Agent, name).is_none() {
            return Err(CaError::Bad(format!("`{name}` cannot name an agent")));
        }
        let mut raw = [0u8; 32];
        {
            use rand::Rng;
            rand::rng().fill_bytes(&mut raw);
        }
        let token = hex(&raw);
        let at = now().unix_timestamp();
        self.state
            .joins
            .retain(|j| j.expires > at && j.name != name);
        self.state.joins.push(Join {
            hash: blake3::hash(token.as_bytes()).to_hex().to_string(),
            name: name.to_string(),
            ips: ips.to_vec(),
            dns: dns.to_vec(),
            expires: at + ttl_secs.max(1),
        });
        self.save()?;
        Ok(token)
    }

    /// Redeems a join token once: a certificate for the agent it names, made for `key`.
    /// An unknown, used or expired token is refused with the same words.
    pub fn redeem(&mut self, token: &str, key: &Ed25519Public) -> Result<Joined, CaError> {
        let at = now().unix_timestamp();
        let hash = blake3::hash(token.trim().as_bytes());
        let found = self.state.joins.iter().position(|j| {
            // Compared as blake3 hashes: constant time.
            unhex(&j.hash)
                .and_then(|h| <[u8; 32]>::try_from(h).ok())
                .is_some_and(|h| blake3::Hash::from(h) == hash)
        });
        let join = match found {
            Some(i) if self.state.joins[i].expires > at => self.state.joins.remove(i),
            _ => return Err(CaError::Bad(
                "unknown, used or expired join token: make a new one with `lockstep ca join-token`"
                    .into(),
            )),
        };
        let who = Identity::new(Kind::Agent, &join.name)
            .ok_or_else(|| CaError::Bad(format!("`{}` cannot name an agent", join.name)))?;
        let p = self.leaf_params(&who, &join.dns, &join.ips, DEFAULT_DAYS)?;
        let (_, cert) = self.sign(p, &who, key)?;
        let ca = self.cert_pem()?;
        let crl_path = Ca::crl_path(&self.dir);
        let crl = std::fs::read_to_string(&crl_path).map_err(io(&crl_path))?;
        Ok(Joined {
            name: who.name,
            cert,
            ca,
            crl,
        })
    }

    /// Revokes every certificate issued to `name` (of `kind`, if given) that is not revoked
    /// yet, and rewrites the revocation list. Returns how many were revoked.
    pub fn revoke(&mut self, name: &str, kind: Option<Kind>) -> Result<usize, CaError> {
        let at = now().unix_timestamp();
        let mut n = 0;
        for i in &mut self.state.issued {
            let kind_matches = kind.is_none_or(|k| k.as_str() == i.kind);
            if i.name == name && kind_matches && i.revoked.is_none() {
                i.revoked = Some(at);
                n += 1;
            }
        }
        if n == 0 {
            return Err(CaError::Bad(format!(
                "no certificate of `{name}` to revoke (see `lockstep ca list`)"
            )));
        }
        self.state.crl_number += 1;
        self.save()?;
        Ok(n)
    }

    /// What was issued.
    pub fn issued(&self) -> &[Issued] {
        &self.state.issued
    }

    /// The farm's name.
    pub fn farm(&self) -> &str {
        &self.state.farm
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> Result<String, CaError> {
        let path = Ca::cert_path(&self.dir);
        std::fs::read_to_string(&path).map_err(io(&path))
    }

    fn write_crl(&self) -> Result<(), CaError> {
        let mut revoked = Vec::new();
        for i in self.state.issued.iter().filter(|i| i.revoked.is_some()) {
            let serial = unhex(&i.serial).ok_or_else(|| CaError::Damaged {
                path: self.dir.join("ca.json"),
                message: format!("serial `{}` is not hex", i.serial),
            })?;
            let at = i.revoked.unwrap_or_default();
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: OffsetDateTime::from_unix_timestamp(at)
                    .unwrap_or(OffsetDateTime::UNIX_EPOCH),
                reason_code: Some(RevocationReason::CessationOfOperation),
                invalidity_date: None,
            });
        }
        let crl = CertificateRevocationListParams {
            this_update: now() - time::Duration::minutes(5),
            next_update: now() + days(CRL_DAYS),
            crl_number: SerialNumber::from(self.state.crl_number.max(1)),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&Issuer::from_params(&self.params, &self.key))?;
        write_file(&Ca::crl_path(&self.dir), crl.pem()?.as_bytes(), 0o644)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn verify(ca_pem: &str, leaf: &CertificateDer<'_>, crl: &[u8]) -> Result<(), webpki::Error> {
        let ca = der(ca_pem);
        let anchor = webpki::anchor_from_trusted_cert(&ca).unwrap();
        let crl = CertificateRevocationListDer::from_pem_slice(crl).unwrap();
        let crl = webpki::OwnedCertRevocationList::from_der(&crl).unwrap();
        let crl = webpki::CertRevocationList::from(crl);
        let crls = [&crl];
        let rev = webpki::RevocationOptionsBuilder::new(&crls)
            .unwrap()
            .build();
        let ee = webpki::EndEntityCert::try_from(leaf).unwrap();
        ee.verify_for_usage(
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
            &[anchor],
            &[],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            Some(rev),
            None,
        )
        .map(|_| ())
    }

    #[test]
    fn issues_verifiable_certificates_naming_the_party_and_revokes_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = Ca::init(dir.path(), "test").unwrap();
        assert!(matches!(
            Ca::init(dir.path(), "again"),
            Err(CaError::Exists(_))
        ));
        let web1 = Identity::new(Kind::Agent, "web-1").unwrap();
        let a = ca
            .issue(&web1, &[], &["10.0.0.11".parse().unwrap()], 30)
            .unwrap();
        // Reopened, the CA signs certificates that chain to the ca.crt handed out earlier.
        let mut ca = Ca::open(dir.path()).unwrap();
        let web2 = Identity::new(Kind::Agent, "web-2").unwrap();
        let b = ca.issue(&web2, &["web-2.farm".into()], &[], 30).unwrap();
        let ca_pem = ca.cert_pem().unwrap();
        let crl = std::fs::read(Ca::crl_path(dir.path())).unwrap();
        for (pem, who) in [(&a.cert, &web1), (&b.cert, &web2)] {
            let leaf = der(pem);
            verify(&ca_pem, &leaf, &crl).unwrap();
            assert_eq!(&Identity::of_cert(&leaf).unwrap(), who);
        }
        assert_eq!(ca.revoke("web-2", Some(Kind::Agent)).unwrap(), 1);
        assert!(ca.revoke("web-2", None).is_err(), "nothing left to revoke");
        let crl = std::fs::read(Ca::crl_path(dir.path())).unwrap();
        assert_eq!(
            verify(&ca_pem, &der(&b.cert), &crl),
            Err(webpki::Error::CertRevoked)
        );
        verify(&ca_pem, &der(&a.cert), &crl).unwrap();
        let mode = |p: &Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
    }

    #[test]
    fn a_join_token_makes_one_certificate_for_the_agents_own_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = Ca::init(dir.path(), "t").unwrap();
        let token = ca
            .join_token("web-3", &["127.0.0.1".parse().unwrap()], &[], 60)
            .unwrap();
        let stored = std::fs::read_to_string(dir.path().join("ca.json")).unwrap();
        assert!(!stored.contains(&token), "only the hash is kept");
        let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let public = Ed25519Public(key.public_key_raw().try_into().unwrap());
        assert!(ca.redeem("not-the-token", &public).is_err());
        let joined = Ca::open(dir.path())
            .unwrap()
            .redeem(&token, &public)
            .unwrap();
        assert_eq!(joined.name, "web-3");
        assert_eq!(
            fingerprint(&joined.ca),
            fingerprint(&ca.cert_pem().unwrap())
        );
        let leaf = der(&joined.cert);
        verify(&joined.ca, &leaf, joined.crl.as_bytes()).unwrap();
        assert_eq!(
            Identity::of_cert(&leaf).unwrap(),
            Identity::new(Kind::Agent, "web-3").unwrap()
        );
        // The certificate holds the agent's key: rustls accepts the pair.
        let (crt, pem) = (dir.path().join("web-3.crt"), dir.path().join("web-3.key"));
        std::fs::write(&crt, &joined.cert).unwrap();
        std::fs::write(&pem, key.serialize_pem()).unwrap();
        let pair = crate::config::tls::load(&crt, &pem);
        assert!(pair.is_ok(), "{:?}", pair.err());
        // Once only, and an expired one never.
        assert!(Ca::open(dir.path())
            .unwrap()
            .redeem(&token, &public)
            .is_err());
        let mut ca = Ca::open(dir.path()).unwrap();
        let old = ca.join_token("web-4", &[], &[], 1).unwrap();
        ca.state.joins[0].expires = 0;
        assert!(ca.redeem(&old, &public).is_err());
    }

    #[test]
    fn a_changeset_is_accepted_only_signed_by_its_origins_valid_certificate() {
        use crate::sync::changeset::{Changeset, Mode};
        use crate::sync::provenance::{ChangesetAuthority, ChangesetSigner, FarmSigned};
        use crate::sync::sign::SecretKey;
        let dir = tempfile::tempdir().unwrap();
        let mut ca = Ca::init(dir.path(), "t").unwrap();
        let signer = |ca: &mut Ca, name: &str| {
            let x = ca
                .issue(&Identity::new(Kind::Agent, name).unwrap(), &[], &[], 1)
                .unwrap();
            let key = SecretKey::from_pem(x.key.as_bytes(), name).unwrap();
            ChangesetSigner::new(key, &der(&x.cert))
        };
        let (web1, web2) = (signer(&mut ca, "web-1"), signer(&mut ca, "web-2"));
        let cs: Changeset = serde_json::from_str(
            r#"{"origin":"web-1","seq":1,"mode":"immediate","base":null,"detected_us":1,"changes":{"a":{"entry":null,"prev":null}}}"#,
        )
        .unwrap();
        assert_eq!(cs.mode, Mode::Immediate);
        // Read from the CA's files each time: the revocation list changes.
        let authority = || {
            let trust = crate::config::tls::load_trust(
                &Ca::cert_path(dir.path()),
                Some(&Ca::crl_path(dir.path())),
            )
            .unwrap();
            FarmSigned::new(
                &trust.roots,
                &trust.crls,
                std::sync::Arc::new(UnixTime::now),
            )
        };
        let farm = authority();
        farm.verify(&web1.sign(cs.clone())).unwrap();
        // Another agent's signature, an altered changeset, no signature: refused.
        let reason = |r: Result<(), crate::sync::provenance::Unauthorised>| r.unwrap_err().reason;
        assert!(reason(farm.verify(&web2.sign(cs.clone()))).contains("signed by agent web-2"));
        let mut altered = web1.sign(cs.clone());
        altered.changeset.seq = 2;
        assert!(reason(farm.verify(&altered)).contains("does not verify"));
        let bare = crate::sync::provenance::SignedChangeset::unsigned(cs.clone());
        assert!(reason(farm.verify(&bare)).contains("not signed"));
        // A certificate of another farm's CA, and a revoked one: refused.
        let other = tempfile::tempdir().unwrap();
        let mut ca2 = Ca::init(other.path(), "t").unwrap();
        let stranger = signer(&mut ca2, "web-1");
        assert!(
            reason(farm.verify(&stranger.sign(cs.clone()))).contains("not one of the farm CA's")
        );
        ca.revoke("web-1", None).unwrap();
        let farm = authority();
        assert!(reason(farm.verify(&web1.sign(cs))).contains("revoked"));
    }

    #[test]
    fn a_certificate_of_another_ca_does_not_verify() {
        let one = tempfile::tempdir().unwrap();
        let two = tempfile::tempdir().unwrap();
        let ca1 = Ca::init(one.path(), "one").unwrap();
        let mut ca2 = Ca::init(two.path(), "one").unwrap();
        let id = Identity::new(Kind::Publisher, "ci").unwrap();
        let x = ca2.issue(&id, &[], &[], 1).unwrap();
        let crl = std::fs::read(Ca::crl_path(one.path())).unwrap();
        assert!(verify(&ca1.cert_pem().unwrap(), &der(&x.cert), &crl).is_err());
    }
}
