//! Building the release an install produces: the served release's manifest with each queued
//! changeset applied in order (one that does not fit is refused whole, the others still go
//! in), built reusing the served release's files and the blobs that came with the changesets.
//! Blocking (reads the store for files neither provides); run on tokio's blocking pool.

use std::collections::HashMap;
use std::sync::Arc;

use tracing::warn;

use crate::agent::messages::Install;
use crate::agent::metrics::AgentMetrics;
use crate::agent::release::Release;
use crate::sync::changeset;
use crate::sync::manifest::ReleaseId;
use crate::sync::store::FsStore;

/// What an install returns.
pub struct Installed {
    /// The release it built on (`None`: the agent served nothing).
    pub base: Option<ReleaseId>,
    /// The jobs it applied, in order (refused ones left out).
    pub jobs: Vec<Install>,
    /// The new release, or why none.
    pub built: Result<Arc<Release>, String>,
}

/// Applies `jobs` in order to `base` and builds the result. Blocking.
pub fn build(
    store: &Arc<FsStore>,
    metrics: &AgentMetrics,
    base: Option<Arc<Release>>,
    jobs: Vec<Install>,
) -> Installed {
    let fresh: HashMap<_, _> = jobs.iter().flat_map(|j| j.blobs.iter().cloned()).collect();
    let mut manifest = base
        .as_ref()
        .map(|r| r.manifest().clone())
        .unwrap_or_default();
    let mut kept = Vec::with_capacity(jobs.len());
    for job in jobs {
        let changes = job.cs.changes.iter().map(|(p, c)| (p, &c.entry));
        match changeset::apply(&manifest, changes) {
            Ok(m) => {
                manifest = m;
                kept.push(job);
            }
            Err(e) => {
                metrics.refused("changeset");
                warn!(changeset = %job.cs.name(), error = %e, "changeset refused: it does not fit the served release; nothing of it is installed");
            }
        }
    }
    let built = Release::build_reusing(store, manifest, base.as_deref(), &fresh)
        .map(Arc::new)
        .map_err(|e| e.to_string());
    Installed {
        base: base.map(|r| r.id()),
        jobs: kept,
        built,
    }
}
