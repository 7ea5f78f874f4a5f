//! The appliance as one object: binds the listeners of a checked [`Config`], starts the proxy,
//! the health checkers, the DNS responder and the admin listener, applies reloads, and drains
//! on shutdown.
//!
//! It takes an already checked config and never reads files or signals itself: `serve` (the
//! command) and the tests drive it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin;
use crate::cluster::{EtcdStore, Peers};
use crate::config::Config;
use crate::dns::view::{SharedView, View};
use crate::dns::{self, DnsError, DnsHandler, DnsMetrics};
use crate::hub::{self, Hub, HubMetrics};
use crate::live::{Live, Shared};
use crate::metrics::{Metrics, ResultLabels};
use crate::net::client::ClientTls;
use crate::net::limit::{Cap, ConnGate};
use crate::net::server::ServerTls;
use crate::pools::checker;
use crate::proxy::listener;
use crate::sync::store::{FsStore, HubStore};

/// Failures while starting or reloading.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplianceError {
    /// A listening socket could not be bound.
    #[error("cannot bind {what} on {addr}: {error} (is another process using it, or does binding it need privileges?)")]
    Bind {
        /// Which listener.
        what: String,
        /// The address.
        addr: SocketAddr,
        /// The OS error (part of the message, not a separate cause, so it prints once).
        error: std::io::Error,
    },
    /// The DNS sockets could not be bound.
    #[error(transparent)]
    Dns(#[from] DnsError),
    /// The sync hub's store could not be opened.
    #[error("sync store {path}: {error}")]
    SyncStore {
        /// `sync.store`.
        path: std::path::PathBuf,
        /// Why.
        error: crate::sync::store::StoreError,
    },
    /// The hub cannot make a client of the other hubs (`sync.cluster`) with its certificate.
    #[error("sync.cluster: this hub cannot call the other hubs with the first of sync.tls.certificates: {0}")]
    HubPeers(String),
}

struct RunningListener {
    bind: SocketAddr,
    local: SocketAddr,
    stop: CancellationToken,
}

/// Binds one TCP listener; a failure names `what`.
/// The connection gate counting in an (open, refused) pair of metrics.
fn gate((open, refused): &(Gauge, Counter)) -> ConnGate {
    ConnGate::new(open.clone(), refused.clone())
}

/// Binds `what`'s listening socket, stored under `name` (see [`crate::net::bind`]).
fn bind_tcp(
    what: &str,
    name: &str,
    addr: SocketAddr,
) -> Result<tokio::net::TcpListener, ApplianceError> {
    crate::net::bind::bind(name, addr).map_err(|error| ApplianceError::Bind {
        what: what.into(),
        addr,
        error,
    })
}

/// Puts `new` in `slot`, stopping the one it replaces (a reload that moved it).
fn replace(slot: &mut Option<RunningListener>, new: RunningListener, what: &str) {
    let to = new.local;
    if let Some(old) = slot.replace(new) {
        info!(from = %old.local, %to, "{what} moved");
        old.stop.cancel();
    }
}

/// Stops what `slot` runs when its config section is `gone`.
fn stop_if(slot: &mut Option<RunningListener>, gone: bool, what: &str) {
    if let Some(old) = slot.take_if(|_| gone) {
        info!(addr = %old.local, "{what} removed from the config; stopped");
        old.stop.cancel();
    }
}

/// A running appliance.
pub struct Appliance {
    live: Shared,
    /// What DNS answers from: the zones and table of the live generation.
    dns_view: SharedView,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    listeners: HashMap<String, RunningListener>,
    checkers: CancellationToken,
    /// Stops the ACME ordering task (restarted when a reload changes `tls.acme`).
    acme: CancellationToken,
    admin: Option<RunningListener>,
    dns: Option<RunningListener>,
    /// Registered with the first DNS socket and kept across rebinds.
    dns_metrics: Option<DnsMetrics>,
    sync: Option<(SocketAddr, Arc<Hub>)>,
    /// The sync API's TLS, swapped at reload (certificates, the farm CA, its revocation list).
    sync_tls: Option<ServerTls>,
    /// The hub as the admin API sees it (set once the hub starts).
    admin_hub: Arc<std::sync::OnceLock<Arc<Hub>>>,
    /// The status page's recent history, taken by its own task.
    history: admin::history::History,
    generation: u64,
    workers: Vec<Handle>,
    /// Where the admin and sync APIs run (see [`Runtimes`]).
    control: Handle,
}

