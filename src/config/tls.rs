//! Loads PEM certificate chains and private keys for TLS listeners, and reads the DNS names
//! each certificate is valid for so that SNI can pick among them.

use std::path::Path;
use std::sync::Arc;

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate chain with its key, ready for rustls, and the names it serves.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    /// DNS names from the leaf's subjectAltName (may include `*.example` wildcards), lowercase.
    pub names: Vec<String>,
    /// Chain and signing key.
    pub key: Arc<CertifiedKey>,
}

/// Which of the two files a loading problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The certificate chain.
    Cert,
    /// The private key (or the pair not matching).
    Key,
}

/// Reads `cert` and `key` (PEM). Errors say which file and what is wrong with it.
pub fn load(cert: &Path, key: &Path) -> Result<LoadedCert, (Part, String)> {
    let c = |e: String| (Part::Cert, e);
    let k = |e: String| (Part::Key, e);
    let bytes = std::fs::read(cert)
        .map_err(|e| c(format!("cannot read certificate {}: {e}", cert.display())))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            c(format!(
                "certificate {} is not valid PEM: {e}",
                cert.display()
            ))
        })?;
    if chain.is_empty() {
        return Err(c(format!(
            "certificate {} holds no PEM CERTIFICATE block: give the chain, leaf first",
            cert.display()
        )));
    }
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| {
        c(format!(
            "certificate {} cannot be parsed: {e:?}",
            cert.display()
        ))
    })?;
    let names: Vec<String> = leaf
        .valid_dns_names()
        .map(|n| n.to_ascii_lowercase())
        .collect();
    let key_bytes = std::fs::read(key)
        .map_err(|e| k(format!("cannot read private key {}: {e}", key.display())))?;
    let private = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
        k(format!(
            "private key {} is not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
            key.display()
        ))
    })?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&private)
        .map_err(|e| k(format!("private key {} is not usable: {e}", key.display())))?;
    let certified = CertifiedKey::new(chain, signer);
    if let Err(e) = certified.keys_match() {
        return Err(k(format!(
            "private key {} does not belong to certificate {} ({e}): give the key the certificate was issued for",
            key.display(),
            cert.display()
        )));
    }
    Ok(LoadedCert {
        names,
        key: Arc::new(certified),
    })
}

/// The farm CA and its revocation list: what a party trusts when it checks another party's
/// certificate (`lockstep ca` makes both).
#[derive(Debug, Clone)]
pub struct FarmTrust {
    /// The CA certificates.
    pub roots: Arc<rustls::RootCertStore>,
    /// Revocation lists (empty: nothing revoked).
    pub crls: Vec<rustls_pki_types::CertificateRevocationListDer<'static>>,
}

/// Reads the farm CA (`ca`, PEM certificates) and its revocation list (`crl`, PEM), naming the
/// file in each error.
pub fn load_trust(ca: &Path, crl: Option<&Path>) -> Result<FarmTrust, (Part, String)> {
    let c = |e: String| (Part::Cert, e);
    let pem =
        std::fs::read(ca).map_err(|e| c(format!("cannot read CA file {}: {e}", ca.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| c(format!("CA file {}: {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| c(format!("CA file {}: {e}", ca.display())))?;
    }
    if roots.is_empty() {
        return Err(c(format!(
            "CA file {} holds no PEM CERTIFICATE block (the farm CA is ca.crt of `lockstep ca init`)",
            ca.display()
        )));
    }
    let mut crls = Vec::new();
    if let Some(path) = crl {
        let k = |e: String| (Part::Key, e);
        let pem = std::fs::read(path).map_err(|e| {
            k(format!(
                "cannot read revocation list {}: {e}",
                path.display()
            ))
        })?;
        for l in rustls_pki_types::CertificateRevocationListDer::pem_slice_iter(&pem) {
            crls.push(l.map_err(|e| k(format!("revocation list {}: {e}", path.display())))?);
        }
        if crls.is_empty() {
            return Err(k(format!(
                "revocation list {} holds no PEM X509 CRL block (crl.pem of `lockstep ca`)",
                path.display()
            )));
        }
    }
    Ok(FarmTrust {
        roots: Arc::new(roots),
        crls,
    })
}
