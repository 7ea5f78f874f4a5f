//! Test fixtures for the hub's unit tests (compiled only for tests): a [`Hub`] over an
//! [`FsStore`] in a temporary directory with a clock the test moves, and releases stored the
//! way a publisher uploads them. No sockets.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{Clock, Hub, HubMetrics, Settings};
use crate::sync::auth::Tokens;
use crate::sync::gc::Gc;
use crate::sync::manifest::{Entry, Hash, Manifest, ReleaseId};
use crate::sync::schedule::Rules;
use crate::sync::store::FsStore;

/// One second in µs.
pub const S: u64 = 1_000_000;

/// A hub in a temporary directory.
pub struct Fixture {
    /// The hub (its `run` task is not started).
    pub hub: Arc<Hub>,
    /// Its metrics (not registered anywhere).
    pub metrics: HubMetrics,
    /// The store's directory.
    pub dir: tempfile::TempDir,
}

/// Reports count for 90 s.
pub const REPORT_EXPIRY: Duration = Duration::from_secs(90);

/// Activations every 10 s, at least 3 s after the publish (so the replace guard is 2 s).
pub fn rules() -> Rules {
    Rules::new(Duration::from_secs(10), Duration::from_secs(3))
}

/// [`rules`], no tokens, no CA, reports counting for [`REPORT_EXPIRY`].
pub fn settings() -> Settings {
    Settings {
        rules: rules(),
        tokens: Tokens::default(),
        gc: Gc::default(),
        report_expiry: REPORT_EXPIRY,
        trusted_keys: None,
        upload_quota: crate::config::sync::DEFAULT_UPLOAD_QUOTA,
        ca_dir: None,
        revoked: Default::default(),
    }
}

/// A hub on `clock`, with [`settings`].
pub fn hub(clock: Clock) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FsStore::open(dir.path()).expect("open the store");
    let settings = settings();
    let metrics = HubMetrics::default();
    let hub = Hub::new(Arc::new(store), settings, clock, metrics.clone()).expect("new hub");
    Fixture { hub, metrics, dir }
}

/// A clock that stands still until the test sets it (µs).
pub fn manual(now_us: u64) -> (Clock, Arc<AtomicU64>) {
    let now = Arc::new(AtomicU64::new(now_us));
    let read = now.clone();
    (Arc::new(move || read.load(Ordering::SeqCst)), now)
}

/// Sets a manual clock.
pub fn set(clock: &AtomicU64, now_us: u64) {
    clock.store(now_us, Ordering::SeqCst);
}

/// A clock at `start_us` that moves with tokio's (paused) time.
pub fn tokio_clock(start_us: u64) -> Clock {
    let origin = tokio::time::Instant::now();
    Arc::new(move || start_us + origin.elapsed().as_micros() as u64)
}

/// The entry of a file holding `data`.
pub fn entry(data: &str) -> Entry {
    Entry {
        hash: Hash::of(data.as_bytes()),
        size: data.len() as u64,
        content_type: "text/html".into(),
    }
}

/// Uploads a release of `files` (path, content) with its blobs, as `lockstep publish` does.
pub async fn release(hub: &Arc<Hub>, files: &[(&str, &str)]) -> ReleaseId {
    let manifest = manifest(files);
    let uploaded = hub
        .upload_manifest(&manifest.to_json())
        .await
        .expect("upload");
    for (_, data) in files {
        hub.put_blob(Hash::of(data.as_bytes()), data.as_bytes().to_vec())
            .await
            .expect("put blob");
    }
    uploaded.id
}

/// Commits release `id` for the next activation, unsigned: the activation time.
pub async fn staged_at(hub: &Arc<Hub>, id: ReleaseId) -> u64 {
    hub.commit(id, None, vec![])
        .await
        .expect("commit")
        .activation_us
        .expect("an activation time")
}

/// The manifest of `files` (path, content).
pub fn manifest(files: &[(&str, &str)]) -> Manifest {
    let files: BTreeMap<String, Entry> = files
        .iter()
        .map(|(p, d)| (p.to_string(), entry(d)))
        .collect();
    Manifest::new(files).expect("valid manifest")
}

/// The files of stored release `id`: path → content hash.
pub async fn files(hub: &Arc<Hub>, id: ReleaseId) -> BTreeMap<String, Hash> {
    let m = Manifest::from_json(&hub.release(id).await.expect("stored")).expect("valid");
    m.files().iter().map(|(p, e)| (p.clone(), e.hash)).collect()
}
