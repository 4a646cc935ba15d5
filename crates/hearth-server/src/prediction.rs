//! A prediction's life: created (`starting`), admitted by the engine (`processing`),
//! streaming output, then `succeeded`, `failed` or `canceled`. While it runs it lives
//! in memory (`Live`), where stream readers and `Prefer: wait` watch it; the store
//! holds it at each change of status. A prediction whose last write failed stays in
//! memory (`Hub::unsaved`) and is written again later, so no reader sees it go back.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::Notify;

use hearth_runtime::{FinishReason, GenerationEvent, RequestStream};

use crate::metrics::{Metrics, RequestTimer};
use crate::record::{now_rfc3339, Record, Status};
use crate::store::{Delivery, SharedStore, StoreError};
use crate::webhook::{WebhookEvent, WebhookSender};

pub use crate::record::{new_id, new_token};

/// Finished predictions whose final write failed, kept until a retry writes them.
const MAX_UNSAVED: usize = 10_000;

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

    /// Completes when a cancel is asked (one waiter at a time: the runner).
    pub(crate) fn cancel_requested(&self) -> tokio::sync::futures::Notified<'_> {
        self.cancel.notified()
    }

    /// Reads the record in place, under its lock: what a reader needs without a copy
    /// of the whole record (output and input included) at every chunk.
    pub fn read<T>(&self, f: impl FnOnce(&Record) -> T) -> Option<T> {
        self.record.lock().ok().map(|r| f(&r))
    }

    /// As `update`, without the copy it returns: a change no webhook needs to see.
    pub(crate) fn apply(&self, f: impl FnOnce(&mut Record)) {
        if let Ok(mut r) = self.record.lock() {
            f(&mut r);
        }
        self.changed.notify_waiters();
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut Record)) -> Option<Record> {
        let snapshot = {
            let mut r = self.record.lock().ok()?;
            f(&mut r);
            r.clone()
        };
        self.changed.notify_waiters();
        Some(snapshot)
    }
}

/// Every prediction in flight, and finished ones not yet written.
#[derive(Default)]
pub struct Hub {
    live: Mutex<HashMap<String, Arc<Live>>>,
    unsaved: Mutex<VecDeque<Record>>,
}

impl Hub {
    pub fn get(&self, id: &str) -> Option<Arc<Live>> {
        self.live.lock().ok()?.get(id).cloned()
    }

    /// None when a prediction with this id is already in flight.
    pub fn try_insert(&self, record: Record) -> Option<Arc<Live>> {
        let id = record.prediction.id.clone();
        let mut m = self.live.lock().ok()?;
        if m.contains_key(&id) {
            return None;
        }
        let live = Arc::new(Live {
            record: Mutex::new(record),
            changed: Notify::new(),
            cancel: Notify::new(),
        });
        m.insert(id, live.clone());
        Some(live)
    }

    pub(crate) fn remove(&self, id: &str) {
        if let Ok(mut m) = self.live.lock() {
            m.remove(id);
        }
    }

    /// A finished prediction the store did not take: kept (bounded) for readers and
    /// for `save_unsaved`.
    pub(crate) fn keep_unsaved(&self, r: Record) {
        if let Ok(mut q) = self.unsaved.lock() {
            q.retain(|x| x.prediction.id != r.prediction.id);
            if q.len() >= MAX_UNSAVED {
                if let Some(old) = q.pop_front() {
                    tracing::error!(prediction = %old.prediction.id, "dropping an unsaved finished prediction: too many");
                }
            }
            q.push_back(r);
        }
    }

    pub fn unsaved(&self, id: &str) -> Option<Record> {
        self.unsaved
            .lock()
            .ok()?
            .iter()
            .find(|r| r.prediction.id == id)
            .cloned()
    }

