//! `meridian`: run one region (`serve`) or a multi-region demo on loopback (`demo`).

use clap::{Parser, Subcommand};
use meridian_region::config::Config;
use meridian_region::{demo, server};
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc instead of glibc's allocator: every request allocates and frees across threads,
/// where glibc's malloc and free took about a sixth of a busy region's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e` of the bundled v3 header,
/// hence the exact version pin; the Rust declarations name only some options).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// That option's default, in milliseconds.
const DEFAULT_PURGE_DELAY_MS: std::ffi::c_long = 1000;

/// Keeps freed memory instead of returning it to the OS a second later: a busy region frees
/// and reallocates the same megabytes all the time, and every return cost a fresh huge page
/// zeroed by the kernel (3-5% of a write's CPU). The heap stays at its high-water mark. Left
/// alone if the option is not at its default (`MIMALLOC_PURGE_DELAY` set, or another layout).
fn keep_freed_memory() {
    // SAFETY: reads and sets a plain integer option; mimalloc reads options at each purge.
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == DEFAULT_PURGE_DELAY_MS {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        }
    }
}

/// Turns transparent huge pages off for this process, unless `MIMALLOC_ALLOW_THP` is set
/// (mimalloc reads that itself: 0 keeps its memory off huge pages, 1 allows them). The
/// first touch of a fresh 2 MiB page cost its thread about 7 ms of CPU on the development VM
/// (zeroing it, and the host backing it); while a region's heap grew, one such stall landed
/// in a group commit every 50-70 ms and held up every writer, which made the p99 of a fresh
/// region's PUTs 10 ms instead of 5.5 ms. Databases commonly ask for THP off for this reason.
fn no_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    // SAFETY: prctl with plain integer arguments; an older kernel refuses it, which is fine.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

#[derive(Parser)]
#[command(
    name = "meridian",
    version,
    about = "Meridian: multi-region replicated key-value store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one region.
    Serve {
        /// TOML config file (fields can be overridden by `MERIDIAN_<FIELD>`).
        #[arg(long, env = "MERIDIAN_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run N regions on 127.0.0.1, ready to curl; Ctrl-C stops them.
    Demo {
        /// How many regions, 1 to 9 (us-east, eu-west, ap-south, then region-4, ...).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
        regions: u16,
        /// Port of the first region; the others follow.
        #[arg(long, default_value_t = 7001)]
        base_port: u16,
        /// Where the regions keep their data (kept between runs).
        #[arg(long, default_value = ".meridian-demo")]
        data_dir: PathBuf,
    },
}

/// Default log filter: the region's own info events, quieter HTTP plumbing.
const LOG_FILTER: &str = "info,actix_server=warn";

fn main() -> ExitCode {
    keep_freed_memory();
    no_huge_pages();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => Config::load(config.as_deref())
            .map_err(anyhow::Error::from)
            .and_then(|config| {
                let attributes = [
                    ("meridian.region", config.region.to_string()),
                    ("meridian.cluster", config.cluster_id.clone()),
                ];
                let service = format!("meridian-{}", config.region);
                let _telemetry =
                    meridian_observability::telemetry::init(&service, &attributes, LOG_FILTER);
                for variable in meridian_region::config::unknown_env_vars() {
                    tracing::warn!(%variable, "ignored: no config field has this name");
                }
                actix_web::rt::System::new().block_on(server::serve(config))
            }),
        Command::Demo {
            regions,
            base_port,
            data_dir,
        } => {
            let _telemetry =
                meridian_observability::telemetry::init("meridian-demo", &[], LOG_FILTER);
            demo::run(regions as usize, base_port, &data_dir)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("meridian: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each once: some error types print their source in
/// their own message, and the chain would repeat it.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_memory_is_kept_unless_the_purge_delay_is_configured() {
        keep_freed_memory();
        // SAFETY: reads a plain integer option.
        let delay = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(delay, -1, "option 15 is the purge delay, and it was set");
        }
    }

    #[test]
    fn huge_pages_are_off_unless_mimalloc_is_told_otherwise() {
        no_huge_pages();
        // SAFETY: prctl with plain integer arguments.
        let disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
            assert_eq!(disabled, 1);
        }
    }

    #[test]
    fn causes_already_in_a_message_are_not_repeated() {
        let inner = std::io::Error::other("disk gone");
        let error = anyhow::Error::new(inner)
            .context("storage failure: disk gone")
            .context("cannot start region us-east");
        assert_eq!(
            one_line(&error),
            "cannot start region us-east: storage failure: disk gone"
        );
    }
}
