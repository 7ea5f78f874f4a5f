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
    /// When the leaf expires (its notAfter, seconds since the Unix epoch).
    pub not_after: Option<u64>,
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
    let bytes = std::fs::read(cert).map_err(|e| {
        (
            Part::Cert,
            format!("cannot read certificate {}: {e}", cert.display()),
        )
    })?;
    let key_bytes = std::fs::read(key).map_err(|e| {
        (
            Part::Key,
            format!("cannot read private key {}: {e}", key.display()),
        )
    })?;
    from_pem(
        &bytes,
        &key_bytes,
        &cert.display().to_string(),
        &key.display().to_string(),
    )
}

/// A certificate chain and its key from PEM text (`cert_name` and `key_name` say where they
/// came from, in errors).
pub fn from_pem(
    bytes: &[u8],
    key_bytes: &[u8],
    cert_name: &str,
    key_name: &str,
) -> Result<LoadedCert, (Part, String)> {
    let c = |e: String| (Part::Cert, e);
    let k = |e: String| (Part::Key, e);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| c(format!("certificate {cert_name} is not valid PEM: {e}")))?;
    if chain.is_empty() {
        return Err(c(format!(
            "certificate {cert_name} holds no PEM CERTIFICATE block: give the chain, leaf first"
        )));
    }
    let leaf = webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| c(format!("certificate {cert_name} cannot be parsed: {e:?}")))?;
    let names: Vec<String> = leaf
        .valid_dns_names()
        .map(|n| n.to_ascii_lowercase())
        .collect();
    let private = PrivateKeyDer::from_pem_slice(key_bytes).map_err(|e| {
        k(format!(
            "private key {key_name} is not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"
        ))
    })?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&private)
        .map_err(|e| k(format!("private key {key_name} is not usable: {e}")))?;
    let certified = CertifiedKey::new(chain, signer);
    if let Err(e) = certified.keys_match() {
        return Err(k(format!(
            "private key {key_name} does not belong to certificate {cert_name} ({e}): give the key the certificate was issued for"
        )));
    }
    Ok(LoadedCert {
        names,
        not_after: not_after(&certified.cert[0]),
        key: Arc::new(certified),
    })
}

/// What `lockstep check` says of a certificate that expires at `not_after` (seconds since
/// the epoch) when it is `now` (idem): expired, or within 14 days; nothing otherwise.
pub fn expiry_warning(not_after: u64, now: u64) -> Option<String> {
    const DAY: u64 = 86_400;
    if not_after <= now {
        let ago = (now - not_after) / DAY;
        Some(format!(
            "expired {ago} day(s) ago: clients refuse it; replace the certificate"
        ))
    } else if not_after - now < 14 * DAY {
        Some(format!(
            "expires in {} day(s): renew it",
            (not_after - now) / DAY
        ))
    } else {
        None
    }
}

/// The notAfter of an X.509 certificate (DER), seconds since the Unix epoch: the second
/// element of `validity`, the fifth field of `tbsCertificate` after the optional `[0]`
/// version. `None` when the bytes are not shaped so (never a panic: the walk is bounded by the
/// bytes it is given).
pub fn not_after(der: &[u8]) -> Option<u64> {
    validity(der).map(|(_, after)| after)
}

/// A DER certificate's validity: (notBefore, notAfter), seconds since the Unix epoch; `None`
/// as for [`not_after`].
pub fn validity(der: &[u8]) -> Option<(u64, u64)> {
    let (tag, cert, _) = der_tlv(der)?;
    (tag == 0x30).then_some(())?;
    let (tag, mut tbs, _) = der_tlv(cert)?;
    (tag == 0x30).then_some(())?;
    // version [0] EXPLICIT, when present.
    if tbs.first() == Some(&0xa0) {
        tbs = der_tlv(tbs)?.2;
    }
    // serialNumber, signature, issuer.
    for _ in 0..3 {
        tbs = der_tlv(tbs)?.2;
    }
    let (tag, validity, _) = der_tlv(tbs)?;
    (tag == 0x30).then_some(())?;
    let (tag, before, rest) = der_tlv(validity)?;
    let before = der_time(tag, before)?;
    let (tag, time, _) = der_tlv(rest)?;
    Some((before, der_time(tag, time)?))
}

