//! Session tokens: per-origin sequence numbers a client has observed (`X-Meridian-Session`).

use crate::context::{decode_token, encode_token, InvalidToken};
use crate::Actor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The highest sequence number a client has observed from each origin incarnation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionToken {
    /// Origin incarnation → highest sequence number observed.
    pub seen: BTreeMap<Actor, u64>,
}

impl SessionToken {
    /// Records that the client has observed `seq` from `origin`.
    pub fn observe(&mut self, origin: Actor, seq: u64) {
        let entry = self.seen.entry(origin).or_default();
        *entry = (*entry).max(seq);
    }

    /// Pointwise maximum with another token.
    pub fn merge(&mut self, other: &SessionToken) {
        for (origin, seq) in &other.seen {
            self.observe(*origin, *seq);
        }
    }

    /// Whether an applied vector covers everything this token has seen.
    pub fn covered_by(&self, applied: &BTreeMap<Actor, u64>) -> bool {
        self.seen
            .iter()
            .all(|(origin, seq)| applied.get(origin).copied().unwrap_or(0) >= *seq)
    }

    /// The header form of the token.
    pub fn encode(&self) -> String {
        encode_token(self)
    }

    /// Reads a token from its header form.
    pub fn decode(token: &str) -> Result<Self, InvalidToken> {
        decode_token(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_merge_pointwise_and_round_trip() {
        let (a, b) = (Actor::from_u128(1), Actor::from_u128(2));
        let mut left = SessionToken::default();
        left.observe(a, 5);
        let mut right = SessionToken::default();
        right.observe(a, 3);
        right.observe(b, 9);
        left.merge(&right);
        assert_eq!(left.seen.get(&a), Some(&5));
        assert_eq!(left.seen.get(&b), Some(&9));
        assert_eq!(SessionToken::decode(&left.encode()), Ok(left.clone()));

        let applied = BTreeMap::from([(a, 5), (b, 8)]);
        assert!(!left.covered_by(&applied));
        let applied = BTreeMap::from([(a, 5), (b, 9)]);
        assert!(left.covered_by(&applied));
    }
}
