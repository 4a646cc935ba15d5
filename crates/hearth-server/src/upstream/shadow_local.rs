//! `shadow-local:UP:PCT` routes, the reverse of `shadow`: the caller's prediction runs
//! on upstream UP exactly as on an `upstream` route (its record, id, stream and
//! webhooks); for PCT% of creates (the canary's hash of the prediction id) a copy of
//! the same input runs on this server's engine at background priority
//! (`Priority::Background`: admitted only into what callers' work leaves, preempted
//! before any of it, waiting in its own bounded queue), so a team can see how its
//! own GPUs would do on real traffic before moving any of it. The copy is the
//! comparison's alone: no record, not listed, no webhook, nothing taken from the
//! caller's quota. It is bounded like a `shadow` copy (`--shadow-max-concurrent`,
//! `--shadow-max-per-minute`; past either it is skipped and counted), by the engine's
//! background queue (`--max-waiting-background`; when full, or when the engine is
//! not running, it is skipped as `local_engine`), and in time; the server's shutdown
//! cancels it. A copy's latency, time to first output and tokens/s are counted from
//! when the engine started it: its wait in the background queue is its priority's
//! doing, not what a caller would see.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use hearth_runtime::{FinishReason, GenerationEvent, GenerationRequest, Priority, RuntimeError};

use super::compare::{FailKind, Observation, Outcome, Pair, Side, Skip};
use super::create::{Created, Routed};
use super::shadow::{refusal_kind, watch, COPY_LIMIT};
use super::stats;
use crate::error::ApiError;
use crate::models::ServedModel;
use crate::record::{new_id, now_rfc3339, Status};
use crate::service::{CreateRequest, Origin, ServiceResult};
use crate::AppState;

/// A shadow-local route's create: the caller's prediction upstream, and maybe a copy
/// on the local engine.
pub async fn create(
    state: &Arc<AppState>,
    routed: &Routed,
    local: &Arc<ServedModel>,
    upstream: &str,
    percent: u8,
    req: CreateRequest,
    mut origin: Origin,
) -> ServiceResult<Created> {
    let id = origin.id.clone().unwrap_or_else(new_id);
    origin.id = Some(id.clone());
    let input = req.input.clone();
    let limit = req.cancel_after.unwrap_or(COPY_LIMIT).min(COPY_LIMIT);
    let created = Instant::now();
    let model = routed.model.clone();
    let result =
        super::create::upstream(state, upstream, routed, req, origin, Some("shadow")).await;
    let live = match result {
        Ok(Created::Live(live)) => live,
        // Refused before the upstream ran it: no pair to make.
        other => {
            super::shadow::observe_create(state, &model, Side::Upstream, &other);
            return other;
        }
    };
    let permit = super::shadow::admit_copy(state, &model, &id, percent, || {
        if local.engine.is_alive() {
            Ok(())
        } else {
            Err(Skip::LocalEngine)
        }
    })
    .map(|((), permit)| permit);
    let state = state.clone();
    let local = local.clone();
    let watched = live.clone();
    let span =
        tracing::info_span!("shadow_local", prediction = %id, model = %model, upstream = %upstream);
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let compare = &state.upstream.compare;
            let Some(permit) = permit else {
                if let Some(w) = watch(&watched, created).await {
                    compare.observe(&model, Side::Upstream, &w.observation(Side::Upstream));
                }
                return;
            };
            let (primary, copy) = tokio::join!(
                watch(&watched, created),
                run_copy(&state, &local, &input, limit)
            );
            drop(permit);
            if let Some(w) = &primary {
                compare.observe(&model, Side::Upstream, &w.observation(Side::Upstream));
            }
            let Some(copy) = copy else {
                compare.copy_refused(&model, Skip::LocalEngine);
                return;
            };
            let (upstream_status, upstream_id) = match &primary {
                Some(w) => (
                    w.record.prediction.status,
                    w.record
                        .prediction
                        .hearth
                        .as_ref()
                        .and_then(|h| h["upstream_id"].as_str().map(str::to_string)),
                ),
                None => (Status::Processing, None),
            };
            let agreement = match (&primary, copy.output) {
                (Some(w), Some(ours))
                    if upstream_status == Status::Succeeded
                        && copy.observation.outcome == Outcome::Succeeded =>
                {
                    let theirs = w.record.prediction.output.clone().unwrap_or_default();
                    // The edit distance is quadratic: off the async workers.
                    tokio::task::spawn_blocking(move || stats::agreement(&ours, &theirs))
                        .await
                        .ok()
                }
                _ => None,
            };
            compare.pair(
                &model,
                Side::Local,
                &copy.observation,
                Pair {
                    id: watched
                        .snapshot()
                        .map(|r| r.prediction.id)
                        .unwrap_or_default(),
                    upstream_id,
                    local: copy.observation.outcome.status(),
                    upstream: upstream_status,
                    copy_started_at: copy.started_at,
                    agreement,
                },
            );
        },
        span,
    ));
    Ok(Created::Live(live))
}

