//! The command line: every subcommand and flag of `meridianctl`, declared with clap derive.

use crate::duration::{parse_duration, parse_positive_duration};
use clap::{Args, Parser, Subcommand, ValueEnum};
use meridian_shared::{BucketType, RegionName};
use reqwest::Url;
use std::time::Duration;

/// `meridianctl`: talk to a Meridian region over its public REST API.
#[derive(Debug, Parser)]
#[command(
    name = "meridianctl",
    version,
    about,
    propagate_version = true,
    after_help = "Exit status: 0 success, 1 the request failed (the server refused it, or \
                  its answer could not be used), 2 bad usage or input, 3 the server was \
                  unreachable or too slow."
)]
pub struct Cli {
    /// Base URL of the region to talk to.
    #[arg(
        long,
        global = true,
        env = "MERIDIAN_URL",
        default_value = "http://127.0.0.1:7001",
        value_parser = parse_base_url
    )]
    pub url: Url,

    /// Client token, sent as `Authorization: Bearer <token>`.
    #[arg(long, global = true, env = "MERIDIAN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Session token from an earlier response, sent as `X-Meridian-Session` (for `--consistency session`).
    #[arg(long, global = true, env = "MERIDIAN_SESSION", hide_env_values = true)]
    pub session: Option<String>,

    /// How long one request may take before the server counts as unreachable.
    #[arg(long, global = true, default_value = "30s", value_parser = parse_positive_duration)]
    pub timeout: Duration,

    /// Print the status line and the X-Meridian-* response headers to stderr.
    #[arg(short, long, global = true)]
    pub verbose: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Every subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a JSON value to a register or lww key.
    Put {
        /// Bucket name.
        bucket: String,
        /// Key name.
        key: String,
        /// The value, as JSON text (quote strings: '"hello"'); `-` reads it from standard input.
        #[arg(allow_negative_numbers = true)]
        json_value: String,
        /// Context from an earlier read: the write replaces the siblings it saw.
        #[arg(long)]
        context: Option<String>,
        /// Write options shared by every mutation.
        #[command(flatten)]
        write: WriteOpts,
    },
    /// Read a key (register, lww, counter or set).
    Get {
        /// Bucket name.
        bucket: String,
        /// Key name.
        key: String,
        /// Read consistency; the server's default when absent.
        #[arg(long, value_enum)]
        consistency: Option<Consistency>,
    },
    /// Delete a key (register, lww or set).
    Delete {
        /// Bucket name.
        bucket: String,
        /// Key name.
        key: String,
        /// Context from an earlier read: only what it saw is deleted.
        #[arg(long)]
        context: Option<String>,
        /// Write options shared by every mutation.
        #[command(flatten)]
        write: WriteOpts,
    },
    /// Add BY (default 1, may be negative) to a counter.
    Incr {
        /// Bucket name.
        bucket: String,
        /// Key name.
        key: String,
        /// Amount to add; negative decrements.
        #[arg(default_value_t = 1, allow_negative_numbers = true)]
        by: i64,
        /// Write options shared by every mutation.
        #[command(flatten)]
        write: WriteOpts,
    },
    /// Add members to a set.
    Add {
        /// Bucket name.
        bucket: String,
        /// Key name.
        key: String,
        /// Members to add.
        #[arg(required = true, num_args = 1..)]
        members: Vec<String>,
        /// Write options shared by every mutation.
        #[command(flatten)]
        write: WriteOpts,
    },
    /// Remove members from a set.
    Remove {
        /// Bucket name.
        bucket: String,
        /// Key name.
        key: String,
        /// Members to remove.
        #[arg(required = true, num_args = 1..)]
        members: Vec<String>,
        /// Write options shared by every mutation.
        #[command(flatten)]
        write: WriteOpts,
    },
    /// List every bucket.
    Buckets,
    /// Create or show one bucket.
    Bucket {
        /// What to do with the bucket.
        #[command(subcommand)]
        action: BucketCommand,
    },
    /// List keys of a bucket in byte order, one page at a time.
    List {
        /// Bucket name.
        bucket: String,
        /// Only keys starting with this prefix.
        #[arg(long)]
        prefix: Option<String>,
        /// Page size (1..=1000; the server's default is 100).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: Option<u32>,
        /// Start after this key (the `next` of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// Read consistency, local or session (a listing is served by one region); the
        /// server's default when absent.
        #[arg(long, value_parser = parse_list_consistency)]
        consistency: Option<Consistency>,
    },
    /// Show the cluster as this region sees it.
    Status {
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Generate load and report throughput and latency.
    Bench(BenchArgs),
}

