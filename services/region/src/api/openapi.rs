//! The OpenAPI document of every public route, generated from the handlers' annotations.

use super::{buckets, error, kv, ops};
use actix_web::{web, HttpResponse};
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Meridian",
        description = "Multi-region replicated key-value store"
    ),
    paths(
        buckets::put,
        buckets::list,
        buckets::get,
        kv::put,
        kv::get,
        kv::delete,
        kv::increment,
        kv::add,
        kv::remove,
        kv::list,
        ops::healthz,
        ops::readyz,
        ops::metrics,
        ops::cluster,
        serve,
    ),
    components(schemas(error::ErrorBody, error::ErrorDetail))
)]
struct ApiDoc;

/// The OpenAPI 3 document as JSON.
pub fn document() -> String {
    ApiDoc::openapi()
        .to_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// This document, rendered once at start.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "the OpenAPI 3 document of every public route", content_type = "application/json")))]
pub async fn serve(doc: web::Data<String>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(doc.as_str().to_owned())
}
