//! Drives one prediction that runs upstream, from the create to its end: sends the
//! create (after 429s, again after the delay, within the deadline), writes the
//! upstream's id to the store before awaiting anything else, then follows it
//! (`follow`: along its event stream, or by polling) and turns the end into a stored
//! record with its `completed` webhook, exactly as a local prediction's runner does.
//! A create whose answer was lost is resolved from the upstream's list (exactly one
//! match: adopted; otherwise failed, saying why); a restart resumes from the stored
//! link.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::attempts;
use super::client::{CreateOutcome, UpstreamClient};
use super::normalize;
use crate::client_quota::Slot;
use crate::prediction::{Live, RunContext};
use crate::record::{now_rfc3339, Record, Status};
use crate::store::{Delivery, StoreError, UpstreamLink};
use crate::webhook::WebhookEvent;

/// Without `Cancel-After`, how long a throttled create is retried.
const CREATE_WINDOW: Duration = Duration::from_secs(600);
/// Before reading the upstream's list for a lost create: time for it to show there.
const LIST_SETTLE: Duration = Duration::from_secs(1);
/// A lost create's candidates were created this long before it was sent at most
/// (clock skew) ...
const WINDOW_BEFORE_MS: i64 = 5_000;
/// ... and this long after.
const WINDOW_AFTER_MS: i64 = 120_000;

/// What the create handler is told after the first attempt.
pub enum First {
    /// The upstream took it, or will be asked again after a throttle: answer 201.
    Accepted,
    /// The upstream refused it (a 4xx): relay its answer unchanged.
    Rejected {
        status: u16,
        body: Vec<u8>,
        content_type: String,
    },
}

/// One upstream prediction to drive.
pub struct Job {
    pub live: Arc<Live>,
    pub client: Arc<UpstreamClient>,
    pub ctx: RunContext,
    pub model: String,
    pub version: Option<String>,
    pub input: Value,
    /// `input`'s bytes as JSON: the upstream echoes it back (`intake::body_max`).
    pub input_bytes: usize,
    pub cancel_after: Option<Duration>,
    pub link: UpstreamLink,
    /// Held until the prediction ends (none for one resumed after a restart).
    pub quota: Option<Slot>,
    pub created: Instant,
    /// Resumed after a restart with its cancel asked before it (`keep_cancel`).
    pub cancel_asked: bool,
}

/// How a prediction ended without the upstream's final record.
pub(super) enum End {
    /// Failed here, with this error.
    Failed(String),
    /// Canceled before the upstream had it.
    Canceled(String),
    /// The upstream refused the create and the caller was told so: no webhook.
    Refused(String),
    /// Another replica owns it now.
    TakenOver,
}

