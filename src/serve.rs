//! `lockstep serve`: runs the [`Appliance`] under a signal loop: SIGHUP and the reload
//! socket reload the config file (a bad one is refused and the old one keeps serving),
//! SIGTERM/SIGINT drain and stop. Tells systemd `READY=1` only once everything is bound.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tracing::{error, info};

use crate::admin::reload;
use crate::appliance::{Appliance, ReloadFailure, Runtimes};
use crate::config::Config;

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colours only on a terminal; under systemd (JOURNAL_STREAM set) the journal stamps each
    // line itself, so no timestamp either.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
}

/// Runs until SIGTERM/SIGINT, serving on `runtimes` (see [`Appliance::start_on`]).
pub async fn run(
    path: PathBuf,
    cfg: Config,
    drain: Duration,
    runtimes: Runtimes,
) -> anyhow::Result<()> {
    let socket_path = cfg.admin.socket.clone();
    let mut app = Appliance::start_on(cfg, runtimes).await?;
    // Stored sockets of listeners gone from the config while the appliance was down.
    crate::net::bind::release_unclaimed();
    let (tx, mut rx) = mpsc::channel::<reload::ReloadRequest>(4);
    let stop_socket = tokio_util::sync::CancellationToken::new();
    if let Some(p) = &socket_path {
        let l = reload::listen(p)
            .with_context(|| format!("cannot create the reload socket {}", p.display()))?;
        tokio::spawn(reload::serve(
            l,
            tx.clone(),
            stop_socket.clone(),
            tokio_util::task::TaskTracker::new(),
        ));
    }
    let mut hup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    crate::systemd::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status(&app)),
    ]);
    let watchdog = crate::systemd::spawn_watchdog();
    info!(config = %path.display(), generation = app.generation(), "lockstep serving");

    loop {
        tokio::select! {
            _ = hup.recv() => {
                let _ = reload_from(&path, &mut app);
            }
            Some(req) = rx.recv() => {
                let _ = req.reply.send(reload_from(&path, &mut app));
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    crate::systemd::notify(&[sd_notify::NotifyState::Stopping]);
    if let Some(w) = watchdog {
        w.abort();
    }
    info!(?drain, "draining");
    stop_socket.cancel();
    if let Some(p) = &socket_path {
        let _ = std::fs::remove_file(p);
    }
    app.shutdown(drain).await;
    info!("stopped");
    Ok(())
}

fn reload_from(path: &std::path::Path, app: &mut Appliance) -> Result<u64, String> {
    crate::systemd::notify(&[sd_notify::NotifyState::Reloading]);
    let outcome = app.reload_file(path).map_err(|failure| {
        match &failure {
            ReloadFailure::Config(errors) => {
                for e in &errors.0 {
                    error!(problem = %e, "config refused; the running config keeps serving");
                }
            }
            e => error!(error = %e, "reload failed; the running config keeps serving"),
        }
        failure.to_string()
    });
    crate::systemd::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status(app)),
    ]);
    outcome
}

fn status(app: &Appliance) -> String {
    let live = app.live().load();
    format!(
        "generation {}: {} listener(s), {} pool(s)",
        app.generation(),
        live.listeners.len(),
        live.table.pools.len()
    )
}
