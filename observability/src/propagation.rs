//! W3C trace-context propagation between regions: a span's context travels as `traceparent`
//! in HTTP headers and inside replication-log records.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::collections::HashMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A span made by `make` inside `parent`, or no span at all when `parent` is none (an
/// unsampled request): work nobody will see costs nothing.
pub fn child_span(parent: &tracing::Span, make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if parent.is_disabled() {
        tracing::Span::none()
    } else {
        parent.in_scope(make)
    }
}

/// Writes `span`'s context into HTTP headers (`traceparent`, `tracestate`).
pub fn inject(span: &tracing::Span, headers: &mut http::HeaderMap) {
    let context = span.context();
    TraceContextPropagator::new()
        .inject_context(&context, &mut opentelemetry_http::HeaderInjector(headers));
}

/// The hex trace id of `span`, if it is part of a valid trace.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let ids = context.span().span_context().clone();
    ids.is_valid().then(|| ids.trace_id().to_string())
}

/// `span`'s context as a `traceparent` value, if its trace is sampled (an unsampled trace
/// has nothing to continue, so nothing is carried).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    if !context.span().span_context().is_sampled() {
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

/// Makes `span` (one operation on behalf of many writes: a commit, a replication batch) a child
/// of the first trace and links it to up to `max_links` others, so every sampled write's trace
/// shows the operation that carried it.
pub fn continue_traces<'a>(
    span: &tracing::Span,
    mut traces: impl Iterator<Item = &'a str>,
    max_links: usize,
) {
    if let Some(first) = traces.next() {
        set_parent(span, first);
    }
    traces
        .take(max_links)
        .for_each(|trace| add_link(span, trace));
}

/// Links `span` to the context a `traceparent` value names.
pub fn add_link(span: &tracing::Span, traceparent: &str) {
    let context = span_context(traceparent);
    if context.is_valid() {
        span.add_link(context);
    }
}
