//! Hybrid logical clock for last-writer-wins registers.
//!
//! A timestamp is `physical_ms << 16 | logical`: it follows wall-clock time when clocks agree
//! and stays monotonic (and ahead of everything observed) when they do not.

use std::sync::atomic::{AtomicU64, Ordering};

const LOGICAL_BITS: u32 = 16;

/// A hybrid logical clock shared by every writer in a region.
#[derive(Debug, Default)]
pub struct Hlc {
    last: AtomicU64,
}

impl Hlc {
    /// A clock that has observed nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next timestamp, strictly greater than every one returned or observed before.
    pub fn tick(&self, now_ms: u64) -> u64 {
        let physical = now_ms << LOGICAL_BITS;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = physical.max(last + 1);
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Moves the clock past a timestamp seen in a remote state.
    pub fn observe(&self, remote: u64) {
        self.last.fetch_max(remote, Ordering::AcqRel);
    }

    /// Wall-clock milliseconds of a timestamp.
    pub fn physical_ms(timestamp: u64) -> u64 {
        timestamp >> LOGICAL_BITS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_strictly_monotonic_even_when_time_stands_still() {
        let hlc = Hlc::new();
        let a = hlc.tick(1000);
        let b = hlc.tick(1000);
        let c = hlc.tick(999);
        assert!(a < b && b < c);
        assert_eq!(Hlc::physical_ms(a), 1000);
    }

    #[test]
    fn observing_a_future_timestamp_moves_the_clock_past_it() {
        let hlc = Hlc::new();
        let remote = 5000 << LOGICAL_BITS;
        hlc.observe(remote);
        assert!(hlc.tick(1000) > remote);
    }
}
