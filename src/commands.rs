//! What each subcommand does; `main` maps the result to an exit code. Config problems are
//! returned as [`ConfigErrors`] (exit 2), anything else as a plain error (exit 1).

use std::path::Path;

use anyhow::Context;

use crate::cli::{Cli, Command};
use crate::config::{self, ConfigErrors};

/// Runs one command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Serve {
            config,
            workers,
            drain,
        } => {
            crate::serve::init_tracing();
            let cfg = config::load(&config)?;
            let count = workers
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
                .max(1);
            // The main runtime runs signals, admin, health checks and reloads; with one worker
            // it serves the proxy too, otherwise each worker thread runs its own runtime.
            let main = runtime(false)?;
            let handles = if count == 1 {
                vec![main.handle().clone()]
            } else {
                worker_runtimes(count)?
            };
            main.block_on(crate::serve::run(config, cfg, drain, handles))
        }
        Command::Reload { config, socket } => {
            let socket = match socket {
                Some(s) => s,
                None => config::load(&config)?.admin.socket.with_context(|| {
                    format!(
                        "{} sets no admin.socket: set it (e.g. /run/lockstep/admin.sock) or pass --socket",
                        config.display()
                    )
                })?,
            };
            let generation = runtime(false)?.block_on(crate::admin::reload::request(&socket))?;
            println!("reloaded: config generation {generation} is serving");
            Ok(())
        }
        Command::Demo {
            port,
            admin_port,
            dns_port,
        } => {
            crate::serve::init_tracing();
            runtime(true)?.block_on(crate::demo::run(port, admin_port, dns_port))
        }
    }
}

fn check(path: &Path) -> anyhow::Result<()> {
    let cfg: Result<_, ConfigErrors> = config::load(path);
    let cfg = cfg?;
    println!(
        "{}: OK ({} listener(s), {} route(s), {} pool(s), {} backend(s){}{})",
        path.display(),
        cfg.listeners.len(),
        cfg.routes.len(),
        cfg.pools.len(),
        cfg.pools.iter().map(|p| p.backends.len()).sum::<usize>(),
        if cfg.dns.is_some() { ", dns" } else { "" },
        if cfg.sync.is_some() { ", sync" } else { "" },
    );
    Ok(())
}

/// Starts `count` threads, each running a single-threaded runtime until the process exits.
fn worker_runtimes(count: usize) -> anyhow::Result<Vec<tokio::runtime::Handle>> {
    (0..count)
        .map(|i| {
            let rt = runtime(false).context("cannot start a worker runtime")?;
            let handle = rt.handle().clone();
            std::thread::Builder::new()
                .name(format!("lockstep-worker-{i}"))
                .spawn(move || rt.block_on(std::future::pending::<()>()))
                .context("cannot start a worker thread")?;
            Ok(handle)
        })
        .collect()
}

/// A single-threaded runtime (the main loop, each worker, the reload client) or, for the
/// demo, tokio's multi-thread one.
fn runtime(multi_thread: bool) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    b.enable_all()
        .build()
        .context("cannot start the async runtime")
}
