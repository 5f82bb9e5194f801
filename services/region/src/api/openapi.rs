//! The OpenAPI document of every public route, generated from the handlers' annotations.

use super::{buckets, error, kv, ops};
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
