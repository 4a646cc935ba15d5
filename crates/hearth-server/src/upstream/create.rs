//! Creating a prediction of a model that has a route: choosing the side (local,
//! upstream, fallback, canary), and for the upstream side storing the prediction
//! and its link, starting its runner, and answering as the first create attempt
//! went (a refusal relayed unchanged).

use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::route::{canary_goes_upstream, Route};
use super::runner::{self, First, Job};
use super::UpstreamClient;
use crate::error::ApiError;
use crate::models::ServedModel;
use crate::prediction::{Live, RunContext};
use crate::record::{new_id, Record, Status};
use crate::service::{self, CreateRequest, Origin, ServiceResult, Starting};
use crate::store::{StoreError, UpstreamLink};
use crate::webhook::{guard, WebhookStyle};
use crate::AppState;

/// A create for a model with a route.
pub struct Routed {
    /// `owner/name`, as the upstream knows it too.
    pub model: String,
    /// A version the caller named, passed on upstream.
    pub version: Option<String>,
    pub route: Route,
    /// The model served here, when it is.
    pub local: Option<Arc<ServedModel>>,
}

/// What a routed create answers.
pub enum Created {
    Live(Arc<Live>),
    /// The upstream refused the create: its status, body and content type.
    Relayed {
        status: StatusCode,
        body: Vec<u8>,
        content_type: String,
    },
}

fn side(side: &str, upstream: Option<&str>, why: Option<&str>) -> Value {
    let mut v = json!({"side": side});
    if let Some(u) = upstream {
        v["upstream"] = json!(u);
    }
    if let Some(w) = why {
        v["reason"] = json!(w);
    }
    v
}

fn client(state: &AppState, name: &str) -> ServiceResult<Arc<UpstreamClient>> {
    state
        .upstream
        .upstream(name)
        .cloned()
        .ok_or_else(|| ApiError::internal(format!("route names unknown upstream {name}")))
}

/// Whether a local create's error lets a `fallback` route go upstream: a fault of
/// the server's (5xx) or the engine's full queue, never the caller's input or quota.
fn local_failure_falls_back(e: &ApiError) -> bool {
    let ApiError::Problem { status, title, .. } = e;
    status.is_server_error()
        || (*status == StatusCode::TOO_MANY_REQUESTS && *title == "Request was throttled")
}

async fn local(
    state: &Arc<AppState>,
    model: &Arc<ServedModel>,
    mut req: CreateRequest,
    origin: Origin,
    why: Value,
) -> ServiceResult<Created> {
    req.side = Some(why);
    service::create(state, model, req, origin)
        .await
        .map(Created::Live)
}

pub async fn create(
    state: &Arc<AppState>,
    routed: Routed,
    req: CreateRequest,
    mut origin: Origin,
) -> ServiceResult<Created> {
    let route = routed.route.clone();
    match (&route, routed.local.clone()) {
        (Route::Local, Some(m)) => local(state, &m, req, origin, side("local", None, None)).await,
        (Route::Upstream(up), _) => upstream(state, up, &routed, req, origin, None).await,
        (Route::Fallback(up), Some(m)) => {
            let c = client(state, up)?;
            if !m.engine.is_alive() {
                if c.breaker.is_closed() {
                    return upstream(
                        state,
                        up,
                        &routed,
                        req,
                        origin,
                        Some("local engine not running"),
                    )
                    .await;
                }
                return local(state, &m, req, origin, side("local", None, None)).await;
            }
            let again = req.clone();
            let id = origin.id.clone().unwrap_or_else(new_id);
            origin.id = Some(id.clone());
            let again_origin = origin.clone();
            match local(state, &m, req, origin, side("local", None, None)).await {
                Err(e) if local_failure_falls_back(&e) && c.breaker.is_closed() => {
                    tracing::info!(model = %routed.model, upstream = %up, error = %e, "local create failed: falling back upstream");
                    upstream(
                        state,
                        up,
                        &routed,
                        again,
                        again_origin,
                        Some("local create failed"),
                    )
                    .await
                }
                other => other,
            }
        }
        (
            Route::Canary {
                upstream: up,
                percent,
            },
            local_model,
        ) => {
            let id = origin.id.clone().unwrap_or_else(new_id);
            origin.id = Some(id.clone());
            let c = client(state, up)?;
            let (side_ran, created) = match local_model {
                Some(m) if !canary_goes_upstream(&id, *percent) || !c.breaker.is_closed() => (
                    super::compare::Side::Local,
                    local(state, &m, req, origin, side("local", None, Some("canary"))).await,
                ),
                _ => (
                    super::compare::Side::Upstream,
                    upstream(state, up, &routed, req, origin, Some("canary")).await,
                ),
            };
            super::shadow::observe_create(state, &routed.model, side_ran, &created);
            created
        }
        (
            Route::Shadow {
                upstream: up,
                percent,
                primary: super::compare::Side::Local,
            },
            Some(m),
        ) => super::shadow::create(state, &routed, &m, up, *percent, req, origin).await,
        (
            Route::Shadow {
                upstream: up,
                percent,
                ..
            },
            Some(m),
        ) => super::shadow_local::create(state, &routed, &m, up, *percent, req, origin).await,
        (_, None) => Err(ApiError::not_found(format!(
            "model {} has route {} but is not served here",
            routed.model,
            route.describe()
        ))),
    }
}

