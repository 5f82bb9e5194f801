//! Traces: `tracing` spans exported over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, plus logs on stderr.
//!
//! With no endpoint, or a collector that is down, the service runs normally and says so once.
//! The standard `OTEL_*` variables (sampler, batch sizes, headers) are read by the SDK.

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tracing_subscriber::filter::{DynFilterFn, EnvFilter};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Share of new traces sampled when `OTEL_TRACES_SAMPLER` is not set.
pub const DEFAULT_SAMPLE_RATIO: f64 = 0.01;
/// Name of a request's root span when its trace is sampled.
pub const SAMPLED_REQUEST: &str = "request";
/// Spans admitted as roots: sampled requests; commit and replication spans, which exist only
/// when they carry a sampled write; hint drains, anti-entropy exchanges, storage checkpoints,
/// tombstone GC rounds and bucket sweeps (background work worth a trace of its own; a
/// checkpoint pauses the writer).
const SAMPLED_ROOTS: [&str; 8] = [
    SAMPLED_REQUEST,
    "group_commit",
    "replicate_send",
    "hint_drain",
    "anti_entropy",
    "checkpoint",
    "tombstone_gc",
    "bucket_sweep",
];

/// Head-sampling ratio in millionths, set once by [`init`]; 0 when traces are not exported.
static SAMPLE_PER_MILLION: AtomicU64 = AtomicU64::new(0);

/// Whether traces are exported (and so whether any span can be sampled at all).
pub fn exporting() -> bool {
    SAMPLE_PER_MILLION.load(Ordering::Relaxed) > 0
}

/// Whether a new trace (a request without `traceparent`) should be sampled.
pub fn sample_new_trace() -> bool {
    let ratio = SAMPLE_PER_MILLION.load(Ordering::Relaxed);
    ratio > 0 && (ratio >= 1_000_000 || next_random() % 1_000_000 < ratio)
}

/// Whether a caller's `traceparent` asks for its trace to be sampled (flags bit 0).
pub fn traceparent_sampled(traceparent: &str) -> bool {
    SAMPLE_PER_MILLION.load(Ordering::Relaxed) > 0
        && traceparent
            .rsplit('-')
            .next()
            .and_then(|flags| u8::from_str_radix(flags, 16).ok())
            .is_some_and(|flags| flags & 1 == 1)
}

/// The head-sampling ratio the standard `OTEL_TRACES_SAMPLER(_ARG)` variables ask for, and
/// what was wrong with them, if anything (then the default stands in, as the spec says).
fn sample_ratio(sampler: Option<&str>, arg: Option<&str>) -> (f64, Option<String>) {
    match sampler {
        None => (DEFAULT_SAMPLE_RATIO, None),
        Some("always_on" | "parentbased_always_on") => (1.0, None),
        Some("always_off" | "parentbased_always_off") => (0.0, None),
        Some("traceidratio" | "parentbased_traceidratio") => {
            match arg.map(|a| a.trim().parse::<f64>()) {
                None => (1.0, None),
                Some(Ok(ratio)) if (0.0..=1.0).contains(&ratio) => (ratio, None),
                _ => (
                    1.0,
                    Some(format!(
                        "OTEL_TRACES_SAMPLER_ARG={:?} is not a ratio in [0, 1]; sampling every \
                         new trace",
                        arg.unwrap_or_default()
                    )),
                ),
            }
        }
        Some(other) => (
            DEFAULT_SAMPLE_RATIO,
            Some(format!(
                "unknown OTEL_TRACES_SAMPLER={other:?} (known: always_on, always_off, \
                 traceidratio, their parentbased_ forms); sampling {}% of new traces",
                DEFAULT_SAMPLE_RATIO * 100.0
            )),
        ),
    }
}

/// The exporter reports a down collector on every failed export; say each such thing once.
fn once_for_exporter(meta: &tracing::Metadata<'_>) -> bool {
    static SEEN: Mutex<Vec<tracing::callsite::Identifier>> = Mutex::new(Vec::new());
    if !meta.is_event() || !meta.target().starts_with("opentelemetry") {
        return true;
    }
    let Ok(mut seen) = SEEN.lock() else {
        return true;
    };
    let callsite = meta.callsite();
    if seen.contains(&callsite) {
        return false;
    }
    seen.push(callsite);
    true
}

/// A cheap per-thread pseudo-random number (sampling needs spread, not secrecy).
fn next_random() -> u64 {
    thread_local!(static STATE: std::cell::Cell<u64> = std::cell::Cell::new(seed()));
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x
    })
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0x9e37_79b9_7f4a_7c15);
    hasher.finish() | 1
}

/// Flushes and shuts the exporter down when dropped (at the end of `main`).
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Targets kept out of the OpenTelemetry layer: the exporter's own HTTP stack would
/// otherwise trace itself.
fn exported(target: &str) -> bool {
    ![
        "hyper",
        "reqwest",
        "h2",
        "opentelemetry",
        "tower",
        "actix_server",
    ]
    .iter()
    .any(|prefix| target.starts_with(prefix))
}

