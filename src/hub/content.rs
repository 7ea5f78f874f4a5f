//! The hub's content: manifests and blobs uploaded by publishers (and agents' changesets),
//! served to agents, checked complete before a commit, and collected once no release needs
//! them. Content-addressed: a blob or manifest that does not hash to its name is refused.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{blocking, Hub, HubError};
use crate::sync::manifest::{Hash, Manifest, ReleaseId, MAX_BLOB_BYTES};
use crate::sync::protocol::{Replicated, Uploaded};
use crate::sync::provenance::MAX_DEPTH;
use crate::sync::store::{Collected, StoreError};

/// Blobs a hub fetches from the others at once for a release (`POST .../replicate`).
const REPLICATE_CONCURRENCY: usize = 16;

impl Hub {
    /// Stores a manifest and answers which of its blobs the hub lacks.
    pub async fn upload_manifest(self: &Arc<Self>, body: &[u8]) -> Result<Uploaded, HubError> {
        let manifest = Manifest::from_json(body)?;
        let hub = self.clone();
        blocking(move || {
            let id = manifest.id();
            hub.store.put_release(&id, &manifest.to_json())?;
            let mut missing = Vec::new();
            for (hash, _) in manifest.blobs() {
                if !hub.store.has_blob(&hash)? {
                    missing.push(hash);
                }
            }
            Ok(Uploaded { id, missing })
        })
        .await
    }

    /// Stores a blob whose bytes hash to `hash` (bytes already in memory: tests and the
    /// hub's own callers; the API streams through [`Hub::receive_blob`], as this does).
    pub async fn put_blob(self: &Arc<Self>, hash: Hash, body: Vec<u8>) -> Result<bool, HubError> {
        self.receive_blob(hash, http_body_util::Full::new(bytes::Bytes::from(body)))
            .await
    }

