//! Home-region placement: rendezvous (highest-random-weight) hashing over region names.
//!
//! Every region computes the same answer from the same region list, and removing a region
//! moves only the keys that were homed there.

use crate::RegionName;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The home region of `(bucket, key)` among `regions` (empty list: `None`).
pub fn rendezvous<'a>(
    regions: impl IntoIterator<Item = &'a RegionName>,
    bucket: &str,
    key: &str,
) -> Option<&'a RegionName> {
    let seed = key_hash(bucket, key);
    regions
        .into_iter()
        .max_by_key(|region| (xxh3_64_with_seed(region.as_str().as_bytes(), seed), *region))
}

/// A stable 64-bit hash of `(bucket, key)`, the same in every process and version.
pub fn key_hash(bucket: &str, key: &str) -> u64 {
    // A separator byte that names cannot contain keeps ("ab","c") and ("a","bc") apart.
    // Names are at most 256 bytes, so the stack buffer almost always suffices (this runs for
    // every key of an anti-entropy scan).
    let len = bucket.len() + key.len() + 1;
    let mut stack = [0u8; 520];
    let mut heap = Vec::new();
    let buf: &mut [u8] = if len <= stack.len() {
        &mut stack[..len]
    } else {
        heap.resize(len, 0);
        &mut heap
    };
    buf[..bucket.len()].copy_from_slice(bucket.as_bytes());
    buf[bucket.len()] = 0;
    buf[bucket.len() + 1..].copy_from_slice(key.as_bytes());
    xxhash_rust::xxh3::xxh3_64(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn regions() -> Vec<RegionName> {
        ["us-east", "eu-west", "ap-south"]
            .into_iter()
            .map(|r| RegionName::new(r).unwrap())
            .collect()
    }

    #[test]
    fn key_hash_is_stable_across_buffer_sizes() {
        // The value is part of placement and partitioning: it must never change.
        assert_eq!(key_hash("b", "k"), xxhash_rust::xxh3::xxh3_64(b"b\0k"));
        let long = "x".repeat(600);
        let mut joined = b"b\0".to_vec();
        joined.extend_from_slice(long.as_bytes());
        assert_eq!(key_hash("b", &long), xxhash_rust::xxh3::xxh3_64(&joined));
    }

    #[test]
    fn placement_is_independent_of_list_order() {
        let a = regions();
        let mut b = a.clone();
        b.reverse();
        for i in 0..200 {
            let key = format!("k{i}");
            assert_eq!(rendezvous(&a, "b", &key), rendezvous(&b, "b", &key));
        }
    }

    #[test]
    fn placement_spreads_keys_over_every_region() {
        let regions = regions();
        let mut counts: HashMap<&RegionName, usize> = HashMap::new();
        for i in 0..3000 {
            let home = rendezvous(&regions, "b", &format!("k{i}")).unwrap();
            *counts.entry(home).or_default() += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|&n| n > 800), "{counts:?}");
    }

    #[test]
    fn removing_a_region_moves_only_its_keys() {
        let all = regions();
        let fewer: Vec<_> = all[..2].to_vec();
        for i in 0..500 {
            let key = format!("k{i}");
            let before = rendezvous(&all, "b", &key).unwrap();
            if before != &all[2] {
                assert_eq!(rendezvous(&fewer, "b", &key), Some(before));
            }
        }
    }
}