/// A point in one prediction's way through the front (`create sent`, `stream
/// connected`, `first event`, ...) and the milliseconds since its create arrived: at
/// debug level (`HEARTH_LOG=hearth_server::upstream::timing=debug`), where a single
/// prediction's added time can be read off.
pub(super) fn mark(job: &Job, stage: &'static str) {
    tracing::debug!(
        target: "hearth_server::upstream::timing",
        stage,
        ms = job.created.elapsed().as_secs_f64() * 1e3
    );
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Job {
    pub(super) fn id(&self) -> String {
        self.link.prediction_id.clone()
    }

    /// A cancel was asked (by the caller, the deadline, the shutdown's drain): kept in
    /// the store before it goes upstream, so a restart that finds the prediction still
    /// in flight (the process ended before the upstream confirmed it) sends it again
    /// instead of following the prediction to an end nobody wants.
    pub(super) async fn keep_cancel(&self) {
        if let Err(e) = self.ctx.store.request_cancel(&self.id()).await {
            tracing::warn!(error = %e, "could not store a prediction's cancel request");
        }
    }

    pub(super) fn note(&self, line: String) {
        self.live.update(|r| {
            r.prediction.logs.push_str(&line);
            r.prediction.logs.push('\n');
        });
    }
}

/// Runs the job to its end. `first` hears how the first create attempt went;
/// `resumed`: the job comes from the store after a restart.
pub async fn run(mut job: Job, mut first: Option<oneshot::Sender<First>>) {
    // The upstream's id, and its stream when the create named one.
    let upstream_id = match job.link.upstream_id.clone() {
        Some(u) => Ok((u, None)),
        // Cog takes hearth's id: nothing to create or resolve before following it.
        None if job.client.cog => Ok((job.id(), None)),
        None if first.is_none() => {
            job.note(format!(
                "Resumed after a restart: the create sent to upstream {} had no recorded answer; looking for it in the upstream's list.",
                job.client.name
            ));
            resolve_lost_create(&job)
                .await
                .map(|u| (u, None))
                .map_err(End::Failed)
        }
        None => create(&mut job, &mut first).await,
    };
    if !job.client.cog {
        if let Some(tx) = first.take() {
            let _ = tx.send(First::Accepted);
        }
    }
    let end = match upstream_id {
        Ok((uid, stream)) => {
            job.link.upstream_id = Some(uid.clone());
            let stored = job.ctx.store.upstream_link_put(&job.link).await;
            mark(&job, "upstream id stored");
            match stored {
                Ok(()) if job.client.cog => super::cog_runner::follow(&job, &uid, &mut first).await,
                Ok(()) => super::follow::follow(&job, &uid, stream).await,
                Err(e) => {
                    tracing::error!(error = %e, "could not store the upstream id; canceling it upstream");
                    if !job.client.cog {
                        let _ = job.client.cancel(&uid).await;
                    }
                    Err(End::Failed(
                        "the server could not save this prediction's upstream id (a storage error; see the server log); it was canceled upstream: create it again"
                            .into(),
                    ))
                }
            }
        }
        Err(end) => Err(end),
    };
    match end {
        Ok(mut final_record) => {
            if let Some(m) = &job.client.mirror {
                for line in super::files::mirror_outputs(m, &job.ctx.store, &mut final_record).await
                {
                    final_record.prediction.logs.push_str(&line);
                    final_record.prediction.logs.push('\n');
                }
            }
            finish(&job, final_record, true).await;
            mark(&job, "finished");
        }
        Err(End::TakenOver) => taken_over(&job).await,
        Err(end) => {
            let Some(mut r) = job.live.snapshot() else {
                return;
            };
            let (status, error, webhook) = match end {
                End::Failed(e) => (Status::Failed, Some(e), true),
                End::Canceled(note) => {
                    r.prediction.logs.push_str(&note);
                    r.prediction.logs.push('\n');
                    (Status::Canceled, None, true)
                }
                End::Refused(e) => (Status::Failed, Some(e), false),
                End::TakenOver => unreachable_end(),
            };
            let now = now_rfc3339();
            r.prediction.finish(status, &now);
            r.prediction.error = error;
            let total = r.prediction.seconds_since_created(&now);
            r.prediction.metrics = Some(json!({"predict_time": 0.0, "total_time": total}));
            finish(&job, r, webhook).await
        }
    }
    drop(job.quota.take());
}

/// `End::TakenOver` is handled before the match that would need this.
fn unreachable_end() -> (Status, Option<String>, bool) {
    (
        Status::Failed,
        Some("internal: unexpected end".into()),
        false,
    )
}

/// Awaits `fut` to its end even when a cancel is asked meanwhile (dropping a create
/// in flight would make it ambiguous); says whether one was, and keeps it in the store
/// at once (`Job::keep_cancel`).
pub(super) async fn uninterrupted<T>(
    job: &Job,
    fut: impl std::future::Future<Output = T>,
) -> (T, bool) {
    tokio::pin!(fut);
    let mut canceled = false;
    loop {
        tokio::select! {
            out = &mut fut => return (out, canceled),
            _ = job.live.cancel_requested(), if !canceled => {
                canceled = true;
                job.keep_cancel().await;
            }
        }
    }
}

/// Sends the create until the upstream names the prediction: its id (and its event
/// stream's URL when the answer has one), or how it ended.
async fn create(
    job: &mut Job,
    first: &mut Option<oneshot::Sender<First>>,
) -> Result<(String, Option<String>), End> {
    let deadline = Instant::now() + job.cancel_after.unwrap_or(CREATE_WINDOW).min(CREATE_WINDOW);
    let name = job.client.name.clone();
    let mut retry = attempts::ConnectRetry::default();
    loop {
        job.link.create_sent_ms = now_ms();
        // The link first: a restart from here on looks for this create upstream.
        if let Err(e) = job.ctx.store.upstream_link_put(&job.link).await {
            tracing::error!(error = %e, "could not store the upstream link; not sending the create");
            return Err(End::Failed(
                "the server could not save this prediction (a storage error; see the server log); create it again".into(),
            ));
        }
        mark(job, "create sent");
        let sent = job.client.create(
            &job.model,
            job.version.as_deref(),
            &job.input,
            job.cancel_after,
        );
        let (outcome, canceled) = uninterrupted(job, sent).await;
        mark(job, "create answered");
        let (uid, stream) = match outcome {
            CreateOutcome::Created(v) => {
                job.client.breaker.success();
                // Created by model name: the record names the version the upstream ran,
                // as Replicate's records always do.
                if let Some(ver) = v["version"].as_str().filter(|s| !s.is_empty()) {
                    job.live.update(|r| {
                        if r.prediction.version.is_empty() {
                            r.prediction.version = ver.to_string();
                        }
                    });
                }
                let stream = v["urls"]["stream"].as_str().map(str::to_string);
                match v["id"].as_str().filter(|id| normalize::valid_id(id)) {
                    Some(id) => (id.to_string(), stream),
                    None => {
                        return Err(End::Failed(format!(
                            "upstream {name} answered the create without a usable prediction id"
                        )))
                    }
                }
            }
            CreateOutcome::Throttled(wait) => {
                if let Some(tx) = first.take() {
                    let _ = tx.send(First::Accepted);
                }
                if canceled {
                    return Err(End::Canceled(format!(
                        "Canceled while upstream {name} was throttling its create (never created there)."
                    )));
                }
                if Instant::now() + wait > deadline {
                    return Err(End::Failed(format!(
                        "upstream {name} kept throttling the create (429) past its deadline; it was never created there"
                    )));
                }
                job.note(format!(
                    "Upstream {name} throttled the create (429): sending it again in {:.1}s.",
                    wait.as_secs_f64()
                ));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = job.live.cancel_requested() => return Err(End::Canceled(format!(
                        "Canceled while upstream {name} was throttling its create (never created there)."
                    ))),
                }
            }
            CreateOutcome::Rejected {
                status,
                body,
                content_type,
            } => {
                let who = format!("upstream {name}");
                return Err(attempts::refused(first, &who, status, body, content_type));
            }
            CreateOutcome::ServerError { status, detail } => {
                job.client.breaker.failure();
                return Err(End::Failed(format!(
                    "upstream {name} answered the create with {status} ({detail}); not sent again, since it may have been received"
                )));
            }
            CreateOutcome::NotSent(e) => {
                if canceled {
                    job.client.breaker.failure();
                    return Err(End::Canceled(format!(
                        "Canceled before upstream {name} could be reached (never created there)."
                    )));
                }
                let who = format!("upstream {name}");
                retry.after(job, &who, &e, Some(deadline)).await?;
                continue;
            }
            CreateOutcome::Ambiguous(e) => {
                job.client.breaker.failure();
                tracing::warn!(upstream = %name, error = %e, "a create's answer was lost; looking for it in the upstream's list");
                job.note(format!(
                    "The answer to the create sent to upstream {name} was lost ({e}); looking for the prediction in the upstream's list instead of sending it again."
                ));
                (resolve_lost_create(job).await.map_err(End::Failed)?, None)
            }
        };
        if canceled {
            job.live.request_cancel();
        }
        return Ok((uid, stream));
    }
}

