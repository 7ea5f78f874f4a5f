//! Bearer tokens of the sync API: the agent token reads, reports and advances cycles; the
//! publish token publishes (and reads). Compared in constant time.

use std::path::Path;

/// What a request's token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An agent: read, report, advance.
    Agent,
    /// A publisher: publish, roll back, read.
    Publish,
    /// Another hub of the farm (`sync.cluster`): read, and ask for a release's blobs. Only by
    /// its farm certificate: there is no hub token, so this role is never open.
    Hub,
}

/// The tokens a hub accepts. A role without a token is open to anyone who can reach the
/// listener (logged at start).
#[derive(Clone, Default)]
pub struct Tokens {
    /// The agents' token.
    pub agent: Option<String>,
    /// The publishers' token.
    pub publish: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens(redacted)")
    }
}

/// The outcome of checking a request's `Authorization` header for a role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Allowed.
    Allow,
    /// No token, or one the hub does not know: 401.
    Unauthenticated,
    /// A known token whose role may not do this: 403.
    Forbidden,
}

/// Equality that takes the same time wherever the inputs differ (blake3's `Hash` compares in
/// constant time, and hashing hides the length).
fn same(a: &str, b: &str) -> bool {
    blake3::hash(a.as_bytes()) == blake3::hash(b.as_bytes())
}

/// Whether `authorization` (an `Authorization` header's value) is `Bearer <expected>`,
/// compared in constant time.
pub fn bearer_matches(expected: &str, authorization: Option<&str>) -> bool {
    authorization
        .and_then(|a| a.strip_prefix("Bearer "))
        .is_some_and(|t| same(expected, t.trim()))
}

/// A secret read from a file (a token): compared, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

impl Tokens {
    /// Which role `authorization` (the header's value) holds, if any.
    fn role_of(&self, authorization: Option<&str>) -> Option<Role> {
        let token = authorization?.strip_prefix("Bearer ")?.trim();
        // Check both so that the time taken does not say which one matched.
        let agent = self.agent.as_deref().is_some_and(|t| same(t, token));
        let publish = self.publish.as_deref().is_some_and(|t| same(t, token));
        match (agent, publish) {
            (_, true) => Some(Role::Publish),
            (true, false) => Some(Role::Agent),
            _ => None,
        }
    }

    /// Whether a request may act in one of `roles`.
    pub fn check(&self, authorization: Option<&str>, roles: &[Role]) -> Check {
        // A role with no token configured is open (a hub has no token: it is never open).
        if roles
            .iter()
            .any(|r| *r != Role::Hub && self.token(*r).is_none())
        {
            return Check::Allow;
        }
        match self.role_of(authorization) {
            Some(role) if roles.contains(&role) => Check::Allow,
            Some(_) => Check::Forbidden,
            None => Check::Unauthenticated,
        }
    }

    fn token(&self, role: Role) -> Option<&str> {
        match role {
            Role::Agent => self.agent.as_deref(),
            Role::Publish => self.publish.as_deref(),
            Role::Hub => None,
        }
    }
}

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Unreadable.
    #[error("cannot read token file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Empty.
    #[error("token file {0} is empty: write a long random token into it (e.g. `openssl rand -hex 32 > {0}`)")]
    Empty(String),
    /// Readable by every user.
    #[error("token file {0} is readable by every user: `chmod 600 {0}` (or 640 with the lockstep group)")]
    WorldReadable(String),
}

/// Reads a token file: the token is its content, trimmed. A file every user may read is
/// refused, as ssh refuses such a key.
pub fn read_token(path: &Path) -> Result<String, TokenError> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| TokenError::Read {
        path: shown.clone(),
        source,
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o004 != 0 {
            return Err(TokenError::WorldReadable(shown));
        }
    }
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: shown.clone(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenError::Empty(shown));
    }
    Ok(token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens {
            agent: Some("a-secret".into()),
            publish: Some("p-secret".into()),
        }
    }

    #[test]
    fn roles_are_enforced() {
        let t = tokens();
        let read = [Role::Agent, Role::Publish];
        assert_eq!(t.check(Some("Bearer a-secret"), &read), Check::Allow);
        assert_eq!(t.check(Some("Bearer p-secret"), &read), Check::Allow);
        assert_eq!(
            t.check(Some("Bearer a-secret"), &[Role::Publish]),
            Check::Forbidden
        );
        assert_eq!(
            t.check(Some("Bearer p-secret"), &[Role::Agent]),
            Check::Forbidden
        );
        assert_eq!(t.check(Some("Bearer nope"), &read), Check::Unauthenticated);
        assert_eq!(t.check(Some("a-secret"), &read), Check::Unauthenticated);
        assert_eq!(t.check(None, &read), Check::Unauthenticated);
        assert_eq!(
            Tokens::default().check(None, &[Role::Publish]),
            Check::Allow
        );
        // A hub has no token: its role is never open, and no token holds it.
        assert_eq!(
            Tokens::default().check(None, &[Role::Hub]),
            Check::Unauthenticated
        );
        assert_eq!(
            t.check(Some("Bearer a-secret"), &[Role::Hub]),
            Check::Forbidden
        );
    }

    #[test]
    fn token_files_must_be_private_and_non_empty() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "  tok\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(read_token(&p), Err(TokenError::WorldReadable(_))));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token(&p).unwrap(), "tok");
        std::fs::write(&p, "\n").unwrap();
        assert!(matches!(read_token(&p), Err(TokenError::Empty(_))));
        assert!(matches!(
            read_token(&dir.path().join("missing")),
            Err(TokenError::Read { .. })
        ));
    }
}
