//! Follows one prediction on a Cog container (`cog+URL`) to its end: one `PUT
//! /predictions/{id}` (hearth's id, stored before it is sent) creates it and streams
//! its events in the same answer (`cog::cog_put`), so even a one-token prediction
//! cannot end unseen between a create and an attach; its `start`, `output` and `log`
//! events become hearth's events and webhooks, its `completed` event the final
//! record. A busy container (409 at capacity, 503 not ready) is asked again after a
//! pause, within the prediction's deadline; a create whose answer was lost, a stream
//! that breaks and a restart of hearth all send the `PUT` again, which attaches to the
//! prediction while it is in flight there and replays its events from the start
//! (chunks already here are skipped by index).
//!
//! The trade-off (README.md, "A plain Cog container"): Cog keeps no record of a
//! prediction once it ends. One that ends there while hearth is not attached (hearth
//! down longer than it took, a broken stream not reattached in time) cannot be read
//! back: hearth as the container answers 409 and the prediction ends `failed` saying
//! its result is lost; Cog itself, which forgets ids, runs it again under the same id.
//! So a prediction whose cancel was asked before a restart is not attached to again
//! (that could run it again): the cancel is sent again and it ends `canceled` here.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::oneshot;

use super::attempts;
use super::cog::{CogEvent, CogOpen, STREAM_IDLE};
use super::follow::relay;
use super::intake::output_bytes;
use super::normalize;
use super::runner::{final_record, End, First, Job};
use crate::record::{now_rfc3339, Record, Status};
use crate::store::StoreError;
use crate::webhook::WebhookEvent;

/// Without `Cancel-After`, how long a busy container is asked again.
const BUSY_WINDOW: Duration = Duration::from_secs(600);
/// Broken streams and lost answers reattached at most this many times in a row.
const REATTACH_MAX: u32 = 5;
/// After a cancel is sent, how long the container gets to end the prediction.
const CANCEL_GRACE: Duration = Duration::from_secs(30);

