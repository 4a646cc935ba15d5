//! `/v1/files`: uploads kept under the data dir, as the Python client expects them
//! (`id, name, content_type, size, etag, checksums, metadata, created_at, urls`).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Multipart, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{base_url, json_response, AppResult};
use crate::error::ApiError;
use crate::AppState;

fn files_dir(state: &AppState) -> std::path::PathBuf {
    state.cfg.data_dir.join("files")
}

fn valid_id(id: &str) -> bool {
    id.len() == 26
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

fn meta_path(state: &AppState, id: &str) -> std::path::PathBuf {
    files_dir(state).join(format!("{id}.json"))
}

fn read_meta(state: &AppState, id: &str, base: &str) -> AppResult<Value> {
    if !valid_id(id) {
        return Err(ApiError::not_found(format!("file {id} not found")));
    }
    let text = std::fs::read_to_string(meta_path(state, id))
        .map_err(|_| ApiError::not_found(format!("file {id} not found")))?;
    let mut v: Value =
        serde_json::from_str(&text).map_err(|e| ApiError::internal(e.to_string()))?;
    v["urls"] = json!({"get": format!("{base}/v1/files/{id}/download")});
    Ok(v)
}

pub async fn upload(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    mut form: Multipart,
) -> AppResult<Response> {
    let mut content: Option<(String, String, Vec<u8>)> = None;
    let mut metadata = json!({});
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::bad_request(format!("multipart: {e}")))?
    {
        match field.name() {
            Some("content") => {
                let name = field.file_name().unwrap_or("file").to_string();
                let ct = field
                    .content_type()
                    .unwrap_or("application/octet-stream")
                    .to_string();
                let bytes = field
                    .bytes()
                    .await
                    .map_err(|e| ApiError::bad_request(format!("content: {e}")))?;
                content = Some((name, ct, bytes.to_vec()));
            }
            Some("metadata") => {
                let text = field
                    .text()
                    .await
                    .map_err(|e| ApiError::bad_request(format!("metadata: {e}")))?;
                metadata = serde_json::from_str(&text)
                    .map_err(|e| ApiError::invalid(format!("metadata: not JSON: {e}")))?;
            }
            _ => {}
        }
    }
    let (name, content_type, bytes) = content
        .ok_or_else(|| ApiError::invalid("content: a file part named `content` is required"))?;
    let id = crate::prediction::new_id();
    let sha = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    let meta = json!({
        "id": id, "name": name, "content_type": content_type, "size": bytes.len(),
        "etag": sha.clone(), "checksums": {"sha256": sha}, "metadata": metadata,
        "created_at": crate::prediction::now_rfc3339(),
        "expires_at": null,
    });
    let dir = files_dir(&state);
    std::fs::write(dir.join(&id), &bytes).map_err(|e| ApiError::internal(e.to_string()))?;
    std::fs::write(meta_path(&state, &id), meta.to_string())
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(json_response(
        StatusCode::CREATED,
        &read_meta(&state, &id, &base_url(&state, &headers))?,
    ))
}

pub async fn list(State(state): State<Arc<AppState>>, headers: HeaderMap) -> AppResult<Response> {
    let base = base_url(&state, &headers);
    let mut results = Vec::new();
    if let Ok(rd) = std::fs::read_dir(files_dir(&state)) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json") {
                if let Ok(v) = read_meta(&state, id, &base) {
                    results.push(v);
                }
            }
        }
    }
    results.sort_by(|a, b| b["created_at"].as_str().cmp(&a["created_at"].as_str()));
    Ok(json_response(
        StatusCode::OK,
        &json!({"next": null, "previous": null, "results": results}),
    ))
}

pub async fn get_one(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> AppResult<Response> {
    Ok(json_response(
        StatusCode::OK,
        &read_meta(&state, &id, &base_url(&state, &headers))?,
    ))
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> AppResult<Response> {
    read_meta(&state, &id, "")?;
    let _ = std::fs::remove_file(files_dir(&state).join(&id));
    let _ = std::fs::remove_file(meta_path(&state, &id));
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    Ok(r)
}

pub async fn download(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> AppResult<Response> {
    let meta = read_meta(&state, &id, "")?;
    let bytes = std::fs::read(files_dir(&state).join(&id))
        .map_err(|_| ApiError::not_found(format!("file {id} not found")))?;
    let mut r = Response::new(Body::from(bytes));
    if let Some(ct) = meta["content_type"]
        .as_str()
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        r.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    Ok(r)
}
