//! What the hub is given besides its store: the settings a reload may change (activation
//! rules, tokens, collection, report expiry, trusted keys) and its clock, injected so tests can move time. Reads no clock
//! itself except in [`system_clock`], the real one.

use std::sync::Arc;
use std::time::Duration;

use crate::config::sync::Sync as SyncConfig;
use crate::sync::auth::Tokens;
use crate::sync::gc::Gc;
use crate::sync::identity::Revocations;
use crate::sync::schedule::Rules;
use crate::sync::sign::TrustedKeys;

/// The hub's clock: µs since the Unix epoch (injected so tests can move time).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(crate::sync::clock::wall_us)
}

/// Settings a reload may change.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Activation times.
    pub rules: Rules,
    /// Accepted tokens.
    pub tokens: Tokens,
    /// Collection of unused releases and blobs.
    pub gc: Gc,
    /// How long an agent's report counts after it arrived.
    pub report_expiry: Duration,
    /// The farm CA's directory: agents may join with a one-time token.
    pub ca_dir: Option<std::path::PathBuf>,
    /// Revoked client certificates, refused on connections made before the revocation too.
    pub revoked: Arc<Revocations>,
    /// Publisher keys one of which must have signed a committed release (`None`: any
    /// release may be committed; agents check signatures either way).
    pub trusted_keys: Option<TrustedKeys>,
    /// Most bytes of uploads not yet named by a release ([`super::uploads`]).
    pub upload_quota: u64,
}

impl Settings {
    /// [`Settings::report_expiry`] in µs.
    pub fn report_expiry_us(&self) -> u64 {
        u64::try_from(self.report_expiry.as_micros()).unwrap_or(u64::MAX)
    }

    /// From the checked `sync:` section.
    pub fn from_config(c: &SyncConfig) -> Settings {
        Settings {
            rules: Rules::new(c.cadence, c.lead),
            tokens: c.tokens.clone(),
            gc: c.gc,
            report_expiry: c.report_expiry,
            ca_dir: c.tls.as_ref().and_then(|t| t.ca_dir.clone()),
            revoked: Arc::new(Revocations::new(
                c.tls
                    .as_ref()
                    .and_then(|t| t.clients.as_ref())
                    .map_or(&[][..], |c| &c.crls),
            )),
            trusted_keys: c.trusted_keys.clone(),
            upload_quota: c.upload_quota,
        }
    }
}
