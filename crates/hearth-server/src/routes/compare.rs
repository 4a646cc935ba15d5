//! `GET /v1/hearth/compare`: the two sides of every canary and shadow route (token
//! only, like every route with data).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

use super::json_response;
use crate::AppState;

pub async fn compare(State(state): State<Arc<AppState>>) -> Response {
    let mut v = state.upstream.compare.snapshot();
    let limits = state.upstream.shadows.limits();
    v["shadow_limits"] = serde_json::json!({
        "max_concurrent_per_route": limits.max_concurrent,
        "max_per_minute_per_route": limits.max_per_minute,
    });
    json_response(StatusCode::OK, &v)
}
