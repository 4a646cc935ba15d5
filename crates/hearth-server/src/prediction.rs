//! A prediction's life: created (`starting`), admitted by the engine (`processing`),
//! streaming output, then `succeeded`, `failed` or `canceled`. While it runs it lives
//! in memory (`Live`), where stream readers and `Prefer: wait` watch it; the store
//! holds it at each change of status.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Notify;

use hearth_runtime::{FinishReason, GenerationEvent, RequestStream};

use crate::metrics::Metrics;
use crate::store::Store;
use crate::webhook::{WebhookEvent, WebhookSender};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Starting,
    Processing,
    Succeeded,
    Failed,
    Canceled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Starting => "starting",
            Status::Processing => "processing",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Canceled => "canceled",
        }
    }
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Canceled)
    }
}

/// The public object, as `GET /v1/predictions/{id}` returns it (urls added on output).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prediction {
    pub id: String,
    pub model: String,
    pub version: String,
    pub input: Value,
    pub logs: String,
    pub output: Option<Vec<String>>,
    pub error: Option<String>,
    pub status: Status,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    pub data_removed: bool,
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Value>,
}

/// What is stored: the prediction and what only the server needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub prediction: Prediction,
    /// Absolute base the prediction's URLs were made with (`http://host:port`).
    pub base_url: String,
    pub stream_token: String,
    pub webhook: Option<String>,
    pub webhook_events_filter: Vec<String>,
    /// Unix seconds of creation: the first half of SSE event ids.
    pub created_unix: i64,
}

impl Record {
    pub fn urls(&self) -> Value {
        let p = &self.prediction;
        let b = &self.base_url;
        json!({
            "get": format!("{b}/v1/predictions/{}", p.id),
            "cancel": format!("{b}/v1/predictions/{}/cancel", p.id),
            "stream": format!("{b}/streams/{}/{}", p.id, self.stream_token),
            "web": format!("{b}/p/{}", p.id),
        })
    }

    /// The JSON clients get, urls absolute.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(&self.prediction).unwrap_or(Value::Null);
        if let Value::Object(o) = &mut v {
            o.insert("urls".into(), self.urls());
        }
        v
    }
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// 26 lowercase base32 characters, like Replicate's.
pub fn new_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut rng = rand::rng();
    (0..26)
        .map(|_| ALPHABET[rng.random_range(0..32)] as char)
        .collect()
}

pub fn new_token() -> String {
    let mut rng = rand::rng();
    (0..32)
        .map(|_| format!("{:x}", rng.random_range(0..16u8)))
        .collect()
}

/// A running prediction, shared by its runner, stream readers and waiters.
pub struct Live {
    pub record: Mutex<Record>,
    /// Wakes stream readers and waiters on every output chunk and status change.
    changed: Notify,
    cancel: Notify,
}

impl Live {
    pub fn snapshot(&self) -> Option<Record> {
        self.record.lock().ok().map(|r| r.clone())
    }

    pub fn is_terminal(&self) -> bool {
        self.record
            .lock()
            .map(|r| r.prediction.status.is_terminal())
            .unwrap_or(true)
    }

    /// A future that completes at the next change, registered now so no change
    /// between a check and the await is missed.
    pub fn subscribe(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    pub fn request_cancel(&self) {
        self.cancel.notify_one();
    }

    fn update(&self, f: impl FnOnce(&mut Record)) -> Option<Record> {
        let snapshot = {
            let mut r = self.record.lock().ok()?;
            f(&mut r);
            r.clone()
        };
        self.changed.notify_waiters();
        Some(snapshot)
    }
}

/// Every prediction in flight.
#[derive(Default)]
pub struct Hub {
    live: Mutex<HashMap<String, Arc<Live>>>,
}

impl Hub {
    pub fn get(&self, id: &str) -> Option<Arc<Live>> {
        self.live.lock().ok()?.get(id).cloned()
    }

    pub fn insert(&self, record: Record) -> Arc<Live> {
        let id = record.prediction.id.clone();
        let live = Arc::new(Live {
            record: Mutex::new(record),
            changed: Notify::new(),
            cancel: Notify::new(),
        });
        if let Ok(mut m) = self.live.lock() {
            m.insert(id, live.clone());
        }
        live
    }

    fn remove(&self, id: &str) {
        if let Ok(mut m) = self.live.lock() {
            m.remove(id);
        }
    }

