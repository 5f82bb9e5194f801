//! Anti-entropy hash tree: a fixed-shape Merkle tree over the whole keyspace.
//!
//! Shape: a root, [`BRANCHES`] branches and [`SEGMENTS`] leaf segments; a key lives in the
//! segment named by the top bits of its key hash. Every node is the XOR of the entry hashes of
//! `(bucket, key, canonical state)` beneath it, so a write changes one segment, one branch and
//! the root by XOR-ing out the old entry hash and in the new one: O(1), never a rescan.
//!
//! Why this shape: 2^18 segments keep ~40 keys per segment at 10M keys (a differing segment
//! costs ~40 digests) and ~4 at 1M; 2^12 branches of 64 segments make the top level 32 KiB
//! and one differing branch 512 bytes, so 100 scattered differences cost about 100 KB of
//! tree and digests in total. Three levels: any more would add round trips for no saving.

use crate::home::key_hash;
use serde::{Deserialize, Serialize};

/// log2 of the number of leaf segments.
pub const SEGMENT_BITS: u32 = 18;
/// log2 of the number of branches.
pub const BRANCH_BITS: u32 = 12;
/// Leaf segments.
pub const SEGMENTS: usize = 1 << SEGMENT_BITS;
/// Branches (inner nodes right below the root).
pub const BRANCHES: usize = 1 << BRANCH_BITS;
/// Segments under one branch.
pub const SEGMENTS_PER_BRANCH: usize = SEGMENTS / BRANCHES;

/// The segment holding `(bucket, key)`.
pub fn segment_of(bucket: &str, key: &str) -> u32 {
    (key_hash(bucket, key) >> (64 - SEGMENT_BITS)) as u32
}

/// The branch above `segment`.
pub fn branch_of(segment: u32) -> u32 {
    segment >> (SEGMENT_BITS - BRANCH_BITS)
}

/// Hash of one stored entry: `(bucket, key, canonical encoded state)`.
pub fn entry_hash(bucket: &str, key: &str, state: &[u8]) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    // Length prefixes keep ("ab","c") apart from ("a","bc").
    hasher.update(&(bucket.len() as u32).to_le_bytes());
    hasher.update(bucket.as_bytes());
    hasher.update(&(key.len() as u32).to_le_bytes());
    hasher.update(key.as_bytes());
    hasher.update(state);
    hasher.digest()
}

/// The tree; every node is the XOR of the entry hashes beneath it.
#[derive(Clone, PartialEq, Eq)]
pub struct MerkleTree {
    root: u64,
    branches: Vec<u64>,
    segments: Vec<u64>,
}

impl Default for MerkleTree {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MerkleTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MerkleTree({:016x})", self.root)
    }
}

impl MerkleTree {
    /// The tree of an empty keyspace.
    pub fn new() -> Self {
        Self {
            root: 0,
            branches: vec![0; BRANCHES],
            segments: vec![0; SEGMENTS],
        }
    }

    /// XORs `hash` into `segment` and its path: adds an entry, or removes one added before.
    pub fn toggle(&mut self, segment: u32, hash: u64) {
        let segment = segment as usize % SEGMENTS;
        self.segments[segment] ^= hash;
        self.branches[branch_of(segment as u32) as usize] ^= hash;
        self.root ^= hash;
    }

    /// Records that `(bucket, key)` changed from `old` to `new` encoded state (`None`: absent).
    pub fn update(&mut self, bucket: &str, key: &str, old: Option<&[u8]>, new: Option<&[u8]>) {
        let delta = old.map_or(0, |s| entry_hash(bucket, key, s))
            ^ new.map_or(0, |s| entry_hash(bucket, key, s));
        if delta != 0 {
            self.toggle(segment_of(bucket, key), delta);
        }
    }

    /// The root hash: equal roots mean (with overwhelming probability) equal keyspaces.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Every branch hash, by branch index.
    pub fn branches(&self) -> &[u64] {
        &self.branches
    }

    /// The segment hashes under `branch`.
    pub fn segments_of(&self, branch: u32) -> &[u64] {
        let start = (branch as usize % BRANCHES) * SEGMENTS_PER_BRANCH;
        &self.segments[start..start + SEGMENTS_PER_BRANCH]
    }
}