/// Finds the upstream prediction a lost create made: exactly one of the upstream's
/// recent predictions with the same model, identical input and a creation time in
/// the window around the send. None or several: an error that says so.
async fn resolve_lost_create(job: &Job) -> Result<String, String> {
    let name = &job.client.name;
    let sent = job.link.create_sent_ms;
    let mut last_err = String::new();
    for attempt in 0..3u32 {
        tokio::time::sleep(LIST_SETTLE * (attempt + 1)).await;
        let list = match job.client.recent_predictions().await {
            Ok(l) => l,
            Err(e) => {
                last_err = e.to_string();
                continue;
            }
        };
        let matches: Vec<String> = list
            .iter()
            .filter(|p| same_request(job, p, sent))
            .filter_map(|p| p["id"].as_str().filter(|i| normalize::valid_id(i)))
            .map(str::to_string)
            .collect();
        match matches.len() {
            1 => {
                job.note(format!(
                    "Found it upstream: {} (the only prediction there with this model and input from that time).",
                    matches[0]
                ));
                return Ok(matches[0].clone());
            }
            0 => last_err = "no prediction with this model and input from that time is listed there".into(),
            n => {
                return Err(format!(
                    "the answer to this prediction's create from upstream {name} was lost, and {n} predictions there have the same model and identical input from that time ({}): hearth cannot tell which one is this, so it adopted none and sent nothing again; check them upstream and create this one again if needed",
                    matches.join(", ")
                ))
            }
        }
    }
    Err(format!(
        "the answer to this prediction's create from upstream {name} was lost and it could not be found there ({last_err}); it may or may not run there, so it was not sent again: check upstream and create it again if needed"
    ))
}

