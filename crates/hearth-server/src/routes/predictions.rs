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

use hearth_runtime::GenerationRequest;

use super::{base_url, json_response, parse_json_body, AppResult};
use crate::error::ApiError;
use crate::models::ServedModel;
use crate::prediction::{self, Live, Prediction, Record, RunContext, Status};
use crate::webhook::WebhookEvent;
use crate::AppState;

const PAGE_SIZE: usize = 100;
const MAX_WAIT: u64 = 60;

/// What a create request carries besides the model.
pub struct CreateRequest {
    pub input: Value,
    pub webhook: Option<String>,
    pub webhook_events_filter: Vec<String>,
}

pub fn parse_create(body: &Value) -> AppResult<CreateRequest> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    let input = obj
        .get("input")
        .cloned()
        .unwrap_or(Value::Object(Default::default()));
    if !input.is_object() {
        return Err(ApiError::invalid("input: expected an object"));
    }
    let webhook = match obj.get("webhook") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => {
            let ok = reqwest::Url::parse(s)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
            if !ok {
                return Err(ApiError::invalid(format!(
                    "webhook: {s:?} is not an http(s) URL"
                )));
            }
            Some(s.clone())
        }
        Some(_) => return Err(ApiError::invalid("webhook: expected a string")),
    };
    let webhook_events_filter = match obj.get("webhook_events_filter") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(
                |e| match e.as_str().filter(|s| WebhookEvent::parse(s).is_some()) {
                    Some(s) => Ok(s.to_string()),
                    None => Err(ApiError::invalid(format!(
                        "webhook_events_filter: {e} is not one of start, output, logs, completed"
                    ))),
                },
            )
            .collect::<AppResult<_>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "webhook_events_filter: expected an array",
            ))
        }
    };
    Ok(CreateRequest {
        input,
        webhook,
        webhook_events_filter,
    })
}

/// Validates, submits to the engine and starts the prediction's runner. Errors before
/// submission (bad input, full queue) leave nothing behind.
pub async fn start_prediction(
    state: &Arc<AppState>,
    model: &Arc<ServedModel>,
    req: CreateRequest,
    base: String,
    source: &str,
    id: Option<String>,
) -> AppResult<Arc<Live>> {
    let parsed = crate::schema::parse_input(&req.input, &model.defaults)?;
    let prompt = model.engine.tokenizer().prompt_tokens(&parsed.prompt)?;
    let stream = model.engine.submit(GenerationRequest {
        prompt,
        params: parsed.params,
    })?;
    let now = chrono::Utc::now();
    let record = Record {
        prediction: Prediction {
            id: id.unwrap_or_else(prediction::new_id),
            model: model.full_name(),
            version: model.version.clone(),
            input: req.input,
            logs: String::new(),
            output: None,
            error: None,
            status: Status::Starting,
            created_at: now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            started_at: None,
            completed_at: None,
            data_removed: false,
            source: source.into(),
            metrics: None,
        },
        base_url: base,
        stream_token: prediction::new_token(),
        webhook: req.webhook.clone(),
        webhook_events_filter: req.webhook_events_filter.clone(),
        created_unix: now.timestamp(),
    };
    state
        .store
        .put(&record)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let webhook = req.webhook.as_ref().map(|url| {
        state.webhooks.sender(
            url.clone(),
            &req.webhook_events_filter,
            &record.prediction.id,
        )
    });
    let live = state.hub.insert(record);
    let ctx = RunContext {
        hub: state.hub.clone(),
        store: state.store.clone(),
        metrics: state
            .metrics
            .get(&model.full_name())
            .cloned()
            .unwrap_or_else(|| Arc::new(crate::metrics::Metrics::new(model.full_name()))),
        webhook,
    };
    let span = tracing::info_span!("prediction", id = %live.snapshot().map(|r| r.prediction.id).unwrap_or_default(), model = %model.full_name());
    tokio::spawn(tracing::Instrument::instrument(
        prediction::run(live.clone(), stream, ctx),
        span,
    ));
    Ok(live)
}

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

/// Waits until the prediction ends or `secs` pass. On timeout the answer says
/// `starting`, which both clients read as "keep polling".
pub async fn wait_for(live: &Live, secs: u64) -> Option<Record> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let changed = live.subscribe();
        if live.is_terminal() {
            return live.snapshot();
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            let mut r = live.snapshot()?;
            if !r.prediction.status.is_terminal() {
                r.prediction.status = Status::Starting;
            }
            return Some(r);
        }
    }
}

