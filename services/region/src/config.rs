//! Region configuration: a TOML file, every field overridable by `MERIDIAN_<FIELD>`.

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use meridian_shared::RegionName;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Fields whose `MERIDIAN_<FIELD>` value is taken as written: parsed, `MERIDIAN_CLUSTER_ID=2024`
/// would be a number and refused.
const TEXT_FIELDS: [&str; 4] = ["region", "listen", "data_dir", "cluster_id"];

/// Top-level fields that `MERIDIAN_<FIELD>` may override.
const ENV_FIELDS: [&str; 30] = [
    "region",
    "listen",
    "data_dir",
    "cluster_id",
    "peers",
    "security",
    "partitions",
    "max_body_bytes",
    "max_state_bytes",
    "commit_max_batch",
    "checkpoint_interval_ms",
    "state_cache_bytes",
    "storage_cache_bytes",
    "workers",
    "pin_workers",
    "idempotency_ttl_secs",
    "heartbeat_interval_ms",
    "down_after_missed",
    "startup_peer_wait_ms",
    "forward_timeout_ms",
    "ack_timeout_ms",
    "session_wait_ms",
    "replication_batch_entries",
    "replication_batch_bytes",
    "hint_max_bytes",
    "hint_max_age_secs",
    "hint_drain_rate",
    "anti_entropy_interval_ms",
    "anti_entropy_scan_rate",
    "tombstone_gc_interval_ms",
];

/// `MERIDIAN_*` variables that other parts read: not config fields, yet not typos either.
const OTHER_ENV: [&str; 8] = [
    "CONFIG",     // main.rs, the Dockerfile
    "LOG_FORMAT", // observability/src/telemetry.rs
    "URL",        // meridianctl (services/cli/src/args.rs)
    "TOKEN",      // meridianctl
    "SESSION",    // meridianctl
    "BIN",        // scripts/bench-replication
    "CHAOS_SECS", // services/region/tests/chaos.rs
    "CHAOS_SEED", // services/region/tests/chaos.rs
];

/// `MERIDIAN_*` variables in this environment that name no config field (a misspelt one
/// would otherwise be ignored without a word).
pub fn unknown_env_vars() -> Vec<String> {
    unknown_among(std::env::vars_os().filter_map(|(name, _)| name.into_string().ok()))
}

/// The `MERIDIAN_*` names among `names` that name no config field.
fn unknown_among(names: impl Iterator<Item = String>) -> Vec<String> {
    let known = |suffix: &str| {
        OTHER_ENV.contains(&suffix) || ENV_FIELDS.contains(&suffix.to_ascii_lowercase().as_str())
    };
    names
        .filter(|name| name.strip_prefix("MERIDIAN_").is_some_and(|s| !known(s)))
        .collect()
}

