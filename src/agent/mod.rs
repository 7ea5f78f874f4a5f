//! `lockstep agent`: the sidecar on each backend. It serves the active release
//! from memory and its store, stages each new release in the background ahead of its
//! activation time, measures its clock's offset from the hub's, and flips to the new release
//! at the hub's instant — with no word to any other agent.
//!
//! # Layout
//!
//! - [`config`]: `agent.yaml` → [`AgentConfig`]
//! - [`state`]: the persisted active/previous releases (restart keeps serving)
//! - [`release`]: a release ready to serve; path resolution, `If-None-Match`        (pure parts)
//! - [`serve`]: the HTTP listener serving the active release
//! - [`poll`]: long-poll of the hub's schedule, with back-off
//! - [`stage`]: manifest + missing blobs, verified, bounded concurrency
//! - [`verify`]: with `trusted_keys`, whether a release is signed, or built from accepted
//!   changesets on a signed one
//! - [`release_dir`]: `releases/<id>/` copies and the atomic `current` symlink
//! - [`measure`]: clock offset from `GET /sync/v1/time` samples
//! - [`plan`]: what to stage, what to activate now, what to arm                     (pure)
//! - [`activate`]: the flip thread: sleep, spin, pointer store
//! - [`advance`]: the cycle compare-and-swap after a flip
//! - [`report`]: the agent's state, reported to the hub
//! - [`control`]: the loop tying them together (I/O shell); its decisions in
//!   [`control::decide`] (pure), installs in [`control::install`], disk writes in [`control::disk`]
//! - [`metrics`]: the agent's Prometheus metrics
//!
//! Detect and forward:
//!
//! - [`ignore`]: globs of editor temporaries and the agent's own files, never synced  (pure)
//! - [`detect`]: what changed in `watch.dir`: files read, hashed, blobs stored, refusals
//! - [`watcher`]: inotify (debounced) → scopes for [`detect`]; full rescans on overflow and periodically
//! - [`quiet`]: when a changed path goes to [`detect`]: `debounce` after its last event  (pure)
//! - [`local`]: the thread owning `watch.dir`: edits → changesets, installs → the directory
//! - [`forward`]: changesets to the hub (durable outbox) and to peers (immediate mode)
//! - [`api`]: `PUT`/`DELETE /content/…` and changesets from peers
//!
//! Start one in-process with [`start`] (the demo and tests do), or run the process with
//! [`run`] (`lockstep agent -c agent.yaml`: signals, systemd notification).
#![allow(clippy::disallowed_methods)] // I/O shell: the agent's hub-time source reads the monotonic clock

pub mod activate;
pub mod advance;
pub mod api;
pub mod config;
pub mod control;
pub mod detect;
pub mod forward;
pub mod frame;
pub mod ignore;
pub mod join;
pub mod local;
pub mod measure;
pub mod messages;
pub mod metrics;
pub mod outbox;
pub mod plan;
pub mod poll;
pub mod quiet;
pub mod release;
pub mod release_dir;
pub mod report;
pub mod serve;
pub mod stage;
pub mod state;
pub mod verify;
pub mod watcher;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::AgentConfig;
pub use release::Release;

use crate::net::client::{ClientError, HttpClient};
use crate::sync::auth::Tokens;
use crate::sync::changeset::{Applied, Mode};
use crate::sync::clock::{self, Anchor, Offset};
use crate::sync::manifest::ReleaseId;
use crate::sync::protocol::Report;
use crate::sync::store::{FsStore, StoreError};
use control::{Controller, DiskJob};
use messages::{Active, HubNow};
use metrics::AgentMetrics;
use serve::ServeState;
use stage::Stager;
use state::{AgentState, StateFile, STATE_NAME};

/// Why an agent cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The store directory is unusable.
    #[error("agent store: {0}")]
    Store(#[from] StoreError),
    /// The serve address cannot be bound.
    #[error("cannot listen on serve address {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The hub settings are unusable.
    #[error(transparent)]
    Hub(#[from] ClientError),
    /// Local change detection cannot start.
    #[error("watch: {0}")]
    Watch(String),
}

/// A running agent.
pub struct AgentHandle {
    serve_addr: SocketAddr,
    active: Active,
    metrics: Arc<AgentMetrics>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl AgentHandle {
    /// Where the active release is served (the bound address: a real port for `:0`).
    pub fn serve_addr(&self) -> SocketAddr {
        self.serve_addr
    }

    /// The id of the release being served.
    pub fn active(&self) -> Option<ReleaseId> {
        self.active.load().as_ref().map(|r| r.id())
    }

    /// The release being served.
    pub fn active_release(&self) -> Option<Arc<Release>> {
        self.active.load_full()
    }

    /// The agent's metrics.
    pub fn metrics(&self) -> &Arc<AgentMetrics> {
        &self.metrics
    }

    /// Stops the agent: no new connections, in-flight requests get up to `grace`.
    pub async fn shutdown(self, grace: Duration) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(?grace, "agent tasks still running after the grace period");
        }
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        // A handle dropped without `shutdown` still stops its agent's tasks.
        self.shutdown.cancel();
    }
}

