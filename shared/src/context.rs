//! Opaque tokens handed to clients: causal contexts (`X-Meridian-Context`).

use crate::Actor;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use crdts::VClock;

/// Why a client-supplied token could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("token is not one this service issued")]
pub struct InvalidToken;

/// Encodes a causal context (the version vector a client has seen) as a URL-safe token.
pub fn encode_context(clock: &VClock<Actor>) -> String {
    encode_token(clock)
}

/// Decodes a causal context token produced by [`encode_context`].
pub fn decode_context(token: &str) -> Result<VClock<Actor>, InvalidToken> {
    decode_token(token)
}

/// Postcard + base64url: compact, header-safe and versioned by the type it decodes into.
pub(crate) fn encode_token<T: serde::Serialize>(value: &T) -> String {
    // Serializing plain maps of ids and integers into a Vec cannot fail.
    let bytes = postcard::to_allocvec(value).unwrap_or_default();
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Inverse of [`encode_token`]; refuses trailing bytes so a token has exactly one reading.
pub(crate) fn decode_token<T: serde::de::DeserializeOwned>(token: &str) -> Result<T, InvalidToken> {
    if token.len() > 64 * 1024 {
        return Err(InvalidToken);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(token.trim())
        .map_err(|_| InvalidToken)?;
    let (value, rest) = postcard::take_from_bytes(&bytes).map_err(|_| InvalidToken)?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(InvalidToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crdts::CmRDT;

    #[test]
    fn context_round_trips_and_garbage_is_refused() {
        let mut clock = VClock::new();
        clock.apply(clock.inc(Actor::from_u128(7)));
        clock.apply(clock.inc(Actor::from_u128(7)));
        let token = encode_context(&clock);
        assert_eq!(decode_context(&token), Ok(clock));
        assert_eq!(decode_context("not a token!"), Err(InvalidToken));
        assert_eq!(decode_context("AAAA"), Err(InvalidToken));
    }
}
