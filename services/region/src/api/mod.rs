//! The public REST API (API.md): routes, middleware and JSON errors.

pub mod anti_entropy;
pub mod buckets;
pub mod error;
pub mod extract;
pub mod forward;
pub mod in_doubt;
pub mod internal;
pub mod kv;
pub mod openapi;
pub mod ops;
pub mod trace;

use crate::region::Region;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, StatusCode};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, HttpResponse, ResponseError};
use error::ApiError;
use std::sync::Arc;
use std::time::Instant;

/// Registers every route on an actix app.
pub fn configure(cfg: &mut web::ServiceConfig, openapi: Arc<String>, max_batch_bytes: usize) {
    let not_allowed = |allow: &'static str| web::to(move || method_not_allowed(allow));
    internal::configure(cfg, max_batch_bytes);
    cfg.service(
        web::scope("/v1")
            .wrap(from_fn(require_client_token))
            // The hottest route first: resources are tried in order, a regex each.
            .service(
                web::resource("/kv/{bucket}/{key}")
                    .route(web::get().to(kv::get))
                    .route(web::put().to(kv::put))
                    .route(web::delete().to(kv::delete))
                    .default_service(not_allowed("GET, PUT, DELETE")),
            )
            .service(
                web::resource("/buckets")
                    .route(web::get().to(buckets::list))
                    .default_service(not_allowed("GET")),
            )
            .service(
                web::resource("/buckets/{bucket}")
                    .route(web::put().to(buckets::put))
                    .route(web::get().to(buckets::get))
                    .default_service(not_allowed("PUT, GET")),
            )
            .service(
                web::resource("/kv/{bucket}")
                    .route(web::get().to(kv::list))
                    .default_service(not_allowed("GET")),
            )
            .service(
                web::resource("/kv/{bucket}/{key}/increment")
                    .route(web::post().to(kv::increment))
                    .default_service(not_allowed("POST")),
            )
            .service(
                web::resource("/kv/{bucket}/{key}/add")
                    .route(web::post().to(kv::add))
                    .default_service(not_allowed("POST")),
            )
            .service(
                web::resource("/kv/{bucket}/{key}/remove")
                    .route(web::post().to(kv::remove))
                    .default_service(not_allowed("POST")),
            )
            .service(
                web::resource("/cluster")
                    .route(web::get().to(ops::cluster))
                    .default_service(not_allowed("GET")),
            ),
    )
    .service(
        web::resource("/healthz")
            .route(web::get().to(ops::healthz))
            .default_service(not_allowed("GET")),
    )
    .service(
        web::resource("/readyz")
            .route(web::get().to(ops::readyz))
            .default_service(not_allowed("GET")),
    )
    .service(
        web::resource("/metrics")
            .route(web::get().to(ops::metrics))
            .default_service(not_allowed("GET")),
    )
    .service(
        web::resource("/openapi.json")
            .app_data(web::Data::from(openapi))
            .route(web::get().to(openapi::serve))
            .default_service(not_allowed("GET")),
    );
}

/// JSON 404 for unknown routes (install with `App::default_service`).
pub async fn not_found() -> HttpResponse {
    ApiError::not_found("not_found", "no such route; see /openapi.json").error_response()
}

/// JSON 405 naming the methods the route takes (`allow`, as the `Allow` header lists them).
async fn method_not_allowed(allow: &'static str) -> HttpResponse {
    let mut response = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("this route takes {allow}; see /openapi.json"),
    )
    .error_response();
    response
        .headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    response
}

/// Refuses `/v1/*` without a configured client token (when any are configured).
async fn require_client_token(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    if let Some(region) = req.app_data::<web::Data<Region>>() {
        let tokens = &region.config.security.client_tokens;
        if !tokens.is_empty() {
            let presented = bearer_token(req.headers());
            if !presented.is_some_and(|p| tokens.iter().any(|t| constant_time_eq(t, p))) {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "send a valid token as 'Authorization: Bearer <token>'",
                )
                .into());
            }
        }
    }
    next.call(req).await
}

