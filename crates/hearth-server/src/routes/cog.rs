//! Cog's container API on the same port, as Cog 0.23.1 serves it: synchronous
//! predictions by default, `Prefer: respond-async` (exactly) for a 202, an SSE stream
//! for `Accept: text/event-stream` (`cog_stream`; with `respond-async` too, the
//! prediction is not tied to the stream's connection: how a front hearth creates and
//! follows one in a single request); `PUT` with an id in flight attaches to it; every
//! invalid field in one 422; a 409 when all `--cog-max-concurrency` slots are busy;
//! Cog's response shapes (`crate::cog_shape`) and Cog-style webhooks.
//! Where hearth deliberately differs, crates/hearth-server/README.md says why.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::{base_url, cog_stream, json_response};
use crate::client_quota::Client;
use crate::cog_shape;
use crate::error::{ApiError, FieldError};
use crate::prediction::Live;
use crate::record::Status;
use crate::schema::{self, COG_VERSION};
use crate::service::{self, CreateRequest, Origin};
use crate::webhook::{guard, WebhookEvent};
use crate::AppState;

/// A sync prediction still waits for its end, but not forever.
const SYNC_LIMIT: Duration = Duration::from_secs(600);
const AT_CAPACITY: &str = "At capacity - all prediction slots busy";

/// Cog's error body: `{"error": ..., "status": "failed"}`.
fn failed(status: StatusCode, msg: &str) -> Response {
    json_response(status, &json!({"error": msg, "status": "failed"}))
}

/// Cog's 422: one `detail` entry per invalid field, `loc` from the body down.
fn invalid(fields: &[FieldError]) -> Response {
    let mut detail: Vec<(Vec<String>, &str)> = fields
        .iter()
        .map(|f| {
            let mut loc = vec!["body".to_string()];
            loc.extend(f.loc.iter().cloned());
            (loc, f.msg.as_str())
        })
        .collect();
    // Cog lists them by field name.
    detail.sort();
    let detail: Vec<Value> = detail
        .into_iter()
        .map(|(loc, msg)| json!({"loc": loc, "msg": msg, "type": "value_error"}))
        .collect();
    json_response(
        StatusCode::UNPROCESSABLE_ENTITY,
        &json!({ "detail": detail }),
    )
}

/// Any service error in Cog's shapes: 422s as Cog's validation errors, a full engine
/// queue as Cog's "at capacity", the rest as `{"error", "status": "failed"}`.
fn cog_error(e: ApiError) -> Response {
    let status = e.status();
    if status == StatusCode::UNPROCESSABLE_ENTITY {
        if e.fields().is_empty() {
            return invalid(&[FieldError::new(&[], e.to_string())]);
        }
        return invalid(e.fields());
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        return failed(StatusCode::CONFLICT, AT_CAPACITY);
    }
    failed(status, &e.to_string())
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

/// `READY`; `BUSY` when every Cog slot is taken; `DEFUNCT` when an engine died.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let alive = state.models.all().iter().all(|m| m.engine.is_alive());
    let status = if !alive {
        "DEFUNCT"
    } else if state.cog_slots.available_permits() == 0 {
        "BUSY"
    } else {
        "READY"
    };
    json_response(StatusCode::OK, &state.setup.health(status))
}

pub async fn openapi(State(state): State<Arc<AppState>>) -> Response {
    match state.models.default_model() {
        Some(m) => json_response(StatusCode::OK, &m.openapi_schema()),
        None => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "OpenAPI schema not available"}),
        ),
    }
}

/// `{id?, input?, webhook?, webhook_events_filter?}` with Cog's defaults: a missing
/// or null input is `{}`, a missing filter is every event.
struct CogRequest {
    id: Option<String>,
    input: Value,
    webhook: Option<String>,
    filter: Vec<String>,
    /// An input that is not an object: refused after a `PUT` looked for its id in
    /// flight, as Cog does (a front hearth attaches with such an input: it can never
    /// create a prediction).
    input_error: Option<FieldError>,
}

/// Why a body was refused: not JSON (400), or fields of the wrong shape (422).
enum Refused {
    Malformed(String),
    Invalid(Vec<FieldError>),
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Malformed(why) => failed(StatusCode::BAD_REQUEST, &why),
            Refused::Invalid(fields) => invalid(&fields),
        }
    }
}

