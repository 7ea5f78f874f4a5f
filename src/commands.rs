//! What each subcommand does; `main` maps the result to an exit code. Config problems are
//! returned as [`ConfigErrors`] (exit 2), anything else as a plain error (exit 1).

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::cli::{Cli, Command};
use crate::config::{self, ConfigErrors};
use crate::net::client::{ClientTls, HttpClient, Remote};
use crate::publish;

/// Runs one command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { config, agent } => check_command(config, agent),
        Command::Serve {
            config,
            workers,
            pin_workers,
            drain,
        } => serve(&config, workers, pin_workers, drain),
        Command::Reload { config, socket } => reload(&config, socket),
        Command::Publish {
            hub,
            dir,
            at,
            rollback,
            concurrency,
            sign_keys,
        } => publish(&hub, dir, at, rollback, concurrency, &sign_keys),
        Command::Keygen { out, comment } => keygen(&out, comment.as_deref()),
        Command::Status { hub, json, admin } => status(&hub, json, admin.as_deref()),
        Command::Agent {
            command:
                Some(crate::cli::AgentCommand::Join {
                    hub,
                    token,
                    ca_hash,
                    out,
                }),
            ..
        } => {
            let written =
                runtime(false)?.block_on(crate::agent::join::join(&hub, &token, &ca_hash, &out))?;
            println!(
                "joined as agent {}: its certificate and key are in {}. Put this in agent.yaml (and hub: \"{hub}\", and trusted_keys: the publishers' KEY.pub files from `lockstep keygen`):\n\n{}",
                written.name,
                out.display(),
                written.yaml()
            );
            Ok(())
        }
        Command::Agent { config, .. } => agent(&config),
        Command::Ca { dir, command } => ca(&dir, &command),
        Command::Demo {
            port,
            admin_port,
            dns_port,
            sync_port,
        } => {
            crate::serve::init_tracing();
            // The whole farm in one process: the appliance's and every agent's connections.
            fit_descriptors(0);
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
        Command::Manpages { dir } => manpages(&dir),
    }
}

