//! [`EtcdStore`]: the hub's store when several hubs share a farm (`sync.cluster`). The cycle
//! state, the manifests, the signatures and the provenances live in etcd ([`super::keys`]);
//! blobs stay in each hub's own [`FsStore`], which also keeps a copy of every manifest, the
//! signatures and the provenances this hub has seen, so a hub cut off from etcd still serves
//! what it has.
//!
//! - **Compare-and-swap**: one etcd transaction compares `state-version` with the version the
//!   caller read and writes the state and its version together: exactly one hub wins each
//!   change. When etcd does not say whether a swap was applied (a leader lost mid-request, a
//!   timeout), the state is read back and the outcome decided from it, never guessed.
//! - **Following**: a watch on the state key feeds [`HubStore::changes`], so a long poll on any
//!   hub sees a change made on another within one watch event.
//! - **Leadership**: each hub holds a lease (`sync.cluster.lease`) and keeps it alive; the hub
//!   whose lease holds the `leader` key does the once-only duties ([`HubStore::leads`]). A hub
//!   that cannot renew its lease stops leading at the lease's end by its own clock, before
//!   etcd lets another take over.
//!
//! The trait is synchronous (the hub calls it on tokio's blocking pool), etcd's client is
//! async: the store runs the client on a runtime of its own (one thread, `etcd`) and waits
//! for each call on a channel, so it may be called from any thread, a runtime's included.
#![allow(clippy::disallowed_methods)] // I/O shell: the lease's deadline on the monotonic clock

use std::collections::HashSet;
use std::fs::File;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::keys::{Beside, Keys};
use crate::config::cluster::Cluster;
use crate::sync::clock::wall_us;
use crate::sync::cycle::HubState;
use crate::sync::manifest::{Hash, ReleaseId};
use crate::sync::protocol::{ClusterView, SharedAcme, SharedDrain, SharedReport};
use crate::sync::provenance::Provenance;
use crate::sync::sign::Signature;
use crate::sync::store::{BlobSink, Collected, FsStore, HubStore, StoreError};

/// Longest wait for one etcd call (a transaction, a read), its repeats included, before it
/// counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait for one attempt: a request to a member that died holding it fails after
/// this, and is tried again on another.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a call that fails for a passing reason is tried again (within [`CALL_TIMEOUT`]):
/// an etcd leader election takes about a second.
const RETRY_FOR: Duration = Duration::from_secs(5);

/// How long a swap whose outcome etcd did not tell is looked up again before giving up.
const RESOLVE_FOR: Duration = Duration::from_secs(10);

/// Values the hubs share (reports, drains) passed from etcd that may wait to be taken.
const SHARED: usize = 1024;

/// Pause between attempts to reach etcd again (watch, lease).
const RETRY: Duration = Duration::from_secs(1);

/// Whether this hub reaches etcd and leads, as its lease loop last saw.
#[derive(Debug)]
struct Standing {
    epoch: Instant,
    /// Until when (µs since `epoch`) the last renewal holds; 0: not renewed.
    renewed_until: AtomicU64,
    /// Whether the lease renewed last holds the leader key.
    leader: AtomicBool,
    /// Who holds the leader key, and the live hubs, as the last renewal saw them.
    seen: Mutex<(Option<String>, Vec<String>)>,
    /// Whether the state is followed (read, and watched since).
    following: AtomicBool,
    /// What etcd last answered when a renewal or the following failed (cleared by a renewal).
    error: Mutex<Option<String>>,
}

impl Standing {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Whether the lease holds and the state is followed: only then does this hub change the
    /// state, lead, or answer the schedule.
    fn connected(&self) -> bool {
        self.now() < self.renewed_until.load(Ordering::Acquire)
            && self.following.load(Ordering::Acquire)
    }

    /// Keeps `e` as why etcd cannot be used (one line, at most 300 characters).
    fn failed(&self, e: &dyn std::fmt::Display) {
        let mut line: String = e.to_string().replace(['\n', '\r'], " ");
        if let Some((cut, _)) = line.char_indices().nth(300) {
            line.truncate(cut);
        }
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(line);
    }
}

