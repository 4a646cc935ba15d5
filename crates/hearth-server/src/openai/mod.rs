//! OpenAI's Completions and Chat Completions over the same engines as Replicate's
//! API: request parsing and validation (`request.rs`), the choices' generation
//! (`choices.rs`) and the response shapes (`render.rs`). Requests are not stored as
//! predictions; they are timed into the same metrics.

pub mod choices;
pub mod constrained;
pub mod reasoning;
pub mod render;
pub mod request;
pub mod tools;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hearth_runtime::RuntimeError;
use serde_json::json;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct OaiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after: Option<u64>,
}

impl OaiError {
    /// A known field with a bad value: 400 naming it.
    pub fn param(param: impl Into<String>, message: impl Into<String>) -> Self {
        let param = param.into();
        Self {
            status: StatusCode::BAD_REQUEST,
            message: format!("{param}: {}", message.into()),
            kind: "invalid_request_error",
            param: Some(param),
            code: None,
            retry_after: None,
        }
    }

    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        Self {
            code: Some("unsupported_parameter"),
            ..Self::param(param, message)
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
            retry_after: None,
        }
    }

    pub fn internal(detail: impl std::fmt::Display) -> Self {
        let e = crate::error::ApiError::internal(detail);
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: e.to_string(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after: Some(1),
        }
    }

    /// An engine error, its field named as the API calls it (`prompt_name`: the
    /// request's prompt field, `messages` or `prompt`).
    pub fn from_runtime(e: RuntimeError, prompt_name: &str) -> Self {
        match e {
            RuntimeError::InvalidRequest { field, reason } => {
                let param = match field {
                    "prompt" => prompt_name,
                    // The runtime names it as Replicate's input does.
                    "stop_sequences" => "stop",
                    other => other,
                };
                Self::param(param, reason)
            }
            RuntimeError::QueueFull(n) => Self {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: format!(
                    "the server's waiting queue is full ({n} requests); retry shortly"
                ),
                kind: "rate_limit_error",
                param: None,
                code: Some("rate_limit_exceeded"),
                retry_after: Some(1),
            },
            RuntimeError::EngineStopped | RuntimeError::EngineDefunct(_) => {
                Self::unavailable(e.to_string())
            }
            RuntimeError::Template(m) => {
                Self::param(prompt_name, format!("the chat template failed: {m}"))
            }
            other => Self::internal(other),
        }
    }

    /// A client at `--max-queued-per-client`.
    pub fn rate_limited(message: String) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message,
            kind: "rate_limit_error",
            param: None,
            code: Some("rate_limit_exceeded"),
            retry_after: Some(1),
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for OaiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, self.body().to_string()).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

pub type OaiResult<T> = Result<T, OaiError>;
