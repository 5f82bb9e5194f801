//! The root span of every traced request: continues the caller's W3C `traceparent`.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use tracing::Span;
use tracing_actix_web::{root_span, DefaultRootSpanBuilder, RootSpanBuilder};

/// Like the default root span, but probes, scrapes and heartbeats are not traced: they would
/// bury every trace worth reading under thousands that are not.
pub struct RegionRootSpan;

impl RootSpanBuilder for RegionRootSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        match request.path() {
            "/healthz" | "/readyz" | "/metrics" | "/internal/v1/heartbeat" => Span::none(),
            _ => root_span!(request),
        }
    }

    fn on_request_end<B: MessageBody>(
        span: Span,
        outcome: &Result<ServiceResponse<B>, actix_web::Error>,
    ) {
        DefaultRootSpanBuilder::on_request_end(span, outcome);
    }
}
