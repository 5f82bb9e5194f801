//! Bucket definitions: a bucket's CRDT type is fixed at creation.

use crate::RegionName;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The CRDT type of every key in a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BucketType {
    /// Multi-value register: concurrent writes are kept as siblings.
    Register,
    /// Last-writer-wins register on a hybrid logical clock.
    Lww,
    /// PN-counter.
    Counter,
    /// Observed-remove set of strings.
    Set,
}

impl BucketType {
    /// The name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            BucketType::Register => "register",
            BucketType::Lww => "lww",
            BucketType::Counter => "counter",
            BucketType::Set => "set",
        }
    }

    /// Parses the API name of a bucket type.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "register" => Some(BucketType::Register),
            "lww" => Some(BucketType::Lww),
            "counter" => Some(BucketType::Counter),
            "set" => Some(BucketType::Set),
            _ => None,
        }
    }
}

impl fmt::Display for BucketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A bucket's definition, as stored and replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketDef {
    /// Bucket name (validated by [`crate::names::validate`]).
    pub name: String,
    /// CRDT type of its keys.
    pub kind: BucketType,
    /// Region that accepts writes for all its keys; `None` = rendezvous hashing per key.
    pub home_region: Option<RegionName>,
}
