//! Bucket routes: create (idempotently), list, get.

use super::error::ApiError;
use super::extract;
use crate::region::Region;
use crate::storage::{BucketOutcome, BucketSource};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use meridian_shared::{BucketDef, BucketType, RegionName};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Body of `PUT /v1/buckets/{bucket}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BucketSpec {
    /// `register`, `lww`, `counter` or `set`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Region that accepts every key's writes; omitted = rendezvous hashing per key.
    #[serde(default)]
    pub home_region: Option<String>,
}

/// A bucket as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct BucketInfo {
    /// Bucket name.
    pub name: String,
    /// CRDT type of its keys.
    #[serde(rename = "type")]
    pub kind: String,
    /// Fixed home region, or null.
    pub home_region: Option<String>,
}

/// Every bucket.
#[derive(Serialize, ToSchema)]
pub struct BucketList {
    /// Buckets sorted by name.
    pub buckets: Vec<BucketInfo>,
}

impl From<&BucketDef> for BucketInfo {
    fn from(def: &BucketDef) -> Self {
        Self {
            name: def.name.clone(),
            kind: def.kind.as_str().to_string(),
            home_region: def.home_region.as_ref().map(|r| r.to_string()),
        }
    }
}

/// Creates a bucket; an identical definition is fine, a different one is a conflict.
#[utoipa::path(put, operation_id = "put_bucket", path = "/v1/buckets/{bucket}", tag = "buckets",
    params(("bucket" = String, Path)), request_body = BucketSpec,
    responses((status = 201, body = BucketInfo, description = "created"),
              (status = 200, body = BucketInfo, description = "identical definition exists"),
              (status = 409, body = super::error::ErrorBody), (status = 422, body = super::error::ErrorBody)))]
pub async fn put(
    region: web::Data<Region>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let name = extract::name_at(&req, 3)?;
    let body = extract::read_body(&req, payload, region.config.max_body_bytes).await?;
    let spec: BucketSpec = extract::json(&body)?;
    let kind = BucketType::parse(&spec.kind).ok_or_else(|| {
        ApiError::invalid_body(format!(
            "unknown bucket type {:?}; expected register, lww, counter or set",
            spec.kind
        ))
    })?;
    let home_region = spec
        .home_region
        .map(|home| {
            RegionName::new(home.clone())
                .ok()
                .filter(|r| region.regions.contains(r))
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "unknown_region",
                        format!("home_region {home:?} is not a region of this cluster"),
                    )
                })
        })
        .transpose()?;
    let def = BucketDef {
        name,
        kind,
        home_region,
    };
    let ticket = region
        .storage
        .submit_bucket(def.clone(), BucketSource::Client)?;
    let outcome = ticket.await?;
    match outcome {
        BucketOutcome::Created => Ok(HttpResponse::Created().json(BucketInfo::from(&def))),
        BucketOutcome::Identical => Ok(HttpResponse::Ok().json(BucketInfo::from(&def))),
        BucketOutcome::Conflict(existing) | BucketOutcome::Resolved(existing) => {
            Err(ApiError::new(
                StatusCode::CONFLICT,
                "bucket_conflict",
                format!(
                    "bucket {:?} already exists as type {} with home region {}",
                    existing.name,
                    existing.kind,
                    existing
                        .home_region
                        .as_ref()
                        .map_or("(rendezvous)".to_string(), |r| r.to_string())
                ),
            ))
        }
    }
}

/// Lists every bucket.
#[utoipa::path(get, operation_id = "list_buckets", path = "/v1/buckets", tag = "buckets", responses((status = 200, body = BucketList)))]
pub async fn list(region: web::Data<Region>) -> HttpResponse {
    let buckets = region
        .storage
        .buckets()
        .iter()
        .map(BucketInfo::from)
        .collect();
    HttpResponse::Ok().json(BucketList { buckets })
}

/// One bucket's definition.
#[utoipa::path(get, operation_id = "get_bucket", path = "/v1/buckets/{bucket}", tag = "buckets", params(("bucket" = String, Path)),
    responses((status = 200, body = BucketInfo), (status = 404, body = super::error::ErrorBody)))]
pub async fn get(region: web::Data<Region>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let name = extract::name_at(&req, 3)?;
    let def = region.bucket(&name)?;
    Ok(HttpResponse::Ok().json(BucketInfo::from(&def)))
}
