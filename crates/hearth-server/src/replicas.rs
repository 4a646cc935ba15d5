//! Replicas sharing a store. Each prediction belongs to the replica that runs it;
//! a replica renews its lease every third of `--replica-lease`. A replica whose lease
//! runs out (killed, frozen, cut off from the database) has its predictions in flight
//! ended `failed` by a survivor, with a clear error and their `completed` webhook, so
//! none stays `processing` forever; a replica whose lease is alive is never touched.
//! Cancels asked of another replica reach the owner through the store.
//!
//! With the embedded store there is one process: everything an earlier process left
//! in flight is ended at start.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::record::{now_rfc3339, Record, Status};
use crate::store::{SharedStore, StoreError, UpstreamLink};
use crate::webhook::{WebhookEvent, WebhookStyle, Webhooks};
use crate::AppState;

/// How often the owner looks for cancels asked on other replicas.
pub const CANCEL_POLL: Duration = Duration::from_millis(100);
/// Orphans ended per query.
const ORPHAN_BATCH: usize = 100;

/// An orphan that ran upstream: resumed (polled to its end), not failed.
pub struct Resumable {
    pub record: Record,
    pub link: UpstreamLink,
}

/// What `end_orphans` did.
#[derive(Default)]
pub struct Orphans {
    pub ended: usize,
    pub resume: Vec<Resumable>,
}

/// Ends every orphan the store hands this replica: `failed`, stored, `completed`
/// webhook queued. Those running upstream (with a stored link) are handed back to
/// resume instead: they are still running there.
pub async fn end_orphans(
    store: &SharedStore,
    webhooks: &Arc<Webhooks>,
) -> Result<Orphans, StoreError> {
    let mut out = Orphans::default();
    loop {
        let batch = store.claim_orphans(ORPHAN_BATCH).await?;
        if batch.is_empty() {
            return Ok(out);
        }
        for mut r in batch {
            if let Some(link) = store.upstream_link(&r.prediction.id).await? {
                out.resume.push(Resumable { record: r, link });
                continue;
            }
            end_orphan(&mut r, store.is_shared());
            let id = r.prediction.id.clone();
            let sender = r.webhook.clone().map(|url| {
                webhooks.sender(
                    url,
                    &r.webhook_events_filter,
                    &id,
                    WebhookStyle::for_source(&r.prediction.source),
                )
            });
            let hooks = sender
                .as_ref()
                .map(|s| s.prepare(WebhookEvent::Completed, &r))
                .unwrap_or_default();
            // The end and its `completed` webhook in one write: neither without the other.
            match store
                .finish(&r, &hooks, crate::webhook::dispatcher::now_ms())
                .await
            {
                Ok(()) => {}
                // A third replica took it over between our claim and this write.
                Err(StoreError::NotOwner(_)) => continue,
                Err(e) => return Err(e),
            }
            if let Some(s) = &sender {
                s.queued(&hooks);
            }
            tracing::warn!(prediction = %id, "ended a prediction left in flight by a replica that stopped");
            out.ended += 1;
        }
    }
}

fn end_orphan(r: &mut Record, shared: bool) {
    let now = now_rfc3339();
    let p = &mut r.prediction;
    let started = p.status == Status::Processing;
    let (error, log) = match (shared, started) {
        (false, _) => (
            "the server stopped while this prediction was running; create it again",
            "Server restarted: prediction interrupted.\n",
        ),
        (true, true) => (
            "the replica running this prediction stopped (its lease expired) before it \
             finished; create it again",
            "Replica lost: prediction interrupted.\n",
        ),
        (true, false) => (
            "the replica this prediction was queued on stopped (its lease expired) before \
             it started; create it again",
            "Replica lost: prediction never started.\n",
        ),
    };
    p.error = Some(error.into());
    p.logs.push_str(log);
    p.finish(Status::Failed, &now);
    let total = p.seconds_since_created(&now);
    let mut m = p.metrics.take().unwrap_or_else(|| json!({}));
    m["total_time"] = json!(total);
    if m.get("predict_time").is_none() {
        m["predict_time"] = json!(0.0);
    }
    p.metrics = Some(m);
}

/// The replica's background work until `stop`: lease renewals and orphan sweeps
/// (every third of the lease), and with a shared store the cancel poll.
pub async fn run(state: Arc<AppState>, stop: CancellationToken) {
    let lease = state.cfg.replica_lease;
    let mut renew = tokio::time::interval(lease / 3);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cancels = tokio::time::interval(CANCEL_POLL);
    cancels.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let shared = state.store.is_shared();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = renew.tick() => {
                if let Err(e) = state.store.heartbeat(lease).await {
                    tracing::error!(error = %e, "could not renew this replica's lease");
                }
                if shared {
                    match end_orphans(&state.store, &state.webhooks).await {
                        Ok(o) => {
                            for r in o.resume {
                                crate::upstream::create::resume(&state, r.record, r.link).await;
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "could not end the predictions of a stopped replica"),
                    }
                }
            }
            _ = cancels.tick(), if shared && !state.hub.is_empty() => {
                match state.store.cancel_requests().await {
                    Ok(ids) => {
                        for id in ids {
                            if let Some(live) = state.hub.get(&id) {
                                live.request_cancel();
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "could not read cancel requests"),
                }
            }
        }
    }
}
