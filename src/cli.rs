//! The command line: raw clap arguments, kept apart from what each command does.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Default config path of the appliance.
pub const DEFAULT_CONFIG: &str = "/etc/lockstep/lockstep.yaml";
/// Default config path of the agent.
pub const DEFAULT_AGENT_CONFIG: &str = "/etc/lockstep/agent.yaml";

/// lockstep — a web-farm appliance: HTTP(S) load balancer, DNS round robin and content sync.
#[derive(Debug, Parser)]
#[command(name = "lockstep", version, about, propagate_version = true, after_help = EXAMPLES)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

const EXAMPLES: &str = "Examples:
  lockstep demo                                  a whole farm on loopback; prints curl and dig lines to try
  lockstep check -c /etc/lockstep/lockstep.yaml  validate a config (exit 2 and file:line:col on errors)
  lockstep serve -c /etc/lockstep/lockstep.yaml  run the appliance
  lockstep reload -c /etc/lockstep/lockstep.yaml reload the running appliance and wait for the result
  lockstep keygen --out /etc/lockstep/publisher.key
                                                 a key pair to sign releases (give agents the .pub)
  lockstep publish --hub http://10.0.0.1:7700 --token-file publish.token --sign-key publisher.key ./site
                                                 stage ./site, signed, as the next release on every backend
  lockstep status --hub http://10.0.0.1:7700 --token-file publish.token
                                                 each agent's active and staged release, clock offset, last flip";

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the appliance (each part runs when its config section is present).
    #[command(
        after_help = "Example:\n  lockstep serve -c /etc/lockstep/lockstep.yaml\n\nSIGHUP reloads the config; SIGTERM drains and stops."
    )]
    Serve {
        /// Config file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Worker threads, each with its own event loop and SO_REUSEPORT socket (default: one per CPU).
        #[arg(long)]
        workers: Option<usize>,
        /// Pin worker i to the i-th CPU this process may run on (as nginx's
        /// `worker_cpu_affinity auto` or HAProxy's `cpu-map`): a steadier tail on a host that
        /// runs little else; with one worker nothing is pinned.
        #[arg(long)]
        pin_workers: bool,
        /// Longest time to let in-flight requests finish on SIGTERM.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        drain: std::time::Duration,
    },
    /// Validate a config file and print every problem as file:line:column (exit 2 if any).
    #[command(
        after_help = "Example:\n  lockstep check -c /etc/lockstep/lockstep.yaml   # prints OK, or every problem as file:line:column\n  lockstep check --agent -c /etc/lockstep/agent.yaml"
    )]
    Check {
        /// Config file (with --agent: default /etc/lockstep/agent.yaml).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// The file is a sync agent's config (what `lockstep agent` reads).
        #[arg(long)]
        agent: bool,
    },
    /// Ask the running appliance to reload its config, and wait for the outcome.
    #[command(
        after_help = "Example:\n  lockstep reload                 # socket from /etc/lockstep/lockstep.yaml's admin.socket\n  lockstep reload --socket /run/lockstep/admin.sock"
    )]
    Reload {
        /// Config file whose `admin.socket` to use.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The reload socket (overrides the config's `admin.socket`).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Turn a directory into a release and stage it on the hub for the next activation.
    #[command(
        after_help = "Examples:\n  lockstep publish --hub http://10.0.0.1:7700 --token-file /etc/lockstep/publish.token --sign-key /etc/lockstep/publisher.key ./site\n  lockstep publish --hub http://10.0.0.1:7700 --token-file publish.token --sign-key publisher.key --at +30s ./site\n  lockstep publish --hub http://10.0.0.1:7700 --token-file publish.token --sign-key old.key --sign-key new.key ./site   # during a key rotation\n  lockstep publish --hub http://10.0.0.1:7700 --token-file publish.token --rollback"
    )]
    Publish {
        /// Hub and token.
        #[command(flatten)]
        hub: HubArgs,
        /// The directory to publish.
        #[arg(required_unless_present = "rollback")]
        dir: Option<PathBuf>,
        /// Activation time: RFC 3339 (2026-11-22T10:00:00Z), +DURATION on the hub's clock (+30s),
        /// or @UNIX_SECONDS. Default: the hub's next activation after its `lead`.
        #[arg(long, value_parser = crate::publish::parse_at)]
        at: Option<crate::publish::At>,
        /// Stage the release before the active one instead.
        #[arg(long, conflicts_with_all = ["dir", "at"])]
        rollback: bool,
        /// Blob uploads in flight at once.
        #[arg(long, default_value_t = crate::publish::DEFAULT_CONCURRENCY)]
        concurrency: usize,
        /// Sign the release with this secret key (from `lockstep keygen`); repeat to sign with
        /// several (a key rotation). Agents with `trusted_keys` serve only signed releases.
        #[arg(long = "sign-key", value_name = "PATH", conflicts_with = "rollback")]
        sign_keys: Vec<PathBuf>,
    },
    /// Make a key pair to sign releases with: PATH (secret, mode 0600) and PATH.pub.
    #[command(
        after_help = "Example:\n  lockstep keygen --out /etc/lockstep/publisher.key --comment \"release key 2026\"\n\nKeep PATH on the publishing host (lockstep publish --sign-key PATH); list PATH.pub in every agent's\ntrusted_keys (and the hub's sync.trusted_keys). An existing file is never overwritten."
    )]
    Keygen {
        /// Where to write the secret key; the public key goes to PATH.pub.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
        /// Text kept after the public key, e.g. who holds it.
        #[arg(long)]
        comment: Option<String>,
    },
    /// Show the fleet: each agent's active and staged release, clock offset, last flip.
    #[command(
        after_help = "Example:\n  lockstep status --hub http://10.0.0.1:7700 --token-file /etc/lockstep/publish.token"
    )]
    Status {
        /// Hub and token.
        #[command(flatten)]
        hub: HubArgs,
        /// Print the hub's JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also show the pools and their backends' health from the appliance's admin API,
        /// e.g. http://127.0.0.1:9901.
        #[arg(long, env = "LOCKSTEP_ADMIN")]
        admin: Option<String>,
    },
    /// The farm CA: issue each agent, publisher and hub a certificate naming it, revoke them.
    #[command(
        after_help = "Examples:\n  lockstep ca init --dir /etc/lockstep/ca\n  lockstep ca issue lb-1 --role hub --ip 10.0.0.1 --out /etc/lockstep/pki\n  lockstep ca issue web-1 --role agent --ip 10.0.0.11\n  lockstep ca issue ci --role publisher\n  lockstep ca revoke web-1"
    )]
    Ca {
        /// The CA's directory (keep ca.key on the appliance, readable by root only).
        #[arg(long, default_value = "/etc/lockstep/ca", global = true)]
        dir: PathBuf,
        /// What to do.
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Run the sync agent on a backend: serve the active release, stage new ones, flip on time.
    #[command(
        after_help = "Example:\n  lockstep agent -c /etc/lockstep/agent.yaml\n\nSIGTERM stops it; the active release is kept in its store and served again at the next start."
    )]
    Agent {
        /// Agent config file.
        #[arg(short, long, default_value = DEFAULT_AGENT_CONFIG)]
        config: PathBuf,
        /// `join`: obtain this backend's farm certificate with a one-time token.
        #[command(subcommand)]
        command: Option<AgentCommand>,
    },
    /// Run a whole farm on loopback: the appliance in front of three demo backends.
    #[command(
        after_help = "Example:\n  lockstep demo\n  curl -s http://127.0.0.1:8080/\n  dig @127.0.0.1 -p 5300 www.farm.test +short"
    )]
    Demo {
        /// Proxy port on 127.0.0.1.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Admin port on 127.0.0.1.
        #[arg(long, default_value_t = 9900)]
        admin_port: u16,
        /// DNS port (UDP and TCP) on 127.0.0.1.
        #[arg(long, default_value_t = 5300)]
        dns_port: u16,
        /// Sync hub port on 127.0.0.1.
        #[arg(long, default_value_t = 7700)]
        sync_port: u16,
    },
    /// Print the shell completion script for SHELL on stdout.
    #[command(
        after_help = "Examples:\n  lockstep completions bash > /usr/share/bash-completion/completions/lockstep\n  lockstep completions zsh > /usr/share/zsh/vendor-completions/_lockstep\n  lockstep completions fish > /usr/share/fish/vendor_completions.d/lockstep.fish"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (lockstep.1 and one lockstep-COMMAND.1 per command) into DIR.
    #[command(after_help = "Example:\n  lockstep manpages --dir /usr/share/man/man1")]
    Manpages {
        /// Directory to write the pages into (created if missing).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

/// How to reach the sync hub (shared by `publish` and `status`).
#[derive(Debug, clap::Args)]
pub struct HubArgs {
    /// The hub's sync API, e.g. http://10.0.0.1:7700; with several appliances (`sync.cluster`),
    /// their hubs in order of preference, comma-separated or repeated: the next is used when
    /// one cannot be reached.
    #[arg(long, env = "LOCKSTEP_HUB", value_delimiter = ',', required = true)]
    pub hub: Vec<String>,
    /// File holding the bearer token (the publish token; `status` also takes the agent token).
    #[arg(long, env = "LOCKSTEP_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM file with the CA that signed an https hub's certificate (the farm CA, `ca.crt`).
    #[arg(long, env = "LOCKSTEP_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Your farm-CA certificate (`lockstep ca issue NAME --role publisher`): required by a hub
    /// that is not on this host, which takes no bearer token from the network.
    #[arg(long, env = "LOCKSTEP_CERT", requires_all = ["key", "ca_file"])]
    pub cert: Option<PathBuf>,
    /// The private key of --cert.
    #[arg(long, env = "LOCKSTEP_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
}

/// `lockstep agent …`.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Obtain this backend's farm certificate from the hub with a one-time token (made on the
    /// appliance by `lockstep ca join-token NAME`, which prints this command).
    Join {
        /// The hub's sync API, https://.
        #[arg(long)]
        hub: String,
        /// The one-time token.
        #[arg(long, env = "LOCKSTEP_JOIN_TOKEN")]
        token: String,
        /// The farm CA's fingerprint: nothing is sent to a hub whose CA differs.
        #[arg(long)]
        ca_hash: String,
        /// Where to write ca.crt, crl.pem, NAME.crt and NAME.key.
        #[arg(long, default_value = "/etc/lockstep/pki")]
        out: PathBuf,
    },
}

