//! `lockstep agent join`: a new backend obtains its farm certificate from the hub with a
//! one-time token (`lockstep ca join-token` on the appliance), in one command.
//!
//! 1. Fetch the farm CA's certificate (`GET /sync/v1/ca`) and check it against the fingerprint
//!    the operator pinned (printed with the token): from here on the hub is verified.
//! 2. Make an Ed25519 key here (it never leaves this host) and send its public half with the
//!    token (`POST /sync/v1/join`) over TLS verified against that CA.
//! 3. Write the CA, its revocation list, the certificate and the key (0600) into the output
//!    directory, refusing to overwrite anything.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Method;

use crate::ca::{create_file, fingerprint, Joined};
use crate::net::client::{ok, ClientTls, HttpClient};
use crate::sync::protocol::{JoinRequest, PREFIX};

/// Longest wait for the hub.
const TIMEOUT: Duration = Duration::from_secs(30);

/// What was written.
#[derive(Debug)]
pub struct Written {
    /// The agent's name (from the token).
    pub name: String,
    /// The farm CA.
    pub ca: PathBuf,
    /// Its revocation list.
    pub crl: PathBuf,
    /// The agent's certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl Written {
    /// The `tls:` block for agent.yaml.
    pub fn yaml(&self) -> String {
        format!(
            "name: {}\ntls:\n  ca: {}\n  crl: {}\n  cert: {}\n  key: {}\n",
            self.name,
            self.ca.display(),
            self.crl.display(),
            self.cert.display(),
            self.key.display()
        )
    }
}

/// Joins the farm of the hub at `hub` (`https://…`) with `token`, trusting only a CA whose
/// fingerprint is `ca_hash`; writes the files into `out`.
pub async fn join(hub: &str, token: &str, ca_hash: &str, out: &Path) -> anyhow::Result<Written> {
    if !hub.starts_with("https://") {
        anyhow::bail!("the hub must be https:// (its sync.tls): the token must not cross the network in clear");
    }
    let probe = HttpClient::hub(hub, None, Some(&ClientTls::unverified()))?;
    let answer = ok(probe
        .send(Method::GET, &format!("{PREFIX}/ca"), None, TIMEOUT)
        .await?)?;
    let ca_pem = String::from_utf8(answer.body.to_vec())
        .map_err(|_| anyhow::anyhow!("the hub's CA certificate is not PEM text"))?;
    let seen = fingerprint(&ca_pem)
        .ok_or_else(|| anyhow::anyhow!("the hub's CA certificate is not PEM"))?;
    if !seen.eq_ignore_ascii_case(ca_hash.trim()) {
        anyhow::bail!(
            "the hub's farm CA has fingerprint {seen}, not the {ca_hash} you pinned: refusing to send the token (a wrong --hub, or someone in between)"
        );
    }
    std::fs::create_dir_all(out)?;
    let ca = out.join("ca.crt");
    if !ca.exists() {
        create_file(&ca, ca_pem.as_bytes(), 0o644)?;
    } else if std::fs::read_to_string(&ca)? != ca_pem {
        anyhow::bail!("{} exists and holds another CA", ca.display());
    }
    let verified = ClientTls::ca_file(&ca)?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let public_key: String = key
        .public_key_raw()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let client = HttpClient::hub(hub, None, Some(&verified))?;
    let request = JoinRequest {
        token: token.trim().to_string(),
        public_key,
    };
    let joined: Joined = client
        .json(
            Method::POST,
            &format!("{PREFIX}/join"),
            Some(&request),
            TIMEOUT,
        )
        .await?;
    if crate::sync::identity::Identity::new(crate::sync::identity::Kind::Agent, &joined.name)
        .is_none()
    {
        anyhow::bail!(
            "the hub named the agent `{}`, which is not a valid name",
            joined.name
        );
    }
    let written = Written {
        ca,
        crl: out.join("crl.pem"),
        cert: out.join(format!("{}.crt", joined.name)),
        key: out.join(format!("{}.key", joined.name)),
        name: joined.name,
    };
    create_file(&written.key, crate::ca::key_pem(&key)?.as_bytes(), 0o600)?;
    create_file(&written.cert, joined.cert.as_bytes(), 0o644)?;
    crate::ca::write_file(&written.crl, joined.crl.as_bytes(), 0o644)?;
    Ok(written)
}
