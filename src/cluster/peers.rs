//! The other hubs of the farm, as a source of blobs: each hub keeps the blobs it received in
//! its own store, so a hub asked for one it lacks fetches it from another hub (hash checked on
//! the way in, like any upload), and a commit first has the release's blobs stored on
//! `sync.cluster.replicas` hubs. Hubs find each other through the keys they hold in etcd
//! under their leases (`hubs/<name>`: the URL of their sync API).
//!
//! A hub calls another with its farm certificate (kind `hub`) over mutual TLS, or, between
//! hubs on one host, with the publish token (loopback only, as every token).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use tracing::warn;

use super::EtcdStore;
use crate::net::client::{ok, ClientTls, HttpClient, Remote};
use crate::sync::manifest::{Hash, ReleaseId, MAX_BLOB_BYTES};
use crate::sync::store::{HubStore, StoreError};

/// Longest a blob may take to come from another hub (64 MiB at ~1 MB/s).
const BLOB_TIMEOUT: Duration = Duration::from_secs(120);

/// Longest another hub may take to fetch a whole release's blobs.
const REPLICATE_TIMEOUT: Duration = Duration::from_secs(600);

/// The other hubs (see the module docs).
pub struct Peers {
    registry: Arc<EtcdStore>,
    replicas: usize,
    token: Option<String>,
    tls: Option<ClientTls>,
    clients: Mutex<HashMap<String, HttpClient>>,
    /// One fetch per blob at a time: the agents staging a release from a hub that lacks its
    /// blobs ask for each at once, and the first fetch serves them all.
    fetching: Mutex<HashMap<Hash, Arc<tokio::sync::Mutex<()>>>>,
}

/// What asking the other hubs for a release's blobs gave.
#[derive(Debug, Default)]
pub struct Replicas {
    /// Hubs that now store every blob of the release (this one not counted).
    pub stored: usize,
    /// What the others answered, hub by hub.
    pub failures: Vec<String>,
}

impl Peers {
    /// The hubs registered beside `registry`'s; a commit needs its blobs on `replicas` hubs.
    /// `token`: the publish token (sent to loopback hubs only); `tls`: this hub's farm
    /// identity for https hubs.
    pub fn new(
        registry: Arc<EtcdStore>,
        replicas: usize,
        token: Option<String>,
        tls: Option<ClientTls>,
    ) -> Peers {
        Peers {
            registry,
            replicas,
            token,
            tls,
            clients: Mutex::default(),
            fetching: Mutex::default(),
        }
    }

    /// How many hubs must store a release's blobs before it is committed.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Clients of the other live hubs.
    async fn others(&self) -> Result<Vec<(String, HttpClient)>, StoreError> {
        let registry = self.registry.clone();
        let listed = tokio::task::spawn_blocking(move || registry.peers())
            .await
            .map_err(|e| StoreError::Shared {
                action: "list the hubs",
                reason: e.to_string(),
            })??;
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (name, url) in listed {
            if let Some(c) = clients.get(&url) {
                out.push((name, c.clone()));
                continue;
            }
            match HttpClient::new(Remote::Hub, &url, self.token.clone(), self.tls.as_ref()) {
                Ok(c) => {
                    clients.insert(url, c.clone());
                    out.push((name, c));
                }
                Err(e) => {
                    warn!(hub = %name, error = %e, "a hub registered an address this hub cannot call")
                }
            }
        }
        Ok(out)
    }

    /// Fetches blob `hash` from another hub into `store` (its hash checked before it is
    /// kept). Errors name what each hub answered.
    pub async fn fetch_blob(&self, hash: Hash, store: &Arc<dyn HubStore>) -> Result<(), String> {
        let one = self
            .fetching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(hash)
            .or_default()
            .clone();
        let result = {
            let _one = one.lock().await;
            let s = store.clone();
            match tokio::task::spawn_blocking(move || s.has_blob(&hash)).await {
                // Fetched by the request this one waited for.
                Ok(Ok(true)) => Ok(()),
                _ => self.fetch_from_others(hash, store).await,
            }
        };
        let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        // The last one out removes the entry (the map holds one reference, `one` another).
        if Arc::strong_count(&one) <= 2 {
            fetching.remove(&hash);
        }
        result
    }

    async fn fetch_from_others(&self, hash: Hash, store: &Arc<dyn HubStore>) -> Result<(), String> {
        let others = self.others().await.map_err(|e| e.to_string())?;
        let mut why = Vec::new();
        for (name, client) in others {
            let s = store.clone();
            let sink = tokio::task::spawn_blocking(move || s.blob_sink(MAX_BLOB_BYTES))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let path = format!("/sync/v1/blobs/{hash}");
            match client
                .download(&path, BLOB_TIMEOUT, MAX_BLOB_BYTES, sink)
                .await
            {
                Ok(sink) => {
                    let s = store.clone();
                    match tokio::task::spawn_blocking(move || s.adopt_blob(sink, &hash)).await {
                        Ok(Ok(_)) => return Ok(()),
                        Ok(Err(e)) => why.push(format!("{name}: {e}")),
                        Err(e) => why.push(format!("{name}: {e}")),
                    }
                }
                Err(e) => why.push(format!("{name}: {e}")),
            }
        }
        if why.is_empty() {
            why.push("no other hub is registered".into());
        }
        Err(format!(
            "blob {hash} from the other hubs: {}",
            why.join("; ")
        ))
    }

    /// Asks every other hub to store release `id`'s blobs (they fetch what they lack, from
    /// any hub), all at once; says how many did.
    pub async fn replicate(&self, id: ReleaseId) -> Replicas {
        let others = match self.others().await {
            Ok(o) => o,
            Err(e) => {
                return Replicas {
                    stored: 0,
                    failures: vec![e.to_string()],
                }
            }
        };
        let mut asks = tokio::task::JoinSet::new();
        for (name, client) in others {
            asks.spawn(async move {
                let path = format!("/sync/v1/releases/{id}/replicate");
                let r = client
                    .send(Method::POST, &path, None, REPLICATE_TIMEOUT)
                    .await
                    .and_then(ok);
                (name, r)
            });
        }
        let mut out = Replicas::default();
        while let Some(done) = asks.join_next().await {
            match done {
                Ok((_, Ok(_))) => out.stored += 1,
                Ok((name, Err(e))) => out.failures.push(format!("{name}: {e}")),
                Err(e) => out.failures.push(e.to_string()),
            }
        }
        out
    }
}
