//! Write-back overlay of key states: states committed (journaled, visible) but not yet inserted
//! into the state database's key table.
//!
//! Inserting a key state into redb rewrites the B-tree leaf of a random key and its path on
//! every write, and was the largest single cost of a write. Group commits put key states here
//! instead; before each checkpoint the writer moves them into the state database in key
//! order, a chunk at a time, so a leaf written many times since the last checkpoint is
//! rewritten about once. The journal holds them until the checkpoint has made them durable.
//!
//! Every reader of key states looks here first and in the state database second, and must open
//! its state-database view only after looking here: entries leave the overlay only after the
//! commit that holds them has ended, so a miss here is answered by any view opened afterwards.
//! Scans, which look here many times, detect removals by the [`Overlay::removals`] counter and
//! reopen their view.

use super::KeyName;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// Bookkeeping bytes counted per entry on top of its key and state (table slot, tree node
/// share, allocation headers).
const ENTRY_OVERHEAD: u64 = 128;

/// Key states newer than the state database's, by bucket.
#[derive(Default)]
pub struct Overlay {
    buckets: RwLock<BTreeMap<String, BucketStates>>,
    entries: AtomicU64,
    bytes: AtomicU64,
    /// Bumped, under the write lock, every time entries leave the overlay.
    removals: AtomicU64,
}

/// One bucket's states: hashed for the lookups every write and read makes, and the key order
/// for scans and moves (ordered lookups cost a string comparison per level of a large tree).
#[derive(Default)]
struct BucketStates {
    /// Key → encoded state.
    states: HashMap<String, Vec<u8>, foldhash::fast::RandomState>,
    /// The same keys, in order.
    order: BTreeSet<String>,
}

/// One change to the overlay: a new state, or a removed key.
pub type Change = (String, String, Option<Vec<u8>>);
/// One entry copied out: bucket, key, encoded state.
pub type Entry = (String, String, Vec<u8>);

impl Overlay {
    /// Runs `read` on the overlay's state of a key; `None` if the overlay has none.
    pub fn with<T>(&self, bucket: &str, key: &str, read: impl FnOnce(&[u8]) -> T) -> Option<T> {
        let buckets = self.buckets.read().unwrap_or_else(|e| e.into_inner());
        buckets
            .get(bucket)?
            .states
            .get(key)
            .map(|state| read(state))
    }

    /// The first entry at or after (`Included`) or after (`Excluded`) `from`, copied out.
    pub fn next(&self, from: &Bound<KeyName>) -> Option<Entry> {
        self.copy_from(from, 1).pop()
    }

    /// Up to `limit` entries from `from` on, in key order, copied out under one read lock.
    pub fn copy_from(&self, from: &Bound<KeyName>, limit: usize) -> Vec<Entry> {
        let buckets = self.buckets.read().unwrap_or_else(|e| e.into_inner());
        let (first_bucket, keys_from) = match from {
            Bound::Unbounded => (None, Bound::Unbounded),
            Bound::Included((bucket, key)) => (Some(bucket), Bound::Included(key.as_str())),
            Bound::Excluded((bucket, key)) => (Some(bucket), Bound::Excluded(key.as_str())),
        };
        let from_bucket = first_bucket.map_or(Bound::Unbounded, |b| Bound::Included(b.as_str()));
        let mut out = Vec::with_capacity(limit.min(1024));
        for (bucket, keys) in buckets.range::<str, _>((from_bucket, Bound::Unbounded)) {
            let keys_from = match first_bucket {
                Some(first) if first == bucket => keys_from,
                _ => Bound::Unbounded,
            };
            for key in keys.order.range::<str, _>((keys_from, Bound::Unbounded)) {
                if out.len() == limit {
                    return out;
                }
                if let Some(state) = keys.states.get(key) {
                    out.push((bucket.clone(), key.clone(), state.clone()));
                }
            }
        }
        out
    }