/// Starts an agent: binds `config.serve` (or takes the socket systemd kept across a restart,
/// see [`crate::net::bind`]), then as [`start_on`]; the socket then goes to systemd's store,
/// so the backend refuses nothing while the agent restarts.
pub async fn start(config: AgentConfig) -> Result<AgentHandle, AgentError> {
    let listener =
        crate::net::bind::bind("agent", config.serve).map_err(|source| AgentError::Bind {
            addr: config.serve,
            source,
        })?;
    crate::net::bind::keep("agent", std::slice::from_ref(&listener));
    crate::net::bind::release_unclaimed();
    start_on(config, listener, CancellationToken::new()).await
}

/// Starts an agent serving on `listener`, stopped by `shutdown` (or [`AgentHandle::shutdown`]).
/// The release recorded in the store is loaded and served before the hub is asked anything,
/// so a restarted agent keeps serving while the hub is away.
pub async fn start_on(
    config: AgentConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<AgentHandle, AgentError> {
    // A child: dropping or stopping this agent never cancels the caller's other work.
    let shutdown = shutdown.child_token();
    let anchor = Anchor::now();
    let serve_addr = listener.local_addr().map_err(|source| AgentError::Bind {
        addr: config.serve,
        source,
    })?;
    let tls = config.tls.as_ref().map(|t| t.client()).transpose()?;
    let client = HttpClient::hubs(&config.hubs, config.token.clone(), tls.as_ref())?;
    let (store, loaded) = open_store(&config).await?;
    let metrics = Arc::new(AgentMetrics::new());
    let trust = verify::Trust::from_config(&config);
    announce_trust(trust.as_deref(), &config);
    let current = loaded.current.clone();
    let active: Active = Arc::new(ArcSwapOption::new(current.clone()));
    metrics.set_active(current.as_ref().map(|r| r.id()));
    let agent = Wiring {
        config: &config,
        store,
        metrics,
        trust,
        client,
        shutdown,
        tracker: TaskTracker::new(),
    };
    let (clock_tx, clock_rx) = tokio::sync::watch::channel(None);
    let (install_tx, install_rx) = mpsc::channel(messages::INSTALL_QUEUE);
    let hub_now = hub_clock(anchor, clock_rx.clone());
    let local_tx = match &config.watch {
        Some(w) => Some(start_local(
            &agent,
            w,
            current.clone(),
            hub_now.clone(),
            install_tx.clone(),
        )?),
        None => None,
    };
    spawn_serve(
        &agent,
        listener,
        &active,
        install_tx,
        local_tx.clone(),
        hub_now,
    );
    let disk = spawn_disk(&agent, &active, current.as_ref());
    let (hub, schedules) = spawn_hub_tasks(&agent, anchor, serve_addr, current.as_ref(), clock_tx);
    let controller = controller(&agent, anchor, &active, hub, disk, local_tx, loaded);
    let inbox = control::Inbox {
        schedules,
        clock: clock_rx,
        installs: install_rx,
    };
    agent
        .tracker
        .spawn(controller.run(inbox, agent.shutdown.clone()));
    info!(
        name = %config.name,
        serve = %serve_addr,
        hub = %config.hubs.join(","),
        active = ?current.as_ref().map(|r| r.id().short()),
        "agent started"
    );
    Ok(agent.into_handle(serve_addr, active))
}

/// Opens the agent's store (creating a few directories and clearing tmp/: quick enough to do
/// on the runtime) and reads the state recorded in it (off the runtime).
async fn open_store(config: &AgentConfig) -> Result<(Arc<FsStore>, control::Start), AgentError> {
    let store = Arc::new(FsStore::open(&config.store)?);
    let loaded = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || load_state(&store))
            .await
            .unwrap_or_default()
    };
    Ok((store, loaded))
}

