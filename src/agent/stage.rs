//! Staging: brings a release into the agent's store in the background while
//! the active one keeps serving — the manifest (its canonical hash must be the release id),
//! then only the blobs the store lacks, at most `fetch_concurrency` at once, each verified
//! against its blake3 hash before it is written (a mismatch is discarded, counted, retried a
//! few times, then staging fails). A restarted agent resumes: blobs already stored are not
//! fetched again. The result is a [`Release`] ready to be swapped in; nothing partial ever is.
//! With `trusted_keys`, a release is checked ([`super::verify`]) before its blobs are fetched
//! and again once built: one no trusted key vouches for is never staged.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::metrics::AgentMetrics;
use super::release::{check_manifest, LoadError, Release};
use super::release_dir;
use super::verify::{log_accepted, refused, Accepted, Refused, Trust};
use crate::net::client::{ok, ClientError, HttpClient, REQUEST_TIMEOUT};
use crate::sync::manifest::{Hash, Manifest, ReleaseId};
use crate::sync::protocol::{Provenance, Signatures, PREFIX};
use crate::sync::provenance::{ProvenanceError, MAX_DEPTH};
use crate::sync::sign::Signature;
use crate::sync::store::{FsStore, StoreError};

/// Tries per blob (and per manifest) before staging fails.
pub const ATTEMPTS: u32 = 3;
/// Longest one blob download may take (64 MiB at a slow 1 MB/s).
pub const BLOB_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause between tries.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Why staging a release failed. The release is not activated; the old one keeps serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StageError {
    /// The hub could not be asked, or refused.
    #[error("fetching {what} from the hub: {source}")]
    Hub {
        /// The manifest or which blob.
        what: String,
        /// Why.
        source: ClientError,
    },
    /// The manifest is not one, or does not hash to the release id.
    #[error("the hub's manifest for release {id} is refused: {reason}")]
    Manifest {
        /// The release.
        id: ReleaseId,
        /// Why.
        reason: String,
    },
    /// A blob arrived damaged every time.
    #[error("blob {hash} (`{path}`) did not match its hash in {ATTEMPTS} tries: the hub's copy or the network is damaging it")]
    Damaged {
        /// The blob.
        hash: Hash,
        /// A file using it.
        path: String,
    },
    /// The store could not write (a full disk shows here as "No space left on device").
    #[error("the agent's store: {0}")]
    Store(StoreError),
    /// The staged release does not load.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The copy under `release_dir` failed.
    #[error("release_dir: {0}")]
    ReleaseDir(std::io::Error),
    /// A background task died.
    #[error("staging task failed: {0}")]
    Task(String),
    /// Not a release this agent trusts (`trusted_keys`): nothing of it is staged.
    #[error(transparent)]
    Untrusted(Box<Refused>),
}

/// Stages releases from one hub into one store.
#[derive(Clone)]
pub struct Stager {
    /// The hub.
    pub client: HttpClient,
    /// The agent's store.
    pub store: Arc<FsStore>,
    /// Metrics (bytes, blobs, hash failures).
    pub metrics: Arc<AgentMetrics>,
    /// Shared by every staging job: at most `fetch_concurrency` blob downloads at once.
    pub permits: Arc<Semaphore>,
    /// Where releases are copied for a web server, if anywhere.
    pub release_dir: Option<std::path::PathBuf>,
    /// What releases must be to be staged (`None`: no `trusted_keys`, anything is).
    pub trust: Option<Arc<Trust>>,
}