/// One DER element at the start of `b`: its tag, its contents and what follows it.
fn der_tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        (1..=4).contains(&n).then_some(())?;
        let (bytes, rest) = (rest.get(..n)?, rest.get(n..)?);
        let len = bytes.iter().fold(0usize, |a, &x| (a << 8) | usize::from(x));
        (len, rest)
    };
    Some((tag, rest.get(..len)?, rest.get(len..)?))
}

/// UTCTime (`YYMMDDHHMMSSZ`, years 1950–2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) as
/// seconds since the Unix epoch.
fn der_time(tag: u8, t: &[u8]) -> Option<u64> {
    let digits = |s: &[u8]| -> Option<u64> {
        s.iter().try_fold(0u64, |a, &c| {
            c.is_ascii_digit().then(|| a * 10 + u64::from(c - b'0'))
        })
    };
    let (year, rest) = match (tag, t.len()) {
        (0x17, 13) => {
            let yy = digits(&t[..2])?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &t[2..])
        }
        (0x18, 15) => (digits(&t[..4])?, &t[4..]),
        _ => return None,
    };
    (rest.last() == Some(&b'Z')).then_some(())?;
    let [mo, d, h, mi, s] = [0, 2, 4, 6, 8].map(|i| digits(&rest[i..i + 2]));
    let (mo, d, h, mi, s) = (mo?, d?, h?, mi?, s?);
    ((1..=12).contains(&mo) && (1..=31).contains(&d) && h < 24 && mi < 60 && s < 61)
        .then_some(())?;
    // Days from the civil date (Howard Hinnant's algorithm), years from 1970.
    let (y, m) = if mo <= 2 {
        (year - 1, mo + 9)
    } else {
        (year, mo - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86_400 + h * 3600 + mi * 60 + s)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_until(y: i32, m: u8, d: u8) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["farm.test".to_string()]).unwrap();
        p.not_after = rcgen::date_time_ymd(y, m, d);
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn not_after_reads_utc_and_generalized_times() {
        // Before 2050 the certificate says UTCTime, from 2050 GeneralizedTime (RFC 5280).
        assert_eq!(not_after(&cert_until(2031, 3, 4)), Some(1_930_348_800));
        assert_eq!(not_after(&cert_until(2061, 12, 31)), Some(2_903_212_800));
        assert_eq!(not_after(&cert_until(1999, 12, 31)), Some(946_598_400));
    }

    #[test]
    fn check_warns_of_expired_and_soon_expiring_certificates() {
        let day = 86_400;
        assert!(expiry_warning(100 * day, 103 * day)
            .unwrap()
            .starts_with("expired 3 day(s) ago"));
        assert_eq!(
            expiry_warning(110 * day, 100 * day).as_deref(),
            Some("expires in 10 day(s): renew it")
        );
        assert_eq!(expiry_warning(200 * day, 100 * day), None);
    }

    #[test]
    fn anything_else_is_none_never_a_panic() {
        let der = cert_until(2031, 3, 4);
        for cut in 0..der.len() {
            let _ = not_after(&der[..cut]);
        }
        let mut bent = der.clone();
        for i in 0..bent.len() {
            bent[i] ^= 0xff;
            let _ = not_after(&bent);
            bent[i] ^= 0xff;
        }
        assert_eq!(not_after(b""), None);
        assert_eq!(not_after(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(der_time(0x17, b"3113130000Z!!"), None);
        assert_eq!(der_time(0x17, b"311301000000Z"), None, "month 13");
    }
}