    /// The ledger of uploads no release names yet; its size goes to the metrics when the
    /// guard is dropped.
    pub(super) fn pending_uploads(&self) -> PendingUploads<'_> {
        PendingUploads {
            ledger: self.uploads.lock().unwrap_or_else(|p| p.into_inner()),
            gauge: &self.metrics.pending_upload_bytes,
        }
    }

    /// The manifest of a release (canonical bytes).
    pub async fn release(self: &Arc<Self>, id: ReleaseId) -> Result<Vec<u8>, HubError> {
        let hub = self.clone();
        blocking(move || hub.store.get_release(&id))
            .await?
            .ok_or_else(|| HubError::NotFound(format!("no release {id}")))
    }

    /// A blob opened for streaming, with its length (never read whole into memory); one this
    /// hub lacks is fetched from the other hubs first, when it has joined them.
    pub async fn blob(self: &Arc<Self>, hash: Hash) -> Result<(std::fs::File, u64), HubError> {
        let open = || {
            let hub = self.clone();
            blocking(move || hub.store.open_blob(&hash))
        };
        let blob = match (open().await?, self.peers.get()) {
            (Some(b), _) => b,
            (None, None) => return Err(HubError::NotFound(format!("no blob {hash}"))),
            (None, Some(peers)) => {
                peers
                    .fetch_blob(hash, &self.store)
                    .await
                    .map_err(|e| HubError::NotFound(format!("no blob {hash} here, nor {e}")))?;
                self.metrics.blobs_fetched.inc();
                open()
                    .await?
                    .ok_or_else(|| HubError::NotFound(format!("no blob {hash}")))?
            }
        };
        self.metrics.blobs_served.inc();
        Ok(blob)
    }

    /// Stores every blob of release `id`, fetching what this hub lacks from the other hubs
    /// (`POST /releases/{id}/replicate`, asked by a hub committing it).
    pub async fn replicate(self: &Arc<Self>, id: ReleaseId) -> Result<Replicated, HubError> {
        let manifest = Manifest::from_json(&self.release(id).await?)?;
        let lacking = self.lacking(manifest.blobs()).await?;
        let Some(peers) = self.peers.get() else {
            return match lacking.len() {
                0 => Ok(Replicated { id, fetched: 0 }),
                n => Err(HubError::Conflict(format!(
                    "release {id} lacks {n} blob(s) here and this hub has no sync.cluster to fetch them from"
                ))),
            };
        };
        // A few at a time: each is a round trip and an fsync, a release may name thousands.
        let mut fetches = tokio::task::JoinSet::new();
        let mut next = lacking.iter().copied();
        let fetched = lacking.len();
        loop {
            while fetches.len() < REPLICATE_CONCURRENCY {
                let Some(hash) = next.next() else { break };
                let (peers, store) = (peers.clone(), self.store.clone());
                fetches.spawn(async move { peers.fetch_blob(hash, &store).await });
            }
            let Some(done) = fetches.join_next().await else {
                break;
            };
            match done {
                Ok(Ok(())) => {
                    self.metrics.blobs_fetched.inc();
                }
                Ok(Err(e)) => return Err(HubError::Unavailable(format!("release {id}: {e}"))),
                Err(e) => return Err(HubError::Unavailable(format!("release {id}: {e}"))),
            }
        }
        Ok(Replicated { id, fetched })
    }

    /// Has release `id`'s blobs stored on `sync.cluster.replicas` hubs (this one and as many
    /// others as needed, asked all at once); a commit waits for this.
    pub(super) async fn replicate_out(self: &Arc<Self>, id: ReleaseId) -> Result<(), HubError> {
        let Some(peers) = self.peers.get() else {
            return Ok(());
        };
        let want = peers.replicas();
        if want <= 1 {
            return Ok(());
        }
        let r = peers.replicate(id).await;
        if 1 + r.stored < want {
            return Err(HubError::Unavailable(format!(
                "release {id} is stored on {} hub(s), and sync.cluster.replicas asks for {want} before a commit (so that losing a hub loses no release): {}",
                1 + r.stored,
                if r.failures.is_empty() {
                    "no other hub is registered".to_string()
                } else {
                    r.failures.join("; ")
                }
            )));
        }
        Ok(())
    }

    /// Receives a blob that must hash to `hash` from `body`, streamed to a temporary file and
    /// hashed on the way (memory: a buffer, whatever the size); stored only if it matches.
    /// True when it was not stored before.
    pub async fn receive_blob<B>(self: &Arc<Self>, hash: Hash, body: B) -> Result<bool, HubError>
    where
        B: http_body::Body<Data = bytes::Bytes>,
        B::Error: std::fmt::Display,
    {
        let quota = self.settings().upload_quota;
        let announced = body.size_hint().lower();
        self.pending_uploads()
            .admit(announced, quota)
            .map_err(HubError::Full)?;
        let hub = self.clone();
        let sink = blocking(move || hub.store.blob_sink(MAX_BLOB_BYTES)).await?;
        let sink = crate::net::body::stream_into(body, sink, MAX_BLOB_BYTES)
            .await
            .map_err(|e| match e {
                crate::net::body::StreamError::TooLarge { .. } => HubError::TooLarge(format!(
                    "blob larger than {MAX_BLOB_BYTES} bytes, the largest a release may hold"
                )),
                crate::net::body::StreamError::Read(m) => HubError::Bad(m),
                crate::net::body::StreamError::Write(e) => HubError::Store(StoreError::Io {
                    action: "cannot write",
                    path: "tmp/ (an upload)".into(),
                    source: e,
                }),
            })?;
        let len = sink.len();
        let hub = self.clone();
        let created = blocking(move || {
            // Checked again with what came (a body without a length says nothing before).
            if !hub.store.has_blob(&hash)? {
                hub.pending_uploads()
                    .admit(len, quota)
                    .map_err(HubError::Full)?;
            }
            hub.store.adopt_blob(sink, &hash).map_err(|e| match e {
                StoreError::HashMismatch(_) => HubError::Bad(format!(
                    "the body does not hash to {hash}: it was corrupted on the way, or the URL names the wrong blob"
                )),
                e => HubError::Store(e),
            })
        })
        .await?;
        if created {
            self.metrics.blob_bytes.inc_by(len);
            let now = self.now_us();
            self.pending_uploads().add(hash, len, now);
        }
        Ok(created)
    }

    /// Whether every blob of release `id` is stored with the size its manifest gives: a
    /// commit stages only a complete release.
    pub(super) async fn check_complete(self: &Arc<Self>, id: ReleaseId) -> Result<(), HubError> {
        let manifest = Manifest::from_json(&self.release(id).await?)?;
        let named: Vec<Hash> = manifest.blobs().into_iter().map(|(h, _)| h).collect();
        let hub = self.clone();
        let (missing, wrong) = blocking(move || {
            let (mut missing, mut wrong) = (0usize, None);
            for (hash, size) in manifest.blobs() {
                match hub.store.blob_len(&hash)? {
                    None => missing += 1,
                    Some(len) if len != size => wrong = Some((hash, size, len)),
                    Some(_) => {}
                }
            }
            Ok::<_, StoreError>((missing, wrong))
        })
        .await?;
        if let Some((hash, size, len)) = wrong {
            return Err(HubError::Bad(format!(
                "release {id} says blob {hash} is {size} bytes; it is {len}: fix the manifest"
            )));
        }
        if missing > 0 {
            return Err(HubError::Conflict(format!(
                "release {id} lacks {missing} blob(s): PUT them before the commit"
            )));
        }
        self.pending_uploads().named(named.iter());
        Ok(())
    }

    /// The blobs of `blobs` the store lacks or holds with another size.
    pub(super) async fn lacking(
        self: &Arc<Self>,
        blobs: Vec<(Hash, u64)>,
    ) -> Result<Vec<Hash>, HubError> {
        let hub = self.clone();
        let missing = blocking(move || {
            let mut missing = Vec::new();
            for (hash, size) in blobs {
                if hub.store.blob_len(&hash)? != Some(size) {
                    missing.push(hash);
                }
            }
            Ok::<_, StoreError>(missing)
        })
        .await?;
        Ok(missing)
    }

    /// Removes the releases no one needs (anything but active, previous, staged and queued,
    /// and the releases their provenance names: agents check a built release against them)
    /// and the blobs only they used, once older than the grace period.
    pub async fn collect(&self) -> Result<Collected, HubError> {
        let state = self.state();
        let named: Vec<ReleaseId> = [
            state.active,
            state.previous,
            state.staged.map(|s| s.id),
            state.queued.map(|q| q.id),
        ]
        .into_iter()
        .flatten()
        .collect();
        let grace = self.settings().gc.grace;
        let store = self.store.clone();
        let done = blocking(move || {
            let mut keep = named.clone();
            let mut next = named;
            for _ in 0..MAX_DEPTH {
                let mut bases = Vec::new();
                for id in &next {
                    if let Some(b) = store.provenance(id)?.and_then(|p| p.base) {
                        if !keep.contains(&b) {
                            keep.push(b);
                            bases.push(b);
                        }
                    }
                }
                next = bases;
            }
            store.collect(&keep, grace)
        })
        .await?;
        // What is older than the grace is collected now, or was named: no longer pending.
        let cutoff = self
            .now_us()
            .saturating_sub(u64::try_from(grace.as_micros()).unwrap_or(u64::MAX));
        self.pending_uploads().expire(cutoff);
        self.metrics.gc_removed(&done);
        Ok(done)
    }

    /// Runs until `shutdown`: collects the store every `gc.interval` (re-read after each, so
    /// a reload applies).
    pub async fn run_gc(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            // Off: look again in a minute, a reload may turn it on.
            let interval = self.settings().gc.interval;
            let wait = if interval.is_zero() {
                Duration::from_secs(60)
            } else {
                interval
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            if self.settings().gc.interval.is_zero() {
                continue;
            }
            match self.collect().await {
                Ok(c) if c.releases + c.blobs > 0 => {
                    info!(
                        releases = c.releases,
                        blobs = c.blobs,
                        bytes = c.bytes,
                        "collected unused content from the store"
                    )
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "store collection failed; nothing was removed on a guess")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::hub::testing::{self, entry, manual, release, set, S};
    use crate::sync::changeset::{Change, Changeset, Mode};
    use crate::sync::cycle::Advancer;

    /// Every file under `dir`, by name.
    fn names(dir: &std::path::Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    #[tokio::test]
    async fn uploads_no_release_names_are_held_to_the_quota() {
        let (clock, now) = manual(100 * S);
        let fx = testing::hub(clock);
        let mut settings = testing::settings();
        settings.upload_quota = 100;
        fx.hub.set_settings(settings);
        let (a, b, c) = ("a".repeat(60), "b".repeat(60), "c".repeat(50));
        let put = |data: &str| {
            let (hub, data) = (fx.hub.clone(), data.to_string());
            async move {
                hub.put_blob(Hash::of(data.as_bytes()), data.into_bytes())
                    .await
            }
        };
        assert!(put(&a).await.unwrap());
        match put(&b).await {
            Err(HubError::Full(m)) => assert!(m.contains("sync.upload_quota"), "{m}"),
            other => panic!("over the quota: {other:?}"),
        }
        assert!(
            !fx.hub.store.has_blob(&Hash::of(b.as_bytes())).unwrap(),
            "refused, not stored"
        );
        // A commit naming `a` frees its place.
        let m = testing::manifest(&[("a.txt", &a)]);
        fx.hub.upload_manifest(&m.to_json()).await.unwrap();
        fx.hub.commit(m.id(), None, Vec::new()).await.unwrap();
        assert!(put(&b).await.unwrap());
        assert!(matches!(put(&c).await, Err(HubError::Full(_))));
        // What the collector may take after the grace no longer counts.
        testing::set(
            &now,
            100 * S + fx.hub.settings().gc.grace.as_micros() as u64 + S,
        );
        fx.hub.collect().await.unwrap();
        assert!(put(&c).await.unwrap());
    }

    #[tokio::test]
    async fn collection_keeps_the_signed_release_a_built_one_is_checked_against() {
        let (clock, now) = manual(100 * S);
        let fx = testing::hub(clock);
        let key = crate::sync::sign::SecretKey::generate(&ring::rand::SystemRandom::new())
            .unwrap()
            .0;
        let old = release(&fx.hub, &[("index.html", "old")]).await;
        let v1 = release(&fx.hub, &[("index.html", "v1")]).await;
        for (i, v) in [old, v1].into_iter().enumerate() {
            fx.hub
                .commit(v, None, vec![key.sign_release(&v)])
                .await
                .unwrap();
            set(&now, (110 + 10 * i as u64) * S);
            let cycle = fx.hub.state().cycle;
            fx.hub.advance(cycle, Advancer::Agent).await.unwrap();
        }
        // Two edits: the second is active, the first named by no one; `old` is the previous
        // release, v1 named by no one but the active release's provenance.
        let mut built = Vec::new();
        for seq in 1..=2u64 {
            let data = format!("edit {seq}");
            fx.hub
                .put_blob(Hash::of(data.as_bytes()), data.clone().into_bytes())
                .await
                .unwrap();
            let cs = Changeset {
                origin: "web1".into(),
                seq,
                mode: Mode::Immediate,
                base: None,
                detected_us: seq,
                changes: BTreeMap::from([(
                    format!("e{seq}.html"),
                    Change {
                        entry: Some(entry(&data)),
                        prev: None,
                    },
                )]),
            };
            built.push(
                fx.hub
                    .changeset(cs, fx.hub.now_us())
                    .await
                    .unwrap()
                    .release
                    .unwrap(),
            );
        }
        let s = fx.hub.state();
        assert_eq!((s.active, s.previous), (Some(built[1]), Some(old)));
        let releases = fx.dir.path().join("releases");
        for name in names(&releases) {
            crate::sync::store::age_file(&releases.join(name), Duration::from_secs(7200));
        }
        let done = fx.hub.collect().await.unwrap();
        assert_eq!(done.releases, 1, "only the first built release goes");
        let left = names(&releases);
        for kept in [format!("{v1}.json"), format!("{v1}.sigs.json")] {
            assert!(left.contains(&kept), "{kept} collected: {left:?}");
        }
        assert!(
            !left.iter().any(|n| n.starts_with(&built[0].to_hex())),
            "{left:?}"
        );
    }
}

/// [`Hub::pending_uploads`]: the ledger, locked; its byte count is exported when released.
pub(super) struct PendingUploads<'a> {
    ledger: std::sync::MutexGuard<'a, super::uploads::Uploads>,
    gauge: &'a prometheus_client::metrics::gauge::Gauge,
}

impl std::ops::Deref for PendingUploads<'_> {
    type Target = super::uploads::Uploads;
    fn deref(&self) -> &Self::Target {
        &self.ledger
    }
}

impl std::ops::DerefMut for PendingUploads<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.ledger
    }
}

impl Drop for PendingUploads<'_> {
    fn drop(&mut self) {
        self.gauge
            .set(i64::try_from(self.ledger.bytes()).unwrap_or(i64::MAX));
    }
}