/// Everything a region needs to start. Defaults are documented in the README.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This region's name.
    pub region: RegionName,
    /// Address the HTTP server binds.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory holding the region's redb file.
    pub data_dir: PathBuf,
    /// Regions refuse peers and data directories of another cluster.
    #[serde(default = "default_cluster_id")]
    pub cluster_id: String,
    /// Every other region: name → base URL.
    #[serde(default)]
    pub peers: BTreeMap<RegionName, String>,
    /// Optional authentication; enforced when set.
    #[serde(default)]
    pub security: Security,
    /// Number of partition actors (keys are spread by hash).
    #[serde(default = "default_partitions")]
    pub partitions: usize,
    /// Largest accepted request body, in bytes.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Largest stored state of one key a client write may produce, in bytes; default
    /// `max(8 MiB, 4 × max_body_bytes)`. See [`Config::state_limit`].
    #[serde(default)]
    pub max_state_bytes: Option<usize>,
    /// Most writes carried by one group commit.
    #[serde(default = "default_commit_max_batch")]
    pub commit_max_batch: usize,
    /// Longest time between checkpoints of the state database (journal replayed after a
    /// crash covers at most this, or 64 MiB of journal, whichever comes first).
    #[serde(default = "default_checkpoint_interval_ms")]
    pub checkpoint_interval_ms: u64,
    /// Bytes of redb's page cache (reads and writes of the database file).
    #[serde(default = "default_storage_cache_bytes")]
    pub storage_cache_bytes: usize,
    /// Bytes of recently written key states kept in memory by the partition actors.
    #[serde(default = "default_state_cache_bytes")]
    pub state_cache_bytes: usize,
    /// HTTP worker threads; 0 = one per CPU.
    #[serde(default)]
    pub workers: usize,
    /// Pin each HTTP worker to a CPU of its own when there are as many workers as CPUs this
    /// process may use (see `affinity`).
    #[serde(default = "default_pin_workers")]
    pub pin_workers: bool,
    /// How long an `Idempotency-Key` answer is kept.
    #[serde(default = "default_idempotency_ttl_secs")]
    pub idempotency_ttl_secs: u64,
    /// Interval between heartbeats to each peer.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// Consecutive missed heartbeats after which a peer is down.
    #[serde(default = "default_down_after_missed")]
    pub down_after_missed: u32,
    /// How long a starting region waits for every peer to say how much of it they have seen
    /// (0: asks once).
    #[serde(default = "default_startup_peer_wait_ms")]
    pub startup_peer_wait_ms: u64,
    /// Time limit of a write forwarded to its home region.
    #[serde(default = "default_forward_timeout_ms")]
    pub forward_timeout_ms: u64,
    /// How long `ack=quorum|all` waits for peers before answering 504.
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// How long a `consistency=session` read waits for replication before going to the home.
    #[serde(default = "default_session_wait_ms")]
    pub session_wait_ms: u64,
    /// Most log entries per replication batch.
    #[serde(default = "default_replication_batch_entries")]
    pub replication_batch_entries: usize,
    /// About the most bytes per replication batch.
    #[serde(default = "default_replication_batch_bytes")]
    pub replication_batch_bytes: usize,
    /// Hints (unacknowledged log) kept per down peer, in bytes, before it is handed to
    /// anti-entropy instead. 0 disables hints: a down peer is repaired by anti-entropy alone.
    #[serde(default = "default_hint_max_bytes")]
    pub hint_max_bytes: u64,
    /// Oldest hint kept for a down peer, in seconds, before it is handed to anti-entropy.
    #[serde(default = "default_hint_max_age_secs")]
    pub hint_max_age_secs: u64,
    /// Entries per second a returning peer's backlog is drained at.
    #[serde(default = "default_hint_drain_rate")]
    pub hint_drain_rate: u64,
    /// Mean time between anti-entropy exchanges with each peer (jittered ±50%); flagged or
    /// returning peers are repaired at once. 0 disables anti-entropy (tests, maintenance).
    #[serde(default = "default_anti_entropy_interval_ms")]
    pub anti_entropy_interval_ms: u64,
    /// Keys per second an exchange may scan for digests: its IO/CPU budget.
    #[serde(default = "default_anti_entropy_scan_rate")]
    pub anti_entropy_scan_rate: u64,
    /// Mean time between tombstone GC rounds (removal is by causal stability, never by age).
    /// 0 keeps every tombstone.
    #[serde(default = "default_tombstone_gc_interval_ms")]
    pub tombstone_gc_interval_ms: u64,
}

