//! What each worker counts while it runs; merged into one set after the run.

use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Highest latency the histogram tracks exactly (60 s, in microseconds); larger values saturate.
const MAX_TRACKED_MICROS: u64 = 60_000_000;

/// Counters and latencies of one worker (or, after [`BenchStats::merge`], of all of them).
#[derive(Debug, Clone)]
pub struct BenchStats {
    /// Latency of successful operations, in microseconds.
    pub latency_us: Histogram<u64>,
    /// Non-2xx responses by status code.
    pub http_errors: BTreeMap<u16, u64>,
    /// Failed connects and requests that broke the connection.
    pub connection_errors: u64,
    /// Requests still unanswered when the run's hard deadline passed.
    pub timeouts: u64,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
    /// When the last counted operation finished.
    pub last_done: Option<Instant>,
}

impl BenchStats {
    /// Empty stats.
    pub fn new() -> Self {
        // 3 significant digits over 1 µs..60 s: constant bounds that hdrhistogram accepts.
        let latency_us = Histogram::new_with_bounds(1, MAX_TRACKED_MICROS, 3)
            .expect("constant histogram bounds are valid");
        BenchStats {
            latency_us,
            http_errors: BTreeMap::new(),
            connection_errors: 0,
            timeouts: 0,
            first_error: None,
            last_done: None,
        }
    }

    /// Counts one successful operation that took `latency` and finished at `done`.
    pub fn record_ok(&mut self, latency: Duration, done: Instant) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.saturating_record(micros.max(1));
        self.last_done = self.last_done.max(Some(done));
    }

    /// Counts a non-2xx answer.
    pub fn record_http_error(
        &mut self,
        status: u16,
        done: Instant,
        describe: impl FnOnce() -> String,
    ) {
        *self.http_errors.entry(status).or_insert(0) += 1;
        self.last_done = self.last_done.max(Some(done));
        self.first_error.get_or_insert_with(describe);
    }

    /// Counts a connection failure.
    pub fn record_connection_error(&mut self, describe: impl FnOnce() -> String) {
        self.connection_errors += 1;
        self.first_error.get_or_insert_with(describe);
    }

    /// Counts a request that got no answer within the request timeout.
    pub fn record_timeout(&mut self, describe: impl FnOnce() -> String) {
        self.timeouts += 1;
        self.first_error.get_or_insert_with(describe);
    }

    /// Successful operations.
    pub fn ops(&self) -> u64 {
        self.latency_us.len()
    }

    /// Every kind of error added up.
    pub fn errors(&self) -> u64 {
        self.http_errors.values().sum::<u64>() + self.connection_errors + self.timeouts
    }

    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &BenchStats) {
        // Both histograms share bounds, so adding cannot fail; if it ever did, re-record the
        // values one by one (saturating) rather than lose operations.
        if self.latency_us.add(&other.latency_us).is_err() {
            for value in other.latency_us.iter_recorded() {
                self.latency_us
                    .saturating_record_n(value.value_iterated_to(), value.count_at_value());
            }
        }
        for (status, count) in &other.http_errors {
            *self.http_errors.entry(*status).or_insert(0) += count;
        }
        self.connection_errors += other.connection_errors;
        self.timeouts += other.timeouts;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        self.last_done = self.last_done.max(other.last_done);
    }
}

impl Default for BenchStats {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_everything() {
        let now = Instant::now();
        let mut a = BenchStats::new();
        a.record_ok(Duration::from_micros(100), now);
        a.record_http_error(503, now, || "503 unavailable".into());
        let mut b = BenchStats::new();
        b.record_ok(Duration::from_millis(2), now + Duration::from_secs(1));
        b.record_ok(Duration::ZERO, now);
        b.record_http_error(503, now, || "later".into());
        b.record_http_error(404, now, || "later".into());
        b.record_connection_error(|| "refused".into());
        b.timeouts = 1;
        a.merge(&b);
        assert_eq!(a.ops(), 3);
        assert_eq!(a.http_errors.get(&503), Some(&2));
        assert_eq!(a.http_errors.get(&404), Some(&1));
        assert_eq!(a.errors(), 5);
        assert_eq!(a.first_error.as_deref(), Some("503 unavailable"));
        assert_eq!(a.last_done, Some(now + Duration::from_secs(1)));
        assert!(a.latency_us.max() >= 1_999);
        assert_eq!(a.latency_us.min(), 1);
    }
}
