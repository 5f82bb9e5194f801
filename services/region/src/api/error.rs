//! API errors: every failure is `{"error": {"code", "message"}}` with a fitting status.

use crate::actors::partition::WriteError;
use crate::storage::StorageError;
use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use meridian_shared::wire::NOT_APPLIED_HEADER;
use meridian_shared::StateError;
use serde::Serialize;
use std::fmt;

/// A client-facing error with a stable, greppable code.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable snake_case code (README lists them).
    pub code: &'static str,
    /// Human sentence.
    pub message: String,
    /// Seconds for `Retry-After` (429/503).
    pub retry_after: Option<u32>,
    /// The request certainly applied nothing (said in a header, for forwarders).
    pub not_applied: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    /// An error with the given status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            not_applied: false,
        }
    }

    /// Marks the error as refused before anything was applied.
    pub fn nothing_applied(mut self) -> Self {
        self.not_applied = true;
        self
    }

    /// 400 with a code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 422 `invalid_body`: well-formed JSON of the wrong shape.
    pub fn invalid_body(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", message)
    }

    /// 404 with a code.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 503 `unavailable` with `Retry-After`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
    }

    /// The JSON body: `{"error": {"code", "message"}}`.
    pub fn body(&self) -> Vec<u8> {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
            },
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// 404 `bucket_not_found`.
    pub fn no_bucket(bucket: &str) -> Self {
        Self::not_found(
            "bucket_not_found",
            format!("bucket {bucket:?} does not exist"),
        )
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(seconds) = self.retry_after {
            response.insert_header((header::RETRY_AFTER, seconds.to_string()));
        }
        if self.not_applied {
            response.insert_header((NOT_APPLIED_HEADER, "true"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            // RFC 7235: a 401 names the scheme that would be accepted.
            response.insert_header((header::WWW_AUTHENTICATE, "Bearer realm=\"meridian\""));
        }
        response.content_type("application/json").body(self.body())
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::TypeMismatch { .. } => {
                Self::new(StatusCode::CONFLICT, "type_mismatch", e.to_string())
            }
            StateError::CounterOverflow { .. } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "counter_overflow",
                e.to_string(),
            ),
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Overloaded => {
                Self::unavailable("the region is at its write capacity; retry shortly")
            }
            StorageError::WriterGone => Self::unavailable("the region is shutting down"),
            other => {
                tracing::error!(error = %other, "storage failure");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "storage_failure",
                    "the region could not read or write its storage; the write was not applied",
                )
            }
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::State(e) => e.into(),
            WriteError::Storage(e) => e.into(),
            WriteError::IdempotencyConflict(message) => {
                Self::new(StatusCode::CONFLICT, "idempotency_conflict", message)
            }
            WriteError::StateTooLarge { .. } => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "state_too_large",
                e.to_string(),
            ),
            WriteError::Stopped => Self::unavailable("the region is shutting down"),
            WriteError::Late { late_ms } => Self::unavailable(format!(
                "this forwarded write reached its partition at the home {late_ms} ms after its \
                 deadline; nothing was applied"
            ))
            .nothing_applied(),
        }
    }
}
