//! What each subcommand does; `main` maps the result to an exit code. Config problems are
//! returned as [`ConfigErrors`] (exit 2), anything else as a plain error (exit 1).

use std::path::Path;

use anyhow::Context;

use crate::cli::{Cli, Command};
use crate::config::{self, ConfigErrors};

/// Runs one command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { config, agent } => {
            let default = if agent {
                crate::cli::DEFAULT_AGENT_CONFIG
            } else {
                crate::cli::DEFAULT_CONFIG
            };
            let path = config.unwrap_or_else(|| default.into());
            if agent {
                check_agent(&path)
            } else {
                check(&path)
            }
        }
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
        Command::Publish {
            hub,
            dir,
            at,
            rollback,
            concurrency,
        } => {
            use crate::publish;
            let client = hub_client(&hub)?;
            runtime(false)?.block_on(async {
                if rollback {
                    let c = publish::rollback(&client).await?;
                    println!("release {}", c.id);
                    println!("{}", publish::describe(&c, c.schedule.now_us));
                    return Ok(());
                }
                // clap requires DIR unless --rollback.
                let dir = dir.context("give the directory to publish")?;
                let o = publish::publish(&client, &dir, at.unwrap_or(publish::At::Next), concurrency)
                    .await
                    .with_context(|| format!("publishing {}", dir.display()))?;
                println!("release {}", o.committed.id);
                println!(
                    "files {} ({} bytes); uploaded {} of {} blob(s), {} bytes (the hub already had the others)",
                    o.files, o.bytes, o.uploaded_blobs, o.blobs, o.uploaded_bytes
                );
                println!("{}", publish::describe(&o.committed, o.committed.schedule.now_us));
                Ok(())
            })
        }
        Command::Status { hub, json, admin } => {
            let client = hub_client(&hub)?;
            let rt = runtime(false)?;
            let pools = match &admin {
                Some(url) => {
                    let c =
                        crate::net::client::HttpClient::new(crate::net::client::Remote::Admin, url.trim_end_matches('/'), None, None)?;
                    Some(rt.block_on(c.json::<serde_json::Value>(
                        http::Method::GET,
                        "/api/pools",
                        None::<&()>,
                        std::time::Duration::from_secs(10),
                    ))?)
                }
                None => None,
            };
            let fleet = rt.block_on(crate::publish::fleet(&client))?;
            if json {
                let mut v = serde_json::to_value(&fleet)?;
                if let Some(p) = pools {
                    v["pools"] = p["pools"].clone();
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                if let Some(p) = &pools {
                    println!("{}", crate::admin::api::render_pools(p));
                }
                print!("{}", crate::publish::render_fleet(&fleet));
            }
            Ok(())
        }
        Command::Agent { config } => {
            crate::serve::init_tracing();
            let cfg = crate::agent::config::load(&config)?;
            runtime(false)?.block_on(crate::agent::run(cfg))
        }
        Command::Demo {
            port,
            admin_port,
            dns_port,
            sync_port,
        } => {
            crate::serve::init_tracing();
            runtime(true)?.block_on(crate::demo::run(port, admin_port, dns_port, sync_port))
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "lockstep",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Manpages { dir } => {
            use clap::CommandFactory;
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            // No `build()` before: generate_to disables the help subcommand itself.
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
            Ok(())
        }
    }
}

fn hub_client(args: &crate::cli::HubArgs) -> anyhow::Result<crate::net::client::HttpClient> {
    let token = match &args.token_file {
        Some(f) => Some(crate::sync::auth::read_token(f)?),
        None => None,
    };
    Ok(crate::net::client::HttpClient::hub(
        &args.hub,
        token,
        args.ca_file.as_deref(),
    )?)
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

fn check_agent(path: &Path) -> anyhow::Result<()> {
    let cfg = crate::agent::config::load(path)?;
    println!(
        "{}: OK (agent {}, hub {}, serves {}{}{})",
        path.display(),
        cfg.name,
        cfg.hub,
        cfg.serve,
        if cfg.release_dir.is_some() {
            ", release_dir"
        } else {
            ""
        },
        match &cfg.watch {
            Some(w) if w.mode == crate::sync::changeset::Mode::Immediate => ", watch: immediate",
            Some(_) => ", watch: scheduled",
            None => "",
        },
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
