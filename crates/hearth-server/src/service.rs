//! The prediction service every route family calls (Replicate's, Cog's): create,
//! look up, wait, cancel. Routes parse and render; the rules live here.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use hearth_runtime::{
    FinishReason, GenerationEvent, GenerationRequest, RequestStream, RuntimeError,
};

use crate::client_quota::{Client, Slot};
use crate::error::ApiError;
use crate::metrics::RequestTimer;
use crate::models::ServedModel;
use crate::prediction::{self, Live, RunContext};
use crate::record::{new_id, new_token, Prediction, Record, Status};
use crate::store::StoreError;
use crate::webhook::{guard, WebhookEvent, WebhookSender, WebhookStyle};
use crate::AppState;

pub type ServiceResult<T> = Result<T, ApiError>;

/// What a create request carries besides the model.
#[derive(Clone)]
pub struct CreateRequest {
    pub input: Value,
    pub webhook: Option<String>,
    pub webhook_events_filter: Vec<String>,
    /// `Cancel-After`, from creation.
    pub cancel_after: Option<Duration>,
    /// The record's `hearth` key (which side of a route runs it).
    pub side: Option<Value>,
}

/// What a new prediction's record says beyond its request: which prediction and model it
/// is, the input as kept (a routed one's as sent on), and the record's `hearth` key.
pub struct Starting {
    pub id: String,
    pub model: String,
    pub version: String,
    pub input: Value,
    pub hearth: Option<Value>,
}

impl CreateRequest {
    /// The new prediction's record, `starting` at `now`, with this request's deadline
    /// and webhook and `origin`'s URLs.
    pub fn record(
        &self,
        p: Starting,
        origin: &Origin,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Record {
        let deadline = self.cancel_after.map(|d| {
            let at = now + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
            at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        });
        Record {
            prediction: Prediction {
                id: p.id,
                model: p.model,
                version: p.version,
                input: p.input,
                logs: String::new(),
                output: None,
                error: None,
                status: Status::Starting,
                created_at: now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                started_at: None,
                completed_at: None,
                deadline,
                data_removed: false,
                source: origin.source.into(),
                metrics: None,
                hearth: p.hearth,
            },
            base_url: origin.base_url.clone(),
            stream_token: new_token(),
            webhook: self.webhook.clone(),
            webhook_events_filter: self.webhook_events_filter.clone(),
            created_unix: now.timestamp(),
        }
    }
}

/// Where a create came from.
#[derive(Clone)]
pub struct Origin {
    /// Absolute base of the URLs handed out.
    pub base_url: String,
    /// `api` or `cog`.
    pub source: &'static str,
    /// A caller-chosen id (Cog); one that exists is a conflict.
    pub id: Option<String>,
    /// Whose quota of queued predictions it counts against.
    pub client: Client,
}

/// Parses `{input, webhook?, webhook_events_filter?}`. `input_required`: Replicate's
/// API needs `input`; Cog's takes a missing one as empty.
pub fn parse_create(body: &Value, input_required: bool) -> ServiceResult<CreateRequest> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    let input =
        match obj.get("input") {
            Some(v @ Value::Object(_)) => v.clone(),
            None | Some(Value::Null) if !input_required => Value::Object(Default::default()),
            None | Some(Value::Null) => return Err(ApiError::invalid(
                "input: required (an object with the model's inputs, e.g. {\"prompt\": \"...\"})",
            )),
            Some(_) => return Err(ApiError::invalid("input: expected an object")),
        };
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
            .collect::<ServiceResult<_>>()?,
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
        cancel_after: None,
        side: None,
    })
}

fn conflict(id: &str) -> ApiError {
    ApiError::conflict(format!(
        "id: a prediction with id {id} already exists; choose another id"
    ))
}

