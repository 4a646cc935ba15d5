//! `/v1/models/...`: the served models and their versions.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::{base_url, json_response, AppResult};
use crate::error::ApiError;
use crate::models::ServedModel;
use crate::AppState;

pub use crate::schema::COG_VERSION;

pub fn version_json(m: &ServedModel, id: &str) -> Value {
    json!({"id": id, "created_at": m.created_at, "cog_version": COG_VERSION, "openapi_schema": m.openapi_schema()})
}

/// One object both clients read at the same URL: Replicate's model fields and
/// OpenAI's (`id`, `object`, `created`, `owned_by`). Each client's parser takes its
/// own fields and ignores the rest (replicate 1.0.7's pydantic `Model`, openai's
/// `Model` with extra fields allowed); checked against both in CI. `hearth.chat`: the
/// model has a chat template of its own (a chat model; without one, chat requests
/// still run, through ChatML), which the console's chat view goes by. (A model that
/// runs upstream only gets `hearth.chat` by `upstream::chat_shape`'s rule.)
fn model_json(m: &ServedModel, base: &str) -> Value {
    let created = chrono::DateTime::parse_from_rfc3339(&m.created_at)
        .map(|t| t.timestamp())
        .unwrap_or(0);
    json!({
        "id": m.full_name(), "object": "model", "created": created, "owned_by": m.owner,
        "max_model_len": m.engine.limits().max_model_len,
        "url": format!("{base}/v1/models/{}/{}", m.owner, m.name),
        "owner": m.owner, "name": m.name, "description": m.description, "visibility": "public",
        "github_url": null, "paper_url": null, "license_url": null, "run_count": 0,
        "cover_image_url": null, "default_example": null,
        "latest_version": version_json(m, &m.version),
        "hearth": {"chat": m.engine.tokenizer().has_chat_template()},
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
    // Replicate's page (`results`, `next`) and OpenAI's list (`object`, `data`) at once.
    Ok(json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": results, "next": null, "previous": null, "results": results}),
    ))
}

/// `GET /v1/models/{id}`: OpenAI's retrieve, `id` being `owner/name` (sent as one
/// escaped segment), an alias, a version id or a bare name.
pub async fn get_by_id(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    match super::openai::find_model(&state, &id) {
        Some(m) => json_response(StatusCode::OK, &model_json(&m, &base_url(&state, &headers))),
        None => crate::openai::OaiError::model_not_found(&id).into_response(),
    }
}

/// For a model that runs upstream and is not served here: the upstream's document at
/// `path` (cached) and the model's route, its errors relayed with their status. None
/// for any other model.
async fn from_upstream(
    state: &AppState,
    owner: &str,
    name: &str,
    path: &str,
) -> Option<AppResult<(Value, String)>> {
    let full = format!("{owner}/{name}");
    if state.models.by_name(owner, name).is_some() {
        return None;
    }
    let route = state.upstream.route(&full)?;
    let up = route.upstream()?.to_string();
    let client = state.upstream.upstream(&up)?;
    Some(match state.upstream.models.get(client, &full, path).await {
        Ok(v) => Ok((v, route.describe())),
        Err(crate::upstream::client::CallError::Status { status, body }) if status < 500 => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::NOT_FOUND);
            let detail = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["detail"].as_str().map(str::to_string))
                .unwrap_or(body);
            Err(ApiError::new(code, "Upstream error", detail))
        }
        Err(e) => Err(ApiError::Problem {
            status: StatusCode::BAD_GATEWAY,
            title: "Upstream error",
            detail: format!("model {full} runs on upstream {up}, which did not answer: {e}"),
            retry_after: None,
            fields: Vec::new(),
        }),
    })
}

pub async fn get_one(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((owner, name)): Path<(String, String)>,
) -> AppResult<Response> {
    let path = format!("/v1/models/{owner}/{name}");
    if let Some(r) = from_upstream(&state, &owner, &name, &path).await {
        // The console's chat view goes by `hearth.chat` here as for local models.
        let (mut doc, route) = r?;
        crate::upstream::chat_shape::annotate(&mut doc, &route);
        return Ok(json_response(StatusCode::OK, &doc));
    }
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
    let path = format!("/v1/models/{owner}/{name}/versions");
    if let Some(r) = from_upstream(&state, &owner, &name, &path).await {
        return r.map(|(doc, _)| json_response(StatusCode::OK, &doc));
    }
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
    if !crate::upstream::normalize::valid_id(&version) {
        return Err(ApiError::not_found(format!(
            "version {version} of {owner}/{name} not found"
        )));
    }
    let path = format!("/v1/models/{owner}/{name}/versions/{version}");
    if let Some(r) = from_upstream(&state, &owner, &name, &path).await {
        return r.map(|(doc, _)| json_response(StatusCode::OK, &doc));
    }
    let m = find(&state, &owner, &name)?;
    if !m.has_version(&version) {
        return Err(ApiError::not_found(format!(
            "version {version} of {owner}/{name} not found"
        )));
    }
    Ok(json_response(StatusCode::OK, &version_json(&m, &version)))
}
