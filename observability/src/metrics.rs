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

/// Latency buckets in seconds, from 50 µs to 10 s: fine-grained where the targets are (ms).
pub fn latency_buckets() -> Vec<f64> {
    vec![
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
        1.0, 2.5, 10.0,
    ]
}