/// `lockstep ca …`: the farm CA.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the farm CA in --dir (ca.crt, ca.key, ca.json, crl.pem).
    Init {
        /// The farm's name (in the CA's subject).
        #[arg(long, default_value = "farm")]
        farm: String,
    },
    /// Issue a certificate naming one party: writes NAME.crt and NAME.key (0600) into --out.
    Issue {
        /// The party's name (for an agent: its `name:` in agent.yaml, the backend's name).
        name: String,
        /// What it is.
        #[arg(long, value_parser = ["agent", "publisher", "hub"])]
        role: String,
        /// A DNS name the party serves under (hubs; repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// An IP address the party serves on (the hub's sync.bind, an agent's serve; repeatable).
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = crate::ca::DEFAULT_DAYS)]
        days: u32,
        /// Directory to write NAME.crt and NAME.key into.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Revoke every certificate of a party and rewrite crl.pem (then `lockstep reload` the
    /// appliance and copy crl.pem to the agents).
    Revoke {
        /// The party's name.
        name: String,
        /// Only its certificates of this role.
        #[arg(long, value_parser = ["agent", "publisher", "hub"])]
        role: Option<String>,
    },
    /// Make a one-time token with which the agent NAME obtains its own certificate from the
    /// hub (`lockstep agent join`, printed here); the hub needs `sync.tls.ca_dir`.
    JoinToken {
        /// The agent's name.
        name: String,
        /// An IP address its serve listener is reached on (repeatable).
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        /// A DNS name it is reached under (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// How long the token is valid.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: std::time::Duration,
        /// The hub's URL, for the command printed.
        #[arg(long, env = "LOCKSTEP_HUB")]
        hub: Option<String>,
    },
    /// List what the CA issued and revoked.
    List,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    crate::config::duration::parse(s)
}