/// Says at start which releases this agent will stage: signed by which keys, or unsigned.
fn announce_trust(trust: Option<&verify::Trust>, config: &AgentConfig) {
    match trust {
        Some(t) => {
            let keys: Vec<String> = t.keys().ids().iter().map(|k| k.to_string()).collect();
            info!(trusted_keys = %keys.join(","), "releases are staged only when a trusted key signed them, or the hub built them from accepted changesets on such a release")
        }
        None => {
            warn!(hub = %config.hubs.join(","), "no trusted_keys: releases are staged unsigned (allowed only because the hub is on this host)")
        }
    }
}

/// What every task of one agent is started with.
struct Wiring<'a> {
    config: &'a AgentConfig,
    store: Arc<FsStore>,
    metrics: Arc<AgentMetrics>,
    trust: Option<Arc<verify::Trust>>,
    client: HttpClient,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Wiring<'_> {
    /// The handle of the agent whose tasks were started with this.
    fn into_handle(self, serve_addr: SocketAddr, active: Active) -> AgentHandle {
        AgentHandle {
            serve_addr,
            active,
            metrics: self.metrics,
            shutdown: self.shutdown,
            tracker: self.tracker,
        }
    }
}

/// Starts the serve listener, with the content API (`PUT`/`DELETE`, peers' changesets).
fn spawn_serve(
    agent: &Wiring,
    listener: TcpListener,
    active: &Active,
    installs: mpsc::Sender<messages::Install>,
    local: Option<mpsc::UnboundedSender<messages::Input>>,
    hub_now: HubNow,
) {
    let config = agent.config;
    let api = api::AgentApi {
        name: config.name.clone(),
        tokens: Tokens {
            agent: config.token.clone(),
            publish: None,
        },
        revoked: crate::sync::identity::Revocations::new(
            config.tls.as_ref().map_or(&[][..], |t| &t.trust.crls),
        ),
        store: agent.store.clone(),
        installs,
        local,
        max_file_bytes: config
            .watch
            .as_ref()
            .map_or(crate::sync::manifest::MAX_BLOB_BYTES, |w| w.max_file_bytes),
        metrics: agent.metrics.clone(),
        hub_now,
        changesets: verify::changeset_authority(config),
        frames: Arc::new(tokio::sync::Semaphore::new(api::FRAMES_AT_ONCE)),
    };
    let state = ServeState {
        tls: config.tls.as_ref().and_then(|t| t.server()),
        active: active.clone(),
        metrics: agent.metrics.clone(),
        api: Some(Arc::new(api)),
    };
    agent.tracker.spawn(serve::serve(
        listener,
        config.max_connections,
        state,
        agent.shutdown.clone(),
        agent.tracker.clone(),
    ));
}

/// The disk worker's queue and the state file's writer it shares with the flip thread.
struct DiskEnds {
    jobs: mpsc::UnboundedSender<DiskJob>,
    state: Arc<StateFile>,
}

/// Starts the ordered disk worker; `current`'s copy in `release_dir` is put right first.
fn spawn_disk(agent: &Wiring, active: &Active, current: Option<&Arc<Release>>) -> DiskEnds {
    let state = Arc::new(StateFile::new(agent.store.clone(), active.clone()));
    if let Some(dir) = &agent.config.release_dir {
        // Copies an earlier run left half-done; nothing of this run is copying yet.
        release_dir::clear_leftovers(dir);
    }
    let (disk_tx, disk_rx) = mpsc::unbounded_channel();
    agent.tracker.spawn(control::disk_worker(
        agent.store.clone(),
        state.clone(),
        agent.config.release_dir.clone(),
        agent.metrics.clone(),
        disk_rx,
    ));
    if let Some(r) = current {
        // A release_dir removed or changed while the agent was down is put right.
        let _ = disk_tx.send(DiskJob::Current(r.clone()));
    }
    DiskEnds {
        jobs: disk_tx,
        state,
    }
}

/// The ends of the hub-facing tasks the controller drives.
struct HubEnds {
    report: tokio::sync::watch::Sender<Report>,
    measure_now: Arc<Notify>,
}