    /// Applies changes in order: states set, removed keys dropped.
    pub fn apply(&self, changes: Vec<Change>) {
        let mut buckets = self.buckets.write().unwrap_or_else(|e| e.into_inner());
        let mut removed = false;
        for (bucket, key, state) in changes {
            let key_bytes = key.len();
            match state {
                Some(state) => {
                    self.bytes
                        .fetch_add(weight(key_bytes, &state), Ordering::Relaxed);
                    let keys = buckets.entry(bucket).or_default();
                    match keys.states.get_mut(key.as_str()) {
                        Some(slot) => self.forget(key_bytes, &std::mem::replace(slot, state)),
                        None => {
                            keys.order.insert(key.clone());
                            keys.states.insert(key, state);
                            self.entries.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                None => {
                    let Some(keys) = buckets.get_mut(bucket.as_str()) else {
                        continue;
                    };
                    let Some(old) = keys.states.remove(key.as_str()) else {
                        continue;
                    };
                    keys.order.remove(key.as_str());
                    self.forget(key_bytes, &old);
                    self.entries.fetch_sub(1, Ordering::Relaxed);
                    removed = true;
                    if keys.states.is_empty() {
                        buckets.remove(bucket.as_str());
                    }
                }
            }
        }
        if removed {
            self.removals.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Stops counting the bytes of a replaced or removed state.
    fn forget(&self, key_bytes: usize, old: &[u8]) {
        self.bytes
            .fetch_sub(weight(key_bytes, old), Ordering::Relaxed);
    }

    /// Number of entries.
    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }

    /// Approximate memory held, in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// How many times entries have left the overlay; a scan that sees it change reopens its
    /// view of the state database.
    pub fn removals(&self) -> u64 {
        self.removals.load(Ordering::Acquire)
    }
}

/// Memory an entry is counted for: its key (held twice, hashed and in order), its state and
/// bookkeeping.
fn weight(key_bytes: usize, state: &[u8]) -> u64 {
    (2 * key_bytes + state.len()) as u64 + ENTRY_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(bucket: &str, key: &str, state: &[u8]) -> Change {
        (bucket.into(), key.into(), Some(state.to_vec()))
    }

    fn name(bucket: &str, key: &str) -> KeyName {
        (bucket.into(), key.into())
    }

    fn key_of(entry: Option<Entry>) -> Option<(String, String)> {
        entry.map(|(b, k, _)| (b, k))
    }

    #[test]
    fn next_walks_keys_in_bucket_then_key_order() {
        let overlay = Overlay::default();
        overlay.apply(vec![
            set("b", "k2", b"2"),
            set("a", "z", b"z"),
            set("a-b", "k", b"x"),
            set("b", "k1", b"1"),
        ]);
        let mut seen = Vec::new();
        let mut from = Bound::Unbounded;
        while let Some((b, k, _)) = overlay.next(&from) {
            seen.push(format!("{b}/{k}"));
            from = Bound::Excluded((b, k));
        }
        assert_eq!(seen, ["a/z", "a-b/k", "b/k1", "b/k2"]);
        assert_eq!(
            key_of(overlay.next(&Bound::Included(name("b", "k1")))),
            Some(name("b", "k1"))
        );
        assert_eq!(
            key_of(overlay.next(&Bound::Excluded(name("a", "zz")))),
            Some(name("a-b", "k"))
        );
        assert_eq!(overlay.next(&Bound::Excluded(name("b", "k2"))), None);
        let chunk: Vec<String> = overlay
            .copy_from(&Bound::Excluded(name("a", "z")), 2)
            .into_iter()
            .map(|(b, k, _)| format!("{b}/{k}"))
            .collect();
        assert_eq!(chunk, ["a-b/k", "b/k1"]);
        assert_eq!(overlay.copy_from(&Bound::Unbounded, 10).len(), 4);
        assert!(overlay.copy_from(&Bound::Unbounded, 0).is_empty());
    }

    #[test]
    fn later_changes_win_and_removals_are_counted() {
        let overlay = Overlay::default();
        overlay.apply(vec![set("b", "k", b"1"), set("b", "k", b"22")]);
        assert_eq!(overlay.with("b", "k", <[u8]>::to_vec), Some(b"22".to_vec()));
        assert_eq!(overlay.entries(), 1);
        assert_eq!(overlay.bytes(), weight(1, b"22"));
        assert_eq!(overlay.removals(), 0, "replacing a state removes nothing");
        overlay.apply(vec![("b".into(), "k".into(), None), set("c", "k", b"3")]);
        assert_eq!(overlay.with("b", "k", <[u8]>::to_vec), None);
        assert_eq!(overlay.removals(), 1);
        assert_eq!((overlay.entries(), overlay.bytes()), (1, weight(1, b"3")));
        assert_eq!(
            key_of(overlay.next(&Bound::Unbounded)),
            Some(name("c", "k")),
            "an emptied bucket is gone"
        );
        overlay.apply(vec![("zz".into(), "none".into(), None)]);
        assert_eq!(
            overlay.removals(),
            1,
            "removing an absent key removes nothing"
        );
        overlay.apply(vec![("c".into(), "k".into(), None)]);
        assert_eq!(
            (overlay.entries(), overlay.bytes(), overlay.removals()),
            (0, 0, 2)
        );
        assert_eq!(overlay.next(&Bound::Unbounded), None);
    }
}