/// Validates, submits to the engine, stores and starts the prediction's runner.
/// Errors before the store write (bad input, full queue, a taken id) leave nothing.
pub async fn create(
    state: &Arc<AppState>,
    model: &Arc<ServedModel>,
    mut req: CreateRequest,
    origin: Origin,
) -> ServiceResult<Arc<Live>> {
    if state.is_draining() {
        return Err(ApiError::unavailable(
            "the server is shutting down and takes no new predictions",
        ));
    }
    if let Some(url) = &req.webhook {
        guard::check_url(url, state.cfg.webhook_allow_private)
            .await
            .map_err(|e| ApiError::invalid(format!("webhook: {e}")))?;
    }
    if let Some(id) = &origin.id {
        if state.hub.get(id).is_some()
            || state.hub.unsaved(id).is_some()
            || state.store.exists(id).await?
        {
            return Err(conflict(id));
        }
    }
    let parsed = crate::schema::parse_input(&req.input, &model.defaults, Some(&model.limits()))?;
    let prompt = model.engine.tokenizer().prompt_tokens(&parsed.prompt)?;
    let mut params = parsed.params;
    params.constraint =
        crate::constraint_input::compile(model, parsed.constraint, &parsed.prompt).await?;
    // Held until the prediction ends (its runner drops it).
    let quota = state.quotas.take(&origin.client)?;
    // Dropping the stream cancels the request in the engine, so every early return
    // below leaves nothing running.
    let stream = model.engine.submit(GenerationRequest { prompt, params })?;
    let now = chrono::Utc::now();
    let starting = Starting {
        id: origin.id.clone().unwrap_or_else(new_id),
        model: model.full_name(),
        version: model.version.clone(),
        input: std::mem::take(&mut req.input),
        hearth: req.side.take(),
    };
    let record = req.record(starting, &origin, now);
    // From the store write on, the rest runs as its own task: a client that hangs up
    // while the write is awaited drops this handler, never a stored row without its
    // runner (which would stay `starting` with no `completed` webhook).
    let state = state.clone();
    let model = model.clone();
    let cancel_after = req.cancel_after;
    let webhook_url = req.webhook;
    let filter = req.webhook_events_filter;
    tokio::spawn(async move {
        let stored = Stored {
            record,
            stream,
            webhook_url,
            filter,
            cancel_after,
            quota,
        };
        start_stored(&state, &model, stored).await
    })
    .await
    .map_err(|e| ApiError::internal(format!("creating the prediction: {e}")))?
}

/// A validated prediction submitted to the engine, to store and start.
struct Stored {
    record: Record,
    stream: RequestStream,
    webhook_url: Option<String>,
    filter: Vec<String>,
    cancel_after: Option<Duration>,
    quota: Slot,
}

/// Stores a new prediction and starts its runner; the second half of `create`.
async fn start_stored(
    state: &Arc<AppState>,
    model: &Arc<ServedModel>,
    stored: Stored,
) -> ServiceResult<Arc<Live>> {
    let Stored {
        record,
        stream,
        webhook_url,
        filter,
        cancel_after,
        quota,
    } = stored;
    let id = record.prediction.id.clone();
    let style = WebhookStyle::for_source(&record.prediction.source);
    let webhook = webhook_url
        .as_ref()
        .map(|url| state.webhooks.sender(url.clone(), &filter, &id, style));
    match state.store.insert(&record).await {
        Ok(()) => {}
        Err(StoreError::Exists(_)) => return Err(conflict(&id)),
        Err(e) => return Err(e.into()),
    }
    let Some(live) = state.hub.try_insert(record.clone()) else {
        // Stored, but another prediction with this id runs here: end the stored one
        // (failed, with its `completed` webhook) so it does not wait forever.
        fail_stored(state, record, webhook.as_ref()).await;
        return Err(conflict(&id));
    };
    let ctx = RunContext {
        hub: state.hub.clone(),
        store: state.store.clone(),
        metrics: state.model_metrics(&model.full_name()),
        webhook,
        deadline: cancel_after
            .map(|d| tokio::time::Instant::now() + d.min(Duration::from_secs(86400 * 365))),
    };
    let span = tracing::info_span!("prediction", %id, model = %model.full_name());
    let runner = live.clone();
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            prediction::run(runner, stream, ctx).await;
            drop(quota);
        },
        span,
    ));
    Ok(live)
}

