//! Certificates ordered from an ACME CA (RFC 8555) for the TLS listeners with `tls.acme:`.
//!
//! One task orders for every such listener in turn: at start it puts in use the certificate
//! kept in `acme.store` when it still covers the configured names; it orders a new one when
//! there is none, when the names changed, and at two-thirds of the certificate's lifetime
//! (back-off after a failure: a minute, doubling to an hour). A challenge is answered by the
//! appliance itself — TLS-ALPN-01 on the listener, HTTP-01 on the plain listeners — through
//! [`AcmeState`], which also hands the new certificate to the next handshakes: no reload.
//!
//! The account key and each listener's key are written 0600 in a 0700 directory and reused
//! across restarts (the account per directory URL).

mod http;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::acme::{Acme, Challenge};
use crate::config::tls::{from_pem, load, validity, LoadedCert};
use crate::live::Shared;
use crate::metrics::{AcmeLabels, Metrics};
use crate::net::acme::AcmeState;
use crate::net::client::ClientTls;
use crate::sync::protocol::SharedAcme;
use crate::sync::store::HubStore;

/// First wait after a failed order; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(60);
/// Longest wait after failed orders.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Longest sleep between looks at the certificates (a wall clock that jumps is seen then).
const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// How long the CA may take to validate the challenges, then to issue.
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(120);
/// How often an appliance that does not lead looks whether it leads now.
const FOLLOWER_RECHECK: Duration = Duration::from_secs(10);
/// The time the other appliances are given to learn of shared challenge answers.
const SHARE_SETTLE: Duration = Duration::from_secs(1);

/// When a certificate valid from `not_before` to `not_after` (seconds since the epoch) is
/// renewed: at two-thirds of its lifetime.
pub fn renew_at(not_before: u64, not_after: u64) -> u64 {
    not_before + not_after.saturating_sub(not_before) * 2 / 3
}

/// How long to wait after `failures` failed orders in a row (at least 1).
pub fn backoff(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    FIRST_BACKOFF.saturating_mul(factor).min(MAX_BACKOFF)
}

/// True when a certificate for `have` covers every one of `want`.
pub fn covers_all(have: &[String], want: &[String]) -> bool {
    want.iter().all(|w| have.contains(w))
}

/// Why an order failed.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// The CA refused or could not be reached.
    #[error("{0}")]
    Acme(#[from] instant_acme::Error),
    /// The store could not be read or written.
    #[error("{0}")]
    Store(String),
    /// The CA's answer was not what RFC 8555 says.
    #[error("{0}")]
    Protocol(String),
}

/// One listener's certificate to keep.
struct Wanted {
    listener: String,
    acme: Acme,
    /// When to order next (seconds since the epoch); 0: now.
    due: u64,
    failures: u32,
}

/// The task ordering for the ACME listeners of the live config, until `shutdown`; `None`
/// when no listener has `tls.acme`. The certificates kept in the store are in use when this
/// returns. With `shared` (the store several appliances share,
/// `sync.cluster`), only the appliance that leads orders: it shares its challenge answers and
/// certificates, which the others answer with and serve.
pub fn task(
    live: Shared,
    metrics: Arc<Metrics>,
    shared: Option<Arc<dyn HubStore>>,
    shutdown: CancellationToken,
) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
    let mut wanted: Vec<Wanted> = live
        .load()
        .config
        .listeners
        .iter()
        .filter_map(|l| {
            l.acme.clone().map(|acme| Wanted {
                listener: l.name.clone(),
                acme,
                due: 0,
                failures: 0,
            })
        })
        .collect();
    if wanted.is_empty() {
        return None;
    }
    // What the store kept from before: in use at once (before this returns, so before the
    // caller goes on: a handshake right after a restart finds it), ordered again only when due.
    let state = live.load().acme.clone();
    for w in &mut wanted {
        if let Some(c) = kept(&w.acme, &w.listener) {
            w.due = renewal(&c);
            info!(listener = %w.listener, names = ?c.names, not_after = c.not_after, "ACME certificate from the store in use");
            state.install(&w.listener, c);
        }
    }
    live.load().export_expiry(&metrics);
    Some(run(wanted, live, metrics, shared, shutdown))
}

/// The settings of each ACME listener, to tell whether a reload changed them.
pub fn settings(config: &crate::config::Config) -> Vec<(String, String)> {
    config
        .listeners
        .iter()
        .filter_map(|l| {
            l.acme.as_ref().map(|a| {
                (
                    l.name.clone(),
                    format!(
                        "{} {:?} {:?} {} {} {}",
                        a.directory,
                        a.contact,
                        a.names,
                        a.challenge.as_str(),
                        a.ca.display(),
                        a.store.display()
                    ),
                )
            })
        })
        .collect()
}

