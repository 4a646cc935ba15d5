//! `/v1/models/...`: the served models and their versions.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::{base_url, json_response, AppResult};
use crate::error::ApiError;
use crate::models::ServedModel;
use crate::AppState;

pub const COG_VERSION: &str = "0.16.9";

pub fn version_json(m: &ServedModel, id: &str) -> Value {
    json!({"id": id, "created_at": m.created_at, "cog_version": COG_VERSION, "openapi_schema": m.openapi_schema()})
}

fn model_json(m: &ServedModel, base: &str) -> Value {
    json!({
        "url": format!("{base}/v1/models/{}/{}", m.owner, m.name),
        "owner": m.owner, "name": m.name, "description": m.description, "visibility": "public",
        "github_url": null, "paper_url": null, "license_url": null, "run_count": 0,
        "cover_image_url": null, "default_example": null,
        "latest_version": version_json(m, &m.version),
    })
}

fn find(state: &AppState, owner: &str, name: &str) -> AppResult<Arc<ServedModel>> {
    super::predictions::find_model(state, owner, name, "model")
}

pub async fn list(State(state): State<Arc<AppState>>, headers: HeaderMap) -> AppResult<Response> {
    let base = base_url(&state, &headers);
    let results: Vec<Value> = state
        .models
        .all()
        .iter()
        .map(|m| model_json(m, &base))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"next": null, "previous": null, "results": results}),
    ))
}

pub async fn get_one(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((owner, name)): Path<(String, String)>,
) -> AppResult<Response> {
    let m = find(&state, &owner, &name)?;
    Ok(json_response(
        StatusCode::OK,
        &model_json(&m, &base_url(&state, &headers)),
    ))
}

pub async fn versions(
    State(state): State<Arc<AppState>>,
    Path((owner, name)): Path<(String, String)>,
) -> AppResult<Response> {
    let m = find(&state, &owner, &name)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"next": null, "previous": null, "results": [version_json(&m, &m.version)]}),
    ))
}

pub async fn version(
    State(state): State<Arc<AppState>>,
    Path((owner, name, version)): Path<(String, String, String)>,
) -> AppResult<Response> {
    let m = find(&state, &owner, &name)?;
    if !m.has_version(&version) {
        return Err(ApiError::not_found(format!(
            "version {version} of {owner}/{name} not found"
        )));
    }
    Ok(json_response(StatusCode::OK, &version_json(&m, &version)))
}