/// The runtimes an appliance serves on. The proxy's connections go to `workers`; the admin
/// API and the sync hub to `control`, a thread of its own at a lower scheduling priority in
/// `lockstep serve`, so that a flood of connections on those listeners (each refused at its
/// cap, or a TLS handshake that fails) takes the core from the control plane and not from
/// the proxy (BENCHMARKS.md, issue 15's phase B); DNS, health checks and reloads stay on the
/// runtime that starts the appliance.
pub struct Runtimes {
    /// One single-threaded runtime per proxy worker thread.
    pub workers: Vec<Handle>,
    /// The control plane's runtime.
    pub control: Handle,
}

impl Runtimes {
    /// Everything on the current runtime (tests, the demo).
    pub fn current() -> Runtimes {
        Runtimes {
            workers: vec![Handle::current()],
            control: Handle::current(),
        }
    }
}

/// The hub's store, and the other hubs when it shares the farm with them.
type HubStorage = (Arc<dyn HubStore>, Option<Arc<Peers>>);

/// The hub's store: its own directory, or with `sync.cluster` the state in etcd (registered
/// under the URL the other hubs reach `local`, the bound sync API, at) and the other hubs.
fn hub_store(
    config: &crate::config::sync::Sync,
    local: std::net::SocketAddr,
) -> Result<HubStorage, ApplianceError> {
    let store_error = |error| ApplianceError::SyncStore {
        path: config.store.clone(),
        error,
    };
    let store = FsStore::open(&config.store).map_err(store_error)?;
    let Some(cluster) = &config.cluster else {
        return Ok((Arc::new(store), None));
    };
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let advertise = cluster
        .advertise
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{local}"));
    let etcd = Arc::new(EtcdStore::connect(cluster, store, &advertise).map_err(store_error)?);
    // This hub calls the others as itself: its farm certificate (kind hub), trusting the farm
    // CA; between hubs on one host, the publish token.
    let tls = match config
        .tls
        .as_ref()
        .and_then(|t| Some((t.clients.as_ref()?, t)))
    {
        Some((trust, t)) => Some(
            ClientTls::farm(trust, t.certs.first())
                .map_err(|e| ApplianceError::HubPeers(e.to_string()))?,
        ),
        None => None,
    };
    let peers = Peers::new(
        etcd.clone(),
        cluster.replicas,
        config.tokens.publish.clone(),
        tls,
    );
    Ok((etcd, Some(Arc::new(peers))))
}

/// The sync API's rustls config: its certificates, and the farm CA of its clients.
fn sync_server_config(t: &crate::config::sync::SyncTls) -> Arc<rustls::ServerConfig> {
    crate::net::tls::server_config_with(&t.certs, t.clients.as_ref())
}

/// Why a reload from a file was refused; the running config keeps serving either way.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadFailure {
    /// The file does not check.
    #[error("{0}")]
    Config(crate::config::ConfigErrors),
    /// It checks, but could not be applied (an address is taken, …).
    #[error("{0}")]
    Apply(ApplianceError),
}

/// A bound listener: one socket per worker runtime (`SO_REUSEPORT` when there are several).
type Bound = (String, Vec<std::net::TcpListener>);

impl Appliance {
    /// Binds everything `config` asks for and starts serving on the current runtime.
    pub async fn start(config: Config) -> Result<Appliance, ApplianceError> {
        Appliance::start_on(config, Runtimes::current()).await
    }

