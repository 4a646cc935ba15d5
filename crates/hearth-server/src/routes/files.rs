//! `/v1/files`: uploads kept by the store (the data dir with SQLite, the database with
//! PostgreSQL, so every replica serves every file), as the Python client expects them
//! (`id, name, content_type, size, etag, checksums, metadata, created_at, urls`).
//! Uploads stream to a temporary file under `--max-file-size`; downloads are served as
//! attachments that browsers will not sniff or render in the server's origin.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{base_url, json_response, AppResult};
use crate::error::ApiError;
use crate::record::{new_id, now_rfc3339};
use crate::AppState;

fn files_dir(state: &AppState) -> std::path::PathBuf {
    state.cfg.data_dir.join("files")
}

/// Uploads' temporary files (`.upload-*`) a stopped process left in `dir`: removed at
/// start. With a shared store several replicas may share the folder, so only those
/// untouched for an hour (an upload in progress writes to its file). Returns how many.
pub fn sweep_temp_files(dir: &std::path::Path, shared: bool) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let idle = std::time::Duration::from_secs(3600);
    let mut n = 0;
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with(".upload-") {
            continue;
        }
        let stale = !shared
            || e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > idle);
        if stale && std::fs::remove_file(e.path()).is_ok() {
            n += 1;
        }
    }
    n
}

async fn read_meta(state: &AppState, id: &str, base: &str) -> AppResult<Value> {
    let mut v = state
        .store
        .file_meta(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("file {id} not found")))?;
    v["urls"] = json!({"get": format!("{base}/v1/files/{id}/download")});
    Ok(v)
}

/// A partly written upload, removed unless kept.
struct TempFile(Option<std::path::PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

struct Upload {
    name: String,
    content_type: String,
    size: u64,
    sha256: String,
    temp: TempFile,
}

async fn receive(
    state: &AppState,
    mut field: axum::extract::multipart::Field<'_>,
) -> AppResult<Upload> {
    let name = field.file_name().unwrap_or("file").to_string();
    let content_type = field
        .content_type()
        .unwrap_or("application/octet-stream")
        .to_string();
    let path = files_dir(state).join(format!(".upload-{}", new_id()));
    let temp = TempFile(Some(path.clone()));
    let mut out = tokio::fs::File::create(&path)
        .await
        .map_err(ApiError::internal)?;
    let mut hash = Sha256::new();
    let mut size = 0u64;
    let limit = state.cfg.max_file_bytes;
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| ApiError::bad_request(format!("content: {e}")))?
    {
        size += chunk.len() as u64;
        if size > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request body too large",
                format!("content: the file is larger than the server's limit of {limit} bytes (--max-file-size)"),
            ));
        }
        hash.update(&chunk);
        out.write_all(&chunk).await.map_err(ApiError::internal)?;
    }
    out.flush().await.map_err(ApiError::internal)?;
    Ok(Upload {
        name,
        content_type,
        size,
        sha256: hash.finalize().iter().map(|b| format!("{b:02x}")).collect(),
        temp,
    })
}

/// The largest `metadata` part: it is parsed in memory.
pub const MAX_METADATA_BYTES: usize = 64 << 10;

/// Uploads listed a page at a time.
const PAGE_SIZE: usize = 100;

/// The `metadata` part, read a chunk at a time up to `MAX_METADATA_BYTES`.
async fn receive_metadata(mut field: axum::extract::multipart::Field<'_>) -> AppResult<Value> {
    let mut buf = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| ApiError::bad_request(format!("metadata: {e}")))?
    {
        if buf.len() + chunk.len() > MAX_METADATA_BYTES {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request body too large",
                format!("metadata: larger than {MAX_METADATA_BYTES} bytes"),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&buf).map_err(|e| ApiError::invalid(format!("metadata: not JSON: {e}")))
}

pub async fn upload(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    mut form: Multipart,
) -> AppResult<Response> {
    let mut content: Option<Upload> = None;
    let mut metadata = json!({});
    while let Some(field) = form.next_field().await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request body too large",
                format!("content: the upload is larger than the server's limit ({e})"),
            )
        } else {
            ApiError::bad_request(format!("multipart: {e}"))
        }
    })? {
        match field.name() {
            Some("content") => content = Some(receive(&state, field).await?),
            Some("metadata") => metadata = receive_metadata(field).await?,
            _ => {}
        }
    }
    let up = content
        .ok_or_else(|| ApiError::invalid("content: a file part named `content` is required"))?;
    let id = new_id();
    let meta = json!({
        "id": id, "name": up.name, "content_type": up.content_type, "size": up.size,
        "etag": up.sha256.clone(), "checksums": {"sha256": up.sha256}, "metadata": metadata,
        "created_at": now_rfc3339(),
        "expires_at": null,
    });
    if let Some(tmp) = up.temp.0.clone() {
        state.store.file_put(&meta, &tmp).await?;
    }
    Ok(json_response(
        StatusCode::CREATED,
        &read_meta(&state, &id, &base_url(&state, &headers)).await?,
    ))
}

#[derive(serde::Deserialize)]
pub struct ListQuery {
    cursor: Option<String>,
}

/// Newest first, `PAGE_SIZE` a page, `next` the absolute URL of the next page (as
/// predictions are listed).
pub async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> AppResult<Response> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let cursor = match &q.cursor {
        Some(c) => Some(
            b64.decode(c)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .filter(|c| c.contains('|'))
                .ok_or_else(|| ApiError::bad_request("cursor: not a cursor this server issued"))?,
        ),
        None => None,
    };
    let base = base_url(&state, &headers);
    let page = state.store.file_list(cursor.as_deref(), PAGE_SIZE).await?;
    let mut results = page.files;
    for v in &mut results {
        let id = v["id"].as_str().unwrap_or("").to_string();
        v["urls"] = json!({"get": format!("{base}/v1/files/{id}/download")});
    }
    let next = page
        .next
        .map(|c| format!("{base}/v1/files?cursor={}", b64.encode(c)));
    Ok(json_response(
        StatusCode::OK,
        &json!({"next": next, "previous": null, "results": results}),
    ))
}

pub async fn get_one(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> AppResult<Response> {
    Ok(json_response(
        StatusCode::OK,
        &read_meta(&state, &id, &base_url(&state, &headers)).await?,
    ))
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> AppResult<Response> {
    if !state.store.file_delete(&id).await? {
        return Err(ApiError::not_found(format!("file {id} not found")));
    }
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    Ok(r)
}

pub async fn download(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> AppResult<Response> {
    let meta = read_meta(&state, &id, "").await?;
    let bytes = state
        .store
        .file_read(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("file {id} not found")))?;
    let mut r = Response::new(Body::from_stream(bytes));
    let h = r.headers_mut();
    if let Some(ct) = meta["content_type"]
        .as_str()
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        h.insert(header::CONTENT_TYPE, ct);
    }
    if let Some(n) = meta["size"].as_u64() {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    // The bytes are whatever a client uploaded: never rendered or sniffed as a page
    // of this origin.
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'"),
    );
    let name: String = meta["name"]
        .as_str()
        .unwrap_or("file")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        .take(128)
        .collect();
    let name = if name.is_empty() { "file".into() } else { name };
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}