/// Indexes where two equally long hash lists differ (a missing entry counts as differing).
pub fn differing(mine: &[u64], theirs: &[u64]) -> Vec<u32> {
    (0..mine.len().max(theirs.len()))
        .filter(|&i| mine.get(i) != theirs.get(i))
        .map(|i| i as u32)
        .collect()
}

/// Membership test for the segments a digest scan reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentFilter(Option<Vec<u64>>);

impl SegmentFilter {
    /// Every segment.
    pub fn all() -> Self {
        Self(None)
    }

    /// Just these segments.
    pub fn of(segments: &[u32]) -> Self {
        let mut bits = vec![0u64; SEGMENTS / 64];
        for &segment in segments {
            let segment = segment as usize % SEGMENTS;
            bits[segment / 64] |= 1 << (segment % 64);
        }
        Self(Some(bits))
    }

    /// Whether `segment` is included.
    pub fn contains(&self, segment: u32) -> bool {
        let segment = segment as usize % SEGMENTS;
        self.0
            .as_ref()
            .is_none_or(|bits| bits[segment / 64] & (1 << (segment % 64)) != 0)
    }
}

/// A key's digest in an exchange: `(bucket, key)` and its entry hash.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Digest {
    /// Bucket name.
    pub bucket: String,
    /// Key name.
    pub key: String,
    /// [`entry_hash`] of its state.
    pub hash: u64,
}

/// What one side must do after comparing digests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DigestDiff {
    /// Keys whose state this side must send (it has them; the other side lacks or differs).
    pub send: Vec<(String, String)>,
    /// Keys whose state this side must fetch (the other side has them; this lacks or differs).
    pub fetch: Vec<(String, String)>,
    /// Distinct keys that differ (a key in both lists counts once).
    pub differing: usize,
}

/// Compares digests of the same key range, both sorted by `(bucket, key)`.
pub fn diff_digests(mine: &[Digest], theirs: &[Digest]) -> DigestDiff {
    let mut diff = DigestDiff::default();
    let (mut i, mut j) = (0, 0);
    let name = |d: &Digest| (d.bucket.clone(), d.key.clone());
    while i < mine.len() || j < theirs.len() {
        let order = match (mine.get(i), theirs.get(j)) {
            (Some(a), Some(b)) => (&a.bucket, &a.key).cmp(&(&b.bucket, &b.key)),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match order {
            std::cmp::Ordering::Less => {
                diff.send.push(name(&mine[i]));
                diff.differing += 1;
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                diff.fetch.push(name(&theirs[j]));
                diff.differing += 1;
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                if mine[i].hash != theirs[j].hash {
                    diff.send.push(name(&mine[i]));
                    diff.fetch.push(name(&theirs[j]));
                    diff.differing += 1;
                }
                i += 1;
                j += 1;
            }
        }
    }
    diff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toggling_twice_restores_the_tree() {
        let mut tree = MerkleTree::new();
        tree.update("b", "k", None, Some(b"v1"));
        assert_ne!(tree.root(), 0);
        tree.update("b", "k", Some(b"v1"), Some(b"v2"));
        tree.update("b", "k", Some(b"v2"), None);
        assert_eq!(tree, MerkleTree::new());
    }

    #[test]
    fn nodes_are_the_xor_of_their_children() {
        let mut tree = MerkleTree::new();
        for i in 0..1000 {
            tree.update("b", &format!("k{i}"), None, Some(i.to_string().as_bytes()));
        }
        let xor = |hashes: &[u64]| hashes.iter().fold(0, |acc, h| acc ^ h);
        assert_eq!(xor(tree.branches()), tree.root());
        for branch in 0..BRANCHES as u32 {
            assert_eq!(
                xor(tree.segments_of(branch)),
                tree.branches()[branch as usize]
            );
        }
    }

    #[test]
    fn entry_hash_separates_bucket_from_key() {
        assert_ne!(entry_hash("ab", "c", b""), entry_hash("a", "bc", b""));
    }
}