    /// Like [`Appliance::start`], on `runtimes`: the proxy's connections served by its
    /// workers, one single-threaded runtime per thread, each accepting on its own
    /// `SO_REUSEPORT` socket (thread per core, as nginx runs a process per core); the admin
    /// and sync APIs on its control runtime.
    pub async fn start_on(config: Config, runtimes: Runtimes) -> Result<Appliance, ApplianceError> {
        let Runtimes { workers, control } = runtimes;
        let workers = if workers.is_empty() {
            vec![Handle::current()]
        } else {
            workers
        };
        let metrics = Arc::new(Metrics::new());
        let config = Arc::new(config);
        let live: Shared = Arc::new(ArcSwap::from_pointee(Live::build(
            config.clone(),
            None,
            1,
            &metrics,
        )));
        let dns_view: SharedView = Arc::new(ArcSwap::from_pointee(View::build(
            &config,
            live.load().table.clone(),
            None,
            unix_now(),
        )));
        let mut app = Appliance {
            live,
            dns_view,
            metrics,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            listeners: HashMap::new(),
            checkers: CancellationToken::new(),
            acme: CancellationToken::new(),
            admin: None,
            dns: None,
            dns_metrics: None,
            sync: None,
            sync_tls: None,
            admin_hub: Arc::default(),
            history: Arc::new(std::sync::Mutex::new(admin::history::Recorder::new(
                config.admin.history_interval,
            ))),
            generation: 1,
            workers,
            control,
        };
        let bound = app.bind_new(&config)?;
        // Bound before anything starts, so a taken port fails the start cleanly.
        let dns_bound = app.bind_dns(&config)?;
        let sync_bound = match &config.sync {
            Some(s) => Some((bind_tcp("sync listener", "sync", s.bind)?, s)),
            None => None,
        };
        let admin_bound = app.bind_admin(&config)?;
        app.start_admin(admin_bound);
        app.start_listeners(bound);
        app.start_dns(dns_bound);
        if let Some((socket, s)) = sync_bound {
            app.start_hub(socket, s)?;
        }
        app.start_acme();
        // What the farm's other appliances share of ACME, for the appliance's life.
        if let Some(store) = app.sync.as_ref().and_then(|(_, hub)| hub.shared_store()) {
            if let Some(task) = crate::acme::follow_shared(
                &store,
                app.live.clone(),
                app.metrics.clone(),
                app.shutdown.clone(),
            ) {
                app.tracker.spawn(task);
            }
        }
        app.checkers = app.shutdown.child_token();
        let live = app.live.load();
        checker::spawn_all(&live.table, &live.clients, &app.checkers, &app.tracker);
        drop(live);
        app.tracker.spawn(admin::history::run(
            app.history.clone(),
            app.live.clone(),
            app.metrics.clone(),
            app.admin_hub.clone(),
            config.admin.history_interval,
            app.shutdown.clone(),
        ));
        Ok(app)
    }

    /// Runs `task` on the control runtime, tracked for shutdown.
    fn on_control(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.control.spawn(self.tracker.track_future(task));
    }

    /// Backends drained on any appliance of the farm (`sync.cluster`) are drained here too.
    fn follow_shared_drains(&self, store: &dyn HubStore) {
        let Some(mut drains) = store.shared_drains() else {
            return;
        };
        let (live, stop) = (self.live.clone(), self.shutdown.clone());
        self.tracker.spawn(async move {
            while let Some(d) = tokio::select! {
                d = drains.recv() => d,
                _ = stop.cancelled() => None,
            } {
                let table = &live.load().table;
                if let Some(pool) = table.pools.iter().find(|p| p.config.name == d.pool) {
                    if pool.set_drained(&d.backend, d.drained).is_some() {
                        info!(pool = %d.pool, backend = %d.backend, drained = d.drained, "backend drain shared by the farm's appliances");
                    }
                }
            }
        });
    }

