//! The bench's results: computed once from the merged stats, printed as text or JSON.

use super::stats::BenchStats;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// Everything the bench reports; field names are the JSON output's keys.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BenchReport {
    /// `put`, `get` or `mixed`.
    pub workload: String,
    /// Number of workers (connections).
    pub concurrency: u32,
    /// Tokio worker threads.
    pub threads: u16,
    /// Base URLs loaded, round-robin by worker.
    pub targets: Vec<String>,
    /// Bytes per PUT body.
    pub value_size: u32,
    /// Size of the key space.
    pub keys: u64,
    /// Whether 90% of operations went to 1% of keys.
    pub hot: bool,
    /// Keys written before the run for GETs to read (GETs read only these); null for `put`.
    pub preloaded_keys: Option<u64>,
    /// Warmup before measuring, in seconds.
    pub warmup_s: f64,
    /// Measured time, in seconds: from the end of warmup to the last counted answer (paced
    /// runs: the configured duration).
    pub duration_s: f64,
    /// Requests per second sent on a fixed schedule (`--rate`); null for a closed loop.
    pub rate_per_sec: Option<u64>,
    /// Successful (2xx) operations in the measured time.
    pub ops: u64,
    /// Successful operations per second.
    pub ops_per_sec: f64,
    /// All errors: non-2xx answers, connection errors and timeouts.
    pub errors: u64,
    /// Non-2xx answers by status code.
    pub http_errors: BTreeMap<String, u64>,
    /// Failed connects and broken connections.
    pub connection_errors: u64,
    /// Requests unanswered at the deadline.
    pub timeouts: u64,
    /// The first error seen, to say what went wrong.
    pub first_error: Option<String>,
    /// Mean latency of successful operations, in milliseconds.
    pub mean_ms: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 90th percentile latency, ms.
    pub p90_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// 99.9th percentile latency, ms.
    pub p999_ms: f64,
    /// Highest latency, ms.
    pub max_ms: f64,
}

/// The run's shape, as configured.
#[derive(Debug, Clone)]
pub struct RunShape {
    /// `put`, `get` or `mixed`.
    pub workload: &'static str,
    /// Number of workers.
    pub concurrency: u32,
    /// Tokio worker threads.
    pub threads: u16,
    /// Base URLs.
    pub targets: Vec<String>,
    /// Bytes per PUT body.
    pub value_size: u32,
    /// Key space size.
    pub keys: u64,
    /// `--hot`.
    pub hot: bool,
    /// Keys preloaded for GETs.
    pub preloaded_keys: Option<u64>,
    /// Configured warmup.
    pub warmup: Duration,
    /// Configured measured duration, used when no operation finished.
    pub duration: Duration,
    /// `--rate`.
    pub rate: Option<u64>,
}

impl BenchReport {
    /// Builds the report from the merged stats and the measured time.
    pub fn new(shape: &RunShape, stats: &BenchStats, measured: Option<Duration>) -> Self {
        let elapsed = measured
            .filter(|d| !d.is_zero())
            .unwrap_or(shape.duration)
            .as_secs_f64();
        let ops = stats.ops();
        let quantile_ms = |q: f64| micros_to_ms(stats.latency_us.value_at_quantile(q));
        let (mean_ms, p50_ms, p90_ms, p99_ms, p999_ms, max_ms) = if ops == 0 {
            (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        } else {
            (
                round(stats.latency_us.mean() / 1000.0, 3),
                quantile_ms(0.50),
                quantile_ms(0.90),
                quantile_ms(0.99),
                quantile_ms(0.999),
                micros_to_ms(stats.latency_us.max()),
            )
        };
        BenchReport {
            workload: shape.workload.to_owned(),
            concurrency: shape.concurrency,
            threads: shape.threads,
            targets: shape.targets.clone(),
            value_size: shape.value_size,
            keys: shape.keys,
            hot: shape.hot,
            preloaded_keys: shape.preloaded_keys,
            warmup_s: round(shape.warmup.as_secs_f64(), 3),
            duration_s: round(elapsed, 3),
            rate_per_sec: shape.rate,
            ops,
            ops_per_sec: if elapsed > 0.0 {
                round(ops as f64 / elapsed, 1)
            } else {
                0.0
            },
            errors: stats.errors(),
            http_errors: stats
                .http_errors
                .iter()
                .map(|(status, count)| (status.to_string(), *count))
                .collect(),
            connection_errors: stats.connection_errors,
            timeouts: stats.timeouts,
            first_error: stats.first_error.clone(),
            mean_ms,
            p50_ms,
            p90_ms,
            p99_ms,
            p999_ms,
            max_ms,
        }
    }

    /// The human-readable report.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let keys = if self.hot {
            format!("{} keys, 90% on the hottest 1%", self.keys)
        } else {
            format!("{} keys, uniform", self.keys)
        };
        out.push_str(&format!(
            "workload:     {} ({keys}, {} B values)\n",
            self.workload, self.value_size
        ));
        if let Some(preloaded) = self.preloaded_keys {
            out.push_str(&format!(
                "note:         GETs read only the {preloaded} preloaded keys k0..k{}\n",
                preloaded.saturating_sub(1)
            ));
        }
        out.push_str(&format!(
            "concurrency:  {} connections, {} thread{}, targets {}\n",
            self.concurrency,
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            self.targets.join(" ")
        ));
        out.push_str(&format!(
            "duration:     {:.3} s measured after {:.3} s warmup\n",
            self.duration_s, self.warmup_s
        ));
        if let Some(rate) = self.rate_per_sec {
            out.push_str(&format!(
                "schedule:     {rate} requests/s, open loop (a held-back request's latency counts from when it was due)\n"
            ));
        }
        out.push_str(&format!("total ops:    {}\n", self.ops));
        out.push_str(&format!("throughput:   {:.1} ops/s\n", self.ops_per_sec));
        out.push_str(&format!("errors:       {}", self.errors));
        if self.errors > 0 {
            let by_status: Vec<String> = self
                .http_errors
                .iter()
                .map(|(status, count)| format!("HTTP {status}: {count}"))
                .collect();
            let mut parts = by_status;
            parts.push(format!("connection: {}", self.connection_errors));
            parts.push(format!("timeouts: {}", self.timeouts));
            out.push_str(&format!(" ({})", parts.join(", ")));
        }
        out.push('\n');
        if let Some(first) = &self.first_error {
            out.push_str(&format!("first error:  {first}\n"));
        }
        out.push_str(&format!(
            "latency ms:   p50 {:.3}  p90 {:.3}  p99 {:.3}  p999 {:.3}  max {:.3}  (mean {:.3})\n",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms, self.mean_ms
        ));
        out
    }
}

