//! Forwarding: a changeset detected on this backend goes
//!
//! - to the **hub**, always, from the durable outbox (`outbox/<seq>.json`, oldest first): the
//!   hub answers `missing` with the blobs it lacks (uploaded, then the changeset again),
//!   `applied` with any conflicts it resolved, or `duplicate`. Failures are retried with
//!   doubling back-off; a file leaves the outbox only once the hub has it. A changeset the hub
//!   refuses as malformed moves to `outbox/refused/` (kept for the operator, never retried).
//!   The hub is how a stopped or new agent catches up, and in `scheduled` mode the only path;
//! - in `immediate` mode, also **directly to every other agent** (`POST
//!   /.lockstep/changesets` on their serve address, blobs inline — see [`encode`]), one try
//!   and one retry: this is the fast path; an agent it misses gets the change from the hub.
//!   Peers are the static `peers:` list, or the other agents the hub's registry knows.
//!
//! Installing never re-triggers forwarding: only [`super::local`] creates changesets.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::metrics::AgentMetrics;
use crate::net::client::{ok, ClientTls, HttpClient, Remote};
use crate::sync::changeset::Changeset;
use crate::sync::manifest::Hash;
use crate::sync::protocol::{ChangesetReply, Fleet, PREFIX};
use crate::sync::provenance::{ChangesetSigner, SignedChangeset};
use crate::sync::store::FsStore;

use super::frame::{encode, FRAME_TYPE, MAX_INLINE_BYTES, PEER_PATH};
use super::messages::Out;
use super::outbox::{outbox_dir, outbox_files};

/// How often the peer list is read from the hub's registry.
pub const PEER_REFRESH: Duration = Duration::from_secs(2);
const PEER_TIMEOUT: Duration = Duration::from_secs(5);
const HUB_TIMEOUT: Duration = Duration::from_secs(30);
const RETRY_BASE: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Where peers come from.
#[derive(Clone)]
pub enum Peers {
    /// A fixed list of serve URLs.
    Static(Vec<String>),
    /// The hub's registry, refreshed in the background.
    Registry(watch::Receiver<Vec<String>>),
}

impl Peers {
    fn list(&self) -> Vec<String> {
        match self {
            Peers::Static(v) => v.clone(),
            Peers::Registry(rx) => rx.borrow().clone(),
        }
    }
}

/// Keeps the peer list from the hub's registry: every other agent whose report (with a serve
/// address) still counts.
pub async fn registry(
    client: HttpClient,
    name: String,
    scheme: &'static str,
    tx: watch::Sender<Vec<String>>,
    metrics: Arc<AgentMetrics>,
    shutdown: CancellationToken,
) {
    loop {
        match client
            .json::<Fleet>(
                Method::GET,
                &format!("{PREFIX}/agents"),
                None::<&()>,
                HUB_TIMEOUT,
            )
            .await
        {
            Ok(fleet) => {
                let mut peers: Vec<String> = fleet
                    .agents
                    .iter()
                    // A stale entry may be an agent gone, or a forged address nobody renews.
                    .filter(|a| a.name != name && !a.stale)
                    .filter_map(|a| a.report.serve.as_ref())
                    .map(|s| format!("{scheme}://{s}"))
                    .collect();
                peers.sort();
                metrics.peers.set(peers.len() as i64);
                tx.send_if_modified(|p| {
                    let changed = *p != peers;
                    *p = peers;
                    changed
                });
            }
            Err(e) => debug!(error = %e, "cannot read the hub's agent registry"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PEER_REFRESH) => {}
        }
    }
}

/// Sends changesets on: to peers at once (immediate), and through the outbox to the hub.
/// The forwarder never creates a changeset; it only carries what [`super::local`] made.
pub struct Forwarder {
    /// The hub.
    pub client: HttpClient,
    /// The agent's token (sent to peers on loopback).
    pub token: Option<String>,
    /// TLS to peers: the farm CA, and this agent's certificate.
    pub tls: Option<ClientTls>,
    /// Signs the changesets sent (with the farm certificate's key).
    pub signer: Option<Arc<ChangesetSigner>>,
    /// The agent's store (blobs, outbox).
    pub store: Arc<FsStore>,
    /// The other agents.
    pub peers: Peers,
    /// Metrics.
    pub metrics: Arc<AgentMetrics>,
    /// The outbox's size against its quota.
    pub outbox: Arc<super::outbox::Usage>,
    /// Frame bytes being sent to peers at once, in [`SEND_UNIT`]s ([`SEND_BUDGET`]).
    pub sending: Arc<tokio::sync::Semaphore>,
}