    /// Opens the hub's store and serves the sync API on `socket`; keeps the router's view of
    /// which backends are behind the fleet's release current.
    fn start_hub(
        &mut self,
        socket: tokio::net::TcpListener,
        config: &crate::config::sync::Sync,
    ) -> Result<(), ApplianceError> {
        let local = socket.local_addr().unwrap_or(config.bind);
        crate::net::bind::keep("sync", std::slice::from_ref(&socket));
        let (store, peers) = hub_store(config, local)?;
        self.follow_shared_drains(store.as_ref());
        let hub = Hub::new(
            store,
            hub::Settings::from_config(config),
            hub::system_clock(),
            HubMetrics::register(&self.metrics),
        )
        .map_err(|error| ApplianceError::SyncStore {
            path: config.store.clone(),
            error,
        })?;
        if let Some(p) = peers {
            hub.join_peers(p);
        }
        if config.tokens.agent.is_none() || config.tokens.publish.is_none() {
            warn!("sync API without agent_token_file or publish_token_file: anyone who can reach {local} may do what that token guards");
        }
        info!(addr = %local, tls = config.tls.is_some(), store = %config.store.display(), "sync hub listening");
        let tls = config
            .tls
            .as_ref()
            .map(|t| ServerTls::only(sync_server_config(t)));
        self.sync_tls = tls.clone();
        self.on_control(hub::api::serve(
            socket,
            tls,
            Cap::new(config.max_connections, gate(&self.metrics.sync_connections)),
            hub.clone(),
            self.shutdown.child_token(),
            self.tracker.clone(),
        ));
        self.on_control(hub.clone().run(self.shutdown.child_token()));
        self.on_control(hub.clone().run_gc(self.shutdown.child_token()));
        let (live, mut behind, stop) = (self.live.clone(), hub.behind(), self.shutdown.clone());
        self.tracker.spawn(async move {
            loop {
                let set = behind.borrow_and_update().clone();
                for pool in &live.load().table.pools {
                    pool.set_behind(&set);
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = behind.changed() => if r.is_err() { return },
                }
            }
        });
        let _ = self.admin_hub.set(hub.clone());
        self.sync = Some((local, hub));
        Ok(())
    }

    /// Binds DNS's sockets when `config` has a `dns:` section whose address is not the one
    /// served now. Nothing is started.
    fn bind_dns(
        &self,
        config: &Config,
    ) -> Result<Option<(SocketAddr, dns::Bound)>, ApplianceError> {
        match &config.dns {
            Some(d) if self.dns.as_ref().is_none_or(|r| r.bind != d.bind) => {
                // One UDP socket, on this runtime: one SO_REUSEPORT socket per worker
                // measured slower here (2 cores shared with the load generator; BENCHMARKS.md).
                Ok(Some((d.bind, dns::bind(d.bind, 1)?)))
            }
            _ => Ok(None),
        }
    }

    /// Serves DNS on `bound`, stopping the sockets it replaces; with nothing bound and no
    /// `dns:` section left, stops DNS.
    fn start_dns(&mut self, bound: Option<(SocketAddr, dns::Bound)>) {
        let Some((bind, b)) = bound else {
            let gone = self.live.load().config.dns.is_none();
            if gone {
                crate::net::bind::forget("dns-udp");
                crate::net::bind::forget("dns-tcp");
            }
            stop_if(&mut self.dns, gone, "dns");
            return;
        };
        let local = b.local_addr().unwrap_or(bind);
        let metrics = self
            .dns_metrics
            .get_or_insert_with(|| DnsMetrics::register(&self.metrics))
            .clone();
        // The handler reads zones and health through the live pointer at every query, so
        // reloads and health changes reach it without further plumbing.
        let handler = DnsHandler::new(self.dns_view.clone(), metrics);
        dns::keep(&b);
        let stop = self.shutdown.child_token();
        self.tracker.spawn(dns::serve(b, handler, stop.clone()));
        replace(&mut self.dns, RunningListener { bind, local, stop }, "dns");
    }

    /// Binds the admin listener when `admin.bind` is set and not the address served now.
    fn bind_admin(
        &self,
        config: &Config,
    ) -> Result<Option<(SocketAddr, tokio::net::TcpListener)>, ApplianceError> {
        match config.admin.bind {
            Some(addr) if self.admin.as_ref().is_none_or(|r| r.bind != addr) => {
                Ok(Some((addr, bind_tcp("admin listener", "admin", addr)?)))
            }
            _ => Ok(None),
        }
    }

