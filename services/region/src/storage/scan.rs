//! Key-ordered scans of key states: the overlay's entries merged over the state database's.

use super::overlay::{Entry, Overlay};
use super::tables::KEYS;
use super::{KeyName, NameBound, StorageError};
use redb::{Database, ReadableDatabase};
use std::cmp::Ordering;
use std::ops::Bound;

/// Calls `visit(bucket, key, state)` for every key state from `from` on, in key order, the
/// overlay's state where it has one, until `visit` returns `Ok(false)`.
///
/// A scan looks at the overlay once per overlay entry, not under one lock; when entries leave
/// the overlay meanwhile (a checkpoint or a purge moved them), the state database view it
/// opened may predate their commit, so it reopens one and goes on after the last key visited.
pub fn scan_states(
    db: &Database,
    overlay: &Overlay,
    from: Bound<KeyName>,
    mut visit: impl FnMut(&str, &str, &[u8]) -> Result<bool, StorageError>,
) -> Result<(), StorageError> {
    let mut position = from;
    'view: loop {
        let removals = overlay.removals();
        let txn = db.begin_read()?;
        let table = txn.open_table(KEYS)?;
        let mut stored_range = table.range::<(&str, &str)>(borrowed(&position))?;
        let mut stored = stored_range.next().transpose()?;
        let mut overlaid: Option<Entry> = overlay.next(&position);
        loop {
            if overlay.removals() != removals {
                continue 'view;
            }
            let order = match (&stored, &overlaid) {
                (None, None) => return Ok(()),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((name, _)), Some((bucket, key, _))) => {
                    name.value().cmp(&(bucket.as_str(), key.as_str()))
                }
            };
            let go_on = if order == Ordering::Less {
                let Some((name, state)) = stored.take() else {
                    return Ok(());
                };
                let (bucket, key) = name.value();
                position = Bound::Excluded((bucket.to_string(), key.to_string()));
                let go_on = visit(bucket, key, state.value())?;
                stored = stored_range.next().transpose()?;
                go_on
            } else {
                let Some((bucket, key, state)) = overlaid.take() else {
                    return Ok(());
                };
                if order == Ordering::Equal {
                    // The overlay's state is the newer one: the stored one is skipped.
                    stored = stored_range.next().transpose()?;
                }
                let go_on = visit(&bucket, &key, &state)?;
                position = Bound::Excluded((bucket, key));
                overlaid = overlay.next(&position);
                go_on
            };
            if !go_on {
                return Ok(());
            }
        }
    }
}

/// `from` as a range over `(bucket, key)` table keys.
fn borrowed(from: &Bound<KeyName>) -> (NameBound<'_>, NameBound<'_>) {
    let lower = match from {
        Bound::Included((b, k)) => Bound::Included((b.as_str(), k.as_str())),
        Bound::Excluded((b, k)) => Bound::Excluded((b.as_str(), k.as_str())),
        Bound::Unbounded => Bound::Unbounded,
    };
    (lower, Bound::Unbounded)
}