/// A runtime that shuts down without waiting, wherever it is dropped (a runtime's own
/// drop refuses to run inside another runtime).
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl OwnRuntime {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("runtime until drop").handle()
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The hub's store on etcd (see the module docs).
pub struct EtcdStore {
    local: FsStore,
    keys: Keys,
    name: String,
    client: Client,
    changes: watch::Sender<HubState>,
    standing: Arc<Standing>,
    /// The lease this hub holds (0: none yet), revoked at drop so another hub leads at once.
    lease: Arc<AtomicU64>,
    /// The agents' reports as the hubs share them, until the hub takes them.
    reports: Mutex<Option<tokio::sync::mpsc::Receiver<SharedReport>>>,
    /// The backends drained or enabled on any appliance, until the appliance takes them.
    drains: Mutex<Option<tokio::sync::mpsc::Receiver<SharedDrain>>>,
    /// What the appliances share of ACME, until the ACME task takes it.
    acme: Mutex<Option<tokio::sync::mpsc::Receiver<SharedAcme>>>,
    rt: OwnRuntime,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn shared(action: &'static str) -> impl FnOnce(etcd_client::Error) -> StoreError {
    move |e| StoreError::Shared {
        action,
        reason: e.to_string(),
    }
}

fn parse<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::CorruptKey {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

impl EtcdStore {
    /// Connects to `cluster`'s etcd with `local` for the blobs, and starts following the
    /// state and keeping this hub's lease, under which it registers `advertise` (the URL the
    /// other hubs reach its sync API at). etcd need not answer yet: the hub starts cut off
    /// (it says why), changes nothing and answers no schedule until it does; the appliance's
    /// proxy and DNS serve meanwhile.
    pub fn connect(
        cluster: &Cluster,
        local: FsStore,
        advertise: &str,
    ) -> Result<EtcdStore, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Shared {
                action: "start its client",
                reason: e.to_string(),
            })?;
        let rt = OwnRuntime(Some(rt));
        let mut options = ConnectOptions::new()
            .with_connect_timeout(ATTEMPT_TIMEOUT)
            .with_timeout(ATTEMPT_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            // A member cut off from the others' quorum answers nothing rather than stale.
            .with_require_leader(true);
        if let Some(tls) = &cluster.tls {
            let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(Identity::from_pem(cert, key));
            }
            options = options.with_tls(t);
        }
        let endpoints = cluster.endpoints.clone();
        let client = block(rt.handle(), "connect", async move {
            Client::connect(endpoints, Some(options)).await
        })?;
        let initial = HubState::default();
        let store = EtcdStore {
            local,
            keys: Keys::new(&cluster.prefix),
            name: cluster.name.clone(),
            client,
            changes: watch::Sender::new(initial),
            standing: Arc::new(Standing {
                epoch: Instant::now(),
                renewed_until: AtomicU64::new(0),
                leader: AtomicBool::new(false),
                seen: Mutex::default(),
                following: AtomicBool::new(false),
                error: Mutex::default(),
            }),
            lease: Arc::new(AtomicU64::new(0)),
            reports: Mutex::new(None),
            drains: Mutex::new(None),
            acme: Mutex::new(None),
            rt,
        };
        // One attempt: the state's follower reads it again until it can.
        let (mut c, key) = (store.client.clone(), store.keys.state());
        let first = block(store.rt.handle(), "read the state", async move {
            attempt(c.get(key, None)).await
        })
        .and_then(|r| match r.kvs().first() {
            None => Ok(HubState::default()),
            Some(kv) => parse(&store.keys.state(), kv.value()),
        });
        match first {
            Ok(state) => {
                store.changes.send_replace(state);
            }
            Err(e) => {
                store.standing.failed(&e);
                warn!(hub = %store.name, error = %e, "etcd does not answer: this hub starts cut off (it changes nothing and answers no schedule until etcd does; the proxy and DNS serve)");
            }
        }
        store.rt.handle().spawn(follow(
            store.client.clone(),
            store.keys.clone(),
            store.changes.clone(),
            store.standing.clone(),
        ));
        let (tx, rx) = tokio::sync::mpsc::channel(SHARED);
        *store.reports.lock().unwrap_or_else(|p| p.into_inner()) = Some(rx);
        let follow_reports = follow_prefix(store.client.clone(), store.keys.agent(""), tx);
        store.rt.handle().spawn(follow_reports);
        let (tx, rx) = tokio::sync::mpsc::channel(SHARED);
        *store.drains.lock().unwrap_or_else(|p| p.into_inner()) = Some(rx);
        let follow_drains = follow_prefix(store.client.clone(), store.keys.drain("", ""), tx);
        store.rt.handle().spawn(follow_drains);
        let (tx, rx) = tokio::sync::mpsc::channel(SHARED);
        *store.acme.lock().unwrap_or_else(|p| p.into_inner()) = Some(rx);
        let follow_acme = follow_prefix(store.client.clone(), store.keys.acme("", ""), tx);
        store.rt.handle().spawn(follow_acme);
        let registration = serde_json::json!({ "url": advertise }).to_string();
        store.rt.handle().spawn(keep_lease(
            store.client.clone(),
            store.keys.clone(),
            (store.name.clone(), registration),
            cluster.lease,
            store.standing.clone(),
            store.lease.clone(),
        ));
        info!(hub = %store.name, endpoints = ?cluster.endpoints, prefix = %cluster.prefix, "hub state in etcd");
        Ok(store)
    }

    /// Where `item` is kept in etcd.
    fn acme_key(&self, item: &SharedAcme) -> String {
        match item {
            SharedAcme::Certificate { listener, .. } => self.keys.acme("cert", listener),
            SharedAcme::Http01 { token, .. } => self.keys.acme("http01", token),
            SharedAcme::TlsAlpn01 { name, .. } => self.keys.acme("alpn01", name),
        }
    }

    /// The other live hubs: their names and the URLs they registered.
    pub fn peers(&self) -> Result<Vec<(String, String)>, StoreError> {
        let kvs = self.list("list the hubs", self.keys.hub(""))?;
        let mine = self.keys.hub(&self.name);
        Ok(kvs
            .iter()
            .filter(|kv| kv.key() != mine.as_bytes())
            .filter_map(|kv| {
                let name = kv.key_str().ok()?.rsplit('/').next()?.to_string();
                let v: serde_json::Value = serde_json::from_slice(kv.value()).ok()?;
                Some((name, v.get("url")?.as_str()?.to_string()))
            })
            .collect())
    }

    /// Runs an etcd call on the store's runtime and waits for it, trying it again while it
    /// fails for a reason that passes (an etcd leader election, a member that went away while
    /// others answer) within [`RETRY_FOR`]. Only for calls that may be repeated: reads, and
    /// writes whose second application changes nothing (the state swap is not one: see
    /// [`EtcdStore::resolve`]).
    fn call<T: Send + 'static>(
        &self,
        action: &'static str,
        f: impl Fn(Client) -> Call<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let client = self.client.clone();
        block(self.rt.handle(), action, async move {
            let until = Instant::now() + RETRY_FOR;
            let mut pause = Duration::from_millis(50);
            // The reason etcd gave, kept over a later attempt that only ran out of time.
            let mut cause = None;
            loop {
                let r = attempt(f(client.clone())).await;
                match r {
                    Err(e) if passes(&e) && Instant::now() + pause < until => {
                        if !timed_out(&e) {
                            cause = Some(e);
                        }
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(500));
                    }
                    Err(e) if timed_out(&e) => return Err(cause.unwrap_or(e)),
                    Err(e) => return Err(e),
                    ok => return ok,
                }
            }
        })
    }

    /// Every key under `prefix`, with its value (repeatable, see [`EtcdStore::call`]).
    fn list(
        &self,
        action: &'static str,
        prefix: String,
    ) -> Result<Vec<etcd_client::KeyValue>, StoreError> {
        self.call(action, move |mut c| {
            let prefix = prefix.clone();
            Box::pin(async move {
                let mut r = c.get(prefix, Some(GetOptions::new().with_prefix())).await?;
                Ok(r.take_kvs())
            })
        })
    }

    fn get(&self, key: String) -> Result<Option<etcd_client::KeyValue>, StoreError> {
        self.call("read", move |mut c| {
            let key = key.clone();
            Box::pin(async move {
                let mut r = c.get(key, None).await?;
                Ok(r.take_kvs().into_iter().next())
            })
        })
    }

    /// A transaction that may be repeated (see [`EtcdStore::call`]).
    fn txn(&self, action: &'static str, t: Txn) -> Result<etcd_client::TxnResponse, StoreError> {
        self.call(action, move |mut c| {
            let t = t.clone();
            Box::pin(async move { c.txn(t).await })
        })
    }

    /// One attempt at the state swap (see [`HubStore::swap_state`]).
    fn try_swap(&self, expected: u64, new: &HubState) -> Result<bool, StoreError> {
        let vkey = self.keys.state_version();
        let check = if expected == 0 {
            Compare::version(vkey.clone(), CompareOp::Equal, 0)
        } else {
            Compare::value(vkey.clone(), CompareOp::Equal, expected.to_string())
        };
        // Plain structs of ids and numbers always serialise.
        let bytes = serde_json::to_vec(new).expect("state serialises");
        let t = Txn::new().when([check]).and_then([
            TxnOp::put(self.keys.state(), bytes, None),
            TxnOp::put(vkey, new.version.to_string(), None),
        ]);
        // Once: whether a failed swap was applied is for `resolve` to find out.
        let mut c = self.client.clone();
        let r = block(
            self.rt.handle(),
            "swap the state",
            async move { c.txn(t).await },
        )?;
        Ok(r.succeeded())
    }

    /// A swap of the state from version `expected` to `new` that etcd did not answer: reads
    /// the state back until it tells whether `new` was written (true), another change won
    /// (false), or nothing happened (`None`: try again). When the state has moved on since,
    /// its history tells which state followed `expected` ([`EtcdStore::was_written`]): a
    /// swap that was applied and then built upon is still this caller's win. Public for the
    /// tests, which cannot lose an answer on purpose.
    pub fn resolve(&self, expected: u64, new: &HubState) -> Result<Option<bool>, StoreError> {
        let deadline = Instant::now() + RESOLVE_FOR;
        let key = self.keys.state();
        loop {
            let read = self
                .get(key.clone())
                .and_then(|kv| match kv {
                    None => Ok((HubState::default(), 0)),
                    Some(kv) => Ok((parse::<HubState>(&key, kv.value())?, kv.mod_revision())),
                })
                .and_then(|(s, revision)| match s {
                    s if s == *new => Ok(Some(true)),
                    s if s.version == expected => Ok(None),
                    s if s.version < new.version => Ok(Some(false)),
                    _ => self.was_written(new, revision).map(Some),
                });
            match read {
                Err(e) if Instant::now() < deadline => {
                    debug!(error = %e, "looking up a swap's outcome again");
                    std::thread::sleep(Duration::from_millis(200));
                }
                outcome => return outcome,
            }
        }
    }

    /// Whether `new` is the state written at its version, looking back through the state
    /// key's history from the value written at `revision` (one read per state since; an error
    /// when etcd has compacted that history away, rather than a guess).
    fn was_written(&self, new: &HubState, mut revision: i64) -> Result<bool, StoreError> {
        let key = self.keys.state();
        // Changes are a few per second at most: a few dozen is far more than a lookup takes.
        for _ in 0..64 {
            let (k, before) = (key.clone(), revision - 1);
            let kv = self.call("read the state's history", move |mut c| {
                let k = k.clone();
                Box::pin(async move {
                    let mut r = c
                        .get(k, Some(GetOptions::new().with_revision(before)))
                        .await?;
                    Ok(r.take_kvs().into_iter().next())
                })
            })?;
            let Some(kv) = kv else { return Ok(false) };
            let s: HubState = parse(&key, kv.value())?;
            if s.version <= new.version {
                return Ok(s == *new);
            }
            revision = kv.mod_revision();
        }
        Err(StoreError::Shared {
            action: "look up a swap's outcome",
            reason: "the state changed too often since".into(),
        })
    }

    /// The value of a JSON key, parsed; `None` if absent.
    fn read_json<T: DeserializeOwned>(&self, key: String) -> Result<Option<(T, i64)>, StoreError> {
        match self.get(key.clone())? {
            None => Ok(None),
            Some(kv) => Ok(Some((parse(&key, kv.value())?, kv.mod_revision()))),
        }
    }

    /// Keeps a copy of manifest `id` in the local store (for serving it cut off from etcd,
    /// and for the local collection); false when etcd has none either.
    fn cache_release(&self, id: &ReleaseId) -> Result<bool, StoreError> {
        Ok(HubStore::get_release(self, id)?.is_some())
    }

    /// Removes from etcd the reports of agents silent for longer than `grace` (long stale:
    /// an agent that left the farm), unless one arrived meanwhile.
    fn collect_reports(&self, grace: Duration) -> Result<(), StoreError> {
        let kvs = self.list("list the agents' reports", self.keys.agent(""))?;
        let now = wall_us();
        for kv in kvs {
            let at = serde_json::from_slice::<SharedReport>(kv.value()).map_or(0, |r| r.at_us);
            if now.saturating_sub(at) < grace.as_micros() as u64 {
                continue;
            }
            let t = Txn::new()
                .when([Compare::mod_revision(
                    kv.key(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([TxnOp::delete(kv.key(), None)]);
            self.txn("forget a silent agent", t)?;
        }
        Ok(())
    }

    /// Removes from etcd the releases `keep` does not name that were stored longer than
    /// `grace` ago, with what is kept beside them.
    fn collect_shared(&self, keep: &[ReleaseId], grace: Duration) -> Result<usize, StoreError> {
        let kvs = self.list("list releases", self.keys.all(Beside::StoredAt))?;
        let keep: HashSet<&ReleaseId> = keep.iter().collect();
        let now = wall_us();
        let mut removed = 0;
        for kv in kvs {
            let Some(id) = self.keys.release_of(Beside::StoredAt, kv.key()) else {
                continue;
            };
            let at: u64 = std::str::from_utf8(kv.value())
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(u64::MAX);
            if keep.contains(&id) || now.saturating_sub(at) < grace.as_micros() as u64 {
                continue;
            }
            // Only if nobody stored it again meanwhile.
            let at_key = self.keys.release(Beside::StoredAt, &id);
            let t = Txn::new()
                .when([Compare::mod_revision(
                    at_key,
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then(
                    Beside::ALL
                        .map(|w| TxnOp::delete(self.keys.release(w, &id), None))
                        .to_vec(),
                );
            if self.txn("collect a release", t)?.succeeded() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Hand the duties over now rather than at the lease's end.
        let lease = self.lease.load(Ordering::Acquire) as i64;
        if lease != 0 {
            // Once: a hub stopping while etcd is away does not wait for it.
            let mut c = self.client.clone();
            let _ = block(self.rt.handle(), "revoke the lease", async move {
                c.lease_revoke(lease).await.map(|_| ())
            });
        }
    }
}

/// One attempt at an etcd call.
type Call<T> = std::pin::Pin<Box<dyn Future<Output = Result<T, etcd_client::Error>> + Send>>;

/// Whether an etcd call failed for a reason that passes: the cluster or the connection (a
/// leader election, a member gone), not the request.
fn passes(e: &etcd_client::Error) -> bool {
    matches!(
        e,
        etcd_client::Error::GRpcStatus(_)
            | etcd_client::Error::TransportError(_)
            | etcd_client::Error::IoError(_)
    )
}

/// One attempt at an etcd call: at most [`ATTEMPT_TIMEOUT`].
async fn attempt<T>(
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, etcd_client::Error> {
    tokio::time::timeout(ATTEMPT_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(etcd_client::Error::IoError(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {ATTEMPT_TIMEOUT:?}"),
            )))
        })
}

/// Whether an attempt only ran out of time (see [`EtcdStore::call`]).
fn timed_out(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::IoError(io) if io.kind() == std::io::ErrorKind::TimedOut)
}

/// Runs `fut` on `rt` and waits for it on this thread, at most [`CALL_TIMEOUT`].
fn block<T: Send + 'static>(
    rt: &tokio::runtime::Handle,
    action: &'static str,
    fut: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(tokio::time::timeout(CALL_TIMEOUT, fut).await);
    });
    match rx.recv() {
        Ok(Ok(r)) => r.map_err(shared(action)),
        Ok(Err(_)) => Err(StoreError::Shared {
            action,
            reason: format!("no answer within {CALL_TIMEOUT:?}"),
        }),
        Err(_) => Err(StoreError::Shared {
            action,
            reason: "the client stopped".into(),
        }),
    }
}

/// Follows the state key: every state written (by any hub) is sent to `changes`, never an
/// older one than it holds; `standing` says whether it follows now. Reconnects after
/// [`RETRY`] when the watch breaks.
async fn follow(
    mut client: Client,
    keys: Keys,
    changes: watch::Sender<HubState>,
    standing: Arc<Standing>,
) {
    let key = keys.state();
    let publish = |bytes: &[u8]| match parse::<HubState>(&key, bytes) {
        Ok(s) => {
            changes.send_if_modified(|cur| {
                let newer = s.version > cur.version;
                if newer {
                    *cur = s;
                }
                newer
            });
        }
        Err(e) => warn!(error = %e, "ignoring a state in etcd that does not parse"),
    };
    loop {
        let result: Result<(), etcd_client::Error> = async {
            let r = client.get(key.clone(), None).await?;
            let revision = r.header().map(|h| h.revision()).unwrap_or(0);
            if let Some(kv) = r.kvs().first() {
                publish(kv.value());
            }
            let mut stream = client
                .watch(
                    key.clone(),
                    Some(WatchOptions::new().with_start_revision(revision + 1)),
                )
                .await?;
            standing.following.store(true, Ordering::Release);
            while let Some(msg) = stream.message().await? {
                if msg.canceled() {
                    break;
                }
                for ev in msg.events() {
                    if let (EventType::Put, Some(kv)) = (ev.event_type(), ev.kv()) {
                        publish(kv.value());
                    }
                }
            }
            Ok(())
        }
        .await;
        standing.following.store(false, Ordering::Release);
        if let Err(e) = result {
            standing.failed(&e);
            warn!(error = %e, "following the state in etcd failed; again in 1 s");
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Follows the values every hub shares under `prefix` (the agents' reports, the drains): those
/// stored when it starts, then each one written, passed on in order (it waits while the taker
/// is behind: the channel is bounded). Reconnects after [`RETRY`] when the watch breaks; ends
/// when the taker is gone.
async fn follow_prefix<T: DeserializeOwned>(
    mut client: Client,
    prefix: String,
    tx: tokio::sync::mpsc::Sender<T>,
) {
    loop {
        let result: Result<(), etcd_client::Error> = async {
            let r = client
                .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
                .await?;
            let revision = r.header().map(|h| h.revision()).unwrap_or(0);
            for kv in r.kvs() {
                pass_on(&tx, kv).await;
            }
            let mut stream = client
                .watch(
                    prefix.clone(),
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(revision + 1),
                    ),
                )
                .await?;
            while let Some(msg) = stream.message().await? {
                if msg.canceled() {
                    break;
                }
                for ev in msg.events() {
                    if let (EventType::Put, Some(kv)) = (ev.event_type(), ev.kv()) {
                        pass_on(&tx, kv).await;
                    }
                }
            }
            Ok(())
        }
        .await;
        if tx.is_closed() {
            return;
        }
        if let Err(e) = result {
            warn!(prefix = %prefix, error = %e, "following what the hubs share in etcd failed; again in 1 s");
        }
        tokio::time::sleep(RETRY).await;
    }
}

async fn pass_on<T: DeserializeOwned>(
    tx: &tokio::sync::mpsc::Sender<T>,
    kv: &etcd_client::KeyValue,
) {
    match serde_json::from_slice::<T>(kv.value()) {
        Ok(r) => {
            let _ = tx.send(r).await;
        }
        Err(e) => {
            warn!(key = ?kv.key_str(), error = %e, "ignoring a value in etcd that does not parse")
        }
    }
}

/// Holds this hub's lease: grants it, registers the hub under it, renews it every third of
/// its time to live and takes the leader key when it is free. A renewal that fails or takes
/// longer than a third of the time to live is tried again on the same lease (an etcd leader
/// election takes about that long): a new lease, and a new registration, only once it has
/// expired. Meanwhile the hub's standing lapses by itself at the lease's end.
async fn keep_lease(
    mut client: Client,
    keys: Keys,
    (name, registration): (String, String),
    ttl: Duration,
    standing: Arc<Standing>,
    held: Arc<AtomicU64>,
) {
    let ttl_us = ttl.as_micros() as u64;
    let mut was = (false, false);
    // The lease held, and until when it holds at least (µs of `standing`'s clock).
    let mut lease: Option<(i64, u64)> = None;
    loop {
        let result: Result<(), etcd_client::Error> = async {
            let id = match lease {
                Some((id, until)) if standing.now() < until => id,
                _ => {
                    let granted = standing.now();
                    let id = client.lease_grant(ttl.as_secs() as i64, None).await?.id();
                    held.store(id as u64, Ordering::Release);
                    client
                        .put(
                            keys.hub(&name),
                            registration.clone(),
                            Some(PutOptions::new().with_lease(id)),
                        )
                        .await?;
                    lease = Some((id, granted + ttl_us));
                    id
                }
            };
            let (mut keeper, mut answers) =
                tokio::time::timeout(CALL_TIMEOUT, client.lease_keep_alive(id))
                    .await
                    .map_err(|_| {
                        etcd_client::Error::LeaseKeepAliveError("no keep-alive stream".into())
                    })??;
            loop {
                let sent = standing.now();
                let renewed = tokio::time::timeout(ttl / 3, async {
                    keeper.keep_alive().await?;
                    let answer = answers.message().await?;
                    if answer.is_none_or(|a| a.ttl() <= 0) {
                        return Ok::<_, etcd_client::Error>(None);
                    }
                    let leader = take_leader(&mut client, &keys, &name, id).await?;
                    let hubs = client
                        .get(
                            keys.hub(""),
                            Some(GetOptions::new().with_prefix().with_keys_only()),
                        )
                        .await?
                        .kvs()
                        .iter()
                        .filter_map(|kv| Some(kv.key_str().ok()?.rsplit('/').next()?.to_string()))
                        .collect::<Vec<_>>();
                    Ok(Some((leader, hubs)))
                })
                .await
                .map_err(|_| {
                    etcd_client::Error::LeaseKeepAliveError(format!(
                        "no renewal within {:?}",
                        ttl / 3
                    ))
                })??;
                let Some(((leader, holder), hubs)) = renewed else {
                    lease = None;
                    return Err(etcd_client::Error::LeaseKeepAliveError(
                        "the lease has expired".into(),
                    ));
                };
                lease = Some((id, sent + ttl_us));
                standing.leader.store(leader, Ordering::Release);
                *standing.seen.lock().unwrap_or_else(|p| p.into_inner()) = (holder, hubs);
                standing
                    .renewed_until
                    .store(sent + ttl_us, Ordering::Release);
                *standing.error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                report(&name, &mut was, (true, leader));
                tokio::time::sleep(ttl / 3).await;
            }
        }
        .await;
        if let Err(e) = result {
            standing.failed(&e);
            if !standing.connected() {
                standing.leader.store(false, Ordering::Release);
                if was.0 {
                    warn!(hub = %name, error = %e, "lost etcd: this hub stops changing the state and leading until it is back");
                }
                was = (false, false);
            }
        }
        // Again soon: the lease may still hold.
        tokio::time::sleep(RETRY / 5).await;
    }
}

/// Takes the leader key for `lease` when nobody holds it; whether this hub holds it, and
/// the name of the hub that does.
async fn take_leader(
    client: &mut Client,
    keys: &Keys,
    name: &str,
    lease: i64,
) -> Result<(bool, Option<String>), etcd_client::Error> {
    let key = keys.leader();
    let r = client
        .txn(
            Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    name,
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(key, None)]),
        )
        .await?;
    if r.succeeded() {
        return Ok((true, Some(name.to_string())));
    }
    let holder = r.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(g) => g.kvs().first().cloned(),
        _ => None,
    });
    Ok(match holder {
        Some(kv) => (kv.lease() == lease, kv.value_str().ok().map(str::to_string)),
        None => (false, None),
    })
}

fn report(name: &str, was: &mut (bool, bool), now: (bool, bool)) {
    if *was != now {
        match now {
            (true, true) => info!(hub = %name, "this hub leads (its own advances, collection)"),
            (true, false) => info!(hub = %name, "this hub follows another hub's lead"),
            _ => {}
        }
        *was = now;
    }
}

impl HubStore for EtcdStore {
    fn has_blob(&self, hash: &Hash) -> Result<bool, StoreError> {
        HubStore::has_blob(&self.local, hash)
    }
    fn open_blob(&self, hash: &Hash) -> Result<Option<(File, u64)>, StoreError> {
        self.local.open_blob(hash)
    }
    fn blob_sink(&self, max: u64) -> Result<BlobSink, StoreError> {
        self.local.blob_sink(max)
    }
    fn adopt_blob(&self, sink: BlobSink, hash: &Hash) -> Result<bool, StoreError> {
        self.local.adopt_blob(sink, hash)
    }
    fn blob_len(&self, hash: &Hash) -> Result<Option<u64>, StoreError> {
        HubStore::blob_len(&self.local, hash)
    }
    fn put_blob(&self, hash: &Hash, data: &[u8]) -> Result<(), StoreError> {
        HubStore::put_blob(&self.local, hash, data)
    }

    fn get_release(&self, id: &ReleaseId) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(m) = self.local.read_release(id)? {
            return Ok(Some(m));
        }
        let Some(kv) = self.get(self.keys.release(Beside::Release, id))? else {
            return Ok(None);
        };
        // The name is the hash: a manifest in etcd that does not match is refused.
        self.local.write_release(id, kv.value())?;
        Ok(Some(kv.value().to_vec()))
    }

    fn put_release(&self, id: &ReleaseId, manifest: &[u8]) -> Result<(), StoreError> {
        self.local.write_release(id, manifest)?;
        // Stored again: young again for the collector.
        let t = Txn::new().and_then([
            TxnOp::put(self.keys.release(Beside::Release, id), manifest, None),
            TxnOp::put(
                self.keys.release(Beside::StoredAt, id),
                wall_us().to_string(),
                None,
            ),
        ]);
        self.txn("store a manifest", t).map(|_| ())
    }

    fn state(&self) -> Result<HubState, StoreError> {
        let key = self.keys.state();
        Ok(self.read_json(key)?.map(|(s, _)| s).unwrap_or_default())
    }

    fn swap_state(&self, expected: u64, new: &HubState) -> Result<bool, StoreError> {
        loop {
            let outcome = match self.try_swap(expected, new) {
                Ok(won) => Some(won),
                // Applied or not? Only the state can tell.
                Err(StoreError::Shared { .. }) => self.resolve(expected, new)?,
                Err(e) => return Err(e),
            };
            if let Some(won) = outcome {
                if won {
                    self.changes.send_if_modified(|cur| {
                        let newer = new.version > cur.version;
                        if newer {
                            *cur = new.clone();
                        }
                        newer
                    });
                }
                return Ok(won);
            }
        }
    }

    fn collect(&self, keep: &[ReleaseId], grace: Duration) -> Result<Collected, StoreError> {
        // The local collection needs the kept manifests to know which blobs they name.
        for id in keep {
            self.cache_release(id)?;
        }
        let mut done = HubStore::collect(&self.local, keep, grace)?;
        if self.leads() {
            done.releases = self.collect_shared(keep, grace)?;
            self.collect_reports(grace)?;
        }
        Ok(done)
    }

    fn signatures(&self, id: &ReleaseId) -> Result<Vec<Signature>, StoreError> {
        match self.read_json(self.keys.release(Beside::Signatures, id)) {
            Ok(v) => Ok(v.map(|(s, _)| s).unwrap_or_default()),
            // Cut off from etcd: what this hub saw last (signatures are only ever added).
            Err(StoreError::Shared { .. }) => HubStore::signatures(&self.local, id),
            Err(e) => Err(e),
        }
    }

    fn add_signatures(
        &self,
        id: &ReleaseId,
        sigs: &[Signature],
    ) -> Result<Vec<Signature>, StoreError> {
        let key = self.keys.release(Beside::Signatures, id);
        let release = self.keys.release(Beside::Release, id);
        loop {
            let (mut all, rev): (Vec<Signature>, i64) =
                self.read_json(key.clone())?.unwrap_or_default();
            let before = all.len();
            for s in sigs {
                if !all.iter().any(|k| k.key == s.key) {
                    all.push(*s);
                }
            }
            // Plain structs always serialise.
            let bytes = serde_json::to_vec(&all).expect("signatures serialise");
            let t = Txn::new()
                .when([
                    Compare::version(release.clone(), CompareOp::Greater, 0),
                    Compare::mod_revision(key.clone(), CompareOp::Equal, rev),
                ])
                .and_then(if all.len() > before {
                    vec![TxnOp::put(key.clone(), bytes, None)]
                } else {
                    vec![]
                })
                .or_else([TxnOp::get(release.clone(), None)]);
            let r = self.txn("add signatures", t)?;
            if r.succeeded() {
                if self.cache_release(id).unwrap_or(false) {
                    let _ = HubStore::add_signatures(&self.local, id, &all);
                }
                return Ok(all);
            }
            if !release_in(&r) {
                return Err(StoreError::NoRelease(*id));
            }
        }
    }

    fn provenance(&self, id: &ReleaseId) -> Result<Option<Provenance>, StoreError> {
        match self.read_json(self.keys.release(Beside::Provenance, id)) {
            Ok(v) => Ok(v.map(|(p, _)| p)),
            Err(StoreError::Shared { .. }) => HubStore::provenance(&self.local, id),
            Err(e) => Err(e),
        }
    }

    fn put_provenance(&self, id: &ReleaseId, p: &Provenance) -> Result<(), StoreError> {
        let key = self.keys.release(Beside::Provenance, id);
        let release = self.keys.release(Beside::Release, id);
        // Plain structs always serialise.
        let bytes = serde_json::to_vec(p).expect("provenance serialises");
        let t = Txn::new()
            .when([
                Compare::version(release.clone(), CompareOp::Greater, 0),
                Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(key, bytes, None)])
            .or_else([TxnOp::get(release, None)]);
        let r = self.txn("keep a provenance", t)?;
        if !r.succeeded() && !release_in(&r) {
            return Err(StoreError::NoRelease(*id));
        }
        if self.cache_release(id).unwrap_or(false) {
            let _ = HubStore::put_provenance(&self.local, id, p);
        }
        Ok(())
    }

    fn changes(&self) -> Option<watch::Receiver<HubState>> {
        Some(self.changes.subscribe())
    }

    fn leads(&self) -> bool {
        self.standing.connected() && self.standing.leader.load(Ordering::Acquire)
    }

    fn share_report(&self, report: &SharedReport) -> Result<(), StoreError> {
        let key = self.keys.agent(&report.agent);
        // Plain structs always serialise.
        let value = serde_json::to_vec(report).expect("report serialises");
        self.call("share a report", move |mut c| {
            let (key, value) = (key.clone(), value.clone());
            Box::pin(async move { c.put(key, value, None).await.map(|_| ()) })
        })
    }

    fn shared_reports(&self) -> Option<tokio::sync::mpsc::Receiver<SharedReport>> {
        self.reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn share_drain(&self, drain: &SharedDrain) -> Result<(), StoreError> {
        let key = self.keys.drain(&drain.pool, &drain.backend);
        // Plain structs always serialise.
        let value = serde_json::to_vec(drain).expect("drain serialises");
        self.call("share a drain", move |mut c| {
            let (key, value) = (key.clone(), value.clone());
            Box::pin(async move { c.put(key, value, None).await.map(|_| ()) })
        })
    }

    fn shared_drains(&self) -> Option<tokio::sync::mpsc::Receiver<SharedDrain>> {
        self.drains.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn share_acme(&self, item: &SharedAcme) -> Result<(), StoreError> {
        let key = self.acme_key(item);
        // Plain structs always serialise.
        let value = serde_json::to_vec(item).expect("ACME item serialises");
        self.call("share ACME", move |mut c| {
            let (key, value) = (key.clone(), value.clone());
            Box::pin(async move { c.put(key, value, None).await.map(|_| ()) })
        })
    }

    fn unshare_acme(&self, item: &SharedAcme) -> Result<(), StoreError> {
        let key = self.acme_key(item);
        self.call("take back an ACME answer", move |mut c| {
            let key = key.clone();
            Box::pin(async move { c.delete(key, None).await.map(|_| ()) })
        })
    }

    fn shared_acme(&self) -> Option<tokio::sync::mpsc::Receiver<SharedAcme>> {
        self.acme.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn standing(&self) -> Option<ClusterView> {
        let (leader, hubs) = self
            .standing
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let connected = self.standing.connected();
        Some(ClusterView {
            hub: self.name.clone(),
            connected,
            leader,
            hubs,
            error: if connected {
                None
            } else {
                self.standing
                    .error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
            },
        })
    }
}

/// Whether a failed transaction's `get` of the release found it.
fn release_in(r: &etcd_client::TxnResponse) -> bool {
    r.op_responses()
        .iter()
        .any(|op| matches!(op, TxnOpResponse::Get(g) if !g.kvs().is_empty()))
}
