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
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Share of new traces sampled when `OTEL_TRACES_SAMPLER` is not set.
pub const DEFAULT_SAMPLE_RATIO: f64 = 0.01;

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
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("MERIDIAN_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let logs = if json {
        // The span list carries the request span's `trace_id` field into every JSON line.
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        let format = TraceIds(tracing_subscriber::fmt::format());
        tracing_subscriber::fmt::layer()
            .event_format(format)
            .with_writer(std::io::stderr)
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
                let mut builder = SdkTracerProvider::builder().with_batch_exporter(exporter);
                if std::env::var_os("OTEL_TRACES_SAMPLER").is_none() {
                    // Head sampling keeps tracing cheap under load; a caller's sampled
                    // traceparent is always honoured. OTEL_TRACES_SAMPLER overrides this.
                    builder = builder.with_sampler(Sampler::ParentBased(Box::new(
                        Sampler::TraceIdRatioBased(DEFAULT_SAMPLE_RATIO),
                    )));
                }
                let provider = builder
                    .with_resource(Resource::builder().with_attributes(resource).build())
                    .build();
                (
                    Some(provider),
                    format!("exporting traces over OTLP/HTTP to {endpoint}"),
                )
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
            .with_filter(filter_fn(|meta| exported(meta.target())))
    });
    // `try_init` fails only when a subscriber is already installed (tests start several).
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(otel)
        .try_init();
    tracing::info!("{note}");
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