/// How long a create waits for the upstream's first answer before answering 201
/// `starting` (the runner carries on).
const FIRST_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(40);

pub(super) async fn upstream(
    state: &Arc<AppState>,
    up: &str,
    routed: &Routed,
    req: CreateRequest,
    origin: Origin,
    why: Option<&str>,
) -> ServiceResult<Created> {
    let arrived = Instant::now();
    if state.is_draining() {
        return Err(ApiError::unavailable(
            "the server is shutting down and takes no new predictions",
        ));
    }
    let c = client(state, up)?;
    if let Err(wait) = c.breaker.allow() {
        return Err(ApiError::Problem {
            status: StatusCode::SERVICE_UNAVAILABLE,
            title: "Upstream unavailable",
            detail: format!(
                "model {} runs on upstream {up}, whose circuit breaker is open after repeated failures; try again in {}s",
                routed.model,
                wait.as_secs().max(1)
            ),
            retry_after: Some(wait.as_secs().max(1)),
            fields: Vec::new(),
        });
    }
    if let Some(url) = &req.webhook {
        guard::check_url(url, state.cfg.webhook_allow_private)
            .await
            .map_err(|e| ApiError::invalid(format!("webhook: {e}")))?;
    }
    // A Cog container has one version, its schema's hash (from the cached document):
    // the record names it, as Replicate's records always name one.
    let version = match (&routed.version, c.cog) {
        (None, true) => state
            .upstream
            .models
            .get(&c, &routed.model, &format!("/v1/models/{}", routed.model))
            .await
            .ok()
            .and_then(|d| d["latest_version"]["id"].as_str().map(str::to_string)),
        (v, _) => v.clone(),
    };
    // The caller's input (before inlining: that changes only URL strings) against the
    // upstream version's schema, when one is cached; else the upstream's 422 relays.
    if let Some(check) = state
        .upstream
        .models
        .input_check(up, &routed.model, version.as_deref())
    {
        check.check(&req.input)?;
    }
    // What the upstream gets: hearth's own file URLs inlined (the record keeps them).
    let bases: Vec<&str> = std::iter::once(origin.base_url.as_str())
        .chain(
            state
                .cfg
                .public_url
                .as_deref()
                .map(|u| u.trim_end_matches('/')),
        )
        .collect();
    let sent_input = super::files::inline_inputs(&state.store, &req.input, &bases).await?;
    let quota = state.quotas.take(&origin.client)?;
    let now = chrono::Utc::now();
    let id = origin.id.clone().unwrap_or_else(new_id);
    let starting = Starting {
        id: id.clone(),
        model: routed.model.clone(),
        version: version.unwrap_or_default(),
        input: req.input.clone(),
        hearth: Some(side("upstream", Some(up), why)),
    };
    let record = req.record(starting, &origin, now);
    let link = UpstreamLink {
        prediction_id: id.clone(),
        upstream: up.to_string(),
        upstream_id: None,
        create_sent_ms: now.timestamp_millis(),
    };
    // As a local create: from the store write on, its own task, so a caller that
    // hangs up cannot leave a stored row without its runner.
    let state = state.clone();
    let model = routed.model.clone();
    let version = routed.version.clone();
    let (tx, rx) = oneshot::channel();
    let started = tokio::spawn(async move {
        match state.store.insert(&record).await {
            Ok(()) => {}
            Err(StoreError::Exists(_)) => {
                return Err(ApiError::conflict(format!(
                    "id: a prediction with id {id} already exists; choose another id"
                )))
            }
            Err(e) => return Err(e.into()),
        }
        let Some(live) = state.hub.try_insert(record.clone()) else {
            return Err(ApiError::conflict(format!(
                "id: a prediction with id {id} is already running"
            )));
        };
        let webhook = record.webhook.as_ref().map(|url| {
            state.webhooks.sender(
                url.clone(),
                &record.webhook_events_filter,
                &id,
                WebhookStyle::Replicate,
            )
        });
        let job = Job {
            live: live.clone(),
            client: c,
            ctx: RunContext {
                hub: state.hub.clone(),
                store: state.store.clone(),
                metrics: state.model_metrics(&model),
                webhook,
                deadline: req.cancel_after.map(|d| {
                    tokio::time::Instant::now() + d.min(std::time::Duration::from_secs(86400 * 365))
                }),
            },
            model,
            version,
            input_bytes: super::intake::json_len(&sent_input),
            input: sent_input,
            cancel_after: req.cancel_after,
            link,
            quota: Some(quota),
            created: arrived,
            cancel_asked: false,
        };
        let span =
            tracing::info_span!("prediction", %id, model = %job.model, upstream = %job.client.name);
        tokio::spawn(tracing::Instrument::instrument(
            runner::run(job, Some(tx)),
            span,
        ));
        Ok(live)
    })
    .await
    .map_err(|e| ApiError::internal(format!("creating the prediction: {e}")))??;
    match tokio::time::timeout(FIRST_ANSWER_WAIT, rx).await {
        Ok(Ok(First::Rejected {
            status,
            body,
            content_type,
        })) => Ok(Created::Relayed {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY),
            body,
            content_type,
        }),
        // Accepted, the runner ended otherwise (the record says how), or still waiting.
        _ => Ok(Created::Live(started)),
    }
}

