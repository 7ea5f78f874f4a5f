//! The `lockstep` binary: parses the command line, runs the command, and turns its outcome
//! into an exit code (0 ok, 2 bad config, 1 any other failure).

use std::process::ExitCode;

/// mimalloc: measurably cheaper than glibc malloc on the proxy's many small per-request
/// allocations (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use lockstep::cli::Cli;
use lockstep::config::ConfigErrors;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match lockstep::commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(errors) = e.downcast_ref::<ConfigErrors>() {
                eprintln!("lockstep: the config has {} problem(s):", errors.0.len());
                eprintln!("{errors}");
                ExitCode::from(2)
            } else {
                eprintln!("lockstep: {e:#}");
                ExitCode::from(1)
            }
        }
    }
}
