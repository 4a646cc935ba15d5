//! `/v1/predictions` and the model/version/deployment variants of creating one.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{base_url, json_response, parse_json_body, AppResult};
use crate::client_quota::Client;
use crate::error::ApiError;
use crate::models::ServedModel;
use crate::record::Status;
use crate::service::{self, Origin};
use crate::store::{ListFilter, MIN_ID_PREFIX};
use crate::upstream::{
    self,
    create::{Created, Routed},
};
use crate::AppState;

const PAGE_SIZE: usize = 100;
const MAX_WAIT: u64 = 60;

/// `Prefer: wait` or `wait=N`; None without the header. N is clamped to 1..=60: the
/// clients do not cap it themselves (Python 1.0.7 sends what the app passes, e.g. 120).
pub fn prefer_wait(headers: &HeaderMap) -> AppResult<Option<u64>> {
    let Some(v) = headers.get("prefer").and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    for pref in v.split(',').map(str::trim) {
        if pref == "wait" {
            return Ok(Some(MAX_WAIT));
        }
        if let Some(n) = pref.strip_prefix("wait=") {
            return match n.trim().parse::<u64>() {
                Ok(n) => Ok(Some(n.clamp(1, MAX_WAIT))),
                Err(_) => Err(ApiError::bad_request(format!(
                    "Prefer: wait={n}: the wait must be a whole number of seconds"
                ))),
            };
        }
    }
    Ok(None)
}

/// `Cancel-After: 30s` (a Go duration); None without the header.
pub fn cancel_after(headers: &HeaderMap) -> AppResult<Option<Duration>> {
    let Some(v) = headers.get("cancel-after") else {
        return Ok(None);
    };
    let text = v
        .to_str()
        .map_err(|_| ApiError::invalid("Cancel-After: not text"))?;
    crate::go_duration::parse(text).map(Some).map_err(|e| {
        ApiError::invalid(format!(
            "Cancel-After: {e} (a duration like 500ms, 30s or 1m30s)"
        ))
    })
}

/// What a create names: a model served here, or one with a route.
pub enum Target {
    Local(Arc<ServedModel>),
    Routed(Routed),
}

/// The target for `owner/name` (at `version`, when named): a model with a route
/// (served here or not), else a served model.
pub fn find_target(
    state: &AppState,
    owner: &str,
    name: &str,
    version: Option<&str>,
    kind: &str,
) -> AppResult<Target> {
    let full = format!("{owner}/{name}");
    let local = state.models.by_name(owner, name).cloned();
    if let Some(route) = state.upstream.route(&full) {
        // A version of the local model is hearth's own id: not one to send upstream.
        let version = version
            .filter(|v| !local.as_ref().is_some_and(|m| m.has_version(v)))
            .map(str::to_string);
        return Ok(Target::Routed(Routed {
            model: full,
            version,
            route: route.clone(),
            local,
        }));
    }
    let m = local.ok_or_else(|| ApiError::not_found(format!("{kind} {owner}/{name} not found")))?;
    if let Some(v) = version {
        check_version(&m, v)?;
    }
    Ok(Target::Local(m))
}

async fn respond_created(
    state: Arc<AppState>,
    target: Target,
    client: Client,
    headers: HeaderMap,
    body: Bytes,
) -> AppResult<Response> {
    let wait = prefer_wait(&headers)?;
    let mut req = service::parse_create(&parse_json_body(&body)?, true)?;
    req.cancel_after = cancel_after(&headers)?;
    let origin = Origin {
        base_url: base_url(&state, &headers),
        source: "api",
        id: None,
        client,
    };
    let live = match target {
        Target::Local(model) => service::create(&state, &model, req, origin).await?,
        Target::Routed(routed) => {
            match upstream::create::create(&state, routed, req, origin).await? {
                Created::Live(live) => live,
                Created::Relayed {
                    status,
                    body,
                    content_type,
                } => {
                    let mut r = Response::new(axum::body::Body::from(body));
                    *r.status_mut() = status;
                    if let Ok(v) = HeaderValue::from_str(&content_type) {
                        r.headers_mut().insert(axum::http::header::CONTENT_TYPE, v);
                    }
                    return Ok(r);
                }
            }
        }
    };
    let record = match wait {
        Some(secs) => service::wait_for(&live, secs).await,
        None => live.snapshot(),
    }
    .ok_or_else(|| ApiError::internal("prediction state lost"))?;
    let mut resp = json_response(StatusCode::CREATED, &record.to_json());
    if let Some(secs) = wait {
        if let Ok(v) = HeaderValue::from_str(&format!("wait={secs}")) {
            resp.headers_mut().insert("preference-applied", v);
        }
    }
    Ok(resp)
}

