//! Who calls the sync plane (the hub's API, an agent's write and peer API), and whether it may
//! do what it asks as the party it is.
//!
//! A caller is identified once per request: by the farm-CA certificate its TLS connection
//! presented (verified, revocation included, by rustls before any byte of HTTP), which names
//! one party ([`Identity`]); or, from loopback only, by a bearer token (tests, the demo, a farm
//! of one on one host). Off loopback a request without a certificate is refused, token or not.
//! A party acts only as itself: an agent reports, sends changesets and registers its `serve`
//! address under its own name and no other. Pure: no I/O.

use std::fmt;

use rustls_pki_types::CertificateDer;

use super::auth::{Check, Role, Tokens};
use super::identity::{Identity, Kind, Revocations};

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A party named by its certificate.
    Party(Identity),
    /// A loopback caller with the role's token (or a loopback hub whose role has none): it
    /// may act for any agent, as the one shared token always could.
    Local,
    /// Anyone, on an endpoint open to all (the farm CA's certificate, joining with a token).
    Public,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Party(id) => id.fmt(f),
            Caller::Local => f.write_str("a loopback token holder"),
            Caller::Public => f.write_str("an unidentified caller"),
        }
    }
}

/// Why a request is refused before it does anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No usable credential: 401.
    Unauthenticated(String),
    /// A known caller that may not do this: 403.
    Forbidden {
        /// What was refused, for the answer and the log.
        message: String,
        /// For the metric: `role` (its kind may not use the endpoint), `identity` (it tried
        /// to act as another party) or `certificate` (it names no party).
        reason: &'static str,
    },
}

impl Refusal {
    fn forbidden(reason: &'static str, message: String) -> Refusal {
        Refusal::Forbidden { message, reason }
    }
}

/// Identifies the caller of an endpoint open to `roles`.
///
/// `cert`: the client certificate of the connection, if any (checked against `revoked` again:
/// the connection may predate a revocation); `loopback`: whether the peer address is a loopback
/// one; `authorization`: the `Authorization` header.
pub fn identify(
    cert: Option<&CertificateDer<'_>>,
    revoked: &Revocations,
    loopback: bool,
    tokens: &Tokens,
    authorization: Option<&str>,
    roles: &[Role],
) -> Result<Caller, Refusal> {
    if roles.is_empty() {
        return Ok(Caller::Public);
    }
    if let Some(cert) = cert {
        if revoked.revoked(cert) {
            return Err(Refusal::Unauthenticated(
                "this certificate is revoked".into(),
            ));
        }
        let id = Identity::of_cert(cert)
            .map_err(|e| Refusal::forbidden("certificate", e.to_string()))?;
        return match id.kind.role() {
            Some(role) if roles.contains(&role) => Ok(Caller::Party(id)),
            _ => Err(Refusal::forbidden(
                "role",
                format!(
                    "{id} may not do this (it needs the role of {})",
                    names(roles)
                ),
            )),
        };
    }
    if !loopback {
        return Err(Refusal::Unauthenticated(
            "present a client certificate issued by the farm CA (`lockstep ca issue`): bearer tokens are accepted from loopback only".into(),
        ));
    }
    match tokens.check(authorization, roles) {
        Check::Allow => Ok(Caller::Local),
        Check::Unauthenticated => Err(Refusal::Unauthenticated(
            "missing or unknown bearer token".into(),
        )),
        Check::Forbidden => Err(Refusal::forbidden(
            "role",
            "this token may not do that".into(),
        )),
    }
}

fn names(roles: &[Role]) -> String {
    let words: Vec<&str> = roles
        .iter()
        .map(|r| match r {
            Role::Agent => "an agent",
            Role::Publish => "a publisher",
            Role::Hub => "a hub",
        })
        .collect();
    words.join(" or ")
}

impl Caller {
    /// Whether the caller may act as the agent `name` (report, send its changesets, register
    /// its serve address).
    pub fn act_as_agent(&self, name: &str) -> Result<(), Refusal> {
        match self {
            Caller::Local => Ok(()),
            Caller::Party(id) if id.kind == Kind::Agent && id.name == name => Ok(()),
            Caller::Party(id) => Err(Refusal::forbidden(
                "identity",
                format!("{id} may act only as itself, not as agent {name}"),
            )),
            Caller::Public => Err(Refusal::Unauthenticated(format!(
                "only agent {name} may do that"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const AGENT: &[Role] = &[Role::Agent];
    const PUBLISH: &[Role] = &[Role::Publish];
    const READ: &[Role] = &[Role::Agent, Role::Publish];

    fn tokens() -> Tokens {
        Tokens {
            agent: Some("a".into()),
            publish: Some("p".into()),
        }
    }

    fn none() -> Revocations {
        Revocations::default()
    }

    fn party(kind: Kind, name: &str) -> Caller {
        Caller::Party(Identity::new(kind, name).unwrap())
    }

    #[test]
    fn tokens_count_from_loopback_only() {
        let t = tokens();
        assert_eq!(
            identify(None, &none(), true, &t, Some("Bearer a"), AGENT),
            Ok(Caller::Local)
        );
        assert!(matches!(
            identify(None, &none(), false, &t, Some("Bearer a"), AGENT),
            Err(Refusal::Unauthenticated(_))
        ));
        assert!(matches!(
            identify(None, &none(), true, &t, Some("Bearer x"), AGENT),
            Err(Refusal::Unauthenticated(_))
        ));
        assert!(matches!(
            identify(None, &none(), true, &t, Some("Bearer a"), PUBLISH),
            Err(Refusal::Forbidden { reason: "role", .. })
        ));
        // No tokens at all: a loopback hub is open to loopback callers, and only to them.
        let open = Tokens::default();
        assert_eq!(
            identify(None, &none(), true, &open, None, READ),
            Ok(Caller::Local)
        );
        assert!(identify(None, &none(), false, &open, None, READ).is_err());
    }

    #[test]
    fn an_agent_acts_only_as_itself() {
        let web2 = party(Kind::Agent, "web-2");
        assert_eq!(web2.act_as_agent("web-2"), Ok(()));
        let refused = web2.act_as_agent("web-1").unwrap_err();
        assert!(
            matches!(&refused, Refusal::Forbidden { reason: "identity", message } if message.contains("agent web-2") && message.contains("web-1")),
            "{refused:?}"
        );
        // A publisher named web-1 is not the agent web-1.
        assert!(party(Kind::Publisher, "web-1")
            .act_as_agent("web-1")
            .is_err());
        assert_eq!(Caller::Local.act_as_agent("anyone"), Ok(()));
    }

    #[test]
    fn a_certificate_without_a_party_is_refused() {
        let not_a_cert = CertificateDer::from(vec![1, 2, 3]);
        assert!(matches!(
            identify(
                Some(&not_a_cert),
                &none(),
                true,
                &tokens(),
                Some("Bearer a"),
                AGENT
            ),
            Err(Refusal::Forbidden {
                reason: "certificate",
                ..
            })
        ));
    }
}
