//! Cog's container API on the same port, for callers that speak to a Cog model
//! directly: synchronous predictions by default, `Prefer: respond-async` for 202.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::models::COG_VERSION;
use super::predictions::{lookup, parse_create, start_prediction, wait_for};
use super::{base_url, json_response, parse_json_body, AppResult};
use crate::error::ApiError;
use crate::prediction::Record;
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
    let ApiError::Problem { detail, .. } = e;
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
    let status = if status == StatusCode::TOO_MANY_REQUESTS {
        StatusCode::CONFLICT
    } else {
        status
    };
    json_response(status, &json!({"detail": detail}))
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
        let req = parse_create(&v)?;
        let model = state
            .models
            .default_model()
            .cloned()
            .ok_or_else(|| ApiError::not_found("no model"))?;
        let id = id.or_else(|| v.get("id").and_then(|x| x.as_str()).map(str::to_string));
        start_prediction(&state, &model, req, base_url(&state, &headers), "cog", id).await
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
    match wait_for(&live, SYNC_LIMIT.as_secs()).await {
        Some(r) => json_response(StatusCode::OK, &cog_json(&r)),
        None => cog_error(ApiError::internal("prediction state lost")),
    }
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    run_cog(state, headers, body, None).await
}

/// Idempotent create: an id that exists answers with its state.
pub async fn put(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if id.is_empty()
        || id.len() > 128
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return cog_error(ApiError::invalid("id: 1-128 letters, digits, '-' or '_'"));
    }
    if let Ok(r) = lookup(&state, &id) {
        let code = if r.prediction.status.is_terminal() {
            StatusCode::OK
        } else {
            StatusCode::ACCEPTED
        };
        return json_response(code, &cog_json(&r));
    }
    run_cog(state, headers, body, Some(id)).await
}

pub async fn cancel(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match state.hub.get(&id) {
        Some(live) => {
            live.request_cancel();
            json_response(StatusCode::OK, &json!({}))
        }
        None => json_response(StatusCode::NOT_FOUND, &json!({})),
    }
}

pub async fn shutdown(State(state): State<Arc<AppState>>) -> Response {
    state.shutdown.notify_one();
    json_response(StatusCode::OK, &json!({}))
}
