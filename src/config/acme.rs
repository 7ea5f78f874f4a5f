//! A TLS listener's `tls.acme:` checked into [`Acme`]: certificates ordered from an ACME CA
//! (RFC 8555) for the listener's names, proven by TLS-ALPN-01 on the listener itself
//! (RFC 8737) or by HTTP-01 on the appliance's plain listeners.
//!
//! The names default to every host routed through the listener ([`default_names`]); a
//! wildcard host cannot be proven by either challenge and is refused with the fix.

use std::path::PathBuf;

use serde_saphyr::Spanned;

use super::check::Ctx;
use super::error::{ConfigError, Pos};
use super::raw::RawAcme;
use super::tls::{load_trust, FarmTrust};
use super::Listener;
use crate::router::route::{HostMatch, Route};

/// Where the CAs a public ACME directory is checked against are on Debian
/// (`ca-certificates`).
pub const DEFAULT_CA: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Where the account key and the certificates are kept (the unit's `StateDirectory`).
pub const DEFAULT_STORE: &str = "/var/lib/lockstep/acme";

/// Most names one listener orders a certificate for (Let's Encrypt's limit per order).
pub const MAX_NAMES: usize = 100;

/// How the CA is shown that the appliance answers for a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// A certificate for the name, offered with ALPN `acme-tls/1` on this TLS listener (port
    /// 443 for a public CA).
    TlsAlpn01,
    /// A token at `/.well-known/acme-challenge/` on the plain listeners (port 80).
    Http01,
}

impl Challenge {
    /// As written in the config and RFC 8555.
    pub fn as_str(self) -> &'static str {
        match self {
            Challenge::TlsAlpn01 => "tls-alpn-01",
            Challenge::Http01 => "http-01",
        }
    }
}

/// A listener's ACME settings.
#[derive(Debug, Clone)]
pub struct Acme {
    /// The CA's directory URL (`https://`).
    pub directory: String,
    /// Contact URIs of the account (`mailto:`).
    pub contact: Vec<String>,
    /// The names of the certificate (lowercase, no wildcard); never empty once checked.
    pub names: Vec<String>,
    /// The challenge the CA is answered with.
    pub challenge: Challenge,
    /// The file of the CAs the directory's own certificate is checked against.
    pub ca: PathBuf,
    /// Those CAs.
    pub trust: FarmTrust,
    /// Directory of the account key and certificates (made 0700, files 0600).
    pub store: PathBuf,
}

