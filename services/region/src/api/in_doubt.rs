//! Idempotency keys whose forward to the home region has an unknown outcome.
//!
//! A forward that timed out after sending may still be applied by the home later: a paused or
//! overloaded home reads it from its socket when it resumes. A retry with the same
//! Idempotency-Key must then not fail over here, or the write is applied twice (once by the
//! home, once here). It waits for the home instead (503 with Retry-After) until the home has
//! answered it with success (from then on the home holds its record and replays it), or has
//! said that this attempt applied nothing.
//!
//! Kept in memory, per region, for at most the idempotency records' lifetime: a retry sent to
//! another region, or after this one restarts, is not covered.

use lru::LruCache;
use prometheus::{IntCounter, IntGauge};
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys remembered at most; beyond that the oldest is forgotten (and counted).
const CAPACITY: usize = 65_536;

/// Idempotency keys forwarded to a home that has not answered for them.
pub struct InDoubt {
    keys: Mutex<Keys>,
    /// After this a retry is a new write anyway (the idempotency records' lifetime).
    ttl: Duration,
    gauge: IntGauge,
    evicted: IntCounter,
}

struct Keys {
    /// Key → (the attempt that marked it last, when).
    marks: LruCache<u128, (u64, Instant)>,
    next_attempt: u64,
}

/// One forward of a keyed write, from before it is sent.
pub struct Attempt {
    id: u128,
    number: u64,
    /// An earlier attempt had left the key in doubt already.
    doubted_before: bool,
}

impl InDoubt {
    /// An empty set whose keys lapse after `ttl`; `gauge` shows how many it holds, `evicted`
    /// counts keys forgotten early because it was full.
    pub fn new(ttl: Duration, gauge: IntGauge, evicted: IntCounter) -> Self {
        let capacity = NonZeroUsize::new(CAPACITY).unwrap_or(NonZeroUsize::MIN);
        InDoubt {
            keys: Mutex::new(Keys {
                marks: LruCache::new(capacity),
                next_attempt: 0,
            }),
            ttl,
            gauge,
            evicted,
        }
    }

    /// Marks `id` in doubt before its forward is sent: once sent, the home may apply it.
    pub fn begin(&self, id: u128) -> Attempt {
        let mut attempt = Attempt {
            id,
            number: 0,
            // Poisoned: the side that never applies twice.
            doubted_before: true,
        };
        self.update(|keys, ttl, evicted| {
            while keys
                .marks
                .peek_lru()
                .is_some_and(|(_, (_, since))| since.elapsed() >= ttl)
            {
                keys.marks.pop_lru();
            }
            attempt.doubted_before = keys.marks.contains(&id);
            keys.next_attempt += 1;
            attempt.number = keys.next_attempt;
            if let Some((other, _)) = keys.marks.push(id, (attempt.number, Instant::now())) {
                if other != id {
                    evicted.inc();
                }
            }
        });
        attempt
    }

    /// The attempt certainly never reached the home (connection refused): its own mark goes,
    /// unless an earlier attempt had left the key in doubt or a later one has marked it since.
    pub fn not_sent(&self, attempt: Attempt) {
        if attempt.doubted_before {
            return;
        }
        self.update(|keys, _, _| {
            if keys
                .marks
                .peek(&attempt.id)
                .is_some_and(|(number, _)| *number == attempt.number)
            {
                keys.marks.pop(&attempt.id);
            }
        });
    }

    /// The home answered `id` with success: it holds a durable answer and replays it.
    pub fn settle(&self, id: u128) {
        self.update(|keys, _, _| {
            keys.marks.pop(&id);
        });
    }

    /// Whether an earlier forward of `id` may still be applied by the home.
    pub fn contains(&self, id: u128) -> bool {
        let mut found = true;
        self.update(|keys, ttl, _| {
            found = match keys.marks.peek(&id) {
                Some((_, since)) if since.elapsed() < ttl => true,
                Some(_) => {
                    keys.marks.pop(&id);
                    false
                }
                None => false,
            };
        });
        found
    }

    fn update(&self, change: impl FnOnce(&mut Keys, Duration, &IntCounter)) {
        if let Ok(mut keys) = self.keys.lock() {
            change(&mut keys, self.ttl, &self.evicted);
            self.gauge.set(keys.marks.len() as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_doubt(ttl_ms: u64) -> (InDoubt, IntGauge) {
        let gauge = IntGauge::new("in_doubt", "test").expect("gauge");
        let evicted = IntCounter::new("evicted", "test").expect("counter");
        let set = InDoubt::new(Duration::from_millis(ttl_ms), gauge.clone(), evicted);
        (set, gauge)
    }

    #[test]
    fn keys_stay_in_doubt_until_settled_or_lapsed() {
        let (set, gauge) = in_doubt(50);
        let _ = set.begin(1);
        let _ = set.begin(2);
        assert!(set.contains(1) && set.contains(2) && !set.contains(3));
        assert_eq!(gauge.get(), 2);
        set.settle(1);
        assert!(!set.contains(1));
        assert_eq!(gauge.get(), 1);
        std::thread::sleep(Duration::from_millis(60));
        assert!(!set.contains(2));
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn an_attempt_not_sent_clears_only_its_own_mark() {
        let (set, _) = in_doubt(60_000);
        // Alone: refused, so nothing is in doubt.
        let alone = set.begin(1);
        set.not_sent(alone);
        assert!(!set.contains(1));
        // After an attempt whose outcome is unknown: the key stays in doubt.
        let _unknown = set.begin(2);
        let retry = set.begin(2);
        set.not_sent(retry);
        assert!(set.contains(2));
        // Two at once: the one refused must not clear the one that went out.
        let first = set.begin(3);
        let _sent = set.begin(3);
        set.not_sent(first);
        assert!(set.contains(3));
    }
}
