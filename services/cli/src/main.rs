//! `meridianctl`: Meridian's command-line client and load generator.
#![deny(missing_docs)]

mod args;
mod bench;
mod client;
mod commands;
mod duration;
mod error;
mod status;

use args::{Cli, Command};
use clap::Parser;

/// mimalloc instead of glibc's allocator: every request allocates and frees across threads,
/// where glibc's malloc and free took about a sixth of a busy region's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use error::CliError;
use std::process::ExitCode;

fn main() -> ExitCode {
    // No transparent huge pages (unless `MIMALLOC_ALLOW_THP` is set, which mimalloc reads
    // itself): the first touch of a fresh 2 MiB page stalls the touching thread for
    // milliseconds on a VM, and the bench's one thread would add that to every request in
    // flight.
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: prctl with plain integer arguments; an older kernel refuses it, which is fine.
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
    // clap prints usage errors and exits with code 2 itself.
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    // One-shot commands and a single-threaded bench run on a current-thread runtime: no
    // cross-thread wakeups, which is the cheapest way to drive many sequential connections.
    let threads = match &cli.command {
        Command::Bench(bench) => usize::from(bench.threads),
        _ => 1,
    };
    let mut builder = if threads > 1 {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = builder
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("cannot start the async runtime: {e}")))?;
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Bench(bench) => bench::run(cli.url, cli.token, cli.timeout, bench).await,
            _ => commands::run(cli).await,
        }
    });
    // Connection tasks of abandoned workers may still be parked; do not wait for them.
    runtime.shutdown_background();
    result
}
