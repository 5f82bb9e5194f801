//! Canonical binary encoding of key states (postcard), used on disk, on the wire and for hashing.
//!
//! `crdts` keeps sets in `HashMap`s, so encoding its types
//! directly would give equal states different bytes. Encoding goes through mirror types with the
//! same serde shape but sorted contents: equal states always encode to identical bytes (the
//! Merkle tree relies on it), and the bytes decode straight back into the `crdts` types.

use crate::bucket::BucketType;
use crate::register::DvvRegister;
use crate::state::{KeyState, LwwStamp};
use crate::Actor;
use crdts::{LWWReg, PNCounter, VClock};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Leading byte of every encoded state: the on-disk format version.
pub const STATE_FORMAT_V1: u8 = 1;

/// Why bytes could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Written by a format version this build does not know.
    #[error("unknown state format version {0}")]
    UnknownVersion(u8),
    /// Not a valid encoding.
    #[error("corrupt state encoding: {0}")]
    Corrupt(String),
}

/// Mirror of `KeyState` with sorted collections; variant order must match.
#[derive(Serialize, Deserialize)]
enum CanonicalState {
    Register(DvvRegister),
    Lww(LWWReg<Option<String>, LwwStamp>),
    Counter(PNCounter<Actor>),
    Set(CanonicalSet),
}

/// Mirror of `Orswot` (fields in declaration order: clock, entries, deferred).
#[derive(Serialize, Deserialize)]
struct CanonicalSet {
    clock: VClock<Actor>,
    entries: BTreeMap<String, VClock<Actor>>,
    deferred: Vec<(VClock<Actor>, BTreeSet<String>)>,
}

/// Encodes a state canonically: equal states give identical bytes.
pub fn encode_state(state: &KeyState) -> Vec<u8> {
    let mut out = vec![STATE_FORMAT_V1];
    if !matches!(state, KeyState::Set(_)) {
        // Registers, lww and counters hold only ordered maps: already canonical.
        // Serializing in-memory maps and strings into a Vec cannot fail.
        return postcard::to_extend(state, out).unwrap_or_default();
    }
    // Sets go through the sorted mirror. An empty result would be refused by `decode_state`,
    // never silently accepted.
    let direct = postcard::to_allocvec(state).unwrap_or_default();
    let mut canonical: CanonicalState = match postcard::from_bytes(&direct) {
        Ok(c) => c,
        Err(_) => return Vec::new(),
    };
    if let CanonicalState::Set(set) = &mut canonical {
        set.deferred.sort_by(|a, b| a.0.dots.cmp(&b.0.dots));
    }
    out.reserve(direct.len());
    postcard::to_extend(&canonical, out).unwrap_or_default()
}

/// The type of an encoded state, read from its first bytes without decoding the rest (scans
/// for states of the wrong type touch every state of a bucket). `None` if not a known encoding.
pub fn encoded_kind(bytes: &[u8]) -> Option<BucketType> {
    // The format version, then postcard's variant index of `KeyState` (one byte below 128).
    match bytes {
        [STATE_FORMAT_V1, 0, ..] => Some(BucketType::Register),
        [STATE_FORMAT_V1, 1, ..] => Some(BucketType::Lww),
        [STATE_FORMAT_V1, 2, ..] => Some(BucketType::Counter),
        [STATE_FORMAT_V1, 3, ..] => Some(BucketType::Set),
        _ => None,
    }
}

/// Decodes bytes produced by [`encode_state`].
pub fn decode_state(bytes: &[u8]) -> Result<KeyState, DecodeError> {
    match bytes.split_first() {
        Some((&STATE_FORMAT_V1, body)) => {
            let (state, rest) = postcard::take_from_bytes::<KeyState>(body)
                .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
            if rest.is_empty() {
                Ok(state)
            } else {
                Err(DecodeError::Corrupt(format!(
                    "{} trailing bytes",
                    rest.len()
                )))
            }
        }
        Some((&version, _)) => Err(DecodeError::UnknownVersion(version)),
        None => Err(DecodeError::Corrupt("empty".into())),
    }
}
