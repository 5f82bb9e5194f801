//! Idempotency keys whose forward to the home region has an unknown outcome.
//!
//! A forward that timed out after sending may still be applied by the home later: a paused or
//! overloaded home reads it from its socket when it resumes. A retry with the same
//! Idempotency-Key must then not fail over here, or the write is applied twice (once by the
//! home, once here). It waits for the home instead (503 with Retry-After) until the home has
//! answered for the key: from then on the home holds its record and replays it.
//!
//! Kept in memory, per region: a retry sent to another region, or after this one restarts,
//! is not covered.

use lru::LruCache;
use prometheus::IntGauge;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys remembered at most; the oldest is forgotten first.
const CAPACITY: usize = 65_536;

/// Idempotency keys forwarded to a home that has not answered for them.
pub struct InDoubt {
    keys: Mutex<LruCache<u128, Instant>>,
    /// After this a retry is a new write anyway (the idempotency records' lifetime).
    ttl: Duration,
    gauge: IntGauge,
}

impl InDoubt {
    /// An empty set whose keys lapse after `ttl`; `gauge` shows how many it holds.
    pub fn new(ttl: Duration, gauge: IntGauge) -> Self {
        let capacity = NonZeroUsize::new(CAPACITY).unwrap_or(NonZeroUsize::MIN);
        InDoubt {
            keys: Mutex::new(LruCache::new(capacity)),
            ttl,
            gauge,
        }
    }

    /// A forward carrying `id` may or may not have been applied by the home.
    pub fn mark(&self, id: u128) {
        self.update(|keys| {
            keys.put(id, Instant::now());
        });
    }

    /// The home has answered for `id`: it holds the outcome from now on.
    pub fn settle(&self, id: u128) {
        self.update(|keys| {
            keys.pop(&id);
        });
    }

    /// Whether an earlier forward of `id` may still be applied by the home.
    pub fn contains(&self, id: u128) -> bool {
        let Ok(mut keys) = self.keys.lock() else {
            // Poisoned: refuse the failover, the side that never applies twice.
            return true;
        };
        match keys.peek(&id) {
            Some(since) if since.elapsed() < self.ttl => true,
            Some(_) => {
                keys.pop(&id);
                self.gauge.set(keys.len() as i64);
                false
            }
            None => false,
        }
    }

    fn update(&self, change: impl FnOnce(&mut LruCache<u128, Instant>)) {
        if let Ok(mut keys) = self.keys.lock() {
            change(&mut keys);
            self.gauge.set(keys.len() as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_in_doubt_until_settled_or_lapsed() {
        let gauge = IntGauge::new("in_doubt", "test").expect("gauge");
        let in_doubt = InDoubt::new(Duration::from_millis(50), gauge.clone());
        in_doubt.mark(1);
        in_doubt.mark(2);
        assert!(in_doubt.contains(1) && in_doubt.contains(2) && !in_doubt.contains(3));
        assert_eq!(gauge.get(), 2);
        in_doubt.settle(1);
        assert!(!in_doubt.contains(1));
        assert_eq!(gauge.get(), 1);
        std::thread::sleep(Duration::from_millis(60));
        assert!(!in_doubt.contains(2));
        assert_eq!(gauge.get(), 0);
    }
}
