//! `shadow:UP:PCT` routes: every create runs here as the caller's prediction, exactly
//! as without a route; for PCT% of them (the canary's hash of the prediction id) a
//! copy with the same input is sent to the upstream in the background. The copy is
//! the comparison's alone: it is not stored, not listed, has no webhook and no
//! stream, takes nothing from the caller's quota, and its result reaches only
//! `compare` (the counts, and the last pairs with the upstream's id). Copies are
//! bounded per route — at most `--shadow-max-concurrent` at once and
//! `--shadow-max-per-minute` sent in any minute; past either a copy is skipped and
//! counted, never queued — and each is bounded in time (`shadow_copy` sends one and
//! follows it along the upstream's event stream). A copy that an upstream
//! throttles (429) is not sent again. Copies are not durable: a restart forgets the
//! ones in flight (they may still run upstream). Canary routes are watched here too,
//! for the comparison's per-side figures. The other direction, an upstream primary
//! with copies on the local engine, is `shadow_local`; both share these bounds.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::compare::{FailKind, Observation, Outcome, Pair, Side, Skip};
use super::create::{Created, Routed};
use super::intake::output_bytes;
use super::route::{canary_goes_upstream, Route};
use super::stats;
use crate::error::ApiError;
use crate::models::ServedModel;
use crate::prediction::Live;
use crate::record::{new_id, Record, Status};
use crate::service::{self, CreateRequest, Origin, ServiceResult};
use crate::AppState;

/// A shadow copy runs upstream this long at most (or the caller's `Cancel-After`,
/// when shorter); the upstream is told the same as its `Cancel-After`.
pub(super) const COPY_LIMIT: Duration = Duration::from_secs(600);
/// A caller's prediction is watched this long at most.
const WATCH_LIMIT: Duration = Duration::from_secs(86400 + 3600);
/// Two outputs whose lengths (bytes) multiply to at most this are compared on the
/// async worker (tens of µs: `levenshtein`), longer ones on the blocking pool (a hand-off
/// costs more than comparing two short texts).
const INLINE_AGREEMENT: usize = 1 << 18;
/// Once its output began, how often a watched prediction is looked at for its end:
/// its pair is recorded at most this late, and the watch costs a few wake-ups per
/// prediction instead of one per token.
const WATCH_EVERY: Duration = Duration::from_millis(25);

/// `--shadow-max-concurrent` and `--shadow-max-per-minute`, per route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowLimits {
    pub max_concurrent: usize,
    pub max_per_minute: usize,
}

impl Default for ShadowLimits {
    fn default() -> Self {
        ShadowLimits {
            max_concurrent: 8,
            max_per_minute: 120,
        }
    }
}

/// One shadow route's bounds.
struct Gate {
    running: Arc<Semaphore>,
    /// When the copies of the last minute were sent (at most `max_per_minute`).
    sent: Mutex<VecDeque<Instant>>,
}

/// The bounds of every shadow route.
pub struct Shadows {
    limits: ShadowLimits,
    gates: HashMap<String, Gate>,
}

impl Shadows {
    pub fn new<'a>(
        routes: impl Iterator<Item = (&'a String, &'a Route)>,
        limits: ShadowLimits,
    ) -> Self {
        let gates = routes
            .filter(|(_, r)| matches!(r, Route::Shadow { .. }))
            .map(|(m, _)| {
                (
                    m.clone(),
                    Gate {
                        running: Arc::new(Semaphore::new(limits.max_concurrent)),
                        sent: Mutex::new(VecDeque::new()),
                    },
                )
            })
            .collect();
        Shadows { limits, gates }
    }

    pub fn limits(&self) -> ShadowLimits {
        self.limits
    }

    /// Copies running now, on every route (each holds one of its route's places).
    pub fn in_flight(&self) -> usize {
        self.gates
            .values()
            .map(|g| {
                self.limits
                    .max_concurrent
                    .saturating_sub(g.running.available_permits())
            })
            .sum()
    }

    /// A place for one more copy of `model`'s, held while it runs; or why not.
    pub(super) fn admit(&self, model: &str, now: Instant) -> Result<OwnedSemaphorePermit, Skip> {
        let gate = self.gates.get(model).ok_or(Skip::Concurrency)?;
        let permit = gate
            .running
            .clone()
            .try_acquire_owned()
            .map_err(|_| Skip::Concurrency)?;
        let mut sent = gate.sent.lock().map_err(|_| Skip::Rate)?;
        while sent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            sent.pop_front();
        }
        if sent.len() >= self.limits.max_per_minute {
            return Err(Skip::Rate);
        }
        sent.push_back(now);
        Ok(permit)
    }
}

