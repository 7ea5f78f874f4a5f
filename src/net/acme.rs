//! What ACME ordering (`crate::acme`) shares with the listeners: the certificate ordered for
//! each listener, swapped in without a reload (the SNI resolver reads it at every handshake),
//! and the answers to the CA's challenges while an order is open — the key authorization of
//! an HTTP-01 token, served by the proxy at `/.well-known/acme-challenge/TOKEN` (RFC 8555
//! §8.3), and the TLS-ALPN-01 certificate of a name, offered only to a client that asks for
//! ALPN `acme-tls/1` (RFC 8737), whose connection then closes after the handshake.
//!
//! Only the ordering task writes here, one answer per name of an open order: the maps are
//! bounded by the names configured.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;

use crate::config::tls::LoadedCert;

/// The ALPN protocol of TLS-ALPN-01 validation.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The path under which HTTP-01 tokens are fetched.
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// Ordered certificates and open challenges (see the module documentation).
#[derive(Default)]
pub struct AcmeState {
    /// The certificate in use for each ACME listener, by listener name.
    certs: ArcSwap<HashMap<String, Arc<LoadedCert>>>,
    /// HTTP-01: token → key authorization.
    http01: Mutex<HashMap<String, String>>,
    /// TLS-ALPN-01: name → its validation certificate.
    alpn01: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    /// How ordering goes, by listener, for the admin API.
    status: Mutex<HashMap<String, Ordering>>,
}

/// How ordering a listener's certificate goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ordering {
    /// Why the last order failed (cleared by one that succeeds).
    pub error: Option<String>,
    /// When the next order is due, seconds since the epoch.
    pub next_order: u64,
}

impl std::fmt::Debug for AcmeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeState")
            .field("listeners", &self.certs.load().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks leaves a map that is still whole.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl AcmeState {
    /// Puts `cert` in use on listener `listener` (new handshakes take it at once).
    pub fn install(&self, listener: &str, cert: LoadedCert) {
        let cert = Arc::new(cert);
        self.certs.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(listener.to_string(), cert.clone());
            m
        });
    }

    /// The certificate in use on `listener`, if one was ordered (or found in the store).
    pub fn certificate(&self, listener: &str) -> Option<Arc<LoadedCert>> {
        self.certs.load().get(listener).cloned()
    }

    /// Every listener's certificate in use.
    pub fn certificates(&self) -> Arc<HashMap<String, Arc<LoadedCert>>> {
        self.certs.load_full()
    }

    /// Answers HTTP-01 `token` with `key_authorization` until [`AcmeState::clear_http01`].
    pub fn set_http01(&self, token: &str, key_authorization: &str) {
        locked(&self.http01).insert(token.to_string(), key_authorization.to_string());
    }

    /// Stops answering `token`.
    pub fn clear_http01(&self, token: &str) {
        locked(&self.http01).remove(token);
    }

    /// The key authorization of HTTP-01 `token`, while its order is open.
    pub fn http01(&self, token: &str) -> Option<String> {
        locked(&self.http01).get(token).cloned()
    }

    /// Offers `key` to TLS-ALPN-01 validation of `name` until [`AcmeState::clear_alpn01`].
    pub fn set_alpn01(&self, name: &str, key: Arc<CertifiedKey>) {
        locked(&self.alpn01).insert(name.to_string(), key);
    }

    /// Stops offering a validation certificate for `name`.
    pub fn clear_alpn01(&self, name: &str) {
        locked(&self.alpn01).remove(name);
    }

    /// Records why the last order for `listener` failed (`None`: it succeeded).
    pub fn set_error(&self, listener: &str, error: Option<String>) {
        locked(&self.status)
            .entry(listener.to_string())
            .or_default()
            .error = error;
    }

    /// Records when the next order for `listener` is due.
    pub fn set_next_order(&self, listener: &str, at: u64) {
        locked(&self.status)
            .entry(listener.to_string())
            .or_default()
            .next_order = at;
    }

    /// How ordering for `listener` goes, once the ordering task has looked at it.
    pub fn status(&self, listener: &str) -> Option<Ordering> {
        locked(&self.status).get(listener).cloned()
    }

    /// The TLS-ALPN-01 validation certificate of `name`, while its order is open.
    pub fn alpn01(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        locked(&self.alpn01).get(name).cloned()
    }
}
