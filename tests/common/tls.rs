//! TLS for the tests: self-signed certificates written as PEM files ([`TestCert`]) and a
//! client connection trusting only one of them ([`tls_connect`]).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

/// A self-signed certificate for `name` (its own key, `CN=name`), written as PEM files
/// `name.pem` and `name.key` into `dir`.
pub struct TestCert {
    /// The certificate, DER.
    pub der: rustls_pki_types::CertificateDer<'static>,
    /// PEM certificate file.
    pub cert_path: std::path::PathBuf,
    /// PEM private key file.
    pub key_path: std::path::PathBuf,
}

impl TestCert {
    /// Generates and writes one.
    pub fn new(dir: &Path, name: &str) -> TestCert {
        let key = rcgen::KeyPair::generate().expect("generate a key pair");
        let mut params =
            rcgen::CertificateParams::new(vec![name.to_string()]).expect("certificate params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("self-sign");
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        TestCert {
            der: cert.der().clone(),
            cert_path,
            key_path,
        }
    }

    /// Its entry in a listener's `tls.certificates`.
    pub fn yaml(&self) -> String {
        format!(
            "        - {{ cert: \"{}\", key: \"{}\" }}\n",
            self.cert_path.display(),
            self.key_path.display()
        )
    }
}

/// Connects with TLS to `addr` asking for `sni`, trusting only `root`, offering ALPN h2 and
/// http/1.1.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    root: &rustls_pki_types::CertificateDer<'static>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(root.clone())
        .map_err(|e| format!("root certificate refused: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name =
        rustls_pki_types::ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .map_err(|_| "TLS handshake did not finish within 5s".to_string())?
        .map_err(|e| format!("TLS handshake failed: {e}"))
}