/// The unit of [`SEND_BUDGET`].
pub const SEND_UNIT: usize = 64 * 1024;
/// Frame bytes in flight to peers at once, in [`SEND_UNIT`]s (64 MiB): past it, a changeset
/// is not sent directly (the peers get it from the hub), so slow peers cannot make the agent
/// hold more.
pub const SEND_BUDGET: usize = 1024;

impl Forwarder {
    /// Runs until `shutdown`: each changeset from `rx` is sent to the peers (immediate mode)
    /// and the outbox is drained to the hub.
    pub async fn run(self, mut rx: mpsc::Receiver<Out>, shutdown: CancellationToken) {
        let me = Arc::new(self);
        let wake = Arc::new(Notify::new());
        let drain = tokio::spawn(me.clone().drain(wake.clone(), shutdown.clone()));
        let clients: Arc<Mutex<HashMap<String, HttpClient>>> = Arc::default();
        loop {
            let out = tokio::select! {
                _ = shutdown.cancelled() => break,
                out = rx.recv() => match out { Some(o) => o, None => break },
            };
            match out {
                Out::Peers(cs, held) => me.to_peers(cs, &held, &clients),
                Out::Recorded => wake.notify_one(),
            }
        }
        drain.abort();
    }

    /// `cs` as it is sent: signed when the agent has a farm certificate.
    fn signed(&self, cs: Changeset) -> SignedChangeset {
        match &self.signer {
            Some(s) => s.sign(cs),
            None => SignedChangeset::unsigned(cs),
        }
    }

    fn to_peers(
        self: &Arc<Self>,
        cs: Changeset,
        held: &[(Hash, Bytes)],
        clients: &Arc<Mutex<HashMap<String, HttpClient>>>,
    ) {
        let bytes: u64 = cs.blobs().iter().map(|(_, n)| n).sum();
        if bytes > MAX_INLINE_BYTES {
            debug!(changeset = %cs.name(), bytes, "too big to send to peers directly; they get it through the hub");
            return;
        }
        let store = self.store.clone();
        let Some(frame) = encode(&self.signed(cs.clone()), |h| {
            match held.iter().find(|(k, _)| k == h) {
                Some((_, b)) => Some(b.to_vec()),
                None => store.read_blob(h).ok().flatten(),
            }
        }) else {
            warn!(changeset = %cs.name(), "a blob of the changeset is missing from the store; peers get it through the hub");
            return;
        };
        let units = (frame.len() / SEND_UNIT + 1) * self.peers.list().len();
        let Ok(budget) = self
            .sending
            .clone()
            .try_acquire_many_owned(units.min(SEND_BUDGET) as u32)
        else {
            self.metrics.forward_failures.inc();
            debug!(changeset = %cs.name(), "sends to peers are behind; they get this one from the hub");
            return;
        };
        let budget = Arc::new(budget);
        for peer in self.peers.list() {
            let Some(client) = self.peer_client(&peer, clients) else {
                continue;
            };
            let send = send_to_peer(client, frame.clone(), cs.name(), self.metrics.clone());
            let budget = budget.clone();
            tokio::spawn(async move {
                let _budget = budget;
                send.await
            });
        }
    }

    /// The client for `peer`, made on first use and kept; `None` when its address is unusable.
    fn peer_client(
        &self,
        peer: &str,
        clients: &Mutex<HashMap<String, HttpClient>>,
    ) -> Option<HttpClient> {
        let mut map = clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(peer) {
            return Some(c.clone());
        }
        match HttpClient::new(Remote::Peer, peer, self.token.clone(), self.tls.as_ref()) {
            Ok(c) => {
                map.insert(peer.to_string(), c.clone());
                Some(c)
            }
            Err(e) => {
                warn!(peer = %peer, error = %e, "unusable peer address");
                None
            }
        }
    }

    fn outbox(&self) -> PathBuf {
        outbox_dir(&self.store)
    }

