//! Account, hardware and the webhook signing secret.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{json_response, AppResult};
use crate::AppState;

pub async fn account() -> AppResult<Response> {
    Ok(json_response(
        StatusCode::OK,
        &json!({"type": "organization", "username": "hearth", "name": "hearth (self-hosted)", "github_url": null}),
    ))
}

pub async fn hardware() -> AppResult<Response> {
    Ok(json_response(
        StatusCode::OK,
        &json!([{"sku": "cpu", "name": "CPU"}, {"sku": "gpu-h100", "name": "Nvidia H100 GPU"}]),
    ))
}

pub async fn webhook_secret(State(state): State<Arc<AppState>>) -> AppResult<Response> {
    Ok(json_response(
        StatusCode::OK,
        &json!({"key": state.webhooks.secret}),
    ))
}

/// `GET /health` (vLLM's): 200 while every engine runs and the server takes work;
/// 503 while loading (the startup router answers), after a failed setup, with a
/// DEFUNCT engine (engine_watch.rs: the detail says why), or while shutting down. Cog's `/health-check` always answers 200 and puts
/// the state in the body, which an HTTP probe cannot read.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let alive = state.models.all().iter().all(|m| m.engine.is_alive());
    if alive && !state.is_draining() {
        let mut body = json!({"status": "ok"});
        // The front is healthy whatever its upstreams do; their circuits are detail.
        if !state.upstream.is_empty() {
            body["upstreams"] = state.upstream.health();
        }
        json_response(StatusCode::OK, &body)
    } else {
        let why = match crate::engine_watch::defunct_reason(&state) {
            Some(reason) => format!("DEFUNCT: {reason}; the server is exiting to be restarted"),
            None if !alive => "DEFUNCT: an engine has stopped".into(),
            None => "shutting down".into(),
        };
        crate::error::ApiError::unavailable(why).into_response()
    }
}