/// Installs logging and, when configured, trace export for `service` (`meridian-<region>`).
pub fn init(
    service: &str,
    attributes: &[(&'static str, String)],
    default_filter: &str,
) -> TelemetryGuard {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // Said once logging runs.
    let mut warnings = Vec::new();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|error| {
        if std::env::var_os("RUST_LOG").is_some_and(|v| !v.is_empty()) {
            warnings.push(format!(
                "RUST_LOG is not a valid filter ({error}); logging with {default_filter:?}"
            ));
        }
        EnvFilter::new(default_filter)
    });
    let format = std::env::var("MERIDIAN_LOG_FORMAT").unwrap_or_default();
    let json = format.eq_ignore_ascii_case("json");
    if !json && !format.is_empty() && !format.eq_ignore_ascii_case("text") {
        warnings.push(format!(
            "MERIDIAN_LOG_FORMAT={format:?} is neither json nor text; logging as text"
        ));
    }
    let logs = if json {
        // The span list carries the request span's `trace_id` field into every JSON line.
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .with_filter(DynFilterFn::new(|meta, _| once_for_exporter(meta)))
            .boxed()
    } else {
        let format = TraceIds(tracing_subscriber::fmt::format());
        // Colour codes only for a terminal: formatting them for every span of every request
        // cost a few percent of a busy region's CPU, and they garble log files.
        tracing_subscriber::fmt::layer()
            .event_format(format)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .with_filter(DynFilterFn::new(|meta, _| once_for_exporter(meta)))
            .boxed()
    };

    let configured = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()));
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    let (provider, note) = match (configured, disabled) {
        (Some(endpoint), false) => match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => {
                let mut resource = vec![KeyValue::new("service.name", service.to_string())];
                resource.extend(attributes.iter().map(|(k, v)| KeyValue::new(*k, v.clone())));
                // Sampling is decided once, at the request root (see `sample_new_trace`), so
                // that unsampled requests never reach the layer; what reaches it is kept.
                // Empty is unset, as the OpenTelemetry spec reads it.
                let set = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
                let (sampler, arg) = (set("OTEL_TRACES_SAMPLER"), set("OTEL_TRACES_SAMPLER_ARG"));
                let (ratio, problem) = sample_ratio(sampler.as_deref(), arg.as_deref());
                warnings.extend(problem);
                let scheme = endpoint
                    .split_once("://")
                    .map(|(s, _)| s.to_ascii_lowercase());
                if !matches!(scheme.as_deref(), Some("http" | "https")) {
                    warnings.push(format!(
                        "the OTLP endpoint {endpoint:?} is not an http:// or https:// URL: \
                         exports will fail"
                    ));
                }
                SAMPLE_PER_MILLION.store((ratio * 1e6).round() as u64, Ordering::Relaxed);
                let provider = SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
                    .with_resource(Resource::builder().with_attributes(resource).build())
                    .build();
                let note = format!(
                    "exporting traces over OTLP/HTTP to {endpoint}, sampling {:.2}% of new traces",
                    ratio * 100.0
                );
                (Some(provider), note)
            }
            Err(error) => (None, format!("trace export disabled: {error}")),
        },
        (Some(_), true) => (None, "trace export disabled by OTEL_SDK_DISABLED".into()),
        (None, _) => (
            None,
            "traces are not exported (set OTEL_EXPORTER_OTLP_ENDPOINT)".into(),
        ),
    };
    let otel = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("meridian"))
            .with_filter(DynFilterFn::new(|meta, cx| {
                if !exported(meta.target()) {
                    return false;
                }
                // Sampled roots are created only when sampled; anything else only under one.
                (meta.is_span() && SAMPLED_ROOTS.contains(&meta.name()))
                    || cx.lookup_current().is_some()
            }))
    });
    // `try_init` fails only when a subscriber is already installed (tests start several).
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(otel)
        .try_init();
    tracing::info!("{note}");
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    TelemetryGuard { provider }
}

/// Prefixes a text log line with the trace and span id of the span it happened in, so a line
/// can be found from a trace in Jaeger and the other way round.
struct TraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for TraceIds<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        if let Some(span) = ctx.lookup_current() {
            let context = tracing::dispatcher::get_default(|dispatch| {
                tracing_opentelemetry::get_otel_context(&span.id(), dispatch)
            });
            if let Some(context) = context {
                let ids = context.span().span_context().clone();
                if ids.is_valid() {
                    write!(
                        writer,
                        "trace_id={} span_id={} ",
                        ids.trace_id(),
                        ids.span_id()
                    )?;
                }
            }
        }
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sampler_variables_are_read_and_a_bad_one_is_said() {
        let ratio = |sampler, arg| sample_ratio(sampler, arg);
        assert_eq!(ratio(None, None), (DEFAULT_SAMPLE_RATIO, None));
        assert_eq!(ratio(Some("always_on"), None), (1.0, None));
        assert_eq!(ratio(Some("parentbased_always_off"), None), (0.0, None));
        assert_eq!(ratio(Some("traceidratio"), Some("0.25")), (0.25, None));
        assert_eq!(ratio(Some("parentbased_traceidratio"), None), (1.0, None));
        for (sampler, arg) in [("traceidratio", Some("2")), ("traceidratio", Some("x"))] {
            let (_, problem) = ratio(Some(sampler), arg);
            assert!(problem.is_some(), "{sampler} {arg:?}");
        }
        let (unknown, problem) = ratio(Some("bogus"), None);
        assert_eq!(unknown, DEFAULT_SAMPLE_RATIO, "the default stands in");
        assert!(problem.is_some_and(|p| p.contains("bogus")));
    }
}