    async fn drain(self: Arc<Self>, wake: Arc<Notify>, shutdown: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let mut stalled = false;
            for file in outbox_files(&self.store) {
                let cs = match std::fs::read(&file)
                    .map_err(|e| e.to_string())
                    .and_then(|b| {
                        serde_json::from_slice::<Changeset>(&b).map_err(|e| e.to_string())
                    }) {
                    Ok(cs) => cs,
                    Err(e) => {
                        error!(file = %file.display(), error = %e, "unreadable outbox entry set aside");
                        self.set_aside(&file);
                        continue;
                    }
                };
                match self.to_hub(&cs).await {
                    Ok(()) => {
                        failures = 0;
                        let _ = std::fs::remove_file(&file);
                        self.outbox.remove(&cs);
                    }
                    Err(Refused(e)) => {
                        error!(changeset = %cs.name(), error = %e, "the hub refused the changeset; set aside in outbox/refused");
                        self.metrics.refused("hub");
                        self.set_aside(&file);
                        self.outbox.remove(&cs);
                    }
                    Err(Retry(e)) => {
                        failures += 1;
                        warn!(changeset = %cs.name(), error = %e, "cannot send the changeset to the hub yet; retrying");
                        stalled = true;
                        break;
                    }
                }
            }
            let pause = if stalled {
                super::plan::backoff(failures, RETRY_BASE, RETRY_MAX)
            } else {
                Duration::from_secs(3600)
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    fn set_aside(&self, file: &std::path::Path) {
        let dir = self.outbox().join("refused");
        let _ = std::fs::create_dir_all(&dir);
        if let Some(name) = file.file_name() {
            let _ = std::fs::rename(file, dir.join(name));
        }
        let gone = super::outbox::trim_refused(&self.store, super::outbox::MAX_REFUSED);
        if gone > 0 {
            warn!(
                removed = gone,
                kept = super::outbox::MAX_REFUSED,
                "outbox/refused is full; its oldest entries were removed"
            );
        }
    }

    async fn to_hub(&self, cs: &Changeset) -> Result<(), HubFailure> {
        let path = format!("{PREFIX}/changesets");
        let signed = self.signed(cs.clone());
        for _ in 0..3 {
            let reply: ChangesetReply = match self
                .client
                .json(Method::POST, &path, Some(&signed), HUB_TIMEOUT)
                .await
            {
                Ok(r) => r,
                Err(e)
                    if e.status().is_some_and(|s| {
                        s.is_client_error()
                            && s.as_u16() != 401
                            && s.as_u16() != 403
                            && s.as_u16() != 409
                    }) =>
                {
                    return Err(Refused(e.to_string()))
                }
                Err(e) => return Err(Retry(e.to_string())),
            };
            use crate::sync::protocol::ChangesetState;
            match reply.state {
                ChangesetState::Missing => {
                    for hash in &reply.missing {
                        let data = self
                            .store
                            .read_blob(hash)
                            .map_err(|e| Retry(e.to_string()))?
                            .ok_or_else(|| {
                                Refused(format!("blob {hash} is no longer in the agent's store"))
                            })?;
                        self.client
                            .send(
                                Method::PUT,
                                &format!("{PREFIX}/blobs/{hash}"),
                                Some((Bytes::from(data), "application/octet-stream")),
                                HUB_TIMEOUT,
                            )
                            .await
                            .and_then(ok)
                            .map_err(|e| Retry(e.to_string()))?;
                    }
                }
                ChangesetState::Applied | ChangesetState::Duplicate => {
                    self.metrics.forwarded("hub");
                    for c in &reply.conflicts {
                        self.metrics.conflicts.inc();
                        if c.loser.origin == cs.origin {
                            warn!(path = %c.path, winner = %c.winner.origin, "our edit crossed a later one from another backend and lost");
                        } else {
                            info!(path = %c.path, loser = %if c.loser.origin.is_empty() { "a publish" } else { &c.loser.origin }, "our edit won over a concurrent one");
                        }
                    }
                    debug!(changeset = %cs.name(), state = %reply.state, "the hub has the changeset");
                    return Ok(());
                }
            }
        }
        Err(Retry("the hub kept asking for blobs".into()))
    }
}

enum HubFailure {
    Refused(String),
    Retry(String),
}
use HubFailure::{Refused, Retry};

/// Sends one frame to a peer, once more after [`RETRY_BASE`] if the first try fails; a peer
/// that misses it catches up from the hub.
async fn send_to_peer(client: HttpClient, frame: Bytes, name: String, metrics: Arc<AgentMetrics>) {
    for attempt in 0..2 {
        let r = client
            .send(
                Method::POST,
                PEER_PATH,
                Some((frame.clone(), FRAME_TYPE)),
                PEER_TIMEOUT,
            )
            .await
            .and_then(ok);
        match r {
            Ok(_) => {
                metrics.forwarded("peer");
                return;
            }
            Err(e) if attempt == 0 => {
                debug!(peer = %client.url(), changeset = %name, error = %e, "forward to peer failed; once more");
                tokio::time::sleep(RETRY_BASE).await;
            }
            Err(e) => {
                metrics.forward_failures.inc();
                debug!(peer = %client.url(), changeset = %name, error = %e, "forward to peer failed; it will catch up from the hub");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::frame::{decode, FrameError};
    use crate::agent::outbox::{outbox_blobs, OUTBOX};
    use crate::sync::changeset::{diff, Mode};
    use crate::sync::manifest::Entry;
    use crate::sync::manifest::Hash;
    use std::collections::BTreeMap;

    fn changeset(files: &[(&str, &[u8])]) -> Changeset {
        let new: BTreeMap<String, Entry> = files
            .iter()
            .map(|(p, d)| {
                (
                    p.to_string(),
                    Entry {
                        hash: Hash::of(d),
                        size: d.len() as u64,
                        content_type: "text/plain".into(),
                    },
                )
            })
            .collect();
        Changeset {
            origin: "a1".into(),
            seq: 7,
            mode: Mode::Immediate,
            base: None,
            detected_us: 1,
            changes: diff(&BTreeMap::new(), &new),
        }
    }

    #[test]
    fn blobs_of_changesets_waiting_for_the_hub_outlive_a_collection() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let cs = changeset(&[("a", b"waiting"), ("b", b"also waiting")]);
        for d in [&b"waiting"[..], b"also waiting", b"unneeded"] {
            store.write_blob(&Hash::of(d), d).unwrap();
            crate::sync::store::age_file(&store.blob_path(&Hash::of(d)), Duration::from_secs(7200));
        }
        crate::agent::local::write_outbox(&store, &cs).unwrap();
        let pinned = outbox_blobs(&store);
        assert_eq!(pinned.len(), 2);
        let hour = Duration::from_secs(3600);
        let done = store.collect(&[], &pinned, hour).unwrap();
        assert_eq!(done.blobs, 1, "only the blob no changeset needs");
        assert!(store.has_blob(&Hash::of(b"waiting")));
        // Delivered (the file leaves the outbox): the blobs are no longer pinned.
        for e in std::fs::read_dir(dir.path().join(OUTBOX))
            .unwrap()
            .flatten()
        {
            std::fs::remove_file(e.path()).unwrap();
        }
        assert!(outbox_blobs(&store).is_empty());
    }

    #[test]
    fn frames_round_trip_and_refuse_damage() {
        let files: &[(&str, &[u8])] = &[("a", b"hello"), ("b", b"world"), ("c", b"hello")];
        let cs = SignedChangeset::unsigned(changeset(files));
        let blob = |h: &Hash| {
            files
                .iter()
                .find(|(_, d)| Hash::of(d) == *h)
                .map(|(_, d)| d.to_vec())
        };
        let frame = encode(&cs, blob).unwrap();
        let (back, blobs) = decode(&frame).unwrap();
        assert_eq!(back, cs);
        assert_eq!(blobs.len(), 2, "a blob shared by two paths travels once");
        // Any flipped byte of a blob is caught; a cut frame is refused.
        let mut bad = frame.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(decode(&bad), Err(FrameError::Damaged(_))));
        assert!(decode(&frame[..frame.len() - 1]).is_err());
        assert!(decode(&frame[..3]).is_err());
        let mut long = frame.to_vec();
        long.push(0);
        assert!(decode(&long).is_err());
        // A huge declared length does not overflow or panic.
        let mut huge = frame.to_vec();
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(&huge).is_err());
        // A blob missing from the store: nothing to send.
        assert!(encode(&cs, |_| None).is_none());
    }

    #[test]
    fn a_bare_changeset_frame_from_an_older_agent_still_decodes() {
        let cs = changeset(&[("a", b"x")]);
        let json = serde_json::to_vec(&cs).unwrap();
        let mut frame = (json.len() as u32).to_be_bytes().to_vec();
        frame.extend(&json);
        frame.extend(b"x");
        let (back, _) = decode(&frame).unwrap();
        assert_eq!(back, SignedChangeset::unsigned(cs));
    }
}