fn micros_to_ms(micros: u64) -> f64 {
    round(micros as f64 / 1000.0, 3)
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn shape() -> RunShape {
        RunShape {
            workload: "get",
            concurrency: 4,
            threads: 1,
            targets: vec!["http://127.0.0.1:7001/".into()],
            value_size: 100,
            keys: 100_000,
            hot: false,
            preloaded_keys: Some(10_000),
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(2),
            rate: None,
        }
    }

    #[test]
    fn report_computes_rate_and_quantiles() {
        let mut stats = BenchStats::new();
        let now = Instant::now();
        for micros in 1..=1000u64 {
            stats.record_ok(Duration::from_micros(micros * 10), now);
        }
        stats.record_http_error(503, now, || "x: unavailable: busy (HTTP 503)".into());
        let report = BenchReport::new(&shape(), &stats, Some(Duration::from_millis(500)));
        assert_eq!(report.ops, 1000);
        assert_eq!(report.ops_per_sec, 2000.0);
        assert_eq!(report.errors, 1);
        assert_eq!(report.http_errors.get("503"), Some(&1));
        assert!((report.p50_ms - 5.0).abs() < 0.01, "{}", report.p50_ms);
        assert!((report.p99_ms - 9.9).abs() < 0.01, "{}", report.p99_ms);
        assert!((report.max_ms - 10.0).abs() < 0.01, "{}", report.max_ms);

        let text = report.render_text();
        assert!(text.contains("throughput:   2000.0 ops/s"), "{text}");
        assert!(text.contains("errors:       1 (HTTP 503: 1, connection: 0, timeouts: 0)"));
        assert!(text.contains("GETs read only the 10000 preloaded keys k0..k9999"));
        assert!(text.contains("p50 5.00"), "{text}");

        let json = serde_json::to_value(&report).expect("serializes");
        for field in [
            "ops_per_sec",
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "p999_ms",
            "max_ms",
            "errors",
        ] {
            assert!(json.get(field).is_some_and(|v| v.is_number()), "{field}");
        }
    }

    #[test]
    fn a_paced_run_says_so() {
        let closed = BenchReport::new(&shape(), &BenchStats::new(), None);
        assert!(!closed.render_text().contains("schedule:"));
        let json = serde_json::to_value(&closed).expect("serializes");
        assert!(json["rate_per_sec"].is_null());

        let paced = RunShape {
            rate: Some(500),
            ..shape()
        };
        let report = BenchReport::new(&paced, &BenchStats::new(), None);
        let text = report.render_text();
        assert!(
            text.contains("schedule:     500 requests/s, open loop"),
            "{text}"
        );
        let json = serde_json::to_value(&report).expect("serializes");
        assert_eq!(json["rate_per_sec"], 500);
    }

    #[test]
    fn an_empty_run_reports_zeros() {
        let report = BenchReport::new(&shape(), &BenchStats::new(), None);
        assert_eq!(report.ops, 0);
        assert_eq!(report.ops_per_sec, 0.0);
        assert_eq!(report.duration_s, 2.0);
        assert_eq!(report.p99_ms, 0.0);
    }
}
