//! Criterion benchmarks of the anti-entropy tree: per-write update cost, the top-down diff of
//! two large trees, and the digest merge-join of one exchange page.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use meridian_shared::merkle::{diff_digests, differing, entry_hash, Digest, MerkleTree};

fn tree_with(keys: u32, changed_every: u32) -> MerkleTree {
    let mut tree = MerkleTree::new();
    for i in 0..keys {
        let state = if changed_every > 0 && i % changed_every == 0 {
            b"v2"
        } else {
            b"v1"
        };
        tree.update("bench", &format!("k{i}"), None, Some(state));
    }
    tree
}

fn update(c: &mut Criterion) {
    let mut tree = tree_with(100_000, 0);
    let mut i = 0u32;
    c.bench_function("merkle update (one write)", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let key = format!("k{}", i % 100_000);
            tree.update("bench", black_box(&key), Some(b"v1"), Some(b"v2"));
            tree.update("bench", black_box(&key), Some(b"v2"), Some(b"v1"));
        })
    });
}

fn diff_trees(c: &mut Criterion) {
    // 1M keys on each side, 100 of them different.
    let a = tree_with(1_000_000, 0);
    let b = tree_with(1_000_000, 10_000);
    c.bench_function(
        "merkle diff, 1M keys, 100 differ (branches + segments)",
        |bench| {
            bench.iter(|| {
                let mut segments = 0;
                for branch in differing(a.branches(), b.branches()) {
                    segments += differing(a.segments_of(branch), b.segments_of(branch)).len();
                }
                black_box(segments)
            })
        },
    );
}

fn digest_page(c: &mut Criterion) {
    let page = |changed_every: u64| -> Vec<Digest> {
        let mut page: Vec<Digest> = (0..20_000u64)
            .map(|i| Digest {
                bucket: "bench".into(),
                key: format!("k{i:08}"),
                hash: entry_hash(
                    "bench",
                    &format!("k{i:08}"),
                    if i % changed_every == 0 { b"x" } else { b"y" },
                ),
            })
            .collect();
        page.sort();
        page
    };
    let (mine, theirs) = (page(u64::MAX), page(100));
    c.bench_function("digest merge-join, 20k-digest page", |b| {
        b.iter(|| black_box(diff_digests(black_box(&mine), black_box(&theirs))))
    });
}

criterion_group!(benches, update, diff_trees, digest_page);
criterion_main!(benches);