/// Starts the reporter, the clock measurer and the schedule long-poll.
fn spawn_hub_tasks(
    agent: &Wiring,
    anchor: Anchor,
    serve_addr: SocketAddr,
    current: Option<&Arc<Release>>,
    clock_tx: tokio::sync::watch::Sender<Option<Offset>>,
) -> (HubEnds, mpsc::Receiver<crate::sync::protocol::Schedule>) {
    let (client, shutdown, tracker) = (&agent.client, &agent.shutdown, &agent.tracker);
    let report = Report {
        active: current.map(|r| r.id()),
        serve: Some(serve_addr.to_string()),
        ..Report::default()
    };
    let (report_tx, report_rx) = tokio::sync::watch::channel(report);
    tracker.spawn(report::reporter(
        client.clone(),
        agent.config.name.clone(),
        report_rx,
        shutdown.clone(),
    ));
    let measure_now = Arc::new(Notify::new());
    tracker.spawn(measure::measurer(
        client.clone(),
        anchor,
        clock_tx,
        measure_now.clone(),
        shutdown.clone(),
    ));
    let (sched_tx, sched_rx) = mpsc::channel(8);
    tracker.spawn(poll::poll(client.clone(), sched_tx, shutdown.clone()));
    let ends = HubEnds {
        report: report_tx,
        measure_now,
    };
    (ends, sched_rx)
}

/// The controller, with its stager.
fn controller(
    agent: &Wiring,
    anchor: Anchor,
    active: &Active,
    hub: HubEnds,
    disk: DiskEnds,
    local: Option<mpsc::UnboundedSender<messages::Input>>,
    start: control::Start,
) -> Controller {
    let config = agent.config;
    let stager = Stager {
        client: agent.client.clone(),
        store: agent.store.clone(),
        metrics: agent.metrics.clone(),
        permits: Arc::new(Semaphore::new(config.fetch_concurrency.max(1))),
        release_dir: config.release_dir.clone(),
        trust: agent.trust.clone(),
    };
    let handles = control::Handles {
        client: agent.client.clone(),
        active: active.clone(),
        metrics: agent.metrics.clone(),
        stager,
        disk: disk.jobs,
        state: disk.state,
        report: hub.report,
        measure_now: hub.measure_now,
        local,
    };
    let settings = control::Settings {
        anchor,
        gc: config.gc,
    };
    Controller::new(handles, settings, start)
}

/// Hub time now from the measurer's latest estimate; `None` until there is one (never the
/// local wall clock: a changeset numbered by a clock an hour behind would be a duplicate at
/// the hub, one an hour ahead would be refused).
fn hub_clock(anchor: Anchor, clock: tokio::sync::watch::Receiver<Option<Offset>>) -> HubNow {
    Arc::new(move || {
        let offset = (*clock.borrow())?;
        Some(clock::hub_time(std::time::Instant::now(), offset, &anchor).max(0) as u64)
    })
}

/// Starts detect-and-forward: the local-edit thread, the watcher (with `watch.dir`), the
/// forwarder and, for immediate mode without a static `peers:` list, the registry reader.
fn start_local(
    agent: &Wiring,
    w: &config::Watch,
    current: Option<Arc<Release>>,
    hub_now: HubNow,
    installs: mpsc::Sender<messages::Install>,
) -> Result<mpsc::UnboundedSender<messages::Input>, AgentError> {
    let ignore =
        Arc::new(detect::Ignore::new(&w.ignore).map_err(|e| AgentError::Watch(e.to_string()))?);
    let (local_tx, local_rx) = mpsc::unbounded_channel();
    let (out_tx, out_rx) = mpsc::channel(messages::OUT_QUEUE);
    // Once at start, like the store's other start-up reads.
    let usage = Arc::new(outbox::Usage::scan(&agent.store));
    local::Local {
        name: agent.config.name.clone(),
        mode: w.mode,
        dir: w.dir.clone(),
        ignore: ignore.clone(),
        max_file_bytes: w.max_file_bytes,
        store: agent.store.clone(),
        hub_now,
        out: out_tx,
        installs,
        outbox: usage.clone(),
        metrics: agent.metrics.clone(),
    }
    .spawn(current, local_rx)
    .map_err(|e| AgentError::Watch(format!("cannot start the local-edit thread: {e}")))?;
    if let Some(dir) = &w.dir {
        spawn_watcher(agent, dir, w, ignore, local_tx.clone())?;
    }
    let forwarder = forward::Forwarder {
        client: agent.client.clone(),
        token: agent.config.token.clone(),
        tls: agent.config.tls.as_ref().and_then(|t| t.client().ok()),
        signer: agent.config.tls.as_ref().and_then(|t| t.signer.clone()),
        store: agent.store.clone(),
        peers: peers(agent, w.mode),
        metrics: agent.metrics.clone(),
        outbox: usage,
        sending: Arc::new(tokio::sync::Semaphore::new(forward::SEND_BUDGET)),
    };
    agent
        .tracker
        .spawn(forwarder.run(out_rx, agent.shutdown.clone()));
    Ok(local_tx)
}