/// `bucket` subcommands.
#[derive(Debug, Subcommand)]
pub enum BucketCommand {
    /// Create a bucket (200 if an identical one exists, 409 if a different one does).
    Create {
        /// Bucket name.
        name: String,
        /// CRDT type of every key in the bucket.
        #[arg(long = "type", value_parser = parse_bucket_type)]
        kind: BucketType,
        /// Region that accepts writes for every key; per-key placement when absent.
        #[arg(long, value_parser = parse_region_name)]
        home_region: Option<RegionName>,
    },
    /// Show one bucket's definition.
    Get {
        /// Bucket name.
        name: String,
    },
}

/// Options every mutation accepts.
#[derive(Debug, Args)]
pub struct WriteOpts {
    /// How many regions must have the write before the answer.
    #[arg(long, value_enum)]
    pub ack: Option<Ack>,
    /// Makes a retried write apply once (a UUID).
    #[arg(long)]
    pub idempotency_key: Option<uuid::Uuid>,
}

/// Write acknowledgement level (`ack=` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Ack {
    /// This region has it durably.
    Local,
    /// A majority of regions have it.
    Quorum,
    /// Every region has it.
    All,
}

/// Read consistency level (`consistency=` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Consistency {
    /// Whatever this region has.
    Local,
    /// Read from the key's home region.
    Home,
    /// At least what the session token covers.
    Session,
    /// Merged from a majority of regions.
    Quorum,
    /// Merged from every region.
    All,
}

/// A listing's consistency: the levels one region can serve alone.
fn parse_list_consistency(text: &str) -> Result<Consistency, String> {
    match Consistency::from_str(text, false)? {
        level @ (Consistency::Local | Consistency::Session) => Ok(level),
        _ => Err("a listing reads one region: local or session".to_owned()),
    }
}

impl Ack {
    /// The value used in the query string.
    pub fn as_str(self) -> &'static str {
        match self {
            Ack::Local => "local",
            Ack::Quorum => "quorum",
            Ack::All => "all",
        }
    }
}

impl Consistency {
    /// The value used in the query string.
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Local => "local",
            Consistency::Home => "home",
            Consistency::Session => "session",
            Consistency::Quorum => "quorum",
            Consistency::All => "all",
        }
    }
}

/// What the bench sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Only PUTs.
    Put,
    /// Only GETs, of preloaded keys.
    Get,
    /// Half PUTs, half GETs.
    Mixed,
}

impl Workload {
    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::Get => "get",
            Workload::Mixed => "mixed",
        }
    }
}

/// Flags of `bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Another region to load as well; workers are spread round-robin over --url and these.
    #[arg(long = "peer-url", value_parser = parse_base_url)]
    pub peer_urls: Vec<Url>,
    /// Number of workers, each with one connection and one request in flight.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: u32,
    /// How long to measure, after the warmup (e.g. 500ms, 10s, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    pub duration: Duration,
    /// Send this many requests per second in all, on a fixed schedule (open loop); a request
    /// held back by slow answers counts its latency from when it was due. Without it, each
    /// worker sends as soon as its last answer arrives.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub rate: Option<u64>,
    /// Size in bytes of each PUT body (a JSON string, quotes included).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(2..=16 * 1024 * 1024))]
    pub value_size: u32,
    /// Operation mix.
    #[arg(long, value_enum, default_value_t = Workload::Put)]
    pub workload: Workload,
    /// Size of the key space (keys k0..k{N-1}).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub keys: u64,
    /// Send 90% of operations to 1% of the keys.
    #[arg(long)]
    pub hot: bool,
    /// Instead of a timed run: write every key k0..k{keys-1} exactly once over --concurrency
    /// connections, print the rate and exit (fills a region for anti-entropy benchmarks).
    #[arg(long)]
    pub fill: bool,
    /// Bucket to load; created as a `register` bucket when absent.
    #[arg(long, default_value = "bench")]
    pub bucket: String,
    /// Load sent before measuring starts (not counted).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Tokio worker threads (1 = a single-threaded runtime).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: u16,
    /// Print the results as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Accepts only `http://` base URLs: the client speaks plain HTTP, no TLS.
pub fn parse_base_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    if url.scheme() != "http" {
        return Err(format!(
            "{text:?}: only http:// URLs are supported (no TLS)"
        ));
    }
    if url.host_str().is_none() {
        return Err(format!("{text:?} has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{text:?}: a base URL takes no query or fragment"));
    }
    Ok(url)
}

fn parse_bucket_type(text: &str) -> Result<BucketType, String> {
    BucketType::parse(text)
        .ok_or_else(|| format!("{text:?} is not a bucket type: use register, lww, counter or set"))
}