/// `lockstep check [--agent] [-c FILE]`.
fn check_command(config: Option<PathBuf>, agent: bool) -> anyhow::Result<()> {
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

/// `lockstep serve`: the main runtime runs signals, admin, health checks and reloads; with one
/// worker it serves the proxy too, otherwise each worker thread runs its own runtime.
fn serve(
    config: &Path,
    workers: Option<usize>,
    pin: bool,
    drain: std::time::Duration,
) -> anyhow::Result<()> {
    crate::serve::init_tracing();
    // Before any thread: the sockets systemd kept across the restart, if any.
    crate::net::bind::inherit_from_env();
    let cfg = config::load(config)?;
    let proxy: u64 = cfg
        .listeners
        .iter()
        .map(|l| 2 * l.max_connections as u64)
        .sum();
    let control = cfg.admin.max_connections as u64
        + cfg.sync.as_ref().map_or(0, |s| s.max_connections as u64);
    fit_descriptors(proxy + control);
    let count = workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let main = runtime(false)?;
    let workers = if count == 1 {
        if pin {
            tracing::info!("--pin-workers: one worker serves on the main thread, which is not pinned (confine the process: taskset, CPUAffinity=)");
        }
        vec![main.handle().clone()]
    } else {
        worker_runtimes(count, pin)?
    };
    let runtimes = crate::appliance::Runtimes {
        workers,
        control: control_runtime()?,
    };
    main.block_on(crate::serve::run(
        config.to_path_buf(),
        cfg,
        drain,
        runtimes,
    ))
}

/// `lockstep reload`: asks the running appliance over its admin socket, waits for the outcome.
fn reload(config: &Path, socket: Option<PathBuf>) -> anyhow::Result<()> {
    let socket = match socket {
        Some(s) => s,
        None => config::load(config)?.admin.socket.with_context(|| {
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

/// `lockstep publish DIR [--at WHEN] [--sign-key PATH…]` or `lockstep publish --rollback`.
fn publish(
    hub: &crate::cli::HubArgs,
    dir: Option<PathBuf>,
    at: Option<publish::At>,
    rollback: bool,
    concurrency: usize,
    keys: &[PathBuf],
) -> anyhow::Result<()> {
    // Read first: a key that cannot sign stops the publish before anything is uploaded.
    let keys = keys
        .iter()
        .map(|k| crate::sync::sign::read_secret_key(k))
        .collect::<Result<Vec<_>, _>>()?;
    let client = hub_client(hub)?;
    let rt = runtime(false)?;
    if rollback {
        let c = rt.block_on(publish::rollback(&client))?;
        println!("release {}", c.id);
        println!("{}", publish::describe(&c, c.schedule.now_us));
        return Ok(());
    }
    // clap requires DIR unless --rollback.
    let dir = dir.context("give the directory to publish")?;
    let o = rt
        .block_on(publish::publish(
            &client,
            &dir,
            at.unwrap_or(publish::At::Next),
            concurrency,
            &keys,
        ))
        .with_context(|| format!("publishing {}", dir.display()))?;
    print!("{}", publish::render_outcome(&o));
    Ok(())
}

/// `lockstep keygen --out PATH [--comment TEXT]`.
fn keygen(out: &Path, comment: Option<&str>) -> anyhow::Result<()> {
    use crate::sync::sign;
    let public = sign::write_key_pair(out, comment, &ring::rand::SystemRandom::new())?;
    println!(
        "secret key {} (mode 0600): keep it on the publishing host; sign with `lockstep publish --sign-key {}`",
        out.display(),
        out.display()
    );
    println!(
        "public key {} (key id {}): list it in every agent's trusted_keys (and the hub's sync.trusted_keys)",
        sign::public_path(out).display(),
        public.id()
    );
    Ok(())
}

/// `lockstep status [--json] [--admin URL]`.
fn status(hub: &crate::cli::HubArgs, json: bool, admin: Option<&str>) -> anyhow::Result<()> {
    let client = hub_client(hub)?;
    let rt = runtime(false)?;
    let pools = match admin {
        Some(url) => {
            let c = HttpClient::new(Remote::Admin, url.trim_end_matches('/'), None, None)?;
            Some(rt.block_on(publish::pools(&c))?)
        }
        None => None,
    };
    let fleet = rt.block_on(publish::fleet(&client))?;
    if json {
        let view = publish::StatusView {
            fleet,
            pools: pools.map(|p| p.pools),
        };
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        if let Some(p) = &pools {
            println!("{}", publish::render_pools(p));
        }
        print!("{}", publish::render_fleet(&fleet));
    }
    Ok(())
}

/// `lockstep agent`.
fn agent(config: &Path) -> anyhow::Result<()> {
    crate::serve::init_tracing();
    // Before any thread: the serving socket systemd kept across the restart, if any.
    crate::net::bind::inherit_from_env();
    let cfg = crate::agent::config::load(config)?;
    fit_descriptors((cfg.max_connections + cfg.fetch_concurrency) as u64);
    runtime(false)?.block_on(crate::agent::run(cfg))
}

/// Raises the open-file limit as far as allowed and warns when the connection caps need more
/// descriptors than that.
fn fit_descriptors(needed: u64) {
    use crate::net::limit::{fd_shortfall, raise_nofile};
    match raise_nofile() {
        Ok(limit) => match fd_shortfall(needed, limit) {
            Some(w) => tracing::warn!("{w}"),
            None => tracing::debug!(limit, needed, "open-file limit"),
        },
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// `lockstep manpages --dir DIR`.
fn manpages(dir: &Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // No `build()` before: generate_to disables the help subcommand itself.
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
    Ok(())
}

fn hub_client(args: &crate::cli::HubArgs) -> anyhow::Result<HttpClient> {
    let token = match &args.token_file {
        Some(f) => Some(crate::sync::auth::read_token(f)?),
        None => None,
    };
    let tls = match (&args.ca_file, &args.cert, &args.key) {
        (Some(ca), Some(cert), Some(key)) => Some(ClientTls::files(ca, None, Some((cert, key)))?),
        (Some(ca), _, _) => Some(ClientTls::ca_file(ca)?),
        _ => None,
    };
    let client = HttpClient::hubs(&args.hub, token, tls.as_ref())?;
    if !client.is_loopback() && !client.is_https() {
        anyhow::bail!(
            "hub {} is not on this host, but plain HTTP: the release and your credentials would cross the network in clear; use https:// with --ca-file, --cert and --key",
            args.hub.join(", ")
        );
    }
    Ok(client)
}

/// `lockstep ca …`.
fn ca(dir: &Path, command: &crate::cli::CaCommand) -> anyhow::Result<()> {
    use crate::ca::Ca;
    use crate::cli::CaCommand;
    use crate::sync::identity::{Identity, Kind};
    let kind = |role: &str| Kind::parse(role).expect("clap checked the role");
    match command {
        CaCommand::Init { farm } => {
            Ca::init(dir, farm)?;
            println!(
                "farm CA created in {}: give {} to every party (hub `sync.tls.client_ca`, agent `tls.ca`, publish --ca-file); keep ca.key here",
                dir.display(),
                Ca::cert_path(dir).display()
            );
        }
        CaCommand::Issue {
            name,
            role,
            dns,
            ip,
            days,
            out,
        } => {
            let who = Identity::new(kind(role), name).ok_or_else(|| {
                anyhow::anyhow!(
                    "`{name}` cannot name a party: use 1 to 64 letters, digits, `.`, `_` or `-`"
                )
            })?;
            let mut ca = Ca::open(dir)?;
            let (issued, crt, key) = ca.issue_into(&who, dns, ip, *days, out)?;
            println!(
                "issued {who} (serial {}, valid {days} days): {} and {}",
                issued.serial,
                crt.display(),
                key.display()
            );
        }
        CaCommand::Revoke { name, role } => {
            let mut ca = Ca::open(dir)?;
            let n = ca.revoke(name, role.as_deref().map(kind))?;
            println!(
                "revoked {n} certificate(s) of {name}; {} is rewritten: `lockstep reload` the appliance and copy it to every agent's tls.crl",
                Ca::crl_path(dir).display()
            );
        }
        CaCommand::JoinToken {
            name,
            ip,
            dns,
            ttl,
            hub,
        } => {
            let mut ca = Ca::open(dir)?;
            let token = ca.join_token(name, ip, dns, ttl.as_secs() as i64)?;
            let hash = crate::ca::fingerprint(&ca.cert_pem()?)
                .ok_or_else(|| anyhow::anyhow!("{} is not PEM", Ca::cert_path(dir).display()))?;
            let hub = hub.as_deref().unwrap_or("https://HUB:7700");
            println!(
                "one-time token for agent {name}, valid {}: on that backend run\n\n  lockstep agent join --hub {hub} --ca-hash {hash} --token {token}\n",
                humantime::format_duration(*ttl)
            );
        }
        CaCommand::List => {
            let ca = Ca::open(dir)?;
            println!("farm {}", ca.farm());
            for i in ca.issued() {
                let state = match i.revoked {
                    Some(_) => "revoked",
                    None => "valid",
                };
                println!("{:<10} {:<24} {} {state}", i.kind, i.name, i.serial);
            }
        }
    }
    Ok(())
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
    let now = crate::sync::clock::wall_us() / 1_000_000;
    for l in &cfg.listeners {
        for (i, c) in l.tls.iter().flatten().enumerate() {
            if let Some(w) = c
                .not_after
                .and_then(|t| config::tls::expiry_warning(t, now))
            {
                println!(
                    "warning: listener `{}`, certificate {}: {w}",
                    l.name,
                    crate::live::certificate_name(c, i)
                );
            }
        }
    }
    Ok(())
}

fn check_agent(path: &Path) -> anyhow::Result<()> {
    let cfg = crate::agent::config::load(path)?;
    let trust = match &cfg.trusted_keys {
        Some(k) => format!(", {} trusted key(s)", k.len()),
        None => ", unsigned releases accepted (hub on this host; set trusted_keys)".to_string(),
    };
    println!(
        "{}: OK (agent {}, hub {}, serves {}{trust}{}{})",
        path.display(),
        cfg.name,
        cfg.hubs.join(", "),
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

/// Starts `count` threads, each running a single-threaded runtime until the process exits;
/// with `pin`, each bound to one of the CPUs the process may run on ([`worker_cpus`]).
fn worker_runtimes(count: usize, pin: bool) -> anyhow::Result<Vec<tokio::runtime::Handle>> {
    let cpus = if pin { allowed_cpus() } else { Vec::new() };
    let cpus = worker_cpus(&cpus, count);
    (0..count)
        .map(|i| {
            let rt = runtime(false).context("cannot start a worker runtime")?;
            let handle = rt.handle().clone();
            let cpu = cpus.get(i).copied();
            std::thread::Builder::new()
                .name(format!("lockstep-worker-{i}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        pin_thread(i, cpu);
                    }
                    rt.block_on(std::future::pending::<()>())
                })
                .context("cannot start a worker thread")?;
            Ok(handle)
        })
        .collect()
}

/// The CPU each of `workers` workers is pinned to, given the CPUs the process may run on
/// (pure): worker i on the i-th, round the list again when there are more workers than CPUs;
/// none when the list is empty.
fn worker_cpus(allowed: &[usize], workers: usize) -> Vec<usize> {
    if allowed.is_empty() {
        return Vec::new();
    }
    (0..workers).map(|i| allowed[i % allowed.len()]).collect()
}

/// The CPUs this process may run on (its affinity: `taskset`, systemd's `CPUAffinity=`), in
/// order; empty, with a warning, when they cannot be read.
fn allowed_cpus() -> Vec<usize> {
    match rustix::thread::sched_getaffinity(None) {
        Ok(set) => (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&c| set.is_set(c))
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the CPUs this process may use; workers not pinned");
            Vec::new()
        }
    }
}

/// Binds the calling thread (worker `i`) to `cpu`; a failure is logged and the worker runs
/// unpinned.
fn pin_thread(i: usize, cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    match rustix::thread::sched_setaffinity(None, &set) {
        Ok(()) => tracing::info!(worker = i, cpu, "worker pinned"),
        Err(e) => {
            tracing::warn!(worker = i, cpu, error = %e, "cannot pin the worker; it runs unpinned")
        }
    }
}

/// How much lower the control plane's thread runs than the proxy's (added to the nice value:
/// the kernel weighs a thread at nice 10 about a tenth of one at 0). Under contention for a core
/// the proxy's workers get it first, while the admin API and the hub's cycle still get their
/// share: they never stop, they only yield.
const CONTROL_NICE: i32 = 10;

/// How long the control plane's thread works before it leaves its core to the proxy for as
/// long (see [`crate::net::slice`]): the kernel would otherwise let it run to the next tick
/// (4 ms here).
const CONTROL_SLICE: std::time::Duration = std::time::Duration::from_micros(250);

/// Starts the control plane's thread (see [`crate::appliance::Runtimes`]): a single-threaded
/// runtime [`CONTROL_NICE`] below the process (a per-thread value on Linux; lowering one's own
/// priority needs no privilege) on slices of [`CONTROL_SLICE`], running until the process
/// exits.
fn control_runtime() -> anyhow::Result<tokio::runtime::Handle> {
    let rt = runtime_builder(false)
        .on_thread_park(crate::net::slice::parked)
        .on_thread_unpark(crate::net::slice::unparked)
        .build()
        .context("cannot start the control runtime")?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("lockstep-control".to_string())
        .spawn(move || {
            // `None`: the calling thread (Linux applies setpriority per thread); relative to
            // the priority the process was started with (a unit's `Nice=`).
            let lower = rustix::process::getpriority_process(None).and_then(|base| {
                rustix::process::setpriority_process(None, (base + CONTROL_NICE).min(19))
            });
            if let Err(e) = lower {
                tracing::warn!(error = %e, "the control plane runs at the proxy's priority");
            }
            crate::net::slice::limit_this_thread(CONTROL_SLICE);
            rt.block_on(std::future::pending::<()>())
        })
        .context("cannot start the control thread")?;
    Ok(handle)
}

/// A single-threaded runtime (the main loop, each worker, the reload client) or, for the
/// demo, tokio's multi-thread one.
fn runtime(multi_thread: bool) -> anyhow::Result<tokio::runtime::Runtime> {
    runtime_builder(multi_thread)
        .build()
        .context("cannot start the async runtime")
}

/// The builder of [`runtime`], with every driver enabled (the control thread adds its hooks).
fn runtime_builder(multi_thread: bool) -> tokio::runtime::Builder {
    let mut b = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    b.enable_all();
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_go_one_to_a_cpu_in_the_order_allowed() {
        assert_eq!(worker_cpus(&[0, 1], 2), vec![0, 1]);
        // A process confined to CPUs 2 and 5 (taskset, CPUAffinity=) pins to those.
        assert_eq!(worker_cpus(&[2, 5], 2), vec![2, 5]);
        assert_eq!(worker_cpus(&[0, 1, 2, 3], 2), vec![0, 1]);
    }

    #[test]
    fn more_workers_than_cpus_share_them_round_the_list() {
        assert_eq!(worker_cpus(&[3, 7], 5), vec![3, 7, 3, 7, 3]);
        assert_eq!(worker_cpus(&[4], 3), vec![4, 4, 4]);
    }

    #[test]
    fn no_known_cpu_pins_nothing() {
        assert!(worker_cpus(&[], 4).is_empty());
    }

    #[test]
    fn the_allowed_cpus_are_this_process_s() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        assert!(cpus.windows(2).all(|w| w[0] < w[1]));
    }
}