impl Stager {
    /// Stages release `id` and returns it ready to serve.
    pub async fn stage(&self, id: ReleaseId) -> Result<Arc<Release>, StageError> {
        let manifest = self.manifest(id).await?;
        // Trusted before any blob is fetched: a refused release leaves nothing but its
        // manifest behind.
        self.verify(id, &manifest).await?;
        // Each blob the store lacks, once, with a file that uses it (for messages).
        let missing = {
            let (store, manifest) = (self.store.clone(), manifest.clone());
            blocking(move || {
                let mut seen = std::collections::HashSet::new();
                Ok::<_, StageError>(
                    manifest
                        .files()
                        .iter()
                        .filter(|(_, e)| seen.insert(e.hash) && !store.has_blob(&e.hash))
                        .map(|(p, e)| (e.hash, e.size, p.clone()))
                        .collect::<Vec<_>>(),
                )
            })
            .await?
        };
        let bytes: u64 = missing.iter().map(|(_, s, _)| s).sum();
        info!(
            release = %id.short(),
            files = manifest.files().len(),
            missing_blobs = missing.len(),
            missing_bytes = bytes,
            "staging"
        );
        let mut jobs = JoinSet::new();
        for (hash, size, path) in missing {
            let me = self.clone();
            jobs.spawn(async move { me.blob(hash, size, &path).await });
        }
        while let Some(done) = jobs.join_next().await {
            // The first failure ends the job; dropping the set aborts the other downloads.
            done.map_err(|e| StageError::Task(e.to_string()))??;
        }
        let store = self.store.clone();
        let release_dir = self.release_dir.clone();
        let release = blocking(move || {
            if let Some(dir) = &release_dir {
                release_dir::materialise(dir, &id, &manifest, &store)
                    .map_err(StageError::ReleaseDir)?;
            }
            Ok(Release::build(&store, manifest)?)
        })
        .await?;
        // And again, for the release exactly as built (its id is its manifest's hash), just
        // before it becomes one the controller may activate.
        let accepted = self.verify(release.id(), release.manifest()).await?;
        log_accepted(id, accepted);
        info!(release = %id.short(), "staged");
        Ok(Arc::new(release))
    }

    /// The manifest, from the store if it is there, else from the hub (checked, then stored).
    pub(super) async fn manifest(&self, id: ReleaseId) -> Result<Manifest, StageError> {
        let store = self.store.clone();
        let stored = blocking(move || store.read_release(&id).map_err(StageError::Store)).await?;
        if let Some(bytes) = stored {
            if let Ok(m) = check_manifest(id, &bytes) {
                return Ok(m);
            }
        }
        let path = format!("{PREFIX}/releases/{id}");
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            let answer = self
                .client
                .send(Method::GET, &path, None, BLOB_TIMEOUT)
                .await
                .and_then(ok)
                .map_err(|source| StageError::Hub {
                    what: format!("the manifest of release {}", id.short()),
                    source,
                })?;
            match check_manifest(id, &answer.body) {
                Ok(m) => {
                    let (store, canonical) = (self.store.clone(), m.to_json());
                    blocking(move || {
                        store
                            .write_release(&id, &canonical)
                            .map_err(StageError::Store)
                    })
                    .await?;
                    return Ok(m);
                }
                Err(e) => {
                    self.metrics.hash_failures.inc();
                    warn!(release = %id.short(), attempt, error = %e, "manifest refused");
                    last = e.to_string();
                    tokio::time::sleep(RETRY_PAUSE * attempt).await;
                }
            }
        }
        Err(StageError::Manifest { id, reason: last })
    }

    /// Fetches one blob, verifies and stores it; retries transport failures and damaged
    /// content a few times.
    async fn blob(&self, hash: Hash, size: u64, path: &str) -> Result<(), StageError> {
        // The semaphore is never closed.
        let _permit = self.permits.acquire().await.expect("semaphore open");
        let url = format!("{PREFIX}/blobs/{hash}");
        for attempt in 1..=ATTEMPTS {
            // Streamed to a temporary file of the store and hashed on the way: memory per
            // fetch is a buffer, whatever the blob's size. More than the manifest's size is
            // refused as it arrives.
            let store = self.store.clone();
            let sink = blocking(move || store.blob_sink(size).map_err(StageError::Store)).await?;
            let answer = self.client.download(&url, BLOB_TIMEOUT, size, sink).await;
            let sink = match answer {
                Ok(sink) => sink,
                Err(source) if attempt == ATTEMPTS => {
                    return Err(StageError::Hub {
                        what: format!("blob {} (`{path}`)", hash.short()),
                        source,
                    })
                }
                Err(e) => {
                    debug!(blob = %hash.short(), attempt, error = %e, "blob fetch failed; retrying");
                    tokio::time::sleep(RETRY_PAUSE * attempt).await;
                    continue;
                }
            };
            let len = sink.len();
            let store = self.store.clone();
            // The store refuses bytes that do not hash to the name, so nothing unverified is
            // ever stored.
            let written = blocking(move || {
                if len != size {
                    return Ok(Err(()));
                }
                match store.adopt_blob(sink, &hash) {
                    Ok(_) => Ok(Ok(())),
                    Err(StoreError::HashMismatch(_)) => Ok(Err(())),
                    Err(e) => Err(StageError::Store(e)),
                }
            })
            .await?;
            match written {
                Ok(()) => {
                    self.metrics.fetched_blobs.inc();
                    self.metrics.fetched_bytes.inc_by(len);
                    return Ok(());
                }
                Err(()) => {
                    self.metrics.hash_failures.inc();
                    warn!(blob = %hash.short(), file = path, attempt, "blob does not match its hash; discarded");
                    tokio::time::sleep(RETRY_PAUSE * attempt).await;
                }
            }
        }
        Err(StageError::Damaged {
            hash,
            path: path.to_string(),
        })
    }
}