    /// Serves the admin API on `bound`, stopping the listener it replaces; with nothing bound
    /// and no `admin.bind` left, stops the admin listener.
    fn start_admin(&mut self, bound: Option<(SocketAddr, tokio::net::TcpListener)>) {
        let Some((bind, socket)) = bound else {
            let gone = self.live.load().config.admin.bind.is_none();
            if gone {
                crate::net::bind::forget("admin");
            }
            stop_if(&mut self.admin, gone, "admin listener");
            return;
        };
        let local = socket.local_addr().unwrap_or(bind);
        info!(addr = %local, "admin listening");
        crate::net::bind::keep("admin", std::slice::from_ref(&socket));
        let stop = self.shutdown.child_token();
        let state = admin::AdminState {
            live: self.live.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
            hub: self.admin_hub.clone(),
            history: self.history.clone(),
        };
        let cap = Cap::new(
            self.live.load().config.admin.max_connections,
            gate(&self.metrics.admin_connections),
        );
        self.on_control(admin::serve(
            socket,
            cap,
            state,
            stop.clone(),
            self.tracker.clone(),
        ));
        replace(
            &mut self.admin,
            RunningListener { bind, local, stop },
            "admin listener",
        );
    }

    /// Binds the listeners of `config` that are not already running (new names, or a changed
    /// bind address). Nothing is started, so a failure leaves everything as it was.
    fn bind_new(&self, config: &Config) -> Result<Vec<Bound>, ApplianceError> {
        let mut out = Vec::new();
        for l in &config.listeners {
            if self
                .listeners
                .get(&l.name)
                .is_some_and(|r| r.bind == l.bind)
            {
                continue;
            }
            // Rebinding an address another running listener of ours holds would fail; the
            // old one is stopped first only if the operator moved it, which we do not guess.
            let err = |error| ApplianceError::Bind {
                what: format!("listener `{}`", l.name),
                addr: l.bind,
                error,
            };
            let name = crate::net::bind::proxy_name(&l.name);
            let sockets =
                crate::net::bind::bind_many(&name, l.bind, self.workers.len()).map_err(err)?;
            out.push((l.name.clone(), sockets));
        }
        Ok(out)
    }

    /// (Re)starts ordering certificates for the listeners with `tls.acme`, once they listen
    /// (the CA's validation connects to them).
    fn start_acme(&mut self) {
        self.acme.cancel();
        self.acme = self.shutdown.child_token();
        // With several appliances (`sync.cluster`), through the store the hubs share.
        let shared = self.sync.as_ref().and_then(|(_, hub)| hub.shared_store());
        if let Some(task) = crate::acme::task(
            self.live.clone(),
            self.metrics.clone(),
            shared,
            self.acme.clone(),
        ) {
            self.tracker.spawn(task);
        }
    }

    fn start_listeners(&mut self, bound: Vec<Bound>) {
        let config = self.live.load().config.clone();
        for (name, sockets) in bound {
            let Some(l) = config.listeners.iter().find(|l| l.name == name) else {
                continue;
            };
            let local = sockets
                .first()
                .and_then(|s| s.local_addr().ok())
                .unwrap_or(l.bind);
            info!(listener = %name, addr = %local, tls = l.tls.is_some(), "listening");
            crate::net::bind::keep(&crate::net::bind::proxy_name(&name), &sockets);
            let stop = self.shutdown.child_token();
            if let Some(old) = self.listeners.insert(
                name.clone(),
                RunningListener {
                    bind: l.bind,
                    local,
                    stop: stop.clone(),
                },
            ) {
                old.stop.cancel();
            }
            // Handed-back sockets may outnumber the workers: each is served.
            for (socket, worker) in sockets.into_iter().zip(self.workers.iter().cycle()) {
                let accept = listener::serve(
                    name.clone(),
                    socket,
                    self.live.clone(),
                    self.metrics.clone(),
                    stop.clone(),
                    self.tracker.clone(),
                );
                worker.spawn(self.tracker.track_future(accept));
            }
        }
    }

    /// Applies a checked config: binds new listeners first (a failure refuses the reload and
    /// keeps the old config), then swaps the live state, restarts the health checkers and
    /// stops listeners that are gone. In-flight requests finish on the state they started on.
    pub fn reload(&mut self, config: Config) -> Result<u64, ApplianceError> {
        let result = self.try_reload(config);
        self.count_reload(result.is_ok());
        result
    }

    /// Reads the config at `path` and applies it ([`Appliance::reload`]); a config that does
    /// not check is refused like a failed reload (and counted once, as one).
    pub fn reload_file(&mut self, path: &std::path::Path) -> Result<u64, ReloadFailure> {
        match crate::config::load(path) {
            Ok(config) => self.reload(config).map_err(ReloadFailure::Apply),
            Err(errors) => {
                self.count_reload(false);
                Err(ReloadFailure::Config(errors))
            }
        }
    }

