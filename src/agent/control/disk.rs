//! The controller's ordered disk work: after a flip or an install, the state file (with the
//! manifest of a release built here, [`StateFile`]), the `current` symlink, pruning old copies,
//! blobs from peers, and the store's periodic collection — one job after another on one
//! worker, so that two quick flips cannot reorder their writes (a scheduled flip's recorder
//! writes beside it, through the same [`StateFile`]). I/O: blocking writes on tokio's blocking
//! pool.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{error, info};

use crate::agent::metrics::AgentMetrics;
use crate::agent::release::Release;
use crate::agent::release_dir;
use crate::agent::state::{AgentState, StateFile};
use crate::sync::manifest::ReleaseId;
use crate::sync::store::FsStore;

/// Ordered disk work after a flip (state file, `current` symlink, pruning old copies).
#[derive(Debug)]
pub enum DiskJob {
    /// Record the release as served (its manifest first, when it is not stored), unless
    /// another is served by now.
    State(Arc<Release>, AgentState),
    /// Make sure `releases/<id>` exists and point `current` at it.
    Current(Arc<Release>),
    /// Drop release copies other than these.
    Prune(Vec<ReleaseId>),
    /// Store blobs received from a peer (before the state that names them).
    Blobs(Vec<(crate::sync::manifest::Hash, bytes::Bytes)>),
    /// Remove what these releases and the outbox do not need (see [`crate::sync::gc`]).
    Collect {
        /// Releases held: active, previous, staged.
        keep: Vec<ReleaseId>,
        /// Age below which nothing goes.
        grace: Duration,
    },
}

/// Runs disk jobs one after another, so that two quick flips cannot reorder their writes.
pub async fn disk_worker(
    store: Arc<FsStore>,
    state: Arc<StateFile>,
    release_dir: Option<PathBuf>,
    metrics: Arc<AgentMetrics>,
    mut rx: mpsc::UnboundedReceiver<DiskJob>,
) {
    while let Some(job) = rx.recv().await {
        let (store, state) = (store.clone(), state.clone());
        let (dir, metrics) = (release_dir.clone(), metrics.clone());
        let outcome =
            tokio::task::spawn_blocking(move || run(job, &store, &state, dir.as_deref(), &metrics))
                .await;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(error = %e, "disk write after a flip failed; the release is served from memory")
            }
            Err(e) => error!(error = %e, "disk task failed"),
        }
    }
}

/// Does one job. Blocking.
fn run(
    job: DiskJob,
    store: &Arc<FsStore>,
    state: &StateFile,
    dir: Option<&std::path::Path>,
    metrics: &AgentMetrics,
) -> Result<(), String> {
    match job {
        DiskJob::Collect { keep, grace } => collect(store, &keep, grace, metrics),
        DiskJob::Blobs(blobs) => blobs
            .iter()
            .filter(|(h, _)| !store.has_blob(h))
            .try_for_each(|(h, b)| store.write_blob(h, b))
            .map_err(|e| format!("cannot store blobs from a peer: {e}")),
        DiskJob::State(r, s) => state.record(&r, &s).map(|_| ()),
        DiskJob::Current(r) => match dir {
            Some(dir) => release_dir::materialise(dir, &r.id(), r.manifest(), store)
                .and_then(|_| release_dir::switch_current(dir, &r.id()))
                .map_err(|e| format!("release_dir: {e}")),
            None => Ok(()),
        },
        DiskJob::Prune(keep) => match dir {
            Some(dir) => release_dir::prune(dir, &keep).map_err(|e| format!("release_dir: {e}")),
            None => Ok(()),
        },
    }
}

/// Removes what `keep` and the outbox do not need. Blocking.
fn collect(
    store: &FsStore,
    keep: &[ReleaseId],
    grace: Duration,
    metrics: &AgentMetrics,
) -> Result<(), String> {
    let pinned = crate::agent::outbox::outbox_blobs(store);
    let c = store
        .collect(keep, &pinned, grace)
        .map_err(|e| format!("store collection: {e}"))?;
    metrics.gc_removed(&c);
    if c.releases + c.blobs > 0 {
        info!(
            releases = c.releases,
            blobs = c.blobs,
            bytes = c.bytes,
            "collected unused content from the store"
        );
    }
    Ok(())
}