impl Stager {
    /// Whether release `id` (whose manifest, checked against `id`, is `manifest`) may be
    /// served ([`super::verify`]): its signatures, else its provenance down to a signed
    /// release, whose manifests are fetched (and checked against their ids) like any other.
    pub(super) async fn verify(
        &self,
        id: ReleaseId,
        manifest: &Manifest,
    ) -> Result<Accepted, StageError> {
        let Some(trust) = &self.trust else {
            return Ok(Accepted::Unchecked);
        };
        // The chain walked down so far: each release was built on the next.
        let mut chain: Vec<ReleaseId> = Vec::new();
        let (mut cid, mut below): (ReleaseId, Option<Manifest>) = (id, None);
        loop {
            if !chain.is_empty() && trust.remembered(&cid) {
                trust.remember(&chain);
                return Ok(Accepted::Built {
                    key: None,
                    steps: chain.len(),
                });
            }
            let unsigned = match trust.keys().verify(&cid, &self.signatures(cid).await?) {
                Ok(key) => {
                    chain.push(cid);
                    trust.remember(&chain);
                    return Ok(match chain.len() {
                        1 => Accepted::Signed(key),
                        n => Accepted::Built {
                            key: Some(key),
                            steps: n - 1,
                        },
                    });
                }
                Err(u) => u,
            };
            let Some(p) = self.provenance(cid).await? else {
                return Err(untrusted(Refused::Unsigned(unsigned), cid, &chain));
            };
            if chain.len() >= MAX_DEPTH {
                let source = ProvenanceError::TooDeep(id.short());
                return Err(untrusted(
                    Refused::Provenance { unsigned, source },
                    cid,
                    &chain,
                ));
            }
            let base = match p.base {
                Some(b) => self.manifest(b).await?,
                None => Manifest::default(),
            };
            let built = below.as_ref().unwrap_or(manifest);
            if let Err(source) = p.check(trust.authority(), &base, built) {
                return Err(untrusted(
                    Refused::Provenance { unsigned, source },
                    cid,
                    &chain,
                ));
            }
            debug!(release = %cid.short(), base = ?p.base.map(|b| b.short()), changesets = p.changesets.len(), "provenance checked");
            chain.push(cid);
            match p.base {
                Some(b) => (cid, below) = (b, Some(base)),
                None => {
                    trust.remember(&chain);
                    return Ok(Accepted::Built {
                        key: None,
                        steps: chain.len(),
                    });
                }
            }
        }
    }

    /// `GET /releases/{id}/signatures`.
    async fn signatures(&self, id: ReleaseId) -> Result<Vec<Signature>, StageError> {
        let s: Signatures = self
            .client
            .json(
                Method::GET,
                &format!("{PREFIX}/releases/{id}/signatures"),
                None::<&()>,
                REQUEST_TIMEOUT,
            )
            .await
            .map_err(|source| StageError::Hub {
                what: format!("the signatures of release {}", id.short()),
                source,
            })?;
        Ok(s.signatures)
    }

    /// `GET /releases/{id}/provenance`; `None` when the hub did not build it (404).
    async fn provenance(&self, id: ReleaseId) -> Result<Option<Provenance>, StageError> {
        let got = self
            .client
            .json(
                Method::GET,
                &format!("{PREFIX}/releases/{id}/provenance"),
                None::<&()>,
                REQUEST_TIMEOUT,
            )
            .await;
        match got {
            Ok(p) => Ok(Some(p)),
            Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => Ok(None),
            Err(source) => Err(StageError::Hub {
                what: format!("the provenance of release {}", id.short()),
                source,
            }),
        }
    }
}

/// Why a release is refused, as a staging error.
fn untrusted(r: Refused, refused_id: ReleaseId, chain: &[ReleaseId]) -> StageError {
    StageError::Untrusted(Box::new(refused(r, refused_id, chain)))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StageError> + Send + 'static,
) -> Result<T, StageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StageError::Task(e.to_string()))?
}