/// `POST /v1/predictions {"version": ...}`: a version id, `owner/name` or `owner/name:version`.
pub async fn create(
    State(state): State<Arc<AppState>>,
    client: Client,
    headers: HeaderMap,
    body: Bytes,
) -> AppResult<Response> {
    let v = parse_json_body(&body)?;
    let version = v.get("version").and_then(|x| x.as_str()).ok_or_else(|| {
        ApiError::invalid("version: required (a version id, owner/name or owner/name:version)")
    })?;
    let target = match version.split_once(':') {
        Some((name, ver)) => {
            let (o, n) = crate::models::split_name(name).map_err(ApiError::invalid)?;
            find_target(&state, &o, &n, Some(ver), "model")?
        }
        None if version.contains('/') => {
            let (o, n) = crate::models::split_name(version).map_err(ApiError::invalid)?;
            find_target(&state, &o, &n, None, "model")?
        }
        None => match state.models.by_version(version).cloned() {
            Some(m) => {
                let (o, n) = (m.owner.clone(), m.name.clone());
                match find_target(&state, &o, &n, None, "model")? {
                    Target::Local(_) => Target::Local(m),
                    routed => routed,
                }
            }
            // A version an upstream-only model's document showed.
            None => match state.upstream.models.model_of_version(version) {
                Some(full) => {
                    let (o, n) = crate::models::split_name(&full).map_err(ApiError::invalid)?;
                    find_target(&state, &o, &n, Some(version), "model")?
                }
                None => return Err(ApiError::not_found(format!("version {version} not found"))),
            },
        },
    };
    respond_created(state, target, client, headers, body).await
}

/// The served model called `owner/name` (`kind` names it in the 404).
pub fn find_model(
    state: &AppState,
    owner: &str,
    name: &str,
    kind: &str,
) -> AppResult<Arc<ServedModel>> {
    state
        .models
        .by_name(owner, name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("{kind} {owner}/{name} not found")))
}

fn check_version(model: &ServedModel, version: &str) -> AppResult<()> {
    if model.has_version(version) {
        Ok(())
    } else {
        Err(ApiError::not_found(format!(
            "version {version} of {} not found",
            model.full_name()
        )))
    }
}

