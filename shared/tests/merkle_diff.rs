//! Property test: the top-down diff walk finds exactly the keys whose states differ.

use meridian_shared::merkle::{
    diff_digests, differing, entry_hash, segment_of, Digest, MerkleTree,
};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

type Keyspace = BTreeMap<(String, String), Vec<u8>>;

fn tree_of(space: &Keyspace) -> MerkleTree {
    let mut tree = MerkleTree::new();
    for ((bucket, key), state) in space {
        tree.update(bucket, key, None, Some(state));
    }
    tree
}

/// Digests of the keys in `segments`, sorted like a storage scan.
fn digests(space: &Keyspace, segments: &BTreeSet<u32>) -> Vec<Digest> {
    space
        .iter()
        .filter(|((b, k), _)| segments.contains(&segment_of(b, k)))
        .map(|((bucket, key), state)| Digest {
            bucket: bucket.clone(),
            key: key.clone(),
            hash: entry_hash(bucket, key, state),
        })
        .collect()
}

/// The exchange as the anti-entropy actor runs it, minus the network.
type Names = BTreeSet<(String, String)>;

fn walk(a: &Keyspace, b: &Keyspace) -> (Names, Names, usize) {
    let (ta, tb) = (tree_of(a), tree_of(b));
    if ta.root() == tb.root() {
        return (Names::new(), Names::new(), 0);
    }
    let mut segments = BTreeSet::new();
    for branch in differing(ta.branches(), tb.branches()) {
        let base = branch * meridian_shared::merkle::SEGMENTS_PER_BRANCH as u32;
        for offset in differing(ta.segments_of(branch), tb.segments_of(branch)) {
            segments.insert(base + offset);
        }
    }
    let diff = diff_digests(&digests(a, &segments), &digests(b, &segments));
    (
        diff.send.into_iter().collect(),
        diff.fetch.into_iter().collect(),
        diff.differing,
    )
}

fn keyspace() -> impl Strategy<Value = Keyspace> {
    // A small name domain so the two sides share most keys; tiny states so equal values occur.
    let name = (0u8..3, 0u16..400).prop_map(|(b, k)| (format!("b{b}"), format!("k{k}")));
    prop::collection::btree_map(name, prop::collection::vec(0u8..3, 0..3), 0..300)
}

/// A keyspace and a copy of it with a few changes (the usual case: mostly equal).
fn pair() -> impl Strategy<Value = (Keyspace, Keyspace)> {
    (
        keyspace(),
        keyspace(),
        prop::collection::vec(any::<bool>(), 0..300),
    )
        .prop_map(|(base, other, keep)| {
            let mut copy = base.clone();
            for (i, (name, state)) in other.into_iter().enumerate() {
                if !keep.get(i).copied().unwrap_or(true) {
                    copy.insert(name, state);
                }
            }
            (base, copy)
        })
}

fn check(a: &Keyspace, b: &Keyspace) -> Result<(), TestCaseError> {
    let expected: BTreeSet<(String, String)> = a
        .keys()
        .chain(b.keys())
        .filter(|name| a.get(*name) != b.get(*name))
        .cloned()
        .collect();
    let (send, fetch, differing) = walk(a, b);
    prop_assert_eq!(differing, expected.len());
    let expected_send: BTreeSet<_> = expected
        .iter()
        .filter(|n| a.contains_key(*n))
        .cloned()
        .collect();
    let expected_fetch: BTreeSet<_> = expected
        .iter()
        .filter(|n| b.contains_key(*n))
        .cloned()
        .collect();
    prop_assert_eq!(send, expected_send);
    prop_assert_eq!(fetch, expected_fetch);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn walk_finds_exactly_the_differing_keys_of_unrelated_keyspaces(a in keyspace(), b in keyspace()) {
        check(&a, &b)?;
    }

    #[test]
    fn walk_finds_exactly_the_differing_keys_of_near_copies((a, b) in pair()) {
        check(&a, &b)?;
    }

    #[test]
    fn incremental_updates_equal_a_rebuild(a in keyspace(), b in keyspace()) {
        // Move from `a` to `b` by per-key updates; the tree must equal one built from `b`.
        let mut tree = tree_of(&a);
        for name in a.keys().chain(b.keys()).collect::<BTreeSet<_>>() {
            tree.update(&name.0, &name.1, a.get(name).map(Vec::as_slice), b.get(name).map(Vec::as_slice));
        }
        prop_assert_eq!(tree, tree_of(&b));
    }
}