    /// The one place `lockstep_reloads_total` is counted.
    fn count_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.metrics
            .reloads
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
    }

    fn try_reload(&mut self, config: Config) -> Result<u64, ApplianceError> {
        // Everything new is bound before anything changes: a taken address refuses the reload.
        let bound = self.bind_new(&config)?;
        let dns_bound = self.bind_dns(&config)?;
        let admin_bound = self.bind_admin(&config)?;
        let generation = self.generation + 1;
        let config = Arc::new(config);
        let old = self.live.load_full();
        match (&old.config.sync, &config.sync, &self.sync) {
            (Some(o), Some(n), Some((_, hub))) => {
                if o.bind != n.bind || o.store != n.store || o.tls.is_some() != n.tls.is_some() {
                    warn!("sync.bind, sync.store or sync.tls (on/off) changed: they take effect at the next restart; cadence, lead, tokens, certificates and the revocation list are reloaded now");
                }
                if let (Some(t), Some(live)) = (&n.tls, &self.sync_tls) {
                    live.config.store(sync_server_config(t));
                }
                hub.set_settings(hub::Settings::from_config(n));
            }
            (_, Some(_), None) => {
                warn!("a sync: section was added: the hub starts at the next restart")
            }
            (Some(_), None, Some(_)) => {
                warn!("the sync: section was removed: the hub keeps running until the next restart")
            }
            _ => {}
        }
        let next = Live::build(config.clone(), Some(&old), generation, &self.metrics);
        let view = View::build(
            &config,
            next.table.clone(),
            Some(&self.dns_view.load()),
            unix_now(),
        );
        self.live.store(Arc::new(next));
        self.dns_view.store(Arc::new(view));
        if let Some((_, hub)) = &self.sync {
            // Backends new in this generation start unflagged: apply the current view.
            let set = hub.behind().borrow().clone();
            for pool in &self.live.load().table.pools {
                pool.set_behind(&set);
            }
        }
        self.generation = generation;
        self.start_listeners(bound);
        if crate::acme::settings(&old.config) != crate::acme::settings(&config) {
            info!("tls.acme changed: ordering restarts with the new settings");
            self.start_acme();
        }
        self.start_dns(dns_bound);
        self.start_admin(admin_bound);
        let gone: Vec<String> = self
            .listeners
            .keys()
            .filter(|n| !config.listeners.iter().any(|l| &&l.name == n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(r) = self.listeners.remove(&name) {
                info!(listener = %name, addr = %r.local, "listener removed");
                crate::net::bind::forget(&crate::net::bind::proxy_name(&name));
                r.stop.cancel();
            }
        }
        self.checkers.cancel();
        self.checkers = self.shutdown.child_token();
        let live = self.live.load();
        checker::spawn_all(&live.table, &live.clients, &self.checkers, &self.tracker);
        info!(generation, "config reloaded");
        Ok(generation)
    }

    /// The address listener `name` actually bound (useful with port 0).
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.get(name).map(|r| r.local)
    }

    /// The address DNS serves on (UDP and TCP), when the config has a `dns:` section.
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.dns.as_ref().map(|r| r.local)
    }

    /// The sync API's address, when the config has a `sync:` section.
    pub fn sync_addr(&self) -> Option<SocketAddr> {
        self.sync.as_ref().map(|(a, _)| *a)
    }

    /// The sync hub, when the config has a `sync:` section.
    pub fn hub(&self) -> Option<&Arc<Hub>> {
        self.sync.as_ref().map(|(_, h)| h)
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|r| r.local)
    }

    /// The live state (routing table, health) for other parts to read.
    pub fn live(&self) -> &Shared {
        &self.live
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Current config generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Stops accepting, lets in-flight requests finish for at most `drain`, then returns.
    pub async fn shutdown(self, drain: Duration) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(drain, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(?drain, "drain period over; closing remaining connections");
        }
    }
}

/// Seconds since the Unix epoch (the DNS zones' serial starts from it).
fn unix_now() -> u64 {
    crate::sync::clock::wall_us() / 1_000_000
}