    /// Writes what the store refused before; returns how many are still unsaved. One
    /// another replica has taken over meanwhile is its to end: dropped here.
    pub async fn save_unsaved(&self, store: &SharedStore) -> usize {
        let pending: Vec<Record> = match self.unsaved.lock() {
            Ok(q) => q.iter().cloned().collect(),
            Err(_) => return 0,
        };
        let mut saved = Vec::new();
        for r in &pending {
            match store.put(r).await {
                Ok(()) | Err(StoreError::NotOwner(_)) => saved.push(r.prediction.id.clone()),
                Err(_) => {}
            }
        }
        match self.unsaved.lock() {
            Ok(mut q) => {
                q.retain(|r| !saved.contains(&r.prediction.id));
                q.len()
            }
            Err(_) => 0,
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
    pub store: SharedStore,
    pub metrics: Arc<Metrics>,
    pub webhook: Option<WebhookSender>,
    /// `Cancel-After`: past it the prediction is canceled, queued or running.
    pub deadline: Option<tokio::time::Instant>,
}

impl RunContext {
    pub(crate) async fn notify(&self, event: WebhookEvent, r: &Record) {
        if let Some(w) = &self.webhook {
            w.send(event, r).await;
        }
    }
}

/// How often a running prediction's new output is written to a shared store, where
/// other replicas read it (their SSE readers and GETs poll at the same pace).
pub const OUTPUT_FLUSH: Duration = Duration::from_millis(100);

fn seconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e6
}

/// Why the event loop ended.
enum End {
    Finished(hearth_runtime::Completion),
    EngineGone,
    /// The store refused a write: the prediction cannot be kept, so it ends now.
    StoreFailed,
    /// Another replica took the prediction over (this one's lease had run out): it
    /// ends it, this one only stops.
    TakenOver,
}

/// Drives one prediction from the engine's events to its end.
/// Runs inside a `prediction` span (see `service::create`), so every log line of it
/// carries the prediction's id and model.
pub async fn run(live: Arc<Live>, mut stream: RequestStream, ctx: RunContext) {
    let mut timer = RequestTimer::new(ctx.metrics.clone());
    let mut deadline_passed = false;
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    let deadline = ctx.deadline.unwrap_or(far);
    let shared = ctx.store.is_shared();
    let mut flush = tokio::time::interval(OUTPUT_FLUSH);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty = false;
    let end = loop {
        let ev = tokio::select! {
            ev = stream.next() => ev,
            _ = flush.tick(), if shared && dirty => {
                dirty = false;
                if let Some(r) = live.snapshot() {
                    match ctx.store.put(&r).await {
                        Ok(()) => {}
                        Err(StoreError::NotOwner(_)) => {
                            stream.cancel();
                            break End::TakenOver;
                        }
                        // Best effort: readers elsewhere lag; the final write matters.
                        Err(e) => tracing::warn!(error = %e, "could not write streamed output"),
                    }
                }
                continue;
            }
            _ = live.cancel.notified() => {
                stream.cancel();
                continue;
            }
            _ = tokio::time::sleep_until(deadline), if ctx.deadline.is_some() && !deadline_passed => {
                deadline_passed = true;
                live.update(|r| r.prediction.logs.push_str("Deadline passed (Cancel-After): canceled.\n"));
                stream.cancel();
                continue;
            }
        };
        match ev {
            Some(GenerationEvent::Started {
                cached_prompt_tokens,
            }) => {
                timer.started();
                let Some(r) = live.update(|r| {
                    r.prediction.status = Status::Processing;
                    r.prediction.started_at = Some(now_rfc3339());
                    if cached_prompt_tokens > 0 {
                        r.prediction.logs.push_str(&format!(
                            "Prefix cache: {cached_prompt_tokens} prompt tokens reused.\n"
                        ));
                    }
                }) else {
                    continue;
                };
                match ctx.store.put(&r).await {
                    Ok(()) => {}
                    Err(StoreError::NotOwner(_)) => {
                        stream.cancel();
                        break End::TakenOver;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "could not store the started prediction; failing it");
                        stream.cancel();
                        break End::StoreFailed;
                    }
                }
                ctx.notify(WebhookEvent::Start, &r).await;
                if cached_prompt_tokens > 0 {
                    ctx.notify(WebhookEvent::Logs, &r).await;
                }
            }
            Some(GenerationEvent::Token { text, .. }) => {
                timer.token();
                if text.is_empty() {
                    continue;
                }
                let push =
                    |r: &mut Record| r.prediction.output.get_or_insert_with(Vec::new).push(text);
                dirty = true;
                // Without a webhook nobody needs a copy of the record at every token.
                if ctx.webhook.is_none() {
                    live.apply(push);
                } else if let Some(r) = live.update(push) {
                    ctx.notify(WebhookEvent::Output, &r).await;
                }
            }
            Some(GenerationEvent::Finished(c)) => break End::Finished(c),
            None => break End::EngineGone,
        }
    };
    if let End::TakenOver = end {
        return taken_over(&live, &ctx).await;
    }
    let finished_at = Instant::now();
    let created = timer.created;
    let now = now_rfc3339();
    // The end is built on a copy and published only once it is stored: a client told
    // `succeeded` or `canceled` here (a wait, a cancel) and then asking another replica
    // must read the same.
    let final_record = live.snapshot().map(|mut r| {
        let p = &mut r.prediction;
        let total = seconds(finished_at - created);
        match &end {
            End::Finished(c) => {
                if !c.trailing_text.is_empty() {
                    p.output.get_or_insert_with(Vec::new).push(c.trailing_text.clone());
                }
                let status = match c.reason {
                    FinishReason::Stop | FinishReason::Length => Status::Succeeded,
                    FinishReason::Canceled => Status::Canceled,
                    FinishReason::Error => Status::Failed,
                };
                p.finish(status, &now);
                if c.reason == FinishReason::Error {
                    p.error = Some(c.error.clone().unwrap_or_else(|| "generation failed".into()));
                }
                let predict = timer.started.map(|s| finished_at - s).unwrap_or_default();
                let tps = if predict.as_secs_f64() > 0.0 { c.output_tokens as f64 / predict.as_secs_f64() } else { 0.0 };
                let mut m = json!({
                    "predict_time": seconds(predict),
                    "total_time": total,
                    "input_token_count": c.prompt_tokens,
                    "output_token_count": c.output_tokens,
                    "tokens_per_second": tps,
                });
                if let Some(ft) = timer.first_token {
                    m["time_to_first_token"] = json!(seconds(ft - created));
                }
                p.metrics = Some(m);
                p.logs.push_str(&format!(
                    "Prompt: {} tokens ({} from the prefix cache). Generated {} tokens in {:.3}s ({:.1} tokens/s). Finish reason: {}.{}\n",
                    c.prompt_tokens,
                    c.cached_prompt_tokens,
                    c.output_tokens,
                    predict.as_secs_f64(),
                    tps,
                    c.reason.as_str(),
                    if c.preemptions > 0 { format!(" Preempted {} times.", c.preemptions) } else { String::new() },
                ));
                if let Some(note) = crate::constraint_input::incomplete_note(&p.input, c.reason) {
                    p.logs.push_str(note);
                    // hearth's own flag beside Replicate's metrics.
                    if let Some(m) = p.metrics.as_mut() {
                        m["output_incomplete"] = json!(true);
                    }
                }
            }
            End::EngineGone => {
                p.finish(Status::Failed, &now);
                p.error = Some("the engine stopped before the prediction finished".into());
                p.metrics = Some(json!({"predict_time": 0.0, "total_time": total}));
            }
            End::StoreFailed | End::TakenOver => {
                p.finish(Status::Failed, &now);
                p.error = Some(
                    "the server could not save this prediction (a storage error; see the server log); create it again"
                        .into(),
                );
                p.metrics = Some(json!({"predict_time": 0.0, "total_time": total}));
            }
        }
        r
    });
    ctx.metrics
        .e2e
        .observe((finished_at - created).as_secs_f64());
    if let Some(r) = final_record {
        ctx.metrics.finished(r.prediction.status.as_str());
        // The summary line is logged by the running prediction: its `logs` event shows
        // the prediction still processing, before `completed` ends it.
        let mut running = r.clone();
        let p = &mut running.prediction;
        (p.status, p.metrics, p.error, p.completed_at) = (Status::Processing, None, None, None);
        let hooks: Vec<Delivery> = match &ctx.webhook {
            Some(w) => [
                (WebhookEvent::Logs, &running),
                (WebhookEvent::Completed, &r),
            ]
            .into_iter()
            .flat_map(|(event, rec)| w.prepare(event, rec))
            .collect(),
            None => Vec::new(),
        };
        // Stored, with its last webhooks, before anyone is told: a crash after a client
        // saw the end cannot lose it, nor the `completed` webhook of a stored end.
        match ctx
            .store
            .finish(&r, &hooks, crate::webhook::dispatcher::now_ms())
            .await
        {
            Ok(()) => {
                if let Some(w) = &ctx.webhook {
                    w.queued(&hooks);
                }
            }
            Err(StoreError::NotOwner(_)) => return taken_over(&live, &ctx).await,
            Err(e) => {
                tracing::error!(error = %e, "could not store the finished prediction; keeping it in memory and retrying");
                ctx.hub.keep_unsaved(r.clone());
                if let Some(w) = &ctx.webhook {
                    w.push(&hooks).await;
                }
            }
        }
        live.update(|x| *x = r.clone());
        ctx.hub.remove(&r.prediction.id);
    }
    live.changed.notify_waiters();
    tracing::info!("prediction finished");
}

/// This replica's lease ran out and another ended the prediction: show its readers
/// here what the store says (or that it was taken over) and let go of it.
async fn taken_over(live: &Live, ctx: &RunContext) {
    tracing::warn!("another replica took this prediction over (this one's lease had run out); stopping it here");
    let id = live.snapshot().map(|r| r.prediction.id).unwrap_or_default();
    let stored = ctx.store.get(&id).await.ok().flatten();
    live.update(|r| match stored {
        Some(s) if s.prediction.status.is_terminal() => *r = s,
        _ => {
            r.prediction.finish(Status::Failed, &now_rfc3339());
            r.prediction.error = Some(
                "the replica running this prediction lost its lease and another replica ended it; create it again"
                    .into(),
            );
        }
    });
    ctx.hub.remove(&id);
    live.changed.notify_waiters();
}
