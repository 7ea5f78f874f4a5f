//! The sync API's route table, parsed once: a request's method, path and query become an
//! [`Endpoint`] with typed parameters, which knows the token roles it needs. The table is the
//! one in [`crate::sync::protocol`]'s doc.
//!
//! Pure: no I/O, no hub. A malformed parameter of a known endpoint ([`RouteError::roles`]) is
//! reported only after that endpoint's token check, so a caller without a token learns
//! nothing but 401.

use http::{Method, StatusCode};

use crate::sync::auth::Role;
use crate::sync::manifest::{BadHash, Hash, ReleaseId};

/// Reads: agents, publishers and the other hubs.
pub const READ: &[Role] = &[Role::Agent, Role::Publish, Role::Hub];
/// Fetching a release's blobs from the other hubs: a hub committing it, or a publisher.
pub const REPLICATE: &[Role] = &[Role::Hub, Role::Publish];
/// Publishing: publishers only.
pub const PUBLISH: &[Role] = &[Role::Publish];
/// An agent's own business: agents only.
pub const AGENT: &[Role] = &[Role::Agent];
/// Blobs come from publishers and from agents forwarding changesets.
pub const WRITE: &[Role] = &[Role::Agent, Role::Publish];
/// Open to anyone: the farm CA's certificate, and joining with a one-time token (the token
/// in the body is the credential).
pub const PUBLIC: &[Role] = &[];

/// The first path segments the API knows: any other method on them is 405, not 404.
const KNOWN: &[&str] = &[
    "time",
    "schedule",
    "agents",
    "releases",
    "blobs",
    "rollback",
    "cycles",
    "changesets",
    "ca",
    "join",
];

/// One endpoint of the sync API (under `/sync/v1/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /time`.
    Time,
    /// `GET /schedule[?wait=VERSION]`.
    Schedule {
        /// Hold the answer until the version differs from this.
        wait: Option<u64>,
    },
    /// `GET /agents`: the fleet.
    Fleet,
    /// `GET /releases/{id}`: a manifest.
    Release(ReleaseId),
    /// `GET /releases/{id}/signatures`: the publishers' signatures kept beside it.
    Signatures(ReleaseId),
    /// `GET /releases/{id}/provenance`: how the hub built it from changesets.
    Provenance(ReleaseId),
    /// `GET /blobs/{hash}`.
    Blob(Hash),
    /// `POST /releases`: a manifest.
    Upload,
    /// `PUT /blobs/{hash}`.
    PutBlob(Hash),
    /// `POST /releases/{id}/commit`.
    Commit(ReleaseId),
    /// `POST /releases/{id}/replicate`: store every blob of the release, fetched from the
    /// other hubs (`sync.cluster`).
    Replicate(ReleaseId),
    /// `POST /rollback`.
    Rollback,
    /// `POST /cycles/{n}/advance`.
    Advance(u64),
    /// `POST /agents/{name}/report` (the name is checked by the hub).
    Report(String),
    /// `POST /changesets`.
    Changeset,
    /// `GET /ca`: the farm CA's certificate (public).
    CaCert,
    /// `POST /join`: a new agent redeems a one-time join token for its certificate.
    Join,
}

/// Why a request names no endpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// Outside `/sync/v1/` (404).
    #[error("not a sync API path: see /sync/v1/schedule")]
    NotSync,
    /// Under `/sync/v1/` but no endpoint (404).
    #[error("no such sync API path {path}")]
    Unknown {
        /// The request's path.
        path: String,
    },
    /// A known path with another method (405).
    #[error("{method} is not allowed on {path}")]
    Method {
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
    },
    /// A release id or blob hash that is not one (400).
    #[error("{source}")]
    Hash {
        /// The roles of the endpoint it was for.
        roles: &'static [Role],
        /// Why.
        source: BadHash,
    },
    /// A cycle that is not a number (400).
    #[error("the cycle must be a number")]
    Cycle,
    /// A `wait=` that is not a number (400).
    #[error("wait= takes the schedule version (a number)")]
    Wait,
}

