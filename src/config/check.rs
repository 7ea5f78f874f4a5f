//! The one context every config check writes into (the appliance's `lockstep.yaml` and the
//! agent's `agent.yaml`): the file being checked, the problems found so far, and the readers
//! of values every section shares (durations, addresses, paths, publisher key files).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde_saphyr::Spanned;

use super::duration;
use super::error::{ConfigError, Pos};
use crate::sync::sign::{read_public_key, TrustedKeys};

/// Highest `max_connections` accepted anywhere: a million file descriptors is where the
/// appliance's unit puts `LimitNOFILE`.
pub const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;

/// The file being checked and the problems found so far.
pub struct Ctx<'a> {
    /// The file being checked.
    pub file: &'a Path,
    /// The problems found so far, in the order found.
    pub errors: Vec<ConfigError>,
}

impl<'a> Ctx<'a> {
    /// Starts checking `file`.
    pub fn new(file: &'a Path) -> Ctx<'a> {
        Ctx {
            file,
            errors: Vec::new(),
        }
    }

    /// A non-empty path as written at `v`, relative ones against the config file's directory.
    pub fn path_at(&mut self, v: &Spanned<String>, key: &str) -> Option<PathBuf> {
        if v.value.trim().is_empty() {
            self.err(v, format!("{key} is empty: write a path"));
            return None;
        }
        Some(self.path(&v.value))
    }

    /// The publisher keys of a list of public key files (`key`: its name in messages), each
    /// read and checked at its own line; an empty list is refused (it would trust nothing).
    pub fn public_keys(&mut self, list: &Spanned<Vec<Spanned<String>>>, key: &str) -> TrustedKeys {
        if list.value.is_empty() {
            self.err(
                list,
                format!("{key} is empty: list the publishers' public key files (`lockstep keygen` writes KEY.pub), or remove the key"),
            );
        }
        let mut keys = Vec::new();
        for file in &list.value {
            let Some(path) = self.path_at(file, key) else {
                continue;
            };
            match read_public_key(&path) {
                Ok(k) => keys.push(k),
                Err(e) => self.err(file, format!("{key}: {e}")),
            }
        }
        TrustedKeys::new(keys)
    }

    /// Records a problem at `at`'s line and column.
    pub fn err<T>(&mut self, at: &Spanned<T>, msg: impl Into<String>) {
        self.errors
            .push(ConfigError::at(self.file, Pos::of(at), msg));
    }

    /// A duration key, `default` when absent; zero and unparsable values are refused.
    pub fn duration(
        &mut self,
        v: &Option<Spanned<String>>,
        default: Duration,
        what: &str,
    ) -> Duration {
        let d = self.any_duration(v, default, what);
        match v {
            Some(v) if d.is_zero() => {
                self.err(v, format!("{what} must be longer than 0"));
                default
            }
            _ => d,
        }
    }

    /// A connection cap (`max_connections`): `default` when absent; 0 and values past
    /// [`MAX_CONNECTIONS_LIMIT`] are refused.
    pub fn connections(&mut self, v: &Option<Spanned<u32>>, default: usize, what: &str) -> usize {
        let Some(v) = v else { return default };
        if v.value == 0 || v.value as usize > MAX_CONNECTIONS_LIMIT {
            self.err(
                v,
                format!(
                    "{what} is {}: give between 1 and {MAX_CONNECTIONS_LIMIT} (default {default}); each connection costs a file descriptor (two through the proxy), so also raise LimitNOFILE past it",
                    v.value
                ),
            );
            return default;
        }
        v.value as usize
    }

    /// A duration key that may be zero, `default` when absent; unparsable values are refused.
    pub fn any_duration(
        &mut self,
        v: &Option<Spanned<String>>,
        default: Duration,
        what: &str,
    ) -> Duration {
        let Some(v) = v else { return default };
        match duration::parse(&v.value) {
            Ok(d) => d,
            Err(e) => {
                self.err(v, format!("{what}: {e}"));
                default
            }
        }
    }

    /// An `ip:port` value.
    pub fn socket_addr(&mut self, v: &Spanned<String>, what: &str) -> Option<SocketAddr> {
        match SocketAddr::from_str(v.value.trim()) {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    v,
                    format!(
                        "{what} `{}` is not an ip:port address: write e.g. \"0.0.0.0:80\" or \"[::]:443\"",
                        v.value
                    ),
                );
                None
            }
        }
    }

    /// A path as written, relative ones against the config file's directory.
    pub fn path(&self, v: &str) -> PathBuf {
        let p = PathBuf::from(v);
        if p.is_absolute() {
            p
        } else {
            self.file.parent().unwrap_or(Path::new(".")).join(p)
        }
    }
}