/// How the comparison counts a create that was refused.
pub(super) fn refusal_kind(e: &ApiError, side: Side) -> FailKind {
    let ApiError::Problem { status, .. } = e;
    if status.is_client_error() && *status != StatusCode::TOO_MANY_REQUESTS {
        FailKind::Validation
    } else if side == Side::Upstream && status.is_server_error() {
        FailKind::Upstream5xx
    } else {
        FailKind::Engine
    }
}

/// For a canary route: counts how the create went on `side` and watches the
/// prediction to its end in the background.
pub fn observe_create(
    state: &Arc<AppState>,
    model: &str,
    side: Side,
    result: &ServiceResult<Created>,
) {
    let compare = &state.upstream.compare;
    match result {
        Ok(Created::Live(live)) => {
            let (state, model, live) = (state.clone(), model.to_string(), live.clone());
            tokio::spawn(async move {
                if let Some(w) = watch(&live, Instant::now()).await {
                    state
                        .upstream
                        .compare
                        .observe(&model, side, &w.observation(side));
                }
            });
        }
        Ok(Created::Relayed { .. }) => {
            compare.observe(model, side, &Observation::refused(FailKind::Validation))
        }
        Err(e) => compare.observe(model, side, &Observation::refused(refusal_kind(e, side))),
    }
}

/// A shadow route's create: the caller's prediction here, and maybe a copy upstream.
pub async fn create(
    state: &Arc<AppState>,
    routed: &Routed,
    local: &Arc<ServedModel>,
    upstream: &str,
    percent: u8,
    mut req: CreateRequest,
    mut origin: Origin,
) -> ServiceResult<Created> {
    let id = origin.id.clone().unwrap_or_else(new_id);
    origin.id = Some(id.clone());
    req.side = Some(json!({"side": "local", "reason": "shadow"}));
    let input = req.input.clone();
    let limit = req.cancel_after.unwrap_or(COPY_LIMIT).min(COPY_LIMIT);
    let created = Instant::now();
    let compare = &state.upstream.compare;
    let model = routed.model.clone();
    let live = match service::create(state, local, req, origin).await {
        Ok(live) => live,
        Err(e) => {
            compare.observe(
                &model,
                Side::Local,
                &Observation::refused(refusal_kind(&e, Side::Local)),
            );
            return Err(e);
        }
    };
    let copy = admit_copy(state, &model, &id, percent, || {
        match state.upstream.upstream(upstream) {
            Some(c) if c.breaker.is_closed() => Ok(c.clone()),
            _ => Err(Skip::Circuit),
        }
    });
    let state = state.clone();
    let watched = live.clone();
    let version = routed.version.clone();
    let span =
        tracing::info_span!("shadow", prediction = %id, model = %model, upstream = %upstream);
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let compare = &state.upstream.compare;
            let Some((client, permit)) = copy else {
                if let Some(w) = watch(&watched, created).await {
                    compare.observe(&model, Side::Local, &w.observation(Side::Local));
                }
                return;
            };
            let (primary, copy) = tokio::join!(
                watch(&watched, created),
                super::shadow_copy::run_copy(
                    &state,
                    &client,
                    &model,
                    version.as_deref(),
                    &input,
                    limit
                )
            );
            drop(permit);
            let Some(copy) = copy else {
                compare.copy_refused(&model, Skip::Throttled);
                if let Some(w) = primary {
                    compare.observe(&model, Side::Local, &w.observation(Side::Local));
                }
                return;
            };
            let local_status = match &primary {
                Some(w) => {
                    compare.observe(&model, Side::Local, &w.observation(Side::Local));
                    w.record.prediction.status
                }
                None => Status::Processing,
            };
            let agreement = match (&primary, &copy.output) {
                (Some(w), Some(theirs))
                    if local_status == Status::Succeeded
                        && copy.observation.outcome == Outcome::Succeeded =>
                {
                    let ours = w.record.prediction.output.as_deref().unwrap_or_default();
                    let work = output_bytes(ours).saturating_mul(output_bytes(theirs));
                    if work <= INLINE_AGREEMENT {
                        Some(stats::agreement(ours, theirs))
                    } else {
                        // Long texts' edit distance: off the async workers.
                        let (ours, theirs) = (ours.to_vec(), theirs.clone());
                        tokio::task::spawn_blocking(move || stats::agreement(&ours, &theirs))
                            .await
                            .ok()
                    }
                }
                _ => None,
            };
            compare.pair(
                &model,
                Side::Upstream,
                &copy.observation,
                Pair {
                    id: watched
                        .snapshot()
                        .map(|r| r.prediction.id)
                        .unwrap_or_default(),
                    upstream_id: copy.upstream_id,
                    local: local_status,
                    upstream: copy.observation.outcome.status(),
                    copy_started_at: copy.started_at,
                    agreement,
                },
            );
        },
        span,
    ));
    Ok(Created::Live(live))
}