impl RouteError {
    /// The status to answer with.
    pub fn status(&self) -> StatusCode {
        match self {
            RouteError::NotSync | RouteError::Unknown { .. } => StatusCode::NOT_FOUND,
            RouteError::Method { .. } => StatusCode::METHOD_NOT_ALLOWED,
            RouteError::Hash { .. } | RouteError::Cycle | RouteError::Wait => {
                StatusCode::BAD_REQUEST
            }
        }
    }

    /// For a malformed parameter, the roles of the endpoint it names: the token is checked
    /// against them before the error is answered. `None`: no endpoint, answered at once.
    pub fn roles(&self) -> Option<&'static [Role]> {
        match self {
            RouteError::Hash { roles, .. } => Some(roles),
            RouteError::Cycle => Some(AGENT),
            RouteError::Wait => Some(READ),
            RouteError::NotSync | RouteError::Unknown { .. } | RouteError::Method { .. } => None,
        }
    }
}

impl Endpoint {
    /// The endpoint `method` and `path` (with `query`) name.
    pub fn parse(method: &Method, path: &str, query: Option<&str>) -> Result<Endpoint, RouteError> {
        let rest = path.strip_prefix("/sync/v1/").ok_or(RouteError::NotSync)?;
        let segments: Vec<&str> = rest.split('/').collect();
        let read = matches!(*method, Method::GET | Method::HEAD);
        let hash = |s: &str, roles| {
            s.parse::<Hash>()
                .map_err(|source| RouteError::Hash { roles, source })
        };
        Ok(match (method, segments.as_slice()) {
            (_, ["time"]) if read => Endpoint::Time,
            (_, ["schedule"]) if read => Endpoint::Schedule { wait: wait(query)? },
            (_, ["agents"]) if read => Endpoint::Fleet,
            (_, ["releases", id]) if read => Endpoint::Release(hash(id, READ)?),
            (_, ["releases", id, "signatures"]) if read => Endpoint::Signatures(hash(id, READ)?),
            (_, ["releases", id, "provenance"]) if read => Endpoint::Provenance(hash(id, READ)?),
            (_, ["blobs", h]) if read => Endpoint::Blob(hash(h, READ)?),
            (&Method::PUT, ["blobs", h]) => Endpoint::PutBlob(hash(h, WRITE)?),
            (&Method::POST, ["releases"]) => Endpoint::Upload,
            (&Method::POST, ["releases", id, "commit"]) => Endpoint::Commit(hash(id, PUBLISH)?),
            (&Method::POST, ["releases", id, "replicate"]) => {
                Endpoint::Replicate(hash(id, REPLICATE)?)
            }
            (&Method::POST, ["rollback"]) => Endpoint::Rollback,
            (&Method::POST, ["cycles", n, "advance"]) => {
                Endpoint::Advance(n.parse().map_err(|_| RouteError::Cycle)?)
            }
            (&Method::POST, ["agents", name, "report"]) => Endpoint::Report(name.to_string()),
            (&Method::POST, ["changesets"]) => Endpoint::Changeset,
            (_, ["ca"]) if read => Endpoint::CaCert,
            (&Method::POST, ["join"]) => Endpoint::Join,
            (_, [first, ..]) if KNOWN.contains(first) => {
                return Err(RouteError::Method {
                    method: method.clone(),
                    path: path.to_string(),
                })
            }
            _ => {
                return Err(RouteError::Unknown {
                    path: path.to_string(),
                })
            }
        })
    }

    /// The token roles that may call it.
    pub fn roles(&self) -> &'static [Role] {
        match self {
            Endpoint::Time
            | Endpoint::Schedule { .. }
            | Endpoint::Fleet
            | Endpoint::Release(_)
            | Endpoint::Signatures(_)
            | Endpoint::Provenance(_)
            | Endpoint::Blob(_) => READ,
            Endpoint::PutBlob(_) => WRITE,
            Endpoint::Upload | Endpoint::Commit(_) | Endpoint::Rollback => PUBLISH,
            Endpoint::Advance(_) | Endpoint::Report(_) | Endpoint::Changeset => AGENT,
            Endpoint::CaCert | Endpoint::Join => PUBLIC,
            Endpoint::Replicate(_) => REPLICATE,
        }
    }
}

