//! TLS configs: a server config whose certificate is picked by SNI among the listener's
//! certificates (exact names first, then `*.` wildcards, then the first certificate as the
//! default), with ALPN offering h2 and http/1.1, optionally asking clients for a farm-CA
//! certificate (mutual TLS on the sync plane); and the client config of the control plane,
//! trusting the farm CA and presenting the party's own certificate.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;

use super::acme::{AcmeState, ACME_TLS_ALPN};
use crate::config::tls::{FarmTrust, LoadedCert};

/// The client certificate a TLS connection presented (verified by the listener's client
/// verifier), put in every request's extensions: who the peer is.
#[derive(Debug, Clone)]
pub struct PeerCertificate(pub Arc<CertificateDer<'static>>);

/// Picks a certificate by the client's SNI: the listener's ACME certificate when it covers
/// the name, else its files'; a TLS-ALPN-01 validation gets the name's validation
/// certificate, or none.
#[derive(Debug)]
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the suffix after `*.`, e.g. `farm.test`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
    /// The listener's name and where its ordered certificate is, with ACME.
    acme: Option<(String, Arc<AcmeState>)>,
}

impl SniResolver {
    /// Indexes the certificates by the names they carry; earlier certificates win ties.
    pub fn new(certs: &[LoadedCert]) -> Self {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for c in certs {
            for n in &c.names {
                match n.strip_prefix("*.") {
                    Some(suffix) => wildcard
                        .entry(suffix.to_string())
                        .or_insert_with(|| c.key.clone()),
                    None => exact.entry(n.clone()).or_insert_with(|| c.key.clone()),
                };
            }
        }
        SniResolver {
            exact,
            wildcard,
            default: certs.first().map(|c| c.key.clone()),
            acme: None,
        }
    }

    /// The same, with the ACME certificate of `listener` in `acme` first.
    pub fn with_acme(certs: &[LoadedCert], listener: &str, acme: Arc<AcmeState>) -> Self {
        SniResolver {
            acme: Some((listener.to_string(), acme)),
            ..SniResolver::new(certs)
        }
    }

    /// The certificate for `sni` (already lowercase, as rustls hands it over).
    pub fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let ordered = self.acme.as_ref().and_then(|(l, a)| a.certificate(l));
        if let Some(o) = &ordered {
            if sni.is_none_or(|n| covers(&o.names, n.trim_end_matches('.'))) {
                return Some(o.key.clone());
            }
        }
        if let Some(name) = sni {
            let name = name.trim_end_matches('.');
            if let Some(k) = self.exact.get(name) {
                return Some(k.clone());
            }
            if let Some((_, parent)) = name.split_once('.') {
                if let Some(k) = self.wildcard.get(parent) {
                    return Some(k.clone());
                }
            }
        }
        self.default
            .clone()
            .or_else(|| ordered.map(|o| o.key.clone()))
    }
}

/// True when a certificate for `names` is valid for `name` (exactly, or by a `*.` wildcard
/// one label deep).
fn covers(names: &[String], name: &str) -> bool {
    names.iter().any(|n| match n.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(_, parent)| parent == suffix),
        None => n == name,
    })
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A validator offers `acme-tls/1` alone (RFC 8737 §3); a client offering it among
        // others is an ordinary client.
        let validation = hello
            .alpn()
            .is_some_and(|mut p| p.next() == Some(ACME_TLS_ALPN) && p.next().is_none());
        if validation {
            // RFC 8737 §3: only the validation certificate of the name, or no handshake.
            let (_, acme) = self.acme.as_ref()?;
            return acme.alpn01(hello.server_name()?.trim_end_matches('.'));
        }
        self.pick(hello.server_name())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls server config for a listener's certificates; ALPN offers h2 and http/1.1, or
/// only h2 with `http2_only`. With `acme` (the listener's name and the ordering state), the
/// ordered certificate is served and TLS-ALPN-01 validations are answered.
pub fn server_config(
    certs: &[LoadedCert],
    http2_only: bool,
    acme: Option<(&str, &Arc<AcmeState>)>,
) -> Arc<rustls::ServerConfig> {
    let mut cfg = Arc::unwrap_or_clone(server_config_with(certs, None));
    if http2_only {
        cfg.alpn_protocols = vec![b"h2".to_vec()];
    }
    if let Some((listener, state)) = acme {
        cfg.cert_resolver = Arc::new(SniResolver::with_acme(certs, listener, state.clone()));
        cfg.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    }
    Arc::new(cfg)
}

/// A rustls server config for `certs` that asks clients for a certificate of `clients`' CA
/// (checked against its revocation list). A client without one may still connect: what it
/// may do without an identity is the application's decision (loopback and bearer tokens).
pub fn server_config_with(
    certs: &[LoadedCert],
    clients: Option<&FarmTrust>,
) -> Arc<rustls::ServerConfig> {
    // The ring provider supports the default protocol versions, so this cannot fail.
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3");
    let builder = match clients.and_then(client_verifier) {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(Arc::new(SniResolver::new(certs)));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

fn client_verifier(
    trust: &FarmTrust,
) -> Option<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
    // Fails only for an empty root store or unparsable CRLs, which loading refused already.
    rustls::server::WebPkiClientVerifier::builder_with_provider(trust.roots.clone(), provider())
        .with_crls(trust.crls.iter().cloned())
        .allow_unauthenticated()
        .build()
        .ok()
}

/// A rustls client config trusting `trust`'s CA (and its revocation list), presenting `own`
/// (a farm-CA certificate) when the server asks for one.
pub fn client_config(
    trust: &FarmTrust,
    own: Option<&LoadedCert>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        trust.roots.clone(),
        provider(),
    )
    .with_crls(trust.crls.iter().cloned())
    .build()
    .map_err(|e| e.to_string())?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_webpki_verifier(verifier);
    let cfg = match own {
        Some(c) => builder.with_client_cert_resolver(Arc::new(OwnCert(c.key.clone()))),
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// A client's one certificate, presented whenever the server asks.
#[derive(Debug)]
struct OwnCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for OwnCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A client config that accepts any server certificate. Only for `lockstep agent join`'s
/// first request, which fetches the farm CA's certificate and checks it against the
/// fingerprint the operator pinned before anything secret is sent; every other connection
/// verifies the server.
pub fn client_config_unverified() -> Arc<rustls::ClientConfig> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider())))
        .with_no_client_auth();
    Arc::new(cfg)
}

#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