/// A local copy's end.
struct LocalCopy {
    observation: Observation,
    output: Option<Vec<String>>,
    /// When the engine started it.
    started_at: Option<String>,
}

fn ended(kind: FailKind, started_at: Option<String>) -> Option<LocalCopy> {
    Some(LocalCopy {
        observation: Observation::refused(kind),
        output: None,
        started_at,
    })
}

/// Runs one copy on the local engine at background priority to its end, its time
/// limit, or the server's shutdown. None: the engine did not take it (its background
/// queue was full, or it is not running).
async fn run_copy(
    state: &AppState,
    model: &Arc<ServedModel>,
    input: &Value,
    limit: Duration,
) -> Option<LocalCopy> {
    let refused = |e: ApiError| ended(refusal_kind(&e, Side::Local), None);
    let parsed = match crate::schema::parse_input(input, &model.defaults, Some(&model.limits())) {
        Ok(p) => p,
        Err(e) => return refused(e),
    };
    let prompt = match model.engine.tokenizer().prompt_tokens(&parsed.prompt) {
        Ok(p) => p,
        Err(e) => return refused(e.into()),
    };
    let mut params = parsed.params;
    params.constraint =
        match crate::constraint_input::compile(model, parsed.constraint, &parsed.prompt).await {
            Ok(c) => c,
            Err(e) => return refused(e),
        };
    // Dropped on every return below: the engine cancels it then.
    let mut stream = match model
        .engine
        .submit_at(GenerationRequest { prompt, params }, Priority::Background)
    {
        Ok(s) => s,
        Err(
            e @ (RuntimeError::BackgroundQueueFull(_)
            | RuntimeError::EngineStopped
            | RuntimeError::EngineDefunct(_)),
        ) => {
            tracing::info!(error = %e, "the local engine did not take a shadow copy");
            return None;
        }
        Err(e) => return refused(e.into()),
    };
    let deadline = tokio::time::Instant::now() + limit;
    let mut started_at = None;
    let mut output = Vec::new();
    let completion = loop {
        let ev = tokio::select! {
            ev = stream.next() => ev,
            _ = tokio::time::sleep_until(deadline) => return ended(FailKind::Timeout, started_at),
            _ = state.stop.cancelled() => {
                return Some(LocalCopy {
                    observation: Observation {
                        outcome: Outcome::Canceled,
                        latency: None,
                        first_output: None,
                        tokens_per_second: None,
                    },
                    output: None,
                    started_at,
                });
            }
        };
        match ev {
            Some(GenerationEvent::Started { .. }) => started_at = Some(now_rfc3339()),
            Some(GenerationEvent::Token { text, .. }) if !text.is_empty() => output.push(text),
            Some(GenerationEvent::Token { .. }) => {}
            Some(GenerationEvent::Finished(c)) => break c,
            None => return ended(FailKind::Engine, started_at),
        }
    };
    if !completion.trailing_text.is_empty() {
        output.push(completion.trailing_text.clone());
    }
    let t = &completion.timings;
    let ran = t.total.saturating_sub(t.queued).as_secs_f64();
    let outcome = match completion.reason {
        FinishReason::Stop | FinishReason::Length => Outcome::Succeeded,
        FinishReason::Canceled => Outcome::Canceled,
        FinishReason::Error => Outcome::Failed(FailKind::Engine),
    };
    Some(LocalCopy {
        observation: Observation {
            outcome,
            latency: Some(ran),
            first_output: t
                .time_to_first_token
                .map(|f| f.saturating_sub(t.queued).as_secs_f64()),
            tokens_per_second: (ran > 0.0).then(|| completion.output_tokens as f64 / ran),
        },
        output: Some(output),
        started_at,
    })
}