fn same_request(job: &Job, p: &Value, sent_ms: i64) -> bool {
    let model_ok = p["model"].as_str() == Some(job.model.as_str())
        || (job.version.is_some() && p["version"].as_str() == job.version.as_deref());
    let created = p["created_at"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp_millis());
    let in_window =
        created.is_some_and(|c| c >= sent_ms - WINDOW_BEFORE_MS && c <= sent_ms + WINDOW_AFTER_MS);
    model_ok && in_window && p["input"] == job.input
}

/// The end as the upstream reports it: its output (normalized), error, timestamps and
/// metrics — the side that ran it is the one that timed it.
pub(super) fn final_record(
    job: &Job,
    mut r: Record,
    uid: &str,
    u: &Value,
    status: Status,
    base_logs: &str,
    polled_since: Instant,
) -> Record {
    let p = &mut r.prediction;
    let completed = u["completed_at"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(now_rfc3339);
    p.output = Some(normalize::chunks(&u["output"]));
    if let Some(logs) = u["logs"].as_str() {
        p.logs = format!("{base_logs}{logs}");
    }
    // The side that ran it timed it (a stream's first event only approximates it).
    if let Some(at) = u["started_at"].as_str() {
        p.started_at = Some(at.to_string());
    }
    p.finish(status, &completed);
    p.error = if status == Status::Failed {
        Some(
            normalize::error(u).unwrap_or_else(|| format!("failed upstream ({})", job.client.name)),
        )
    } else {
        None
    };
    let mut m = match &u["metrics"] {
        Value::Object(o) => Value::Object(o.clone()),
        _ => json!({}),
    };
    if m.get("predict_time").is_none() {
        let t = |s: Option<&str>| s.and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok());
        let predict = match (t(p.started_at.as_deref()), t(Some(&completed))) {
            (Some(a), Some(b)) => (b - a).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6,
            _ => polled_since.elapsed().as_secs_f64(),
        };
        m["predict_time"] = json!(predict);
    }
    if m.get("total_time").is_none() {
        m["total_time"] = json!(job.created.elapsed().as_secs_f64());
    }
    p.metrics = Some(m);
    if let Some(h) = p.hearth.as_mut() {
        h["upstream_id"] = json!(uid);
    }
    r
}

/// Stores the end (with the `completed` webhook when `webhook`), then shows it.
async fn finish(job: &Job, r: Record, webhook: bool) {
    let ctx = &job.ctx;
    ctx.metrics.upstream_finished(
        r.prediction.status.as_str(),
        job.created.elapsed().as_secs_f64(),
    );
    let hooks: Vec<Delivery> = match (&ctx.webhook, webhook) {
        (Some(w), true) => w.prepare(WebhookEvent::Completed, &r),
        _ => Vec::new(),
    };
    match ctx
        .store
        .finish(&r, &hooks, crate::webhook::dispatcher::now_ms())
        .await
    {
        Ok(()) => {
            if let (Some(w), false) = (&ctx.webhook, hooks.is_empty()) {
                w.queued(&hooks);
            }
        }
        Err(StoreError::NotOwner(_)) => return taken_over(job).await,
        Err(e) => {
            tracing::error!(error = %e, "could not store the finished prediction; keeping it in memory and retrying");
            ctx.hub.keep_unsaved(r.clone());
            if let Some(w) = &ctx.webhook {
                w.push(&hooks).await;
            }
        }
    }
    job.live.update(|x| *x = r.clone());
    ctx.hub.remove(&r.prediction.id);
    tracing::info!(
        status = r.prediction.status.as_str(),
        "upstream prediction finished"
    );
}

/// Another replica took the prediction over (this one's lease ran out): it polls it
/// now; this one lets go.
async fn taken_over(job: &Job) {
    tracing::warn!("another replica took this upstream prediction over; stopping here");
    let id = job.id();
    let stored = job.ctx.store.get(&id).await.ok().flatten();
    job.live.update(|r| {
        if let Some(s) = stored {
            *r = s;
        }
    });
    job.ctx.hub.remove(&id);
}
