//! redb table definitions: the whole on-disk schema in one place.

use redb::TableDefinition;

/// Identity stamps and counters: region, cluster id, incarnation, format, last sequence.
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Key states: `(bucket, key)` → canonical encoded state. Tuple order gives byte-ordered listing.
pub const KEYS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("keys");
/// Replication log: region sequence number → encoded `LogEntry`.
pub const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("replication_log");
/// Bucket definitions: name → encoded `BucketDef`.
pub const BUCKETS: TableDefinition<&str, &[u8]> = TableDefinition::new("buckets");
/// Idempotency records: key (UUID as u128) → encoded `IdempotencyRecord`.
pub const IDEMPOTENCY: TableDefinition<u128, &[u8]> = TableDefinition::new("idempotency");
/// Per-peer replication cursors: peer region → highest sequence it acknowledged.
pub const PEER_CURSORS: TableDefinition<&str, u64> = TableDefinition::new("peer_cursors");
/// Applied vector: origin incarnation (u128) → highest contiguous sequence applied.
pub const APPLIED: TableDefinition<u128, u64> = TableDefinition::new("applied");

/// Tombstone candidates for causally stable removal: `(bucket, key)` written as a tombstone.
pub const TOMBSTONES: TableDefinition<(&str, &str), ()> = TableDefinition::new("tombstones");

/// Meta keys.
pub mod meta {
    /// Region name the directory belongs to.
    pub const REGION: &str = "region";
    /// Cluster id the directory belongs to.
    pub const CLUSTER_ID: &str = "cluster_id";
    /// Incarnation id (16 bytes).
    pub const INCARNATION: &str = "incarnation";
    /// On-disk schema version (1 byte).
    pub const SCHEMA: &str = "schema_version";
    /// Highest region sequence number committed (u64 big-endian).
    pub const LAST_SEQ: &str = "last_seq";
    /// Bytes of replication log written by this incarnation (u64 big-endian).
    pub const LOG_BYTES: &str = "log_bytes";
    /// Group commits that changed key states (u64 big-endian). Peers remember the highest they
    /// saw; a directory behind that is a restored old copy.
    pub const COMMITS: &str = "commits";
    /// Prefix of the highest commit counter seen from each peer (`peer_commits:<peer>`).
    pub const PEER_COMMITS_PREFIX: &str = "peer_commits:";
    /// Prefix of per-peer "needs priority anti-entropy" flags (`ae_needed:<peer>`).
    pub const AE_NEEDED_PREFIX: &str = "ae_needed:";
    /// Prefix of per-peer log gaps accepted here (`log_gap:<peer>`): per incarnation of the
    /// peer, what was applied of it before the gap (postcard map; empty once filled).
    pub const LOG_GAP_PREFIX: &str = "log_gap:";
    /// Highest journal record this state database holds durably (u64 big-endian).
    pub const JOURNAL_UPTO: &str = "journal_upto";
}

/// Schema version this build writes and reads.
pub const SCHEMA_VERSION: u8 = 1;