fn parse_request(body: &[u8]) -> Result<CogRequest, Refused> {
    let v = super::parse_json_body(body).map_err(|e| Refused::Malformed(e.to_string()))?;
    let Value::Object(obj) = v else {
        return Err(Refused::Invalid(vec![FieldError::new(
            &[],
            "expected an object",
        )]));
    };
    let mut errors = Vec::new();
    let mut input_error = None;
    let id = match obj.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errors.push(FieldError::new(&["id"], "expected a string"));
            None
        }
    };
    let input = match obj.get("input") {
        None | Some(Value::Null) => json!({}),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(other) => {
            input_error = Some(FieldError::new(
                &["input", "__root__"],
                format!("{other} is not of type \"object\""),
            ));
            Value::Null
        }
    };
    let webhook = match obj.get("webhook") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errors.push(FieldError::new(&["webhook"], "expected a string"));
            None
        }
    };
    let filter = match obj.get("webhook_events_filter") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a))
            if a.iter()
                .all(|e| e.as_str().and_then(WebhookEvent::parse).is_some()) =>
        {
            a.iter()
                .filter_map(|e| e.as_str().map(str::to_string))
                .collect()
        }
        Some(_) => {
            errors.push(FieldError::new(
                &["webhook_events_filter"],
                "expected a list of start, output, logs, completed",
            ));
            Vec::new()
        }
    };
    if !errors.is_empty() {
        errors.extend(input_error);
        return Err(Refused::Invalid(errors));
    }
    Ok(CogRequest {
        id,
        input,
        webhook,
        filter,
        input_error,
    })
}

/// Ids name predictions in URLs and logs: letters, digits, `-`, `_` and `.` (not
/// only dots), at most 128.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.chars().all(|c| c == '.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

const ID_RULE: &str = "an id is 1-128 letters, digits, '-', '_' or '.'";

/// How the caller wants the answer.
enum Reply {
    /// The finished prediction (Cog's default).
    Sync,
    /// `Prefer: respond-async`: 202 `{id, status}` at once.
    Async,
    /// `Accept: text/event-stream`: the prediction's events as they happen. A caller
    /// who hangs up cancels the prediction it created, unless `detached` (it also
    /// said `Prefer: respond-async`: the prediction runs on, and a `PUT` with its id
    /// attaches to it again).
    Stream { detached: bool },
}

fn reply(headers: &HeaderMap) -> Reply {
    let accepts_sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    // Cog compares the whole header: `respond-async, wait=5` is a sync request.
    let respond_async = headers
        .get("prefer")
        .is_some_and(|v| v.as_bytes() == b"respond-async");
    if accepts_sse {
        Reply::Stream {
            detached: respond_async,
        }
    } else if respond_async {
        Reply::Async
    } else {
        Reply::Sync
    }
}

/// Cancels a sync prediction whose caller went away, unless disarmed: a client that
/// hangs up should not leave its generation running.
struct SyncGuard(Option<Arc<Live>>);

impl Drop for SyncGuard {
    fn drop(&mut self) {
        if let Some(live) = self.0.take() {
            if !live.is_terminal() {
                live.request_cancel();
            }
        }
    }
}

/// Validates (every field, in one 422), takes a Cog slot (409 when none is free),
/// creates, and answers as `reply` says.
async fn run(
    state: Arc<AppState>,
    client: Client,
    headers: HeaderMap,
    req: CogRequest,
) -> Response {
    let Some(model) = state.models.default_model().cloned() else {
        return failed(StatusCode::SERVICE_UNAVAILABLE, "no model is served");
    };
    let mut errors = schema::null_errors(&req.input);
    if let Err(e) = schema::parse_input(&req.input, &model.defaults, Some(&model.limits())) {
        errors.extend(e.fields().iter().cloned());
    }
    if let Some(url) = &req.webhook {
        if let Err(why) = guard::check_url(url, state.cfg.webhook_allow_private).await {
            errors.push(FieldError::new(&["webhook"], why));
        }
    }
    if !errors.is_empty() {
        return invalid(&errors);
    }
    let Ok(slot) = state.cog_slots.clone().try_acquire_owned() else {
        return failed(StatusCode::CONFLICT, AT_CAPACITY);
    };
    let create = CreateRequest {
        input: req.input,
        webhook: req.webhook,
        webhook_events_filter: req.filter,
        cancel_after: None,
        side: None,
    };
    let origin = Origin {
        base_url: base_url(&state, &headers),
        source: "cog",
        id: req.id,
        client,
    };
    let live = match service::create(&state, &model, create, origin).await {
        Ok(l) => l,
        Err(e) => return cog_error(e),
    };
    // The slot is the prediction's until it ends, however its caller waits.
    let held = live.clone();
    tokio::spawn(async move {
        let _slot = slot;
        until_terminal(&held).await;
    });
    match reply(&headers) {
        Reply::Stream { detached } => {
            let id = live.snapshot().map(|r| r.prediction.id).unwrap_or_default();
            cog_stream::sse(state, id, (!detached).then_some(live))
        }
        Reply::Async => match live.snapshot() {
            Some(r) => json_response(
                StatusCode::ACCEPTED,
                &json!({"id": r.prediction.id, "status": "starting"}),
            ),
            None => cog_error(ApiError::internal("prediction state lost")),
        },
        Reply::Sync => {
            let mut guard = SyncGuard(Some(live.clone()));
            let answer = service::wait_for(&live, SYNC_LIMIT.as_secs()).await;
            guard.0 = None;
            match answer {
                Some(r) => {
                    let mut body = cog_shape::response(&r);
                    // Cog answers a canceled sync request without its output.
                    if r.prediction.status == Status::Canceled {
                        if let Value::Object(o) = &mut body {
                            o.remove("output");
                        }
                    }
                    json_response(StatusCode::OK, &body)
                }
                None => cog_error(ApiError::internal("prediction state lost")),
            }
        }
    }
}

