//! Account, hardware and the webhook signing secret.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
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