/// Follows `id` on the Cog container until it ends. `first` (none after a restart)
/// hears whether the first `PUT` was taken or refused.
pub(super) async fn follow(
    job: &Job,
    id: &str,
    first: &mut Option<oneshot::Sender<First>>,
) -> Result<Record, End> {
    let name = &job.client.name;
    let live = &job.live;
    let resumed = first.is_none();
    live.update(|r| {
        if let Some(h) = r.prediction.hearth.as_mut() {
            h["upstream_id"] = json!(id);
        }
    });
    if resumed && job.cancel_asked {
        // Its cancel was asked before the restart: attaching again could run it again
        // (Cog forgets a prediction that ended), so the cancel is sent again instead.
        if let Err(e) = job.client.cog_cancel(id).await {
            tracing::warn!(upstream = %name, error = %e, "forwarding a cancel again failed");
        }
        return Err(End::Canceled(format!(
            "Resumed after a restart with its cancel asked: the cancel was sent to Cog upstream {name} again; Cog keeps no record of it, so its output from there ends here."
        )));
    }
    if resumed {
        job.note(format!(
            "Resumed after a restart: attaching to it on Cog upstream {name} again."
        ));
    }
    let base_logs = live
        .snapshot()
        .map(|r| r.prediction.logs)
        .unwrap_or_default();
    let mut started = live
        .snapshot()
        .is_some_and(|r| r.prediction.status != Status::Starting);
    let started_at = Instant::now();
    let busy_until = Instant::now() + job.cancel_after.unwrap_or(BUSY_WINDOW).min(BUSY_WINDOW);
    let far = tokio::time::Instant::now() + Duration::from_secs(86400);
    let deadline = job.ctx.deadline.unwrap_or(far);
    let mut deadline_passed = false;
    let mut cancel_sent: Option<Instant> = None;
    let mut upstream_logs_len = 0usize;
    let mut out_bytes = live
        .read(|r| r.prediction.output.as_deref().map_or(0, output_bytes))
        .unwrap_or(0);
    let limits = job.client.intake;
    let mut attached = false;
    // After a restart it was created before: attach only.
    let mut created = resumed;
    // A create was sent whose answer was lost: it may run there.
    let mut maybe_created = false;
    let mut reattaches = 0u32;
    let mut retry = attempts::ConnectRetry::default();
    loop {
        if cancel_sent.is_none() && !created {
            // Nothing runs there yet: a cancel now needs no call.
            let canceled = tokio::select! {
                biased;
                _ = live.cancel_requested() => true,
                _ = std::future::ready(()) => false,
            };
            if canceled {
                return Err(End::Canceled(format!(
                    "Canceled before Cog upstream {name} took it."
                )));
            }
        }
        let (opened, canceled) =
            super::runner::uninterrupted(job, job.client.cog_put(id, &job.input, created)).await;
        if canceled && cancel_sent.is_none() {
            cancel_sent = Some(Instant::now());
            let _ = job.client.cog_cancel(id).await;
        }
        let mut stream = match opened {
            CogOpen::Taken => {
                job.client.breaker.success();
                created = true;
                if let Some(tx) = first.take() {
                    let _ = tx.send(First::Accepted);
                }
                continue;
            }
            CogOpen::Stream(s) => {
                job.client.breaker.success();
                if let Some(tx) = first.take() {
                    let _ = tx.send(First::Accepted);
                }
                attached = true;
                created = true;
                s
            }
            CogOpen::Busy(wait) => {
                if let Some(tx) = first.take() {
                    let _ = tx.send(First::Accepted);
                }
                if canceled || Instant::now() + wait > busy_until {
                    return Err(if canceled {
                        End::Canceled(format!(
                            "Canceled while Cog upstream {name} was busy (never run there)."
                        ))
                    } else {
                        End::Failed(format!("Cog upstream {name} stayed busy (at capacity or not ready) past this prediction's deadline; it never ran there"))
                    });
                }
                if !attached {
                    job.note(format!(
                        "Cog upstream {name} is busy: asking again in {:.1}s.",
                        wait.as_secs_f64()
                    ));
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = live.cancel_requested() => return Err(End::Canceled(format!(
                        "Canceled while Cog upstream {name} was busy (never run there)."
                    ))),
                }
            }
            CogOpen::Refused {
                status,
                body,
                content_type,
            } => {
                // A 409 for an id sent before: it ended there unseen.
                if created || (maybe_created && status == 409) {
                    let detail: String =
                        String::from_utf8_lossy(&body).chars().take(2000).collect();
                    return Err(End::Failed(format!(
                        "Cog upstream {name} no longer has prediction {id} in flight ({status}: {detail}): it ended there while hearth was not attached to it, and Cog keeps no record of finished predictions, so its result is lost; create it again"
                    )));
                }
                let who = format!("Cog upstream {name}");
                return Err(attempts::refused(first, &who, status, body, content_type));
            }
            CogOpen::ServerError { status, detail } => {
                job.client.breaker.failure();
                return Err(End::Failed(format!(
                    "Cog upstream {name} answered {status} ({detail})"
                )));
            }
            CogOpen::NotSent(e) => {
                let who = format!("Cog upstream {name}");
                retry.after(job, &who, &e, None).await?;
                continue;
            }
            CogOpen::Lost(e) => {
                job.client.breaker.failure();
                maybe_created = true;
                reattaches += 1;
                if reattaches > REATTACH_MAX {
                    return Err(End::Failed(format!(
                        "lost contact with Cog upstream {name} ({e}); prediction {id} may still be running there"
                    )));
                }
                // The same PUT again finds it there instead of running it twice.
                job.note(format!(
                    "The answer from Cog upstream {name} was lost ({e}): asking for prediction {id} again."
                ));
                tokio::time::sleep(Duration::from_millis(500 << reattaches.min(4))).await;
                continue;
            }
        };
        // A (re)attached stream replays from the start.
        let mut seen_logs = 0usize;
        let broke: String = loop {
            if let Some(at) = cancel_sent {
                if at.elapsed() > CANCEL_GRACE {
                    return Err(End::Canceled(format!(
                        "Canceled here; Cog upstream {name} had not ended prediction {id} within {}s.",
                        CANCEL_GRACE.as_secs()
                    )));
                }
            }
            let ev = tokio::select! {
                ev = tokio::time::timeout(STREAM_IDLE, stream.next()) => ev,
                _ = live.cancel_requested(), if cancel_sent.is_none() => {
                    cancel_sent = Some(Instant::now());
                    job.keep_cancel().await;
                    if let Err(e) = job.client.cog_cancel(id).await {
                        tracing::warn!(upstream = %name, error = %e, "forwarding a cancel failed");
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(deadline), if !deadline_passed => {
                    deadline_passed = true;
                    if job.ctx.deadline.is_some() && cancel_sent.is_none() {
                        cancel_sent = Some(Instant::now());
                        job.keep_cancel().await;
                        let _ = job.client.cog_cancel(id).await;
                        continue;
                    }
                    return Err(End::Failed(format!("Cog upstream {name} did not finish prediction {id} within a day")));
                }
                _ = tokio::time::sleep(CANCEL_GRACE), if cancel_sent.is_some() => continue,
            };
            let ev = match ev {
                Ok(Ok(Some(ev))) => ev,
                Ok(Ok(None)) => break "the stream ended before its completed event".to_string(),
                Ok(Err(e)) => break e,
                Err(_) => break format!("nothing for {}s", STREAM_IDLE.as_secs()),
            };
            reattaches = 0;
            match ev {
                CogEvent::Start if !started => {
                    started = true;
                    let Some(r) = live.update(|r| {
                        r.prediction.status = Status::Processing;
                        r.prediction.started_at = Some(now_rfc3339());
                    }) else {
                        return Err(End::Failed(
                            "internal: the prediction's state was lost".into(),
                        ));
                    };
                    match job.ctx.store.put(&r).await {
                        Ok(()) => {}
                        Err(StoreError::NotOwner(_)) => return Err(End::TakenOver),
                        Err(e) => {
                            tracing::warn!(error = %e, "could not store the started prediction")
                        }
                    }
                    job.ctx.notify(WebhookEvent::Start, &r).await;
                }
                CogEvent::Start => {}
                CogEvent::Output { chunk, index } => {
                    let have = live
                        .read(|r| r.prediction.output.as_ref().map_or(0, Vec::len))
                        .unwrap_or(0);
                    // A replay's chunks up to what is here are already out.
                    if index >= have {
                        out_bytes += chunk.len();
                        if let Err(why) = limits.check(name, out_bytes, 0) {
                            return Err(over_limit(job, id, why).await);
                        }
                        relay(job, WebhookEvent::Output, |r| {
                            r.prediction.output.get_or_insert_with(Vec::new).push(chunk)
                        })
                        .await;
                    }
                }
                CogEvent::Log(text) => {
                    let end = seen_logs + text.len();
                    if end > upstream_logs_len {
                        let skip = upstream_logs_len.saturating_sub(seen_logs);
                        if let Some(new) = text.get(skip..) {
                            upstream_logs_len += new.len();
                            if let Err(why) = limits.check(name, 0, upstream_logs_len) {
                                return Err(over_limit(job, id, why).await);
                            }
                            // In place: a replay's logs past what is here, once.
                            relay(job, WebhookEvent::Logs, |r| r.prediction.logs.push_str(new))
                                .await;
                        }
                    }
                    seen_logs = end;
                }
                CogEvent::Completed(body) => {
                    limits.check_record(name, &body).map_err(End::Failed)?;
                    let Some(r) = live.snapshot() else {
                        return Err(End::Failed(
                            "internal: the prediction's state was lost".into(),
                        ));
                    };
                    let status = match normalize::status(&body) {
                        s if s.is_terminal() => s,
                        _ => Status::Failed,
                    };
                    return Ok(final_record(
                        job, r, id, &body, status, &base_logs, started_at,
                    ));
                }
            }
        };
        reattaches += 1;
        if reattaches > REATTACH_MAX {
            return Err(End::Failed(format!(
                "the stream from Cog upstream {name} kept breaking ({broke}); prediction {id} may still be running there"
            )));
        }
        job.note(format!(
            "The stream from Cog upstream {name} broke ({broke}): attaching to prediction {id} again."
        ));
        tokio::time::sleep(Duration::from_millis(200 << reattaches.min(4))).await;
    }
}

/// Past a cap on what the container may send (`intake`): canceled there, failed here.
async fn over_limit(job: &Job, id: &str, why: String) -> End {
    tracing::warn!(upstream = %job.client.name, reason = %why, "a Cog prediction sent more than it may");
    if let Err(e) = job.client.cog_cancel(id).await {
        tracing::warn!(upstream = %job.client.name, error = %e, "canceling it failed");
    }
    End::Failed(why)
}