/// Creates `watch.dir` if need be and watches it; the watcher's scopes go to the local thread
/// (those that piled up while it was busy merged into one).
fn spawn_watcher(
    agent: &Wiring,
    dir: &std::path::Path,
    w: &config::Watch,
    ignore: Arc<detect::Ignore>,
    local: mpsc::UnboundedSender<messages::Input>,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        AgentError::Watch(format!("cannot create watch.dir {}: {e}", dir.display()))
    })?;
    // Watcher batches go straight to the local thread.
    let (scope_tx, mut scope_rx) = mpsc::unbounded_channel();
    let watcher = watcher::spawn(
        dir,
        w.debounce,
        w.rescan,
        ignore,
        scope_tx,
        agent.shutdown.clone(),
    )
    .map_err(|e| AgentError::Watch(e.to_string()))?;
    let stop = agent.shutdown.clone();
    agent.tracker.spawn(async move {
        let _watcher = watcher;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                s = scope_rx.recv() => match s {
                    Some(mut s) => {
                        // Windows that piled up while the last one was examined: one pass.
                        while let Ok(more) = scope_rx.try_recv() {
                            s.merge(more);
                        }
                        if local.send(messages::Input::Scope(s)).is_err() {
                            return;
                        }
                    }
                    None => return,
                },
            }
        }
    });
    Ok(())
}

/// The peers immediate changesets go to: the static `peers:` list, else the hub's registry
/// (read by a task in immediate mode).
fn peers(agent: &Wiring, mode: Mode) -> forward::Peers {
    let config = agent.config;
    if !config.peers.is_empty() {
        agent.metrics.peers.set(config.peers.len() as i64);
        return forward::Peers::Static(config.peers.clone());
    }
    let (tx, rx) = tokio::sync::watch::channel(Vec::new());
    if mode == Mode::Immediate {
        // Peers with farm certificates speak TLS on their serve address.
        let scheme = match config.tls.as_ref().and_then(|t| t.own.as_ref()) {
            Some(_) => "https",
            None => "http",
        };
        agent.tracker.spawn(forward::registry(
            agent.client.clone(),
            config.name.clone(),
            scheme,
            tx,
            agent.metrics.clone(),
            agent.shutdown.clone(),
        ));
    }
    forward::Peers::Registry(rx)
}

/// The active and previous releases recorded in the store, when they load whole, and the
/// changesets the active one includes.
fn load_state(store: &Arc<FsStore>) -> control::Start {
    let state: AgentState = match store.read_state(STATE_NAME) {
        Ok(s) => s.unwrap_or_default(),
        Err(e) => {
            warn!(error = %e, "agent state unreadable; starting empty and fetching the hub's active release");
            return control::Start::default();
        }
    };
    let load = |id: Option<ReleaseId>, what: &str| {
        let id = id?;
        match Release::load(store, id) {
            Ok(r) => Some(Arc::new(r)),
            Err(e) => {
                warn!(release = %id.short(), error = %e, "the {what} release recorded in the store cannot be served; it will be fetched again");
                None
            }
        }
    };
    let active = load(state.active, "active");
    // Without its release, the record of what it included means nothing.
    let applied = if active.is_some() {
        state.applied
    } else {
        Applied::new()
    };
    control::Start {
        current: active,
        previous: load(state.previous, "previous"),
        applied,
    }
}

/// Longest time in-flight requests get at shutdown.
pub const DRAIN: Duration = Duration::from_secs(5);

/// `lockstep agent`: runs until SIGTERM/SIGINT; tells systemd `READY=1` once the serve
/// listener is bound.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    use anyhow::Context;
    use tokio::signal::unix::{signal, SignalKind};

    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let agent_name = config.name.clone();
    let agent = start(config).await?;
    let status = format!(
        "agent {} serving {} on {}",
        agent_name,
        agent
            .active()
            .map_or_else(|| "nothing yet".to_string(), |id| id.short()),
        agent.serve_addr()
    );
    crate::systemd::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]);
    let watchdog = crate::systemd::spawn_watchdog();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    crate::systemd::notify(&[sd_notify::NotifyState::Stopping]);
    if let Some(w) = watchdog {
        w.abort();
    }
    info!("agent stopping");
    agent.shutdown(DRAIN).await;
    info!("agent stopped");
    Ok(())
}