/// Resumes, after a restart, a prediction that was running upstream: polling from
/// its stored link (or resolving a create whose answer was lost). One whose upstream
/// is no longer configured is ended, saying so.
pub async fn resume(state: &Arc<AppState>, record: Record, link: UpstreamLink) {
    let id = record.prediction.id.clone();
    let webhook = record.webhook.as_ref().map(|url| {
        state.webhooks.sender(
            url.clone(),
            &record.webhook_events_filter,
            &id,
            WebhookStyle::Replicate,
        )
    });
    let ctx = RunContext {
        hub: state.hub.clone(),
        store: state.store.clone(),
        metrics: state.model_metrics(&record.prediction.model),
        webhook,
        deadline: None,
    };
    let Some(live) = state.hub.try_insert(record.clone()) else {
        return;
    };
    let Some(c) = state.upstream.upstream(&link.upstream).cloned() else {
        live.update(|r| {
            let now = crate::record::now_rfc3339();
            r.prediction.finish(Status::Failed, &now);
            r.prediction.error = Some(format!(
                "this prediction ran on upstream {}, which this server no longer has (--upstream); it was not resumed",
                link.upstream
            ));
        });
        if let Some(r) = live.snapshot() {
            let hooks = ctx
                .webhook
                .as_ref()
                .map(|w| w.prepare(crate::webhook::WebhookEvent::Completed, &r))
                .unwrap_or_default();
            if let Err(e) = state
                .store
                .finish(&r, &hooks, crate::webhook::dispatcher::now_ms())
                .await
            {
                tracing::error!(prediction = %id, error = %e, "could not end an upstream prediction that cannot resume");
            } else if let Some(w) = &ctx.webhook {
                w.queued(&hooks);
            }
        }
        state.hub.remove(&id);
        return;
    };
    let version = Some(record.prediction.version.clone()).filter(|v| !v.is_empty());
    let input = super::files::inline_inputs(
        &state.store,
        &record.prediction.input,
        &[record.base_url.as_str()],
    )
    .await
    .unwrap_or_else(|_| record.prediction.input.clone());
    tracing::info!(prediction = %id, upstream = %c.name, "resuming an upstream prediction after a restart");
    // A cancel asked before the restart (kept by `Job::keep_cancel`) goes upstream
    // again: the runner sees it as asked now.
    let cancel_asked = match state.store.cancel_requests().await {
        Ok(ids) => ids.contains(&id),
        Err(e) => {
            tracing::warn!(prediction = %id, error = %e, "could not read whether its cancel was asked");
            false
        }
    };
    if cancel_asked {
        live.request_cancel();
    }
    let job = Job {
        live,
        client: c,
        ctx,
        model: record.prediction.model.clone(),
        version,
        input_bytes: super::intake::json_len(&input),
        input,
        cancel_after: None,
        link,
        quota: None,
        created: Instant::now(),
        cancel_asked,
    };
    let span =
        tracing::info_span!("prediction", %id, model = %job.model, upstream = %job.client.name);
    tokio::spawn(tracing::Instrument::instrument(
        runner::run(job, None),
        span,
    ));
}