fn parse_region_name(text: &str) -> Result<RegionName, String> {
    RegionName::new(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let mut full = vec!["meridianctl"];
        full.extend_from_slice(args);
        Cli::try_parse_from(full)
    }

    fn command(args: &[&str]) -> Command {
        match parse(args) {
            Ok(cli) => cli.command,
            Err(e) => panic!("{args:?} should parse: {e}"),
        }
    }

    #[test]
    fn global_flags_work_before_and_after_the_subcommand() {
        let cli = parse(&[
            "--url",
            "http://10.0.0.1:7002",
            "buckets",
            "--token",
            "t",
            "-v",
        ])
        .expect("parses");
        assert_eq!(cli.url.as_str(), "http://10.0.0.1:7002/");
        assert_eq!(cli.token.as_deref(), Some("t"));
        assert!(cli.verbose);
        assert_eq!(cli.timeout, Duration::from_secs(30));
        assert!(matches!(cli.command, Command::Buckets));
    }

    #[test]
    fn url_must_be_plain_http() {
        assert!(parse(&["--url", "https://x:7001", "buckets"]).is_err());
        assert!(parse(&["--url", "not a url", "buckets"]).is_err());
        assert!(parse(&["--url", "http://x:7001/?a=b", "buckets"]).is_err());
    }

    #[test]
    fn put_takes_value_context_ack_and_idempotency_key() {
        let id = "6f1c1b9e-9a43-4f6e-8d7a-3f7f2f2a8b10";
        match command(&[
            "put",
            "users",
            "alice",
            r#"{"age": 3}"#,
            "--context",
            "ctx1",
            "--ack",
            "quorum",
            "--idempotency-key",
            id,
        ]) {
            Command::Put {
                bucket,
                key,
                json_value,
                context,
                write,
            } => {
                assert_eq!((bucket.as_str(), key.as_str()), ("users", "alice"));
                assert_eq!(json_value, r#"{"age": 3}"#);
                assert_eq!(context.as_deref(), Some("ctx1"));
                assert_eq!(write.ack, Some(Ack::Quorum));
                assert_eq!(
                    write.idempotency_key.map(|u| u.to_string()).as_deref(),
                    Some(id)
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            command(&["put", "b", "k", "-1.5"]),
            Command::Put { json_value, .. } if json_value == "-1.5"
        ));
        assert!(parse(&["put", "b", "k", "1", "--ack", "some"]).is_err());
        assert!(parse(&["put", "b", "k", "1", "--idempotency-key", "nope"]).is_err());
        assert!(parse(&["put", "b", "k"]).is_err());
    }

    #[test]
    fn get_takes_every_consistency_level() {
        for (flag, level) in [
            ("local", Consistency::Local),
            ("home", Consistency::Home),
            ("session", Consistency::Session),
            ("quorum", Consistency::Quorum),
            ("all", Consistency::All),
        ] {
            match command(&["get", "b", "k", "--consistency", flag]) {
                Command::Get { consistency, .. } => assert_eq!(consistency, Some(level)),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(matches!(
            command(&["get", "b", "k"]),
            Command::Get {
                consistency: None,
                ..
            }
        ));
        assert!(parse(&["get", "b", "k", "--consistency", "strong"]).is_err());
    }

    #[test]
    fn delete_takes_a_context() {
        match command(&["delete", "b", "k", "--context", "c"]) {
            Command::Delete { context, .. } => assert_eq!(context.as_deref(), Some("c")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn incr_defaults_to_one_and_accepts_negative_amounts() {
        assert!(matches!(
            command(&["incr", "c", "k"]),
            Command::Incr { by: 1, .. }
        ));
        assert!(matches!(
            command(&["incr", "c", "k", "5"]),
            Command::Incr { by: 5, .. }
        ));
        assert!(matches!(
            command(&["incr", "c", "k", "-3"]),
            Command::Incr { by: -3, .. }
        ));
        assert!(matches!(
            command(&["incr", "c", "k", "-9223372036854775808"]),
            Command::Incr { by: i64::MIN, .. }
        ));
        assert!(parse(&["incr", "c", "k", "x"]).is_err());
    }

    #[test]
    fn add_and_remove_need_at_least_one_member() {
        match command(&["add", "s", "k", "a", "b"]) {
            Command::Add { members, .. } => assert_eq!(members, ["a", "b"]),
            other => panic!("unexpected {other:?}"),
        }
        match command(&["remove", "s", "k", "a"]) {
            Command::Remove { members, .. } => assert_eq!(members, ["a"]),
            other => panic!("unexpected {other:?}"),
        }
        let err = parse(&["add", "s", "k"]).expect_err("needs a member");
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn bucket_commands() {
        assert!(matches!(command(&["buckets"]), Command::Buckets));
        match command(&[
            "bucket",
            "create",
            "users",
            "--type",
            "lww",
            "--home-region",
            "eu-west",
        ]) {
            Command::Bucket {
                action:
                    BucketCommand::Create {
                        name,
                        kind,
                        home_region,
                    },
            } => {
                assert_eq!(name, "users");
                assert_eq!(kind, BucketType::Lww);
                assert_eq!(
                    home_region.as_ref().map(RegionName::as_str),
                    Some("eu-west")
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            command(&["bucket", "create", "c", "--type", "counter"]),
            Command::Bucket {
                action: BucketCommand::Create {
                    kind: BucketType::Counter,
                    home_region: None,
                    ..
                }
            }
        ));
        assert!(parse(&["bucket", "create", "c"]).is_err());
        assert!(parse(&["bucket", "create", "c", "--type", "map"]).is_err());
        assert!(parse(&[
            "bucket",
            "create",
            "c",
            "--type",
            "set",
            "--home-region",
            "EU"
        ])
        .is_err());
        match command(&["bucket", "get", "users"]) {
            Command::Bucket {
                action: BucketCommand::Get { name },
            } => assert_eq!(name, "users"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn list_takes_prefix_limit_after_and_a_listings_consistency() {
        match command(&[
            "list",
            "b",
            "--prefix",
            "user:",
            "--limit",
            "10",
            "--after",
            "user:9",
            "--consistency",
            "session",
        ]) {
            Command::List {
                bucket,
                prefix,
                limit,
                after,
                consistency,
            } => {
                assert_eq!(bucket, "b");
                assert_eq!(prefix.as_deref(), Some("user:"));
                assert_eq!(limit, Some(10));
                assert_eq!(after.as_deref(), Some("user:9"));
                assert_eq!(consistency, Some(Consistency::Session));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(parse(&["list", "b", "--limit", "0"]).is_err());
        assert!(parse(&["list", "b", "--limit", "1001"]).is_err());
        // A listing is served by one region: home, quorum and all are not its levels.
        assert!(parse(&["list", "b", "--consistency", "home"]).is_err());
    }

    #[test]
    fn status_takes_json() {
        assert!(matches!(
            command(&["status"]),
            Command::Status { json: false }
        ));
        assert!(matches!(
            command(&["status", "--json"]),
            Command::Status { json: true }
        ));
    }

    #[test]
    fn bench_defaults() {
        match command(&["bench"]) {
            Command::Bench(b) => {
                assert!(b.peer_urls.is_empty());
                assert_eq!(b.concurrency, 64);
                assert_eq!(b.duration, Duration::from_secs(10));
                assert_eq!(b.value_size, 100);
                assert_eq!(b.workload, Workload::Put);
                assert_eq!(b.keys, 100_000);
                assert!(!b.hot);
                assert_eq!(b.bucket, "bench");
                assert_eq!(b.warmup, Duration::from_secs(1));
                assert_eq!(b.threads, 1);
                assert!(!b.json);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn bench_flags() {
        match command(&[
            "bench",
            "--url",
            "http://127.0.0.1:7001",
            "--peer-url",
            "http://127.0.0.1:7002",
            "--peer-url",
            "http://127.0.0.1:7003",
            "--concurrency",
            "8",
            "--duration",
            "500ms",
            "--value-size",
            "1000",
            "--workload",
            "mixed",
            "--keys",
            "50",
            "--hot",
            "--bucket",
            "b2",
            "--warmup",
            "0s",
            "--threads",
            "2",
            "--json",
        ]) {
            Command::Bench(b) => {
                assert_eq!(b.peer_urls.len(), 2);
                assert_eq!(b.concurrency, 8);
                assert_eq!(b.duration, Duration::from_millis(500));
                assert_eq!(b.value_size, 1000);
                assert_eq!(b.workload, Workload::Mixed);
                assert_eq!(b.keys, 50);
                assert!(b.hot && b.json);
                assert_eq!(b.bucket, "b2");
                assert_eq!(b.warmup, Duration::ZERO);
                assert_eq!(b.threads, 2);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(parse(&["bench", "--duration", "10"]).is_ok());
        assert!(parse(&["bench", "--duration", "10x"]).is_err());
        assert!(parse(&["bench", "--concurrency", "0"]).is_err());
        assert!(parse(&["bench", "--value-size", "1"]).is_err());
        assert!(parse(&["bench", "--workload", "scan"]).is_err());
        assert!(parse(&["bench", "--peer-url", "https://x"]).is_err());
    }

    #[test]
    fn usage_errors_are_reported_as_such() {
        let err = parse(&["frobnicate"]).expect_err("unknown subcommand");
        assert_eq!(err.kind(), ErrorKind::InvalidSubcommand);
        assert_eq!(err.exit_code(), 2);
    }
}