async fn respond_created(
    state: Arc<AppState>,
    model: Arc<ServedModel>,
    headers: HeaderMap,
    body: Bytes,
) -> AppResult<Response> {
    let wait = prefer_wait(&headers)?;
    let req = parse_create(&parse_json_body(&body)?)?;
    let live =
        start_prediction(&state, &model, req, base_url(&state, &headers), "api", None).await?;
    let record = match wait {
        Some(secs) => wait_for(&live, secs).await,
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
    headers: HeaderMap,
    body: Bytes,
) -> AppResult<Response> {
    let v = parse_json_body(&body)?;
    let version = v.get("version").and_then(|x| x.as_str()).ok_or_else(|| {
        ApiError::invalid("version: required (a version id, owner/name or owner/name:version)")
    })?;
    let model = match version.split_once(':') {
        Some((name, ver)) => {
            let (o, n) = crate::models::split_name(name).map_err(ApiError::invalid)?;
            let m = find_model(&state, &o, &n, "model")?;
            check_version(&m, ver)?;
            m
        }
        None if version.contains('/') => {
            let (o, n) = crate::models::split_name(version).map_err(ApiError::invalid)?;
            find_model(&state, &o, &n, "model")?
        }
        None => state
            .models
            .by_version(version)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("version {version} not found")))?,
    };
    respond_created(state, model, headers, body).await
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
    Path((owner, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> AppResult<Response> {
    let model = find_model(&state, &owner, &name, "model")?;
    respond_created(state, model, headers, body).await
}

pub async fn create_for_version(
    State(state): State<Arc<AppState>>,
    Path((owner, name, version)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> AppResult<Response> {
    let model = find_model(&state, &owner, &name, "model")?;
    check_version(&model, &version)?;
    respond_created(state, model, headers, body).await
}

/// A deployment is served as the model of the same name.
pub async fn create_for_deployment(
    State(state): State<Arc<AppState>>,
    Path((owner, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> AppResult<Response> {
    let model = find_model(&state, &owner, &name, "deployment")?;
    respond_created(state, model, headers, body).await
}

/// The current state: in memory while running, else from the store.
pub fn lookup(state: &AppState, id: &str) -> AppResult<Record> {
    if let Some(r) = state.hub.get(id).and_then(|l| l.snapshot()) {
        return Ok(r);
    }
    state
        .store
        .get(id)
        .map_err(|e| ApiError::internal(e.to_string()))?
        .ok_or_else(|| ApiError::not_found(format!("prediction {id} not found")))
}

pub async fn get_one(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> AppResult<Response> {
    Ok(json_response(
        StatusCode::OK,
        &lookup(&state, &id)?.to_json(),
    ))
}

pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> AppResult<Response> {
    if let Some(live) = state.hub.get(&id) {
        live.request_cancel();
        // The engine frees the sequence at its next step; answer with the final state.
        if let Some(r) = wait_for(&live, 5)
            .await
            .filter(|r| r.prediction.status.is_terminal())
        {
            return Ok(json_response(StatusCode::OK, &r.to_json()));
        }
    }
    Ok(json_response(
        StatusCode::OK,
        &lookup(&state, &id)?.to_json(),
    ))
}

#[derive(Deserialize)]
pub struct ListQuery {
    cursor: Option<String>,
    created_after: Option<String>,
    created_before: Option<String>,
}

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
    let after = normalise_time("created_after", q.created_after)?;
    let before = normalise_time("created_before", q.created_before)?;
    let page = state
        .store
        .list(
            cursor.as_deref(),
            after.as_deref(),
            before.as_deref(),
            PAGE_SIZE,
        )
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let base = base_url(&state, &headers);
    let results: Vec<Value> = page
        .records
        .iter()
        .map(|r| {
            let current = state
                .hub
                .get(&r.prediction.id)
                .and_then(|l| l.snapshot())
                .unwrap_or_else(|| r.clone());
            current.to_json()
        })
        .collect();
    let mut extra = String::new();
    if let Some(a) = &after {
        extra.push_str(&format!(
            "&created_after={}",
            a.replace('+', "%2B").replace(':', "%3A")
        ));
    }
    if let Some(b) = &before {
        extra.push_str(&format!(
            "&created_before={}",
            b.replace('+', "%2B").replace(':', "%3A")
        ));
    }
    let next = page
        .next
        .map(|c| format!("{base}/v1/predictions?cursor={}{extra}", b64.encode(c)));
    Ok(json_response(
        StatusCode::OK,
        &json!({"next": next, "previous": null, "results": results}),
    ))
}
