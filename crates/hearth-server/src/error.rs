//! API errors as RFC 7807 problem documents, the shape both Replicate clients read.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hearth_runtime::RuntimeError;

/// One invalid part of a request: where (`["input", "max_tokens"]`, `["id"]`) and
/// why. Cog's 422 is a list of these; Replicate's joins them into its `detail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub loc: Vec<String>,
    pub msg: String,
}

impl FieldError {
    pub fn new(loc: &[&str], msg: impl Into<String>) -> Self {
        Self {
            loc: loc.iter().map(|s| s.to_string()).collect(),
            msg: msg.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{detail}")]
    Problem {
        status: StatusCode,
        title: &'static str,
        detail: String,
        retry_after: Option<u64>,
        /// For a 422: every invalid field, so each API can render them its way.
        fields: Vec<FieldError>,
    },
}

impl ApiError {
    pub fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        ApiError::Problem {
            status,
            title,
            detail: detail.into(),
            retry_after: None,
            fields: Vec::new(),
        }
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "Not found", detail)
    }
    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Input validation failed",
            detail,
        )
    }
    /// A 422 naming each invalid field; the detail lists them as `input.a: why; ...`.
    pub fn invalid_fields(fields: Vec<FieldError>) -> Self {
        let detail = fields
            .iter()
            .map(|f| format!("{}: {}", f.loc.join("."), f.msg))
            .collect::<Vec<_>>()
            .join("; ");
        match Self::invalid(detail) {
            ApiError::Problem {
                status,
                title,
                detail,
                retry_after,
                ..
            } => ApiError::Problem {
                status,
                title,
                detail,
                retry_after,
                fields,
            },
        }
    }
    /// A 422 about one field at `loc`.
    pub fn invalid_at(loc: &[&str], msg: impl Into<String>) -> Self {
        Self::invalid_fields(vec![FieldError::new(loc, msg)])
    }
    /// The invalid fields of a 422 (empty for other errors).
    pub fn fields(&self) -> &[FieldError] {
        match self {
            ApiError::Problem { fields, .. } => fields,
        }
    }
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "Bad request", detail)
    }
    pub fn unauthenticated() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "Unauthenticated",
            "You did not pass a valid authentication token",
        )
    }
    pub fn throttled(retry_after: u64) -> Self {
        ApiError::Problem {
            status: StatusCode::TOO_MANY_REQUESTS,
            title: "Request was throttled",
            detail: format!("Request was throttled. Your rate limit resets in ~{retry_after}s."),
            retry_after: Some(retry_after),
            fields: Vec::new(),
        }
    }
    /// A fault of the server's own: the detail goes to the log under a reference,
    /// the client gets the reference alone (no database or file system text).
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        let reference = crate::record::new_id();
        tracing::error!(%reference, error = %detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal server error",
            format!(
                "The server hit an internal error (reference {reference}); its log has the details."
            ),
        )
    }
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "Conflict", detail)
    }
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service unavailable",
            detail,
        )
    }
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Problem { status, .. } => *status,
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        match &e {
            crate::store::StoreError::Exists(id) => {
                ApiError::conflict(format!("id: a prediction with id {id} already exists"))
            }
            _ => ApiError::internal(e),
        }
    }
}

impl From<RuntimeError> for ApiError {
    fn from(e: RuntimeError) -> Self {
        match &e {
            RuntimeError::InvalidRequest { field, reason } => {
                ApiError::invalid_at(&["input", field], reason.clone())
            }
            RuntimeError::QueueFull(_) | RuntimeError::BackgroundQueueFull(_) => {
                ApiError::throttled(1)
            }
            RuntimeError::EngineStopped | RuntimeError::EngineDefunct(_) => {
                ApiError::unavailable(e.to_string())
            }
            _ => ApiError::internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let ApiError::Problem {
            status,
            title,
            detail,
            retry_after,
            ..
        } = self;
        let body = serde_json::json!({"title": title, "detail": detail, "status": status.as_u16()});
        let mut resp = (status, body.to_string()).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                h.insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}
