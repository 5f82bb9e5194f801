//! Validation of bucket and key names (API.md: 1..=256 bytes of UTF-8, no control chars, no `/`;
//! and not `.` or `..`, which URLs resolve as path steps).

/// Longest bucket or key name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// Why a bucket or key name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidName {
    /// Empty or longer than [`MAX_NAME_BYTES`].
    #[error("name must be 1 to 256 bytes long, got {0}")]
    Length(usize),
    /// Contains a control character or `/`.
    #[error("name must not contain control characters or '/'")]
    Character,
    /// `.` or `..`: URL parsers (clients', and ours when forwarding) resolve them as path steps.
    #[error("'.' and '..' are not names: URLs resolve them as path steps")]
    DotSegment,
}

/// Checks a bucket or key name against the API contract.
pub fn validate(name: &str) -> Result<(), InvalidName> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(InvalidName::Length(name.len()));
    }
    if name.chars().any(|c| c.is_control() || c == '/') {
        return Err(InvalidName::Character);
    }
    if name == "." || name == ".." {
        return Err(InvalidName::DotSegment);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        assert!(validate("users").is_ok());
        assert!(validate("üñí-çødé key").is_ok());
        assert!(validate(&"k".repeat(256)).is_ok());
        assert_eq!(validate(""), Err(InvalidName::Length(0)));
        assert_eq!(validate(&"k".repeat(257)), Err(InvalidName::Length(257)));
        assert_eq!(validate("a/b"), Err(InvalidName::Character));
        assert_eq!(validate("a\nb"), Err(InvalidName::Character));
        assert_eq!(validate("a\u{7f}b"), Err(InvalidName::Character));
        assert_eq!(validate("."), Err(InvalidName::DotSegment));
        assert_eq!(validate(".."), Err(InvalidName::DotSegment));
        assert!(validate("...").is_ok() && validate(".hidden").is_ok());
    }
}