/// Bearer tokens for clients and peers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Security {
    /// Accepted `Authorization: Bearer` tokens on `/v1/*`; empty = open.
    #[serde(default)]
    pub client_tokens: Vec<String>,
    /// Token required on `/internal/*` between regions.
    #[serde(default)]
    pub peer_token: Option<String>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7001))
}
fn default_cluster_id() -> String {
    "default".into()
}
fn default_partitions() -> usize {
    64
}
fn default_max_body_bytes() -> usize {
    1024 * 1024
}
fn default_storage_cache_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_state_cache_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_commit_max_batch() -> usize {
    4096
}
fn default_pin_workers() -> bool {
    true
}
fn default_checkpoint_interval_ms() -> u64 {
    10_000
}
fn default_idempotency_ttl_secs() -> u64 {
    24 * 3600
}
fn default_heartbeat_interval_ms() -> u64 {
    200
}
fn default_down_after_missed() -> u32 {
    3
}
fn default_startup_peer_wait_ms() -> u64 {
    3000
}
fn default_forward_timeout_ms() -> u64 {
    2000
}
fn default_ack_timeout_ms() -> u64 {
    5000
}
fn default_session_wait_ms() -> u64 {
    1000
}
fn default_replication_batch_entries() -> usize {
    2048
}
fn default_replication_batch_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_hint_max_bytes() -> u64 {
    1024 * 1024 * 1024
}
fn default_hint_max_age_secs() -> u64 {
    3600
}
fn default_hint_drain_rate() -> u64 {
    50_000
}
fn default_anti_entropy_interval_ms() -> u64 {
    30_000
}
fn default_anti_entropy_scan_rate() -> u64 {
    2_000_000
}
fn default_tombstone_gc_interval_ms() -> u64 {
    10_000
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an override did not parse.
    #[error("{0}")]
    Load(#[from] Box<figment::Error>),
    /// The values parse but do not describe a usable region.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Why a text field's value cannot be used, if it cannot.
fn text_field_problem(field: &str, value: &str) -> Option<String> {
    match field {
        "region" => RegionName::new(value).err().map(|e| e.to_string()),
        "listen" => value
            .parse::<SocketAddr>()
            .err()
            .map(|e| format!("{e} (expected IP:PORT)")),
        "data_dir" => value
            .trim()
            .is_empty()
            .then(|| "must not be empty".to_string()),
        _ => None,
    }
}

impl Config {
    /// Loads `path` (if given), then applies `MERIDIAN_*` environment overrides, then validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = path {
            // (A pipe such as `--config <(...)` or /dev/stdin is fine: only these are not.)
            if !path.exists() || path.is_dir() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} {}",
                    path.display(),
                    if path.is_dir() {
                        "is a directory"
                    } else {
                        "does not exist"
                    }
                )));
            }
            figment = figment.merge(Toml::file(path));
        } else if Env::var("MERIDIAN_REGION").is_none() {
            return Err(ConfigError::Invalid(
                "nothing to load: pass --config FILE (or MERIDIAN_CONFIG), or set at least \
                 MERIDIAN_REGION and MERIDIAN_DATA_DIR"
                    .into(),
            ));
        }
        // Only config fields come from the environment: other MERIDIAN_* variables (the config
        // path, the log format, test knobs) are not this loader's business.
        let parsed: Vec<&str> = ENV_FIELDS
            .into_iter()
            .filter(|field| !TEXT_FIELDS.contains(field))
            .collect();
        figment = figment.merge(Env::prefixed("MERIDIAN_").only(&parsed));
        for field in TEXT_FIELDS {
            let variable = format!("MERIDIAN_{}", field.to_uppercase());
            if let Some(value) = Env::var(&variable) {
                // Checked here, so that a bad value names the variable it came from.
                text_field_problem(field, &value).map_or(Ok(()), |why| {
                    Err(ConfigError::Invalid(format!("{variable}={value:?}: {why}")))
                })?;
                figment = figment.merge(Serialized::default(field, value));
            }
        }
        let mut config: Config = figment.extract().map_err(Box::new)?;
        // The peers table from the environment replaces the file's: merged, it could add
        // peers but never drop one. `security` merges field by field instead, so setting only
        // a peer token there never silently drops the file's client tokens (opening the API).
        if Env::var("MERIDIAN_PEERS").is_some() {
            config.peers = env_table("peers")?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML document without file or environment (tests, tooling).
    pub fn load_from_str(toml: &str) -> Result<Self, ConfigError> {
        let config: Config = Figment::from(Toml::string(toml))
            .extract()
            .map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: relations between fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        // An unset shell variable would otherwise put the data in the working directory.
        if self.data_dir.as_os_str().is_empty() {
            return invalid("data_dir must not be empty".into());
        }
        // An empty token is no secret: anyone could present it.
        if self.security.client_tokens.iter().any(String::is_empty) {
            return invalid("security.client_tokens must not contain an empty token".into());
        }
        if self
            .security
            .peer_token
            .as_ref()
            .is_some_and(String::is_empty)
        {
            return invalid(
                "security.peer_token must not be empty (leave it out for no peer token)".into(),
            );
        }
        if self.cluster_id.is_empty() || self.cluster_id.len() > 64 {
            return invalid("cluster_id must be 1 to 64 characters".into());
        }
        if self.peers.contains_key(&self.region) {
            return invalid(format!("region {} lists itself as a peer", self.region));
        }
        for (name, url) in &self.peers {
            peer_url_problem(url).map_or(Ok(()), |why| {
                invalid(format!("peer {name} has URL {url:?}: {why}"))
            })?;
        }
        if !(1..=4096).contains(&self.partitions) {
            return invalid("partitions must be between 1 and 4096".into());
        }
        if self.max_body_bytes < 1024 {
            return invalid("max_body_bytes must be at least 1024".into());
        }
        if self
            .max_state_bytes
            .is_some_and(|limit| limit < 2 * self.max_body_bytes)
        {
            return invalid("max_state_bytes must be at least twice max_body_bytes".into());
        }
        for (field, value) in [
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
            ("down_after_missed", u64::from(self.down_after_missed)),
            (
                "replication_batch_entries",
                self.replication_batch_entries as u64,
            ),
            ("hint_drain_rate", self.hint_drain_rate),
            // Zero would forget every answer at once: a retry would apply again.
            ("idempotency_ttl_secs", self.idempotency_ttl_secs),
            ("anti_entropy_scan_rate", self.anti_entropy_scan_rate),
            ("checkpoint_interval_ms", self.checkpoint_interval_ms),
        ] {
            if value == 0 {
                return invalid(format!("{field} must be positive"));
            }
        }
        // A forward's deadline is reckoned from it: in range, the sums cannot overflow.
        if !(1..=600_000).contains(&self.forward_timeout_ms) {
            return invalid("forward_timeout_ms must be between 1 and 600000".into());
        }
        // Upper bounds too: the batch is allocated up front, and each worker is a thread.
        if !(1..=1_000_000).contains(&self.commit_max_batch) {
            return invalid("commit_max_batch must be between 1 and 1000000".into());
        }
        if self.workers > 1024 {
            return invalid("workers must be at most 1024 (0: one per CPU)".into());
        }
        Ok(())
    }

    /// Largest state of one key a client write may produce. Bounding states bounds every
    /// replication and repair body a peer must accept (see [`Config::max_peer_body_bytes`]).
    pub fn state_limit(&self) -> usize {
        self.max_state_bytes
            .unwrap_or_else(|| (8 * 1024 * 1024).max(4 * self.max_body_bytes))
    }

    /// Largest region-to-region body accepted. A replication batch stops after the record
    /// that passes `replication_batch_bytes`, and a record's state is at most the join of
    /// every region's states, each within `state_limit` when written.
    pub fn max_peer_body_bytes(&self) -> usize {
        let regions = self.peers.len() + 1;
        self.replication_batch_bytes
            .saturating_add(regions.saturating_mul(self.state_limit()))
            .saturating_add(1024 * 1024)
    }

    /// Every region of the cluster, this one included, sorted by name.
    pub fn regions(&self) -> Vec<RegionName> {
        let mut all: Vec<RegionName> = self.peers.keys().cloned().collect();
        all.push(self.region.clone());
        all.sort();
        all
    }

    /// Threads of their own for the partition actors: half as many as HTTP workers. A
    /// partition does about a third of a write's work, so more threads only sleep and wake
    /// more: on 2 cores, a second one cost 10% more CPU per write and no throughput. None with
    /// a single HTTP worker: the actors then run on its thread, which spares every write two
    /// hand-offs between threads (three regions sharing 2 cores, one worker each: replication
    /// lag p50 at 1,000 writes/s 0.91-0.99 ms against 1.09-1.35 ms).
    pub fn partition_threads(&self) -> usize {
        match self.worker_threads() {
            1 => 0,
            workers => (workers / 2).max(1),
        }
    }

    /// HTTP worker threads to start.
    pub fn worker_threads(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            cores()
        }
    }
}

