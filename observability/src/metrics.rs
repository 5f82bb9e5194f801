//! Prometheus registry helpers: one registry per process, rendered as text at `/metrics`.

use prometheus::{Encoder, Registry, TextEncoder};

/// Renders every metric in `registry` in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    // Encoding into a Vec only fails on metric families that violate the format, which the
    // typed constructors in this codebase cannot build.
    let _ = TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

/// Latency buckets in seconds, from 50 µs to 10 s: fine-grained where the targets are (ms),
/// with bounds at exactly 1 ms and 5 ms so the share within a target is read, not estimated.
pub fn latency_buckets() -> Vec<f64> {
    vec![
        0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005,
        0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
    ]
}