    pub fn all(&self) -> Vec<Arc<Live>> {
        self.live
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.live.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct RunContext {
    pub hub: Arc<Hub>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub webhook: Option<WebhookSender>,
}

fn seconds(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e6
}

/// Drives one prediction from the engine's events to its end.
/// Runs inside a `prediction` span (see `start_prediction`), so every log line of it
/// carries the prediction's id and model.
pub async fn run(live: Arc<Live>, mut stream: RequestStream, ctx: RunContext) {
    let created = Instant::now();
    let mut started: Option<Instant> = None;
    let mut first_token: Option<Instant> = None;
    let mut last_token: Option<Instant> = None;
    let persist = |r: &Record| {
        if let Err(e) = ctx.store.put(r) {
            tracing::error!(error = %e, "could not store prediction");
        }
    };
    let completion = loop {
        let ev = tokio::select! {
            ev = stream.next() => ev,
            _ = live.cancel.notified() => {
                stream.cancel();
                continue;
            }
        };
        match ev {
            Some(GenerationEvent::Started {
                cached_prompt_tokens,
            }) => {
                started = Some(Instant::now());
                ctx.metrics
                    .queue_time
                    .observe(created.elapsed().as_secs_f64());
                if let Some(r) = live.update(|r| {
                    r.prediction.status = Status::Processing;
                    r.prediction.started_at = Some(now_rfc3339());
                    if cached_prompt_tokens > 0 {
                        r.prediction.logs.push_str(&format!(
                            "Prefix cache: {cached_prompt_tokens} prompt tokens reused.\n"
                        ));
                    }
                }) {
                    persist(&r);
                    if let Some(w) = &ctx.webhook {
                        w.send(WebhookEvent::Start, r.to_json());
                    }
                }
            }
            Some(GenerationEvent::Token { text, .. }) => {
                let now = Instant::now();
                if first_token.is_none() {
                    first_token = Some(now);
                    ctx.metrics.ttft.observe((now - created).as_secs_f64());
                } else if let Some(prev) = last_token {
                    ctx.metrics.itl.observe((now - prev).as_secs_f64());
                }
                last_token = Some(now);
                ctx.metrics.generation_tokens.inc();
                if text.is_empty() {
                    continue;
                }
                if let Some(r) =
                    live.update(|r| r.prediction.output.get_or_insert_with(Vec::new).push(text))
                {
                    if let Some(w) = &ctx.webhook {
                        w.send(WebhookEvent::Output, r.to_json());
                    }
                }
            }
            Some(GenerationEvent::Finished(c)) => break Some(c),
            None => break None,
        }
    };
    let end = Instant::now();
    let final_record = live.update(|r| {
        let p = &mut r.prediction;
        p.completed_at = Some(now_rfc3339());
        if p.started_at.is_none() {
            p.started_at = p.completed_at.clone();
        }
        match &completion {
            Some(c) => {
                if !c.trailing_text.is_empty() {
                    p.output.get_or_insert_with(Vec::new).push(c.trailing_text.clone());
                }
                p.status = match c.reason {
                    FinishReason::Stop | FinishReason::Length => Status::Succeeded,
                    FinishReason::Canceled => Status::Canceled,
                    FinishReason::Error => Status::Failed,
                };
                if c.reason == FinishReason::Error {
                    p.error = Some(c.error.clone().unwrap_or_else(|| "generation failed".into()));
                }
                let predict = started.map(|s| end - s).unwrap_or_default();
                let total = end - created;
                let mut m = json!({
                    "predict_time": seconds(predict),
                    "total_time": seconds(total),
                    "input_token_count": c.prompt_tokens,
                    "output_token_count": c.output_tokens,
                    "tokens_per_second": if predict.as_secs_f64() > 0.0 { c.output_tokens as f64 / predict.as_secs_f64() } else { 0.0 },
                });
                if let Some(ft) = first_token {
                    m["time_to_first_token"] = json!(seconds(ft - created));
                }
                p.metrics = Some(m);
                p.logs.push_str(&format!(
                    "Prompt: {} tokens ({} from the prefix cache). Generated {} tokens in {:.3}s ({:.1} tokens/s). Finish reason: {}.{}\n",
                    c.prompt_tokens,
                    c.cached_prompt_tokens,
                    c.output_tokens,
                    predict.as_secs_f64(),
                    if predict.as_secs_f64() > 0.0 { c.output_tokens as f64 / predict.as_secs_f64() } else { 0.0 },
                    c.reason.as_str(),
                    if c.preemptions > 0 { format!(" Preempted {} times.", c.preemptions) } else { String::new() },
                ));
                ctx.metrics.prompt_tokens.add(c.prompt_tokens as u64);
            }
            None => {
                p.status = Status::Failed;
                p.error = Some("the engine stopped before the prediction finished".into());
                p.metrics = Some(json!({"predict_time": 0.0, "total_time": seconds(end - created)}));
            }
        }
    });
    ctx.metrics.e2e.observe((end - created).as_secs_f64());
    if let Some(r) = final_record {
        ctx.metrics.finished(r.prediction.status.as_str());
        // Stored before anyone is told, so a crash after a client saw it cannot lose it.
        persist(&r);
        if let Some(w) = &ctx.webhook {
            w.send(WebhookEvent::Completed, r.to_json());
        }
        ctx.hub.remove(&r.prediction.id);
    }
    live.changed.notify_waiters();
    tracing::info!("prediction finished");
}