/// A prediction here, once ended.
pub(super) struct Watched {
    pub(super) record: Record,
    observed: f64,
    first_seen: Option<f64>,
}

impl Watched {
    pub(super) fn observation(&self, side: Side) -> Observation {
        Observation::from_record(&self.record, side, self.observed, self.first_seen)
    }
}

/// Waits for a prediction to end (None past `WATCH_LIMIT`), noting when its first
/// output was seen. Each change is looked at in place until the first output; from
/// then on only the end is awaited, looked for every `WATCH_EVERY` rather than at
/// every token (its times are the record's). The record is copied once, at its end.
pub(super) async fn watch(live: &Live, created: Instant) -> Option<Watched> {
    let mut first_seen = None;
    loop {
        let changed = first_seen.is_none().then(|| live.subscribe());
        let (has_output, terminal) = live.read(|r| {
            (
                r.prediction.output.as_ref().is_some_and(|o| !o.is_empty()),
                r.prediction.status.is_terminal(),
            )
        })?;
        if first_seen.is_none() && has_output {
            first_seen = Some(created.elapsed().as_secs_f64());
        }
        if terminal {
            let r = live.snapshot()?;
            return Some(Watched {
                record: r,
                observed: created.elapsed().as_secs_f64(),
                first_seen,
            });
        }
        if created.elapsed() > WATCH_LIMIT {
            return None;
        }
        match changed {
            // A change wakes this at once; the timeout only bounds a missed one.
            Some(changed) => {
                let _ = tokio::time::timeout(Duration::from_secs(2), changed).await;
            }
            None => tokio::time::sleep(WATCH_EVERY).await,
        }
    }
}

/// Whether the create `id` of `model` gets a shadow copy, on either kind of shadow
/// route: none unless its hash falls in `percent`; then, unless the server is
/// draining or the copy's side cannot take it (`side_ready`, which hands back what the
/// copy needs there), a permit within the per-route limits. Every skip is counted
/// with its reason; an admitted copy is counted as started.
pub(super) fn admit_copy<T>(
    state: &AppState,
    model: &str,
    id: &str,
    percent: u8,
    side_ready: impl FnOnce() -> Result<T, Skip>,
) -> Option<(T, OwnedSemaphorePermit)> {
    if !canary_goes_upstream(id, percent) {
        return None;
    }
    let compare = &state.upstream.compare;
    compare.eligible(model);
    let admitted = if state.is_draining() {
        Err(Skip::Draining)
    } else {
        side_ready().and_then(|side| {
            state
                .upstream
                .shadows
                .admit(model, Instant::now())
                .map(|permit| (side, permit))
        })
    };
    match admitted {
        Ok(a) => {
            compare.copy_started(model);
            Some(a)
        }
        Err(why) => {
            tracing::debug!(prediction = %id, model = %model, reason = ?why, "shadow copy skipped");
            compare.skipped(model, why);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_bounded_by_concurrency_and_by_the_minute() {
        let routes = [
            ("a/b".to_string(), Route::parse("shadow:up:100").unwrap()),
            ("a/c".to_string(), Route::parse("canary:up:100").unwrap()),
        ];
        let s = Shadows::new(
            routes.iter().map(|(m, r)| (m, r)),
            ShadowLimits {
                max_concurrent: 2,
                max_per_minute: 3,
            },
        );
        let t0 = Instant::now();
        let p1 = s.admit("a/b", t0).unwrap();
        let p2 = s.admit("a/b", t0).unwrap();
        assert_eq!(s.admit("a/b", t0).unwrap_err(), Skip::Concurrency);
        drop(p1);
        let p3 = s.admit("a/b", t0).unwrap();
        drop((p2, p3));
        // Three sent this minute: the fourth waits for the minute to pass.
        assert_eq!(s.admit("a/b", t0).unwrap_err(), Skip::Rate);
        assert_eq!(
            s.admit("a/b", t0 + Duration::from_secs(59)).unwrap_err(),
            Skip::Rate
        );
        assert!(s.admit("a/b", t0 + Duration::from_secs(60)).is_ok());
        // A rate refusal gives its concurrency place back.
        let _held = s.admit("a/b", t0 + Duration::from_secs(120)).unwrap();
        // Only shadow routes have gates.
        assert!(s.admit("a/c", t0).is_err());
    }

    #[test]
    fn refusals_are_counted_by_kind() {
        let bad = ApiError::invalid("input.prompt: required");
        assert_eq!(refusal_kind(&bad, Side::Local), FailKind::Validation);
        let down = ApiError::unavailable("circuit open");
        assert_eq!(refusal_kind(&down, Side::Upstream), FailKind::Upstream5xx);
        assert_eq!(refusal_kind(&down, Side::Local), FailKind::Engine);
    }
}