async fn until_terminal(live: &Live) {
    loop {
        let changed = live.subscribe();
        if live.is_terminal() {
            return;
        }
        changed.await;
    }
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    client: Client,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = match parse_request(&body) {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    if let Some(e) = req.input_error {
        return invalid(&[e]);
    }
    if let Some(id) = &req.id {
        if !valid_id(id) {
            return invalid(&[FieldError::new(&["id"], ID_RULE)]);
        }
    }
    run(state, client, headers, req).await
}

/// Cog's idempotent create. A Cog prediction in flight with this id answers 202 with
/// its state (or, with `Accept: text/event-stream`, its events from the start), as
/// Cog does (with a shared store, also one another replica runs); an id that names a
/// finished prediction, or one created through another API, is a 409: hearth never
/// reuses an id.
pub async fn put(
    State(state): State<Arc<AppState>>,
    client: Client,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !valid_id(&id) {
        return invalid(&[FieldError::new(&["path", "prediction_id"], ID_RULE)]);
    }
    let mut req = match parse_request(&body) {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    if req.id.as_ref().is_some_and(|b| *b != id) {
        return invalid(&[FieldError::new(
            &["id"],
            "prediction ID must match the ID supplied in the URL",
        )]);
    }
    // In flight here, or (with a shared store) on another replica: its state as of
    // the owner's last write, its events through the store.
    let in_flight = match state.hub.get(&id) {
        Some(live) => match live.snapshot() {
            Some(r) => Some(r),
            None => return cog_error(ApiError::internal("prediction state lost")),
        },
        None if state.store.is_shared() => match state.store.get(&id).await {
            Ok(r) => r.filter(|r| !r.prediction.status.is_terminal()),
            Err(e) => return cog_error(e.into()),
        },
        None => None,
    };
    if let Some(r) = in_flight.filter(|r| r.prediction.source == "cog") {
        return match reply(&headers) {
            Reply::Stream { .. } => cog_stream::sse(state, id, None),
            _ => json_response(StatusCode::ACCEPTED, &cog_shape::in_flight(&r)),
        };
    }
    if let Some(e) = req.input_error.take() {
        return invalid(&[e]);
    }
    req.id = Some(id);
    run(state, client, headers, req).await
}

/// Cancels a prediction in flight here, or (with a shared store) on the replica that
/// runs it.
pub async fn cancel(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if let Some(live) = state.hub.get(&id) {
        live.request_cancel();
        return json_response(StatusCode::OK, &json!({}));
    }
    if state.store.is_shared() && matches!(state.store.request_cancel(&id).await, Ok(true)) {
        return json_response(StatusCode::OK, &json!({}));
    }
    json_response(StatusCode::NOT_FOUND, &json!({}))
}

pub async fn shutdown(State(state): State<Arc<AppState>>) -> Response {
    state.stop.cancel();
    json_response(StatusCode::OK, &json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_with_dots_pass_and_odd_ones_do_not() {
        for ok in ["a.b.c", "pred_18eb4f", "x-1", "v1.2"] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", &"x".repeat(129)] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn prefer_must_be_exactly_respond_async() {
        let h = |k: &str, v: &str| {
            let mut m = HeaderMap::new();
            m.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
            m
        };
        assert!(matches!(reply(&h("prefer", "respond-async")), Reply::Async));
        assert!(matches!(
            reply(&h("prefer", "respond-async, wait=5")),
            Reply::Sync
        ));
        assert!(matches!(reply(&h("prefer", "Respond-Async")), Reply::Sync));
        assert!(matches!(
            reply(&h("accept", "application/json, text/event-stream")),
            Reply::Stream { detached: false }
        ));
        // Both: a stream whose prediction outlives its connection.
        let mut both = h("accept", "text/event-stream");
        both.insert("prefer", "respond-async".parse().unwrap());
        assert!(matches!(reply(&both), Reply::Stream { detached: true }));
    }
}