/// Ends a stored prediction that will not run, with its `completed` webhook.
async fn fail_stored(state: &AppState, mut record: Record, webhook: Option<&WebhookSender>) {
    record.prediction.error = Some(format!(
        "a prediction with id {} was already running; create this one again",
        record.prediction.id
    ));
    record
        .prediction
        .finish(Status::Failed, &crate::record::now_rfc3339());
    let hooks = webhook
        .map(|w| w.prepare(WebhookEvent::Completed, &record))
        .unwrap_or_default();
    match state
        .store
        .finish(&record, &hooks, crate::webhook::dispatcher::now_ms())
        .await
    {
        Ok(()) => {
            if let Some(w) = webhook {
                w.queued(&hooks);
            }
        }
        Err(e) => {
            tracing::error!(prediction = %record.prediction.id, error = %e, "could not end a prediction that will not run")
        }
    }
}

/// The current state: in memory while running here (or while its last write is
/// pending), else from the store (where another replica's running predictions show
/// their output as of its last flush, `prediction::OUTPUT_FLUSH` ago at most).
pub async fn lookup(state: &AppState, id: &str) -> ServiceResult<Record> {
    if let Some(r) = state.hub.get(id).and_then(|l| l.snapshot()) {
        return Ok(r);
    }
    if let Some(r) = state.hub.unsaved(id) {
        return Ok(r);
    }
    state
        .store
        .get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("prediction {id} not found")))
}

/// Waits until the prediction ends or `secs` pass. On timeout the answer says
/// `starting`, which both Replicate clients read as "keep polling".
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

/// How long a cancel waits for the prediction to end before answering with its
/// state as it is then.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

/// Asks the engine to stop the prediction and answers with its state once it has
/// (or after 5 s, whatever it is then). A prediction another replica runs is asked
/// through the store; its owner cancels it within `replicas::CANCEL_POLL`.
pub async fn cancel(state: &AppState, id: &str) -> ServiceResult<Record> {
    if let Some(live) = state.hub.get(id) {
        live.request_cancel();
        if let Some(r) = wait_for(&live, CANCEL_WAIT.as_secs())
            .await
            .filter(|r| r.prediction.status.is_terminal())
        {
            return Ok(r);
        }
        return lookup(state, id).await;
    }
    let r = lookup(state, id).await?;
    if r.prediction.status.is_terminal() || !state.store.is_shared() {
        return Ok(r);
    }
    state.store.request_cancel(id).await?;
    let deadline = tokio::time::Instant::now() + CANCEL_WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = lookup(state, id).await?;
        if r.prediction.status.is_terminal() || tokio::time::Instant::now() >= deadline {
            return Ok(r);
        }
    }
}

/// A generation that is not a prediction (OpenAI's API): submitted to the engine,
/// timed into the model's metrics, never stored. Dropping it cancels it.
pub struct Generation {
    stream: RequestStream,
    timer: RequestTimer,
    done: bool,
}

/// Submits `req`; the caller holds the client's quota slot for it
/// (`client_quota`).
pub fn generate(
    state: &AppState,
    model: &ServedModel,
    req: GenerationRequest,
) -> Result<Generation, RuntimeError> {
    let stream = model.engine.submit(req)?;
    Ok(Generation {
        stream,
        timer: RequestTimer::new(state.model_metrics(&model.full_name())),
        done: false,
    })
}

impl Generation {
    pub async fn next(&mut self) -> Option<GenerationEvent> {
        let ev = self.stream.next().await;
        match &ev {
            Some(GenerationEvent::Started { .. }) => self.timer.started(),
            Some(GenerationEvent::Token { .. }) => self.timer.token(),
            Some(GenerationEvent::Finished(c)) => {
                self.done = true;
                let status = match c.reason {
                    FinishReason::Stop | FinishReason::Length => Status::Succeeded,
                    FinishReason::Canceled => Status::Canceled,
                    FinishReason::Error => Status::Failed,
                };
                self.timer.finished(status.as_str(), c.prompt_tokens);
            }
            None if !self.done => {
                self.done = true;
                self.timer.finished(Status::Failed.as_str(), 0);
            }
            None => {}
        }
        ev
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        // The client went away (or the handler failed): the engine stops it at its
        // next step when the stream drops; count it as canceled.
        if !self.done {
            self.timer.finished(Status::Canceled.as_str(), 0);
        }
    }
}
