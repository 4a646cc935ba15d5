//! Cog's container API on the same port, for callers that speak to a Cog model
//! directly: synchronous predictions by default, `Prefer: respond-async` for 202.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::models::COG_VERSION;
use super::{base_url, json_response, parse_json_body, AppResult};
use crate::error::ApiError;
use crate::prediction::Live;
use crate::record::Record;
use crate::service::{self, Origin};
use crate::AppState;

/// A sync prediction still waits for its end, but not forever.
const SYNC_LIMIT: Duration = Duration::from_secs(600);

fn cog_json(r: &Record) -> Value {
    let p = &r.prediction;
    json!({
        "id": p.id, "input": p.input, "output": p.output, "status": p.status.as_str(), "error": p.error,
        "logs": p.logs, "metrics": p.metrics, "created_at": p.created_at, "started_at": p.started_at,
        "completed_at": p.completed_at,
    })
}

/// Cog's validation errors: `{"detail": [{"loc": ["body", "input", FIELD], ...}]}`.
fn cog_error(e: ApiError) -> Response {
    let status = e.status();
    let ApiError::Problem { detail, title, .. } = e;
    if status == StatusCode::UNPROCESSABLE_ENTITY {
        let (field, msg) = match detail
            .strip_prefix("input.")
            .and_then(|d| d.split_once(": "))
        {
            Some((f, m)) => (f.to_string(), m.to_string()),
            None => ("input".to_string(), detail.clone()),
        };
        return json_response(
            status,
            &json!({"detail": [{"loc": ["body", "input", field], "msg": msg, "type": "value_error"}]}),
        );
    }
    // At capacity Cog answers 409.
    if status == StatusCode::TOO_MANY_REQUESTS {
        return json_response(StatusCode::CONFLICT, &json!({"detail": detail}));
    }
    // Anything else (a taken id, an internal error) as a problem document.
    ApiError::new(status, title, detail).into_response()
}

/// Cancels a sync prediction whose caller went away, unless disarmed: a client that
/// hangs up should not leave its generation running.
struct SyncGuard(Option<Arc<Live>>);

impl Drop for SyncGuard {
    fn drop(&mut self) {
        if let Some(live) = self.0.take() {
            if !live.is_terminal() {
                live.request_cancel();
            }
        }
    }
}

pub async fn index() -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "cog_version": COG_VERSION, "docs_url": "/docs", "openapi_url": "/openapi.json",
            "shutdown_url": "/shutdown", "healthcheck_url": "/health-check", "predictions_url": "/predictions",
            "predictions_idempotent_url": "/predictions/{prediction_id}",
            "predictions_cancel_url": "/predictions/{prediction_id}/cancel",
        }),
    )
}

pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let alive = state.models.all().iter().all(|m| m.engine.is_alive());
    let status = if !alive {
        "DEFUNCT"
    } else if state.hub.is_empty() {
        "READY"
    } else {
        "BUSY"
    };
    json_response(
        StatusCode::OK,
        &json!({"status": status, "setup": {"started_at": state.started_at, "completed_at": state.started_at, "status": "succeeded", "logs": ""}}),
    )
}

pub async fn openapi(State(state): State<Arc<AppState>>) -> AppResult<Response> {
    let m = state
        .models
        .default_model()
        .ok_or_else(|| ApiError::not_found("no model"))?;
    Ok(json_response(StatusCode::OK, &m.openapi_schema()))
}

fn respond_async(headers: &HeaderMap) -> bool {
    headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim() == "respond-async"))
}

async fn run_cog(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Bytes,
    id: Option<String>,
) -> Response {
    let result = async {
        let v = parse_json_body(&body)?;
        let req = service::parse_create(&v, false)?;
        let model = state
            .models
            .default_model()
            .cloned()
            .ok_or_else(|| ApiError::not_found("no model"))?;
        let id = match id {
            Some(id) => Some(id),
            None => match v.get("id") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(valid_id(s)?),
                Some(_) => return Err(ApiError::invalid("id: expected a string")),
            },
        };
        let origin = Origin {
            base_url: base_url(&state, &headers),
            source: "cog",
            id,
        };
        service::create(&state, &model, req, origin).await
    }
    .await;
    let live = match result {
        Ok(l) => l,
        Err(e) => return cog_error(e),
    };
    if respond_async(&headers) {
        return match live.snapshot() {
            Some(r) => json_response(StatusCode::ACCEPTED, &cog_json(&r)),
            None => cog_error(ApiError::internal("prediction state lost")),
        };
    }
    let mut guard = SyncGuard(Some(live.clone()));
    let answer = match service::wait_for(&live, SYNC_LIMIT.as_secs()).await {
        Some(r) => json_response(StatusCode::OK, &cog_json(&r)),
        None => cog_error(ApiError::internal("prediction state lost")),
    };
    guard.0 = None;
    answer
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    run_cog(state, headers, body, None).await
}

fn valid_id(id: &str) -> AppResult<String> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(ApiError::invalid("id: 1-128 letters, digits, '-' or '_'"));
    }
    Ok(id.to_string())
}

/// Create with the caller's id; an id that exists already is a 409, never replaced.
pub async fn put(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match valid_id(&id) {
        Ok(id) => run_cog(state, headers, body, Some(id)).await,
        Err(e) => cog_error(e),
    }
}

/// Cancels a prediction in flight here, or (with a shared store) on the replica that
/// runs it.
pub async fn cancel(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if let Some(live) = state.hub.get(&id) {
        live.request_cancel();
        return json_response(StatusCode::OK, &json!({}));
    }
    if state.store.is_shared() && matches!(state.store.request_cancel(&id).await, Ok(true)) {
        return json_response(StatusCode::OK, &json!({}));
    }
    json_response(StatusCode::NOT_FOUND, &json!({}))
}

pub async fn shutdown(State(state): State<Arc<AppState>>) -> Response {
    state.stop.cancel();
    json_response(StatusCode::OK, &json!({}))
}
