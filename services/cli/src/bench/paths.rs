//! Pre-formatted request paths, so a worker never formats a string on the hot path.

/// The paths `{prefix}k{n}{suffix}` for `n` in `0..count`, packed into one buffer.
///
/// One buffer plus offsets costs ~25 bytes per key instead of an allocation each, and handing
/// out a path is a slice of it.
#[derive(Debug, Clone)]
pub struct PathTable {
    buf: String,
    ends: Vec<u32>,
}

impl PathTable {
    /// Builds the table; fails if the paths are not valid request targets or do not fit.
    pub fn build(prefix: &str, suffix: &str, count: u64) -> Result<Self, String> {
        let mut text = String::new();
        let mut ends = Vec::new();
        for n in 0..count {
            use std::fmt::Write;
            // Writing to a String cannot fail.
            let _ = write!(text, "{prefix}k{n}{suffix}");
            let end = u32::try_from(text.len())
                .map_err(|_| format!("{count} request paths do not fit in 4 GiB"))?;
            ends.push(end);
        }
        // A request target is visible ASCII without spaces, starting with `/`; the prefix
        // and suffix decide that for every path, since `k{n}` always fits.
        let valid = |part: &str| part.bytes().all(|b| b.is_ascii_graphic());
        if !prefix.starts_with('/') || !valid(prefix) || !valid(suffix) {
            return Err(format!(
                "{prefix}k{{n}}{suffix} is not a valid request path"
            ));
        }
        Ok(PathTable { buf: text, ends })
    }

    /// The path of key `n`, or `None` when `n` is out of range.
    pub fn path(&self, n: u64) -> Option<&[u8]> {
        let n = usize::try_from(n).ok()?;
        let end = *self.ends.get(n)? as usize;
        let start = match n {
            0 => 0,
            _ => self.ends[n - 1] as usize,
        };
        self.buf.as_bytes().get(start..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_prefix_key_suffix() {
        let table = PathTable::build("/v1/kv/bench/", "?ack=quorum", 12).expect("builds");
        assert_eq!(table.ends.len(), 12);
        assert_eq!(table.path(0), Some(&b"/v1/kv/bench/k0?ack=quorum"[..]));
        assert_eq!(table.path(11), Some(&b"/v1/kv/bench/k11?ack=quorum"[..]));
        assert!(table.path(12).is_none());
    }

    #[test]
    fn invalid_paths_are_refused_up_front() {
        assert!(PathTable::build("/v1/kv/a b/", "", 3).is_err());
        assert!(PathTable::build("/v1/kv/b/", "\r\n", 3).is_err());
        assert!(PathTable::build("v1/kv/b/", "", 3).is_err());
        assert!(PathTable::build("/v1/kv/b/", "", 0).is_ok());
    }
}