/// The token of an `Authorization: Bearer <token>` header (the scheme in any case, RFC 7235).
pub(crate) fn bearer_token(headers: &header::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

/// Compares secrets without leaking where they differ through timing.
pub(crate) fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The route pattern of a path, for metric labels: asking the router again per request
/// (`match_pattern`) costs a regex match; the API's shapes are few and fixed.
pub(crate) fn route_label(path: &str) -> &'static str {
    let mut segments = path.trim_start_matches('/').split('/');
    let parts: [Option<&str>; 6] = std::array::from_fn(|_| segments.next());
    match parts {
        [Some("v1"), Some("buckets"), None, ..] => "/v1/buckets",
        [Some("v1"), Some("buckets"), Some(_), None, ..] => "/v1/buckets/{bucket}",
        [Some("v1"), Some("kv"), Some(_), None, ..] => "/v1/kv/{bucket}",
        [Some("v1"), Some("kv"), Some(_), Some(_), None, ..] => "/v1/kv/{bucket}/{key}",
        [Some("v1"), Some("kv"), Some(_), Some(_), Some("increment"), None] => {
            "/v1/kv/{bucket}/{key}/increment"
        }
        [Some("v1"), Some("kv"), Some(_), Some(_), Some("add"), None] => {
            "/v1/kv/{bucket}/{key}/add"
        }
        [Some("v1"), Some("kv"), Some(_), Some(_), Some("remove"), None] => {
            "/v1/kv/{bucket}/{key}/remove"
        }
        [Some("v1"), Some("cluster"), None, ..] => "/v1/cluster",
        [Some("healthz"), None, ..] => "/healthz",
        [Some("readyz"), None, ..] => "/readyz",
        [Some("metrics"), None, ..] => "/metrics",
        [Some("openapi.json"), None, ..] => "/openapi.json",
        [Some("internal"), Some("v1"), Some("heartbeat"), None, ..] => "/internal/v1/heartbeat",
        [Some("internal"), Some("v1"), Some("replicate"), None, ..] => "/internal/v1/replicate",
        [Some("internal"), Some("v1"), Some("ae"), Some(step), None, ..] => match step {
            "top" => "/internal/v1/ae/top",
            "segments" => "/internal/v1/ae/segments",
            "digests" => "/internal/v1/ae/digests",
            "fetch" => "/internal/v1/ae/fetch",
            "push" => "/internal/v1/ae/push",
            _ => "unmatched",
        },
        _ => "unmatched",
    }
}

/// The method as a metric label: any method outside the standard ones is `other`, so a
/// client inventing methods cannot create series without bound.
fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Counts and times every request by method, route pattern and status.
pub async fn record_metrics(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let region = req.app_data::<web::Data<Region>>().cloned();
    let method = method_label(req.method());
    let route = route_label(req.path());
    let response = next.call(req).await;
    if let Some(region) = region {
        let status = match &response {
            Ok(r) => r.status(),
            Err(e) => e.as_response_error().status_code(),
        };
        let labels = [method, route, status.as_str()];
        region
            .metrics
            .http_requests
            .with_label_values(&labels)
            .inc();
        region
            .metrics
            .http_duration
            .with_label_values(&labels)
            .observe(started.elapsed().as_secs_f64());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::{method_label, route_label};

    #[test]
    fn method_labels_are_bounded() {
        use actix_web::http::Method;
        assert_eq!(method_label(&Method::PUT), "PUT");
        let invented = Method::from_bytes(b"FOO").expect("a valid token");
        assert_eq!(method_label(&invented), "other");
    }

    #[test]
    fn route_labels_name_the_pattern_not_the_path() {
        assert_eq!(route_label("/v1/kv/users/alice"), "/v1/kv/{bucket}/{key}");
        assert_eq!(
            route_label("/v1/kv/c/k/increment"),
            "/v1/kv/{bucket}/{key}/increment"
        );
        assert_eq!(route_label("/v1/kv/users"), "/v1/kv/{bucket}");
        assert_eq!(route_label("/v1/buckets"), "/v1/buckets");
        assert_eq!(route_label("/metrics"), "/metrics");
        assert_eq!(route_label("/v1/kv/a/b/c/d"), "unmatched");
        assert_eq!(route_label("/nope"), "unmatched");
    }
}
