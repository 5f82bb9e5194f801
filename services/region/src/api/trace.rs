//! The root span of every traced request: continues the caller's W3C `traceparent`.

use super::route_label;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use meridian_observability::telemetry;
use tracing::field::Empty;
use tracing::Span;
use tracing_actix_web::RootSpanBuilder;

/// A lean server span per request (the route label comes from the path's shape, not from
/// re-running the router). Probes, scrapes and heartbeats are not traced: they would bury
/// every trace worth reading under thousands that are not.
pub struct RegionRootSpan;

impl RootSpanBuilder for RegionRootSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let route = route_label(request.path());
        if matches!(
            route,
            "/healthz" | "/readyz" | "/metrics" | "/internal/v1/heartbeat"
        ) {
            return Span::none();
        }
        let parent = request
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok());
        // Decided once, here: follow the caller; start new traces only for client requests.
        let sampled = match parent {
            Some(parent) => telemetry::traceparent_sampled(parent),
            None => route.starts_with("/v1/") && telemetry::sample_new_trace(),
        };
        if !sampled {
            // No span at all: creating and formatting one per request cost more CPU than
            // anything else in the request path, for a span nobody would see.
            return Span::none();
        }
        let span = tracing::info_span!(
            "request",
            "otel.name" = route,
            "otel.kind" = "server",
            "otel.status_code" = Empty,
            "http.request.method" = %request.method(),
            "http.route" = route,
            "http.response.status_code" = Empty,
            trace_id = Empty,
        );
        if let Some(parent) = parent {
            meridian_observability::propagation::set_parent(&span, parent);
        }
        // Sampled requests only (cheap enough at the sampling ratio): JSON log lines find
        // their trace through this field.
        if let Some(trace_id) = meridian_observability::propagation::trace_id(&span) {
            span.record("trace_id", trace_id.as_str());
        }
        span
    }

    fn on_request_end<B: MessageBody>(
        span: Span,
        outcome: &Result<ServiceResponse<B>, actix_web::Error>,
    ) {
        let status = match outcome {
            Ok(response) => response.status(),
            Err(error) => error.as_response_error().status_code(),
        };
        span.record("http.response.status_code", status.as_u16());
        if status.is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
        let error = match outcome {
            Ok(response) => response.response().error(),
            Err(error) => Some(error),
        };
        let Some(error) = error else { return };
        // A failure of the region itself is worth a line; refusals of bad or unlucky
        // requests (404s, 503 with Retry-After, 504) are the client's to handle and are
        // counted in the request metrics, so one line each would only bury the log.
        let ours = status.is_server_error() && !matches!(status.as_u16(), 503 | 504);
        if ours {
            tracing::error!(status = status.as_u16(), %error, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), %error, "request refused");
        }
    }
}