/// Checks `tls.acme:` of listener `listener` (at `at`); `names` stays empty when not given,
/// for [`default_names`].
pub(super) fn acme(cx: &mut Ctx<'_>, raw: &RawAcme, listener: &str, at: Pos) -> Option<Acme> {
    let errors = cx.errors.len();
    let directory = raw.directory.value.trim().to_string();
    match directory.parse::<http::Uri>() {
        Ok(u) if u.scheme_str() == Some("https") && u.host().is_some() => {}
        _ => cx.err(
            &raw.directory,
            format!("acme.directory `{directory}` must be the CA's https:// directory URL, e.g. https://acme-v02.api.letsencrypt.org/directory"),
        ),
    }
    let mut contact = Vec::new();
    for c in raw.contact.iter().flatten() {
        let v = c.value.trim();
        let ok = v
            .strip_prefix("mailto:")
            .is_some_and(|a| a.contains('@') && !a.contains(char::is_whitespace));
        if ok {
            contact.push(v.to_string());
        } else {
            cx.err(
                c,
                format!("acme.contact `{v}` must be a mailto: URI, e.g. mailto:ops@example.com"),
            );
        }
    }
    let mut names = Vec::new();
    for n in raw.names.iter().flatten() {
        if let Some(name) = orderable(cx, n) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    if let Some(first) = raw.names.as_ref().and_then(|n| n.get(MAX_NAMES)) {
        cx.err(
            first,
            format!(
                "acme.names: at most {MAX_NAMES} names per certificate: split them over listeners"
            ),
        );
    }
    if raw.names.as_ref().is_some_and(Vec::is_empty) {
        cx.errors.push(ConfigError::at(
            cx.file,
            at,
            format!("listener `{listener}`: acme.names is empty: list the names, or leave the key out for every host routed through the listener"),
        ));
    }
    let challenge = match raw.challenge.as_ref().map(|c| c.value.trim()) {
        None | Some("tls-alpn-01") => Challenge::TlsAlpn01,
        Some("http-01") => Challenge::Http01,
        Some(other) => {
            if let Some(c) = &raw.challenge {
                cx.err(c, format!("acme.challenge `{other}` is not known: use tls-alpn-01 (answered on this listener) or http-01 (answered on a plain listener)"));
            }
            Challenge::TlsAlpn01
        }
    };
    let ca_path = match &raw.ca {
        Some(c) => cx.path_at(c, "acme.ca"),
        None => Some(PathBuf::from(DEFAULT_CA)),
    };
    let trust = ca_path.clone().and_then(|p| match load_trust(&p, None) {
        Ok(t) => Some(t),
        Err((_, e)) => {
            let fix =
                "give `acme.ca:` the CA certificates (PEM) that signed the directory's certificate";
            match &raw.ca {
                Some(c) => cx.err(c, format!("acme.ca: {e}")),
                None => cx.errors.push(ConfigError::at(
                    cx.file,
                    at,
                    format!("listener `{listener}`: acme: {e}: install ca-certificates, or {fix}"),
                )),
            }
            None
        }
    });
    let store = match &raw.store {
        Some(s) => cx.path_at(s, "acme.store"),
        None => Some(PathBuf::from(DEFAULT_STORE)),
    };
    if cx.errors.len() != errors {
        return None;
    }
    Some(Acme {
        directory,
        contact,
        names,
        challenge,
        ca: ca_path?,
        trust: trust?,
        store: store?,
    })
}

/// A name a certificate can be ordered for by HTTP-01 or TLS-ALPN-01: a DNS name, lowercase,
/// no wildcard, no address.
fn orderable(cx: &mut Ctx<'_>, n: &Spanned<String>) -> Option<String> {
    match HostMatch::parse(n.value.trim()) {
        Ok(HostMatch::Exact(name))
            if !name.starts_with('[')
                && name.parse::<std::net::IpAddr>().is_err()
                && name.contains('.') =>
        {
            Some(name)
        }
        Ok(HostMatch::Suffix(_)) => {
            cx.err(n, format!("acme.names `{}`: a wildcard can only be proven by DNS-01, which lockstep does not answer: list the names", n.value));
            None
        }
        Ok(_) => {
            cx.err(n, format!("acme.names `{}`: an ACME CA issues for registered DNS names (with a dot), not addresses or single labels", n.value));
            None
        }
        Err(e) => {
            cx.err(n, format!("acme.names `{}`: {e}", n.value));
            None
        }
    }
}

/// For each ACME listener without `names:`, every exact host of the routes its requests can
/// take; a wildcard route host, or no host at all, is an error at the listener (the fix:
/// list the names). Also checks that HTTP-01 has a plain listener to be answered on.
pub(super) fn default_names(
    cx: &mut Ctx<'_>,
    listeners: &mut [Listener],
    routes: &[Route],
    at: &[(String, Pos)],
) {
    let has_plain = listeners.iter().any(|l| l.tls.is_none());
    for l in listeners.iter_mut() {
        let name = l.name.clone();
        let pos = at
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| *p)
            .unwrap_or_default();
        let Some(acme) = l.acme.as_mut() else {
            continue;
        };
        if acme.challenge == Challenge::Http01 && !has_plain {
            cx.errors.push(ConfigError::at(cx.file, pos, format!("listener `{name}`: acme.challenge http-01 is answered on a plain (non-TLS) listener on port 80, and there is none: add one, or use tls-alpn-01")));
        }
        if !acme.names.is_empty() {
            continue;
        }
        let mut wildcards = Vec::new();
        for r in routes
            .iter()
            .filter(|r| r.listeners.is_empty() || r.listeners.contains(&name))
        {
            match &r.host {
                Some(HostMatch::Exact(h))
                    if !acme.names.contains(h)
                        && h.contains('.')
                        && h.parse::<std::net::IpAddr>().is_err()
                        && !h.starts_with('[') =>
                {
                    acme.names.push(h.clone())
                }
                Some(HostMatch::Suffix(s)) => wildcards.push(format!("*{s}")),
                _ => {}
            }
        }
        if !wildcards.is_empty() {
            cx.errors.push(ConfigError::at(cx.file, pos, format!("listener `{name}`: acme without names would order for every host routed through it, but {} cannot be proven by HTTP-01 or TLS-ALPN-01: list the names under acme.names", wildcards.join(", "))));
        } else if acme.names.is_empty() {
            cx.errors.push(ConfigError::at(cx.file, pos, format!("listener `{name}`: acme has no names: no route through this listener names a host; list them under acme.names")));
        } else if acme.names.len() > MAX_NAMES {
            cx.errors.push(ConfigError::at(cx.file, pos, format!("listener `{name}`: acme would order one certificate for {} names (most {MAX_NAMES}): list the names under acme.names, or split the listener", acme.names.len())));
        }
    }
}