/// The wall clock in seconds (certificates' validity is wall-clock time).
fn now() -> u64 {
    crate::sync::clock::wall_us() / 1_000_000
}

async fn run(
    mut wanted: Vec<Wanted>,
    live: Shared,
    metrics: Arc<Metrics>,
    shared: Option<Arc<dyn HubStore>>,
    shutdown: CancellationToken,
) {
    let state = live.load().acme.clone();
    let mut accounts: HashMap<(PathBuf, String), Account> = HashMap::new();
    loop {
        let t = now();
        for w in wanted.iter_mut().filter(|w| w.due <= t) {
            // One the leading appliance shared may have come meanwhile.
            if let Some(c) = state.certificate(&w.listener) {
                if covers_all(&c.names, &w.acme.names) && renewal(&c) > t {
                    w.due = renewal(&c);
                    continue;
                }
            }
            if shared.as_ref().is_some_and(|s| !s.leads()) {
                // Another appliance orders; this one looks again in a while (it may lead then).
                w.due = t + FOLLOWER_RECHECK.as_secs();
                continue;
            }
            let result = tokio::select! {
                r = order(w, &state, &mut accounts, shared.as_ref()) => r,
                _ = shutdown.cancelled() => return,
            };
            let outcome = match result {
                Ok((cert, item)) => {
                    info!(listener = %w.listener, names = ?cert.names, not_after = cert.not_after, "ACME certificate ordered and in use");
                    w.due = renewal(&cert);
                    w.failures = 0;
                    state.install(&w.listener, cert);
                    live.load().export_expiry(&metrics);
                    if let Some(s) = &shared {
                        if let Err(e) = share(s, item).await {
                            warn!(listener = %w.listener, error = %e, "the other appliances did not get the certificate; they keep theirs until the next renewal");
                        }
                    }
                    ("ok", None)
                }
                Err(e) => {
                    w.failures += 1;
                    let wait = backoff(w.failures);
                    warn!(listener = %w.listener, directory = %w.acme.directory, error = %e, retry_in = ?wait, "ACME order failed");
                    w.due = now() + wait.as_secs();
                    ("error", Some(e.to_string()))
                }
            };
            metrics
                .acme_orders
                .get_or_create(&AcmeLabels {
                    listener: w.listener.clone(),
                    result: outcome.0.into(),
                })
                .inc();
            state.set_error(&w.listener, outcome.1);
        }
        for w in &wanted {
            state.set_next_order(&w.listener, w.due);
        }
        let next = wanted.iter().map(|w| w.due).min().unwrap_or(u64::MAX);
        let sleep = Duration::from_secs(next.saturating_sub(now())).min(MAX_SLEEP);
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Hands `item` to the other appliances (logged when it fails: they order nothing, and keep
/// what they serve until it arrives).
async fn share(store: &Arc<dyn HubStore>, item: SharedAcme) -> Result<(), String> {
    let store = store.clone();
    match tokio::task::spawn_blocking(move || store.share_acme(&item)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// What the appliances share of ACME (`sync.cluster`), followed for the appliance's life
/// (reloads included): a certificate newer than the one in use for an ACME listener's names
/// is put in use and written to this appliance's store; open challenges are answered here
/// until they expire. `None` without a shared store.
pub fn follow_shared(
    store: &Arc<dyn HubStore>,
    live: Shared,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
    let items = store.shared_acme()?;
    Some(follow(items, live, metrics, shutdown))
}

async fn follow(
    mut items: tokio::sync::mpsc::Receiver<SharedAcme>,
    live: Shared,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let state = live.load().acme.clone();
    let mut open: Vec<(u64, SharedAcme)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        let item = tokio::select! {
            i = items.recv() => match i { Some(i) => i, None => return },
            _ = tick.tick() => {
                let t = now();
                open.retain(|(until, item)| {
                    let keep = *until > t;
                    if !keep {
                        forget_answer(&state, item);
                    }
                    keep
                });
                continue;
            }
            _ = shutdown.cancelled() => return,
        };
        match &item {
            SharedAcme::Certificate {
                listener,
                cert,
                key,
            } => {
                let config = live.load().config.clone();
                let Some(acme) = config
                    .listeners
                    .iter()
                    .find(|l| &l.name == listener)
                    .and_then(|l| l.acme.as_ref())
                else {
                    continue;
                };
                let c = match from_pem(cert.as_bytes(), key.as_bytes(), "shared", "shared") {
                    Ok(c) => c,
                    Err((_, e)) => {
                        warn!(listener, error = %e, "a shared ACME certificate cannot be used");
                        continue;
                    }
                };
                let current = state.certificate(listener);
                let newer = current.is_none_or(|o| {
                    !covers_all(&o.names, &acme.names) || o.not_after < c.not_after
                });
                if !covers_all(&c.names, &acme.names) || !newer {
                    // For other names, or not newer than the one in use (an old copy).
                    continue;
                }
                info!(listener, names = ?c.names, not_after = c.not_after, "ACME certificate shared by the leading appliance in use");
                state.install(listener, c);
                live.load().export_expiry(&metrics);
                if let Err(e) = persist(acme, listener, cert, key) {
                    warn!(listener, error = %e, "the shared ACME certificate is in use but not kept: a restart orders or waits for it again");
                }
            }
            SharedAcme::Http01 {
                token,
                key_authorization,
                until,
            } if *until > now() => {
                state.set_http01(token, key_authorization);
                open.push((*until, item.clone()));
            }
            SharedAcme::TlsAlpn01 {
                name,
                digest,
                until,
            } if *until > now() => match crate::ca::unhex(digest)
                .filter(|d| d.len() == 32)
                .map(|d| validation_cert(name, &d))
            {
                Some(Ok(k)) => {
                    state.set_alpn01(name, k);
                    open.push((*until, item.clone()));
                }
                _ => warn!(name, "a shared TLS-ALPN-01 answer does not parse"),
            },
            _ => {}
        }
        // Bounded: an answer lives minutes, and an order has at most MAX_NAMES of them.
        if open.len() > 4 * crate::config::acme::MAX_NAMES {
            let (_, oldest) = open.remove(0);
            forget_answer(&state, &oldest);
        }
    }
}

fn forget_answer(state: &AcmeState, item: &SharedAcme) {
    match item {
        SharedAcme::Http01 { token, .. } => state.clear_http01(token),
        SharedAcme::TlsAlpn01 { name, .. } => state.clear_alpn01(name),
        SharedAcme::Certificate { .. } => {}
    }
}

/// Writes `cert` and `key` (PEM) as `listener`'s in `acme.store`.
fn persist(acme: &Acme, listener: &str, cert: &str, key: &str) -> Result<(), OrderError> {
    open_store(&acme.store)?;
    let (crt_path, key_path) = cert_paths(acme, listener);
    // The key first: a certificate is never on disk without the key it was issued for.
    write_secret(&key_path, key.as_bytes())?;
    write_secret(&crt_path, cert.as_bytes())
}

/// When `cert` is to be renewed (now when its validity cannot be read).
fn renewal(cert: &LoadedCert) -> u64 {
    cert.key
        .cert
        .first()
        .and_then(|c| validity(c))
        .map(|(b, a)| renew_at(b, a))
        // Unreadable validity (a CA's odd encoding): served, and looked at again in a day.
        .unwrap_or_else(|| now() + 86_400)
}

/// Where `listener`'s certificate and key from `acme.directory` are kept: another CA (say
/// from staging to production) does not find the first one's.
fn cert_paths(acme: &Acme, listener: &str) -> (PathBuf, PathBuf) {
    let ca = directory_id(&acme.directory);
    (
        acme.store.join(format!("{listener}.{ca}.crt")),
        acme.store.join(format!("{listener}.{ca}.key")),
    )
}

/// A short stable name of an ACME directory URL, in file names.
fn directory_id(directory: &str) -> String {
    blake3::hash(directory.as_bytes()).to_hex()[..16].to_string()
}

/// The certificate kept for `listener`, when it is still for `names` (a damaged one is
/// logged and ordered again).
fn kept(acme: &Acme, listener: &str) -> Option<LoadedCert> {
    let names = &acme.names;
    let (crt, key) = cert_paths(acme, listener);
    if !crt.exists() {
        return None;
    }
    match load(&crt, &key) {
        Ok(c) if covers_all(&c.names, names) => Some(c),
        Ok(c) => {
            info!(listener, have = ?c.names, want = ?names, "the kept ACME certificate is for other names: ordering anew");
            None
        }
        Err((_, e)) => {
            warn!(listener, error = %e, "the kept ACME certificate cannot be used: ordering anew");
            None
        }
    }
}

/// The store directory, made 0700 if missing.
fn open_store(store: &Path) -> Result<(), OrderError> {
    crate::ca::private_dir(store).map_err(|e| OrderError::Store(e.to_string()))
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), OrderError> {
    crate::ca::write_file(path, bytes, 0o600).map_err(|e| OrderError::Store(e.to_string()))
}

/// The account for `acme.directory`: kept credentials, else a new account, registered and
/// then written (if that write fails, the next order registers another).
async fn account(
    acme: &Acme,
    accounts: &mut HashMap<(PathBuf, String), Account>,
) -> Result<Account, OrderError> {
    let id = (acme.store.clone(), acme.directory.clone());
    if let Some(a) = accounts.get(&id) {
        return Ok(a.clone());
    }
    open_store(&acme.store)?;
    let tls = ClientTls::farm(&acme.trust, None).map_err(|e| OrderError::Store(e.to_string()))?;
    let http = || Box::new(http::AcmeHttp::new(tls.clone()));
    let file = acme
        .store
        .join(format!("account-{}.json", directory_id(&acme.directory)));
    let account = match std::fs::read(&file) {
        Ok(bytes) => {
            let creds: AccountCredentials = serde_json::from_slice(&bytes).map_err(|e| {
                OrderError::Store(format!(
                    "{} is damaged ({e}): remove it to register a new account",
                    file.display()
                ))
            })?;
            Account::builder_with_http(http())
                .from_credentials(creds)
                .await?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let contact: Vec<&str> = acme.contact.iter().map(String::as_str).collect();
            let (account, creds) = Account::builder_with_http(http())
                .create(
                    &NewAccount {
                        contact: &contact,
                        terms_of_service_agreed: true,
                        only_return_existing: false,
                    },
                    acme.directory.clone(),
                    None,
                )
                .await?;
            let json = serde_json::to_vec(&creds)
                .map_err(|e| OrderError::Store(format!("account credentials: {e}")))?;
            write_secret(&file, &json)?;
            info!(directory = %acme.directory, account = account.id(), "ACME account registered");
            account
        }
        Err(e) => {
            return Err(OrderError::Store(format!(
                "cannot read {}: {e}",
                file.display()
            )))
        }
    };
    accounts.insert(id, account.clone());
    Ok(account)
}

/// The challenge answers an order put up, taken down however the order ends (here, and
/// from the other appliances).
struct Answers<'a> {
    state: &'a AcmeState,
    items: Vec<SharedAcme>,
    shared: Option<Arc<dyn HubStore>>,
}

impl Drop for Answers<'_> {
    fn drop(&mut self) {
        for item in &self.items {
            forget_answer(self.state, item);
        }
        if let Some(store) = self.shared.clone() {
            let items = std::mem::take(&mut self.items);
            tokio::task::spawn_blocking(move || {
                for item in &items {
                    let _ = store.unshare_acme(item);
                }
            });
        }
    }
}

/// Orders a certificate for `w`'s names, answers its challenges, writes it and its key to
/// the store and returns it loaded.
async fn order(
    w: &Wanted,
    state: &AcmeState,
    accounts: &mut HashMap<(PathBuf, String), Account>,
    shared: Option<&Arc<dyn HubStore>>,
) -> Result<(LoadedCert, SharedAcme), OrderError> {
    let acme = &w.acme;
    let account = account(acme, accounts).await?;
    let identifiers: Vec<Identifier> = acme.names.iter().cloned().map(Identifier::Dns).collect();
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    info!(listener = %w.listener, names = ?acme.names, challenge = acme.challenge.as_str(), "ACME order placed");
    let mut answers = Answers {
        state,
        items: Vec::new(),
        shared: shared.cloned(),
    };
    let until = now() + VALIDATION_TIMEOUT.as_secs() * 2;
    let kind = match acme.challenge {
        Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        Challenge::Http01 => ChallengeType::Http01,
    };
    let mut ready = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(a) = authorizations.next().await {
        let mut a = a?;
        match a.status {
            AuthorizationStatus::Valid => continue,
            AuthorizationStatus::Pending => {}
            other => {
                return Err(OrderError::Protocol(format!(
                    "an authorization is {other:?}, not pending"
                )))
            }
        }
        let challenge = a.challenge(kind.clone()).ok_or_else(|| {
            OrderError::Protocol(format!(
                "the CA offers no {} challenge",
                acme.challenge.as_str()
            ))
        })?;
        let name = match challenge.identifier().identifier {
            Identifier::Dns(d) => d.clone(),
            other => {
                return Err(OrderError::Protocol(format!(
                    "an authorization is for {other:?}, not a DNS name"
                )))
            }
        };
        let key_authorization = challenge.key_authorization();
        let item = match acme.challenge {
            Challenge::Http01 => {
                state.set_http01(&challenge.token, key_authorization.as_str());
                SharedAcme::Http01 {
                    token: challenge.token.clone(),
                    key_authorization: key_authorization.as_str().to_string(),
                    until,
                }
            }
            Challenge::TlsAlpn01 => {
                let digest = key_authorization.digest();
                state.set_alpn01(&name, validation_cert(&name, digest.as_ref())?);
                SharedAcme::TlsAlpn01 {
                    name,
                    digest: crate::ca::hex(digest.as_ref()),
                    until,
                }
            }
        };
        answers.items.push(item);
        ready.push(challenge.url.clone());
    }
    if let Some(s) = shared {
        // Every appliance the CA may reach answers: the answers are shared before the CA is
        // told to look, and given a moment to arrive (the others follow them by a watch).
        for item in &answers.items {
            // An appliance without the answer would fail the validation, which the CA counts:
            // better not to ask it to look.
            share(s, item.clone()).await.map_err(|e| {
                OrderError::Store(format!("the challenge answers could not be shared: {e}"))
            })?;
        }
        tokio::time::sleep(SHARE_SETTLE).await;
    }
    let mut authorizations = order.authorizations();
    while let Some(a) = authorizations.next().await {
        let mut a = a?;
        if a.status != AuthorizationStatus::Pending {
            continue;
        }
        if let Some(mut challenge) = a.challenge(kind.clone()) {
            if ready.contains(&challenge.url) {
                challenge.set_ready().await?;
            }
        }
    }
    let retries = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(VALIDATION_TIMEOUT);
    let status = order.poll_ready(&retries).await?;
    drop(answers);
    if status != OrderStatus::Ready {
        return Err(OrderError::Protocol(format!(
            "the order is {status:?} after validation: the CA could not reach this appliance for every name (TLS-ALPN-01 needs port 443 of this listener, HTTP-01 port 80 of a plain one)"
        )));
    }
    let key_pem = order.finalize().await?;
    let chain_pem = order.poll_certificate(&retries).await?;
    let cert = from_pem(
        chain_pem.as_bytes(),
        key_pem.as_bytes(),
        "issued",
        "generated",
    )
    .map_err(|(_, e)| OrderError::Protocol(format!("the CA's certificate: {e}")))?;
    if let Err(e) = persist(acme, &w.listener, &chain_pem, &key_pem) {
        // Issued all the same: in use now; a restart orders again.
        warn!(listener = %w.listener, error = %e, "the ACME certificate is in use but not kept");
    }
    let item = SharedAcme::Certificate {
        listener: w.listener.clone(),
        cert: chain_pem,
        key: key_pem,
    };
    Ok((cert, item))
}

/// The TLS-ALPN-01 certificate of `name` (RFC 8737 §3): self-signed, for `name` only, with
/// the critical acmeIdentifier extension holding the SHA-256 of the key authorization.
fn validation_cert(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, OrderError> {
    let bad = |e: rcgen::Error| OrderError::Protocol(format!("validation certificate: {e}"));
    let key = rcgen::KeyPair::generate().map_err(bad)?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(bad)?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(bad)?;
    let der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signer = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| OrderError::Protocol(format!("validation key: {e}")))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signer,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_two_thirds_of_the_lifetime() {
        assert_eq!(renew_at(0, 90 * 86_400), 60 * 86_400);
        assert_eq!(renew_at(1_000, 1_030), 1_020);
        // A certificate that ends before it starts is renewed at once (at its start).
        assert_eq!(renew_at(1_000, 10), 1_000);
    }

    #[test]
    fn backs_off_from_a_minute_doubling_to_an_hour() {
        assert_eq!(backoff(1), Duration::from_secs(60));
        assert_eq!(backoff(2), Duration::from_secs(120));
        assert_eq!(backoff(6), Duration::from_secs(1920));
        assert_eq!(backoff(7), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
        assert_eq!(backoff(0), Duration::from_secs(60));
    }

    #[test]
    fn a_certificate_covers_the_names_it_lists() {
        let have = vec!["a.test".to_string(), "b.test".to_string()];
        assert!(covers_all(&have, &["b.test".to_string()]));
        assert!(!covers_all(&have, &["c.test".to_string()]));
    }

    #[test]
    fn the_validation_certificate_carries_the_digest_critically() {
        let digest = [7u8; 32];
        let key = validation_cert("www.farm.test", &digest).unwrap();
        let der = key.cert[0].as_ref();
        // id-pe-acmeIdentifier (1.3.6.1.5.5.7.1.31), critical, OCTET STRING of the digest.
        let oid = [0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x1f];
        let at = der
            .windows(oid.len())
            .position(|w| w == oid)
            .expect("acmeIdentifier");
        let rest = &der[at + oid.len()..];
        assert_eq!(&rest[..3], &[0x01, 0x01, 0xff], "critical");
        assert!(rest.windows(32).any(|w| w == digest));
    }
}