/// Why `url` cannot be a peer's base URL, if it cannot.
fn peer_url_problem(url: &str) -> Option<&'static str> {
    // The URL is used as written, and parsing would trim what requests then carry.
    if url.chars().any(char::is_whitespace) {
        return Some("it contains whitespace");
    }
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return Some("not a URL; expected http://host:port");
    };
    match parsed.scheme() {
        "http" => {}
        // The region's HTTP client is built without TLS (it would only be refused later).
        "https" => {
            return Some(
                "https is not supported between regions (no TLS client is built in); use \
                 http:// on a private network, or a TLS tunnel between regions",
            )
        }
        _ => return Some("expected http://host:port"),
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Some("it names no host; expected http://host:port");
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Some("a base URL takes no query or fragment");
    }
    None
}

/// CPUs this process may use (2 when that cannot be told).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// The table `MERIDIAN_<FIELD>` holds, on its own.
fn env_table<T: serde::de::DeserializeOwned>(field: &str) -> Result<T, ConfigError> {
    Figment::from(Env::prefixed("MERIDIAN_").only(&[field]))
        .extract_inner(field)
        .map_err(|e| ConfigError::Load(Box::new(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_can_be_overridden_from_the_environment() {
        let config = Config::load_from_str("region = \"a\"\ndata_dir = \"/tmp/x\"");
        let fields = config.ok().and_then(|c| serde_json::to_value(c).ok());
        let Some(serde_json::Value::Object(fields)) = fields else {
            panic!("config serializes to an object")
        };
        for field in fields.keys() {
            assert!(
                ENV_FIELDS.contains(&field.as_str()),
                "{field} missing from ENV_FIELDS"
            );
        }
    }

    #[test]
    fn environment_overrides_take_text_as_written_and_replace_the_peers_table() {
        // The only test of this binary that reads the environment.
        std::env::set_var("MERIDIAN_REGION", "7");
        std::env::set_var("MERIDIAN_CLUSTER_ID", "2024");
        std::env::set_var("MERIDIAN_DATA_DIR", "123");
        std::env::set_var("MERIDIAN_PARTITIONS", "8");
        let config = Config::load(None);
        for name in ["REGION", "CLUSTER_ID", "DATA_DIR", "PARTITIONS"] {
            std::env::remove_var(format!("MERIDIAN_{name}"));
        }
        let config = config.map_err(|e| e.to_string());
        let fields = config.map(|c| {
            let region = c.region.to_string();
            (region, c.cluster_id, c.data_dir, c.partitions)
        });
        assert_eq!(
            fields,
            Ok(("7".into(), "2024".into(), PathBuf::from("123"), 8)),
            "numeric-looking text stays text; numbers are still numbers"
        );
        // The peers table from the environment replaces the file's; security merges by field.
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("r.toml");
        let toml = "region = \"a\"\ndata_dir = \"/d\"\n[peers]\nb = \"http://b:1\"\n\
                    c = \"http://c:1\"\n[security]\nclient_tokens = [\"t\"]\n";
        std::fs::write(&file, toml).expect("write config");
        std::env::set_var("MERIDIAN_PEERS", "{c=\"http://c:2\"}");
        std::env::set_var("MERIDIAN_SECURITY", "{peer_token=\"p\"}");
        let config = Config::load(Some(&file));
        std::env::remove_var("MERIDIAN_PEERS");
        std::env::remove_var("MERIDIAN_SECURITY");
        let config = config.map_err(|e| e.to_string());
        let tables = config.map(|c| {
            let peers: Vec<_> = c.peers.iter().map(|(n, u)| format!("{n}={u}")).collect();
            (peers, c.security.client_tokens, c.security.peer_token)
        });
        assert_eq!(
            tables,
            Ok((
                vec!["c=http://c:2".to_string()],
                vec!["t".into()],
                Some("p".into())
            )),
            "b dropped, c replaced, the file's client token kept"
        );
        // Without the variables (and no file), there is nothing to load; a directory is no file.
        let none = Config::load(None).map_err(|e| e.to_string());
        assert!(none.is_err_and(|e| e.contains("nothing to load")));
        let dir = Config::load(Some(Path::new("/"))).map_err(|e| e.to_string());
        assert!(dir.is_err_and(|e| e.contains("is a directory")));
        // A bad text value names the variable it came from.
        for (name, value) in [
            ("REGION", "US_EAST"),
            ("LISTEN", "garbage"),
            ("DATA_DIR", ""),
        ] {
            std::env::set_var("MERIDIAN_REGION", "a");
            std::env::set_var("MERIDIAN_DATA_DIR", "/d");
            std::env::set_var(format!("MERIDIAN_{name}"), value);
            let bad = Config::load(None).map_err(|e| e.to_string());
            for name in ["REGION", "DATA_DIR", "LISTEN"] {
                std::env::remove_var(format!("MERIDIAN_{name}"));
            }
            let said = format!("MERIDIAN_{name}=\"{value}\"");
            assert!(bad.as_ref().is_err_and(|e| e.contains(&said)), "{bad:?}");
        }
    }

    #[test]
    fn a_single_worker_hosts_the_partition_actors_and_more_get_threads_of_their_own() {
        let threads = |workers: usize| {
            Config::load_from_str(&format!(
                "region = \"a\"\ndata_dir = \"/tmp/x\"\nworkers = {workers}"
            ))
            .map(|c| c.partition_threads())
            .ok()
        };
        assert_eq!(threads(1), Some(0));
        assert_eq!(threads(2), Some(1));
        assert_eq!(threads(3), Some(1));
        assert_eq!(threads(8), Some(4));
    }

    #[test]
    fn only_meridian_variables_that_name_nothing_are_unknown() {
        let names = [
            "MERIDIAN_LISTEN",
            "MERIDIAN_HINT_DRAIN_RATE",
            "MERIDIAN_CONFIG",
            "MERIDIAN_BIN",
            "MERIDIAN_PARTITION",
            "MERIDIAN_LISTEN_ADDR",
            "PATH",
        ];
        let unknown = unknown_among(names.iter().map(|n| n.to_string()));
        assert_eq!(unknown, ["MERIDIAN_PARTITION", "MERIDIAN_LISTEN_ADDR"]);
    }

    #[test]
    fn peer_urls_must_be_plain_http_base_urls() {
        for good in [
            "http://eu-west:7001",
            "http://10.0.0.2:7001/",
            "http://h:1/prefix",
        ] {
            assert_eq!(peer_url_problem(good), None, "{good}");
        }
        for bad in [
            "https://eu-west:7001",
            "http://",
            "http://a b:1/",
            "eu-west:7001",
            "ftp://h:1",
            "http://h:1/?x=1",
            "http://h:1 ",
            " http://h:1",
            "http://h:1/a\tb",
        ] {
            assert!(peer_url_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn settings_that_would_break_a_guarantee_are_refused() {
        let base = "region = \"a\"\ndata_dir = \"/tmp/x\"\n";
        for (setting, refused) in [
            // Every Idempotency-Key answer forgotten at once: retries apply again.
            ("idempotency_ttl_secs = 0", true),
            ("idempotency_ttl_secs = 1", false),
            // The forward deadline's sums must not overflow.
            ("forward_timeout_ms = 0", true),
            ("forward_timeout_ms = 600001", true),
            ("forward_timeout_ms = 600000", false),
            // An empty token is no secret: anyone could present it.
            ("[security]\nclient_tokens = [\"\"]", true),
            ("[security]\nclient_tokens = [\"t\"]", false),
            ("[security]\npeer_token = \"\"", true),
            ("[security]\npeer_token = \"p\"", false),
        ] {
            let loaded = Config::load_from_str(&format!("{base}{setting}"));
            assert_eq!(loaded.is_err(), refused, "{setting}: {loaded:?}");
        }
        // An unset shell variable must not put the data in the working directory.
        let empty = Config::load_from_str("region = \"a\"\ndata_dir = \"\"");
        let empty = empty.map_err(|e| e.to_string());
        assert!(empty.is_err_and(|e| e.contains("data_dir")));
        // The message names the one field that is zero.
        let zero = Config::load_from_str(&format!("{base}down_after_missed = 0"));
        let zero = zero.map_err(|e| e.to_string());
        assert!(
            zero.is_err_and(|e| e.contains("down_after_missed must be positive")
                && !e.contains("heartbeat_interval_ms"))
        );
    }

    #[test]
    fn the_state_limit_follows_the_body_limit_and_bounds_peer_bodies() {
        let base = "region = \"a\"\ndata_dir = \"/tmp/x\"\n";
        let load = |extra: &str| Config::load_from_str(&format!("{base}{extra}"));
        let default = load("")
            .ok()
            .map(|c| (c.state_limit(), c.max_peer_body_bytes()));
        let mib = 1024 * 1024;
        assert_eq!(default, Some((8 * mib, 4 * mib + 8 * mib + mib)));
        let large = load("max_body_bytes = 4194304\n[peers]\nb = \"http://b:1\"\n").ok();
        let large = large.map(|c| (c.state_limit(), c.max_peer_body_bytes()));
        assert_eq!(large, Some((16 * mib, 4 * mib + 2 * 16 * mib + mib)));
        assert!(load("max_state_bytes = 4000000").is_ok());
        assert!(
            load("max_state_bytes = 2000000").is_err(),
            "a state limit under twice the body limit must be refused"
        );
    }
}