/// The first `wait=` of the query: the schedule version to wait past.
fn wait(query: Option<&str>) -> Result<Option<u64>, RouteError> {
    let Some(v) = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("wait="))) else {
        return Ok(None);
    };
    v.parse().map(Some).map_err(|_| RouteError::Wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

    fn hash() -> Hash {
        H.parse().unwrap()
    }

    fn parse(method: Method, path: &str) -> Result<Endpoint, RouteError> {
        Endpoint::parse(&method, path, None)
    }

    /// Every row of the table in `sync::protocol`'s doc, with the roles that may call it.
    #[test]
    fn every_path_of_the_table_names_its_endpoint_and_roles() {
        let rows = [
            (
                Method::GET,
                "/sync/v1/time".to_string(),
                Endpoint::Time,
                READ,
            ),
            (Method::HEAD, "/sync/v1/time".into(), Endpoint::Time, READ),
            (
                Method::GET,
                "/sync/v1/schedule".into(),
                Endpoint::Schedule { wait: None },
                READ,
            ),
            (
                Method::GET,
                format!("/sync/v1/releases/{H}"),
                Endpoint::Release(hash()),
                READ,
            ),
            (
                Method::GET,
                format!("/sync/v1/releases/{H}/signatures"),
                Endpoint::Signatures(hash()),
                READ,
            ),
            (
                Method::GET,
                format!("/sync/v1/releases/{H}/provenance"),
                Endpoint::Provenance(hash()),
                READ,
            ),
            (
                Method::GET,
                format!("/sync/v1/blobs/{H}"),
                Endpoint::Blob(hash()),
                READ,
            ),
            (
                Method::HEAD,
                format!("/sync/v1/blobs/{H}"),
                Endpoint::Blob(hash()),
                READ,
            ),
            (
                Method::POST,
                "/sync/v1/releases".into(),
                Endpoint::Upload,
                PUBLISH,
            ),
            (
                Method::PUT,
                format!("/sync/v1/blobs/{H}"),
                Endpoint::PutBlob(hash()),
                WRITE,
            ),
            (
                Method::POST,
                format!("/sync/v1/releases/{H}/commit"),
                Endpoint::Commit(hash()),
                PUBLISH,
            ),
            (
                Method::POST,
                format!("/sync/v1/releases/{H}/replicate"),
                Endpoint::Replicate(hash()),
                REPLICATE,
            ),
            (Method::GET, "/sync/v1/ca".into(), Endpoint::CaCert, PUBLIC),
            (Method::POST, "/sync/v1/join".into(), Endpoint::Join, PUBLIC),
            (
                Method::POST,
                "/sync/v1/rollback".into(),
                Endpoint::Rollback,
                PUBLISH,
            ),
            (
                Method::POST,
                "/sync/v1/cycles/7/advance".into(),
                Endpoint::Advance(7),
                AGENT,
            ),
            (
                Method::POST,
                "/sync/v1/agents/web-1/report".into(),
                Endpoint::Report("web-1".into()),
                AGENT,
            ),
            (Method::GET, "/sync/v1/agents".into(), Endpoint::Fleet, READ),
            (
                Method::POST,
                "/sync/v1/changesets".into(),
                Endpoint::Changeset,
                AGENT,
            ),
        ];
        for (method, path, want, roles) in rows {
            let got = parse(method.clone(), &path).unwrap();
            assert_eq!((&got, got.roles()), (&want, roles), "{method} {path}");
        }
    }

    #[test]
    fn the_schedule_takes_the_first_wait_of_its_query() {
        let get = |q| Endpoint::parse(&Method::GET, "/sync/v1/schedule", Some(q));
        assert_eq!(
            get("wait=12").unwrap(),
            Endpoint::Schedule { wait: Some(12) }
        );
        assert_eq!(
            get("x=1&wait=3&wait=4").unwrap(),
            Endpoint::Schedule { wait: Some(3) }
        );
        assert_eq!(get("other=1").unwrap(), Endpoint::Schedule { wait: None });
        let bad = get("wait=soon").unwrap_err();
        assert_eq!(
            (bad.status(), bad.roles()),
            (StatusCode::BAD_REQUEST, Some(READ))
        );
        assert_eq!(
            bad.to_string(),
            "wait= takes the schedule version (a number)"
        );
    }

    #[test]
    fn unknown_paths_are_404_with_the_path_named() {
        for path in [
            "/sync/v1/",
            "/sync/v1/nope",
            "/sync/v1/report",
            "/sync/v1/cycle/1/advance",
        ] {
            let e = parse(Method::GET, path).unwrap_err();
            assert_eq!(e.status(), StatusCode::NOT_FOUND, "{path}");
            assert_eq!(e.to_string(), format!("no such sync API path {path}"));
            assert_eq!(e.roles(), None, "answered before any token check");
        }
        for path in ["/", "/sync/v1", "/sync/v2/time", "/time"] {
            let e = parse(Method::GET, path).unwrap_err();
            assert_eq!(e.status(), StatusCode::NOT_FOUND, "{path}");
            assert_eq!(e.to_string(), "not a sync API path: see /sync/v1/schedule");
        }
    }

    #[test]
    fn other_methods_on_known_paths_are_405_with_method_and_path_named() {
        let rows = [
            (Method::POST, "/sync/v1/time".to_string()),
            (Method::DELETE, "/sync/v1/schedule".into()),
            (Method::PUT, "/sync/v1/agents".into()),
            (Method::GET, "/sync/v1/releases".into()),
            (Method::POST, format!("/sync/v1/blobs/{H}")),
            (Method::DELETE, format!("/sync/v1/releases/{H}")),
            (Method::GET, format!("/sync/v1/releases/{H}/commit")),
            (Method::POST, format!("/sync/v1/releases/{H}/signatures")),
            (Method::PUT, format!("/sync/v1/releases/{H}/provenance")),
            (Method::GET, "/sync/v1/rollback".into()),
            (Method::GET, "/sync/v1/cycles/1/advance".into()),
            (Method::GET, "/sync/v1/agents/web1/report".into()),
            (Method::GET, "/sync/v1/changesets".into()),
            // Known first segment, unknown rest: 405 as before, not 404.
            (Method::GET, "/sync/v1/time/extra".into()),
            (Method::POST, "/sync/v1/cycles/1".into()),
        ];
        for (method, path) in rows {
            let e = parse(method.clone(), &path).unwrap_err();
            assert_eq!(
                e.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            assert_eq!(e.to_string(), format!("{method} is not allowed on {path}"));
            assert_eq!(e.roles(), None);
        }
    }

    #[test]
    fn malformed_parameters_are_400_after_the_endpoints_token_check() {
        let rows = [
            (Method::GET, "/sync/v1/blobs/xyz", READ),
            (Method::GET, "/sync/v1/releases/", READ),
            (Method::GET, "/sync/v1/releases/xyz/signatures", READ),
            (Method::GET, "/sync/v1/releases/xyz/provenance", READ),
            (Method::PUT, "/sync/v1/blobs/xyz", WRITE),
            (Method::POST, "/sync/v1/releases/XYZ/commit", PUBLISH),
        ];
        for (method, path, roles) in rows {
            let e = parse(method.clone(), path).unwrap_err();
            assert_eq!(
                (e.status(), e.roles()),
                (StatusCode::BAD_REQUEST, Some(roles)),
                "{method} {path}"
            );
            assert!(
                e.to_string()
                    .ends_with("is not a blake3 hash (64 hex characters)"),
                "{e}"
            );
        }
        let upper =
            parse(Method::GET, &format!("/sync/v1/blobs/{}", H.to_uppercase())).unwrap_err();
        assert_eq!(
            upper.status(),
            StatusCode::BAD_REQUEST,
            "ids are lower case"
        );
        let cycle = parse(Method::POST, "/sync/v1/cycles/one/advance").unwrap_err();
        assert_eq!(
            (cycle.status(), cycle.roles()),
            (StatusCode::BAD_REQUEST, Some(AGENT))
        );
        assert_eq!(cycle.to_string(), "the cycle must be a number");
    }
}