pub async fn create_for_model(
    State(state): State<Arc<AppState>>,
    client: Client,
    Path((owner, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> AppResult<Response> {
    let target = find_target(&state, &owner, &name, None, "model")?;
    respond_created(state, target, client, headers, body).await
}

pub async fn create_for_version(
    State(state): State<Arc<AppState>>,
    client: Client,
    Path((owner, name, version)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> AppResult<Response> {
    let target = find_target(&state, &owner, &name, Some(&version), "model")?;
    respond_created(state, target, client, headers, body).await
}

/// A deployment is served as the model of the same name.
pub async fn create_for_deployment(
    State(state): State<Arc<AppState>>,
    client: Client,
    Path((owner, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> AppResult<Response> {
    let target = find_target(&state, &owner, &name, None, "deployment")?;
    respond_created(state, target, client, headers, body).await
}

pub async fn get_one(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> AppResult<Response> {
    Ok(json_response(
        StatusCode::OK,
        &service::lookup(&state, &id).await?.to_json(),
    ))
}

pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> AppResult<Response> {
    Ok(json_response(
        StatusCode::OK,
        &service::cancel(&state, &id).await?.to_json(),
    ))
}

#[derive(Deserialize)]
pub struct ListQuery {
    cursor: Option<String>,
    created_after: Option<String>,
    created_before: Option<String>,
    /// hearth's own: `status=succeeded` or `status=starting,processing` keeps only
    /// those (Replicate's list has no such filter; its clients never send one).
    status: Option<String>,
    /// hearth's own: `id_prefix=abcd` keeps the predictions whose id starts so (the
    /// console's search by id).
    id_prefix: Option<String>,
    /// hearth's own: `model=owner/name` keeps that model's predictions (the console's
    /// filter by model).
    model: Option<String>,
}

/// The longest `model` a listing filters by (owner and name are each far shorter).
const MODEL_MAX: usize = 200;

/// `model`: `owner/name`, each part letters, digits, '-', '_' and '.', at most
/// `MODEL_MAX` characters; empty or absent keeps all.
fn parse_model(v: Option<String>) -> AppResult<Option<String>> {
    let Some(m) = v.filter(|m| !m.is_empty()) else {
        return Ok(None);
    };
    let n = m.chars().count();
    if n > MODEL_MAX {
        return Err(ApiError::bad_request(format!(
            "model: {n} characters; a model name is at most {MODEL_MAX}"
        )));
    }
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match m.split_once('/') {
        Some((o, name)) if part_ok(o) && part_ok(name) => Ok(Some(m)),
        _ => Err(ApiError::bad_request(format!(
            "model: {m:?} is not owner/name (each part letters, digits, '-', '_' or '.')"
        ))),
    }
}

/// `id_prefix`: `MIN_ID_PREFIX` to 128 of the characters ids are made of; empty or
/// absent keeps all.
fn parse_id_prefix(v: Option<String>) -> AppResult<Option<String>> {
    let Some(p) = v.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let n = p.chars().count();
    if !(MIN_ID_PREFIX..=128).contains(&n) {
        return Err(ApiError::invalid(format!(
            "id_prefix: {n} characters; a search by id takes {MIN_ID_PREFIX} to 128 (fetch a \
             shorter id whole at /v1/predictions/{{id}})"
        )));
    }
    if let Some(c) = p
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(ApiError::invalid(format!(
            "id_prefix: {c:?} is in no prediction id (ids are letters, digits, '-', '_' and '.')"
        )));
    }
    Ok(Some(p))
}

/// `status=a,b`: each a prediction status, none twice; empty or absent keeps all.
fn parse_statuses(v: Option<&str>) -> AppResult<Vec<Status>> {
    let mut out = Vec::new();
    for part in v.unwrap_or("").split(',').map(str::trim) {
        if part.is_empty() {
            continue;
        }
        let s = ALL_STATUSES
            .into_iter()
            .find(|s| s.as_str() == part)
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "status: {part:?} is not a prediction status (starting, processing, \
                     succeeded, failed or canceled, several separated by commas)"
                ))
            })?;
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

const ALL_STATUSES: [Status; 5] = [
    Status::Starting,
    Status::Processing,
    Status::Succeeded,
    Status::Failed,
    Status::Canceled,
];

fn normalise_time(field: &str, v: Option<String>) -> AppResult<Option<String>> {
    v.map(|s| {
        chrono::DateTime::parse_from_rfc3339(&s)
            .map(|t| {
                t.with_timezone(&chrono::Utc)
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            })
            .map_err(|e| ApiError::invalid(format!("{field}: {s:?} is not an RFC 3339 time: {e}")))
    })
    .transpose()
}

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
                .ok_or_else(|| ApiError::bad_request("cursor: not a cursor this server issued"))?,
        ),
        None => None,
    };
    let filter = ListFilter {
        created_after: normalise_time("created_after", q.created_after)?,
        created_before: normalise_time("created_before", q.created_before)?,
        statuses: parse_statuses(q.status.as_deref())?,
        id_prefix: parse_id_prefix(q.id_prefix)?,
        model: parse_model(q.model)?,
    };
    let page = state
        .store
        .list(cursor.as_deref(), &filter, PAGE_SIZE)
        .await?;
    let base = base_url(&state, &headers);
    let results: Vec<Value> = page
        .records
        .iter()
        .map(|r| {
            state
                .hub
                .get(&r.prediction.id)
                .and_then(|l| l.snapshot())
                .unwrap_or_else(|| r.clone())
        })
        // One that has moved on since the store's copy (it ended meanwhile) no longer
        // matches the filter it was read for.
        .filter(|r| filter.statuses.is_empty() || filter.statuses.contains(&r.prediction.status))
        .map(|r| r.to_json())
        .collect();
    let mut extra = String::new();
    if let Some(a) = &filter.created_after {
        extra.push_str(&format!(
            "&created_after={}",
            a.replace('+', "%2B").replace(':', "%3A")
        ));
    }
    if let Some(b) = &filter.created_before {
        extra.push_str(&format!(
            "&created_before={}",
            b.replace('+', "%2B").replace(':', "%3A")
        ));
    }
    if !filter.statuses.is_empty() {
        let names: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
        extra.push_str(&format!("&status={}", names.join("%2C")));
    }
    if let Some(p) = &filter.id_prefix {
        // Letters, digits, '-', '_' and '.' only: nothing to escape in a query.
        extra.push_str(&format!("&id_prefix={p}"));
    }
    if let Some(m) = &filter.model {
        // Letters, digits, '-', '_', '.' and one '/'.
        extra.push_str(&format!("&model={}", m.replace('/', "%2F")));
    }
    let next = page
        .next
        .map(|c| format!("{base}/v1/predictions?cursor={}{extra}", b64.encode(c)));
    Ok(json_response(
        StatusCode::OK,
        &json!({"next": next, "previous": null, "results": results}),
    ))
}
