//! W3C trace-context propagation between regions: a span's context travels as `traceparent`
//! in HTTP headers and inside replication-log records.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::collections::HashMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Writes `span`'s context into HTTP headers (`traceparent`, `tracestate`).
pub fn inject(span: &tracing::Span, headers: &mut http::HeaderMap) {
    let context = span.context();
    TraceContextPropagator::new()
        .inject_context(&context, &mut opentelemetry_http::HeaderInjector(headers));
}

/// `span`'s context as a `traceparent` value, if it is being traced.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// The span context a `traceparent` value names (invalid if it does not parse).
pub fn span_context(traceparent: &str) -> opentelemetry::trace::SpanContext {
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    TraceContextPropagator::new()
        .extract(&carrier)
        .span()
        .span_context()
        .clone()
}

/// Makes `span` a child of the context a `traceparent` value names.
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let _ = span.set_parent(TraceContextPropagator::new().extract(&carrier));
}

/// Links `span` to the context a `traceparent` value names.
pub fn add_link(span: &tracing::Span, traceparent: &str) {
    let context = span_context(traceparent);
    if context.is_valid() {
        span.add_link(context);
    }
}
