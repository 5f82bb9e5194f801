//! Identities: region names and CRDT actors (incarnations).

use serde::{Deserialize, Serialize};
use std::fmt;

/// A CRDT actor: the incarnation id of a region's data directory (see DESIGN.md, "Identity").
///
/// Dots, sequence numbers and session-token entries are keyed by incarnation rather than region
/// name, so a region restarted on an empty disk can never reuse a dot its peers have seen.
pub type Actor = uuid::Uuid;

/// A validated region name: `[a-z0-9-]{1,32}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RegionName(String);

/// Why a region name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("region name {0:?} must be 1 to 32 characters of [a-z0-9-]")]
pub struct InvalidRegionName(pub String);

impl RegionName {
    /// Validates and wraps a region name.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidRegionName> {
        let name = name.into();
        let ok = (1..=32).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(name))
        } else {
            Err(InvalidRegionName(name))
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RegionName {
    type Error = InvalidRegionName;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<RegionName> for String {
    fn from(value: RegionName) -> Self {
        value.0
    }
}

impl fmt::Display for RegionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_names_are_validated() {
        assert!(RegionName::new("us-east").is_ok());
        assert!(RegionName::new("a").is_ok());
        assert!(RegionName::new("").is_err());
        assert!(RegionName::new("US-EAST").is_err());
        assert!(RegionName::new("us_east").is_err());
        assert!(RegionName::new("x".repeat(33)).is_err());
    }
}
