//! Follows one prediction on a Cog container (`cog+URL`) to its end: one `PUT
//! /predictions/{id}` (hearth's id, stored before it is sent) creates it and streams
//! its events in the same answer (`cog::Put::Create`), so even a one-token prediction
//! cannot end unseen between a create and an attach; its `start`, `output` and `log`
//! events become hearth's events and webhooks, its `completed` event the final
//! record. A busy container (409 at capacity, 503 not ready) is asked again after a
//! pause, within the prediction's deadline; a create whose answer was lost, a stream
//! that breaks and a restart of hearth attach to it again (`cog::Put::Attach`: a `PUT`
//! that replays the events of the prediction in flight with that id and never creates
//! one; chunks already here are skipped by index). A cancel is sent the moment it is
//! asked, whatever `PUT` is waiting for its answer (the id is hearth's: nothing to
//! wait for).
//!
//! What Cog 0.23.1 does (checked against the real server: crates/hearth/tests/cog_real.rs), and
//! the trade-offs it sets (README.md, "A plain Cog container"):
//! - It keeps no record of a prediction once it ends, and it cancels a prediction
//!   created over an event stream as soon as no stream follows it (it ignores
//!   `Prefer: respond-async` then). A stream that breaks or a restart of hearth
//!   therefore cancels the prediction there: the attach finds it ending `canceled`, or
//!   no longer in flight (422), and the prediction fails here saying so (never
//!   `canceled`: nobody asked). A prediction that ended there while hearth was not
//!   attached fails the same way: its result is lost. Nothing is ever run twice.
//!   (hearth's own Cog API keeps such a prediction running: there the attach resumes
//!   it.)
//! - A model without `@cog.streaming` answers an event stream with 406: hearth then
//!   creates it with a synchronous `PUT` and reads its end from that answer (Cog
//!   cancels it if that request drops: a restart of hearth ends it failed, saying so).
//! - A prediction whose cancel was asked before a restart is not attached to again:
//!   the cancel is sent again and it ends `canceled` here.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::oneshot;

use super::attempts;
use super::cog::{CogEvent, CogOpen, Put, STREAM_IDLE};
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

/// Where following one Cog prediction stands.
struct Following {
    started: bool,
    /// The prediction's logs before Cog's (hearth's own notes).
    base_logs: String,
    since: Instant,
    deadline_passed: bool,
    cancel_sent: Option<Instant>,
    /// Cog's logs relayed so far, in bytes.
    upstream_logs_len: usize,
    out_bytes: usize,
}

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
    let snapshot = live.snapshot();
    let mut f = Following {
        started: snapshot
            .as_ref()
            .is_some_and(|r| r.prediction.status != Status::Starting),
        base_logs: snapshot.map(|r| r.prediction.logs).unwrap_or_default(),
        since: Instant::now(),
        deadline_passed: false,
        cancel_sent: None,
        upstream_logs_len: 0,
        out_bytes: live
            .read(|r| r.prediction.output.as_deref().map_or(0, output_bytes))
            .unwrap_or(0),
    };
    let busy_until = Instant::now() + job.cancel_after.unwrap_or(BUSY_WINDOW).min(BUSY_WINDOW);
    let far = tokio::time::Instant::now() + Duration::from_secs(86400);
    let deadline = job.ctx.deadline.unwrap_or(far);
    // After a restart it was created before: attach only.
    let mut created = resumed;
    // A create was sent whose answer was lost: it may run there.
    let mut maybe_created = false;
    // The stream broke or hearth restarted since it was created: Cog may have
    // canceled it for that.
    let mut detached = resumed;
    let mut reattaches = 0u32;
    let mut busy_noted = false;
    let mut retry = attempts::ConnectRetry::default();
    loop {
        if f.cancel_sent.is_none() && !created && !maybe_created {
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
        let put = if created || maybe_created {
            Put::Attach
        } else {
            Put::Create(&job.input)
        };
        let asked_before = f.cancel_sent.is_some();
        let opened = put_or_cancel(job, id, put, &mut f).await;
        let canceled_meanwhile = !asked_before && f.cancel_sent.is_some();
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
                created = true;
                if canceled_meanwhile {
                    // The cancel may have gone out before Cog had the id (a 404 there).
                    let _ = job.client.cog_cancel(id).await;
                }
                s
            }
            CogOpen::Finished(body) => return completed(job, id, &f, &body, detached),
            CogOpen::NoStreams if !created && !maybe_created => {
                return follow_sync(job, id, first, &mut f, busy_until).await
            }
            CogOpen::NoStreams => {
                // Created before by a synchronous PUT whose request is gone (hearth
                // restarted): Cog canceled it then.
                let _ = job.client.cog_cancel(id).await;
                return Err(End::Failed(format!(
                    "Cog upstream {name} serves no event streams for this model, so prediction {id} ran there in one synchronous request, and that request ended with the restart of hearth: Cog cancels such a prediction when its request drops, and keeps no record of it; create it again"
                )));
            }
            CogOpen::Gone(detail) => {
                if f.cancel_sent.is_some() {
                    return Err(End::Canceled(format!(
                        "Canceled: Cog upstream {name} has ended prediction {id} ({detail})."
                    )));
                }
                return Err(End::Failed(lost(name, id, &detail, detached)));
            }
            CogOpen::Busy(wait) => {
                if let Some(tx) = first.take() {
                    let _ = tx.send(First::Accepted);
                }
                // Created before: Cog is not ready to attach to it (restarting).
                let ran = created || maybe_created;
                let canceled = f.cancel_sent.is_some();
                if canceled || Instant::now() + wait > busy_until {
                    return Err(match (canceled, ran) {
                        (true, false) => End::Canceled(format!(
                            "Canceled while Cog upstream {name} was busy (never run there)."
                        )),
                        (true, true) => End::Canceled(format!(
                            "Canceled while Cog upstream {name} was not ready to attach to prediction {id} again."
                        )),
                        (false, false) => End::Failed(format!("Cog upstream {name} stayed busy (at capacity or not ready) past this prediction's deadline; it never ran there")),
                        (false, true) => End::Failed(format!("Cog upstream {name} stayed not ready past this prediction's deadline, so prediction {id} could not be attached to again (a restarted Cog has forgotten it): its result is lost; create it again")),
                    });
                }
                if !busy_noted {
                    busy_noted = true;
                    job.note(format!(
                        "Cog upstream {name} is busy or not ready: asking again every {:.1}s.",
                        wait.as_secs_f64()
                    ));
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = live.cancel_requested(), if ran => {
                        send_cancel(job, id, &mut f).await;
                        continue;
                    }
                    _ = live.cancel_requested(), if !ran => return Err(End::Canceled(format!(
                        "Canceled while Cog upstream {name} was busy (never run there)."
                    ))),
                }
            }
            CogOpen::Refused {
                status,
                body,
                content_type,
            } => {
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
                maybe_created = !created;
                detached = true;
                reattaches += 1;
                if reattaches > REATTACH_MAX {
                    return Err(End::Failed(format!(
                        "lost contact with Cog upstream {name} ({e}); prediction {id} may still be running there"
                    )));
                }
                // An attach finds it there instead of running it twice.
                job.note(format!(
                    "The answer from Cog upstream {name} was lost ({e}): attaching to prediction {id} again."
                ));
                tokio::time::sleep(Duration::from_millis(500 << reattaches.min(4))).await;
                continue;
            }
        };
        // A (re)attached stream replays from the start.
        let mut seen_logs = 0usize;
        let broke: String = loop {
            if let Some(at) = f.cancel_sent {
                if at.elapsed() > CANCEL_GRACE {
                    return Err(End::Canceled(format!(
                        "Canceled here; Cog upstream {name} had not ended prediction {id} within {}s.",
                        CANCEL_GRACE.as_secs()
                    )));
                }
            }
            let ev = tokio::select! {
                ev = tokio::time::timeout(STREAM_IDLE, stream.next()) => ev,
                _ = live.cancel_requested(), if f.cancel_sent.is_none() => {
                    send_cancel(job, id, &mut f).await;
                    continue;
                }
                _ = tokio::time::sleep_until(deadline), if !f.deadline_passed => {
                    f.deadline_passed = true;
                    if job.ctx.deadline.is_some() && f.cancel_sent.is_none() {
                        send_cancel(job, id, &mut f).await;
                        continue;
                    }
                    return Err(End::Failed(format!("Cog upstream {name} did not finish prediction {id} within a day")));
                }
                _ = tokio::time::sleep(CANCEL_GRACE), if f.cancel_sent.is_some() => continue,
            };
            let ev = match ev {
                Ok(Ok(Some(ev))) => ev,
                Ok(Ok(None)) => break "the stream ended before its completed event".to_string(),
                Ok(Err(e)) => break e,
                Err(_) => break format!("nothing for {}s", STREAM_IDLE.as_secs()),
            };
            reattaches = 0;
            match ev {
                CogEvent::Start => mark_started(job, &mut f).await?,
                CogEvent::Output { chunk, index } => {
                    let have = live
                        .read(|r| r.prediction.output.as_ref().map_or(0, Vec::len))
                        .unwrap_or(0);
                    // A replay's chunks up to what is here are already out.
                    if index >= have {
                        f.out_bytes += chunk.len();
                        if let Err(why) = job.client.intake.check(name, f.out_bytes, 0) {
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
                    if end > f.upstream_logs_len {
                        let skip = f.upstream_logs_len.saturating_sub(seen_logs);
                        if let Some(new) = text.get(skip..) {
                            f.upstream_logs_len += new.len();
                            if let Err(why) = job.client.intake.check(name, 0, f.upstream_logs_len)
                            {
                                return Err(over_limit(job, id, why).await);
                            }
                            // In place: a replay's logs past what is here, once.
                            relay(job, WebhookEvent::Logs, |r| r.prediction.logs.push_str(new))
                                .await;
                        }
                    }
                    seen_logs = end;
                }
                CogEvent::Error(e) => break format!("Cog ended it with an error event: {e}"),
                CogEvent::Completed(body) => return completed(job, id, &f, &body, detached),
            }
        };
        detached = true;
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

/// Why a prediction Cog no longer has in flight (`detail`, its answer to an attach)
/// cannot end here with its result.
fn lost(name: &str, id: &str, detail: &str, detached: bool) -> String {
    let why = if detached {
        "Cog cancels a prediction created over an event stream once no stream follows it (hearth's stream to it broke, or hearth restarted), a restarted Cog has forgotten every prediction, and Cog keeps no record of one that ended"
    } else {
        "it ended there while hearth was not attached to it, and Cog keeps no record of finished predictions"
    };
    format!(
        "Cog upstream {name} no longer has prediction {id} in flight ({detail}): {why}, so its result is lost; create it again"
    )
}

/// `PUT` as `put` says, while a cancel asked meanwhile (or the deadline) goes to
/// Cog at once: the id is hearth's, so the cancel need not wait for the answer, and
/// the `PUT` runs on (a create dropped halfway would leave it unknown whether it
/// runs).
async fn put_or_cancel(job: &Job, id: &str, put: Put<'_>, f: &mut Following) -> CogOpen {
    let sent = job.client.cog_put(id, put);
    tokio::pin!(sent);
    let far = tokio::time::Instant::now() + Duration::from_secs(86400);
    let deadline = job.ctx.deadline.unwrap_or(far);
    loop {
        tokio::select! {
            opened = &mut sent => return opened,
            _ = job.live.cancel_requested(), if f.cancel_sent.is_none() => {
                send_cancel(job, id, f).await;
            }
            _ = tokio::time::sleep_until(deadline), if job.ctx.deadline.is_some() && !f.deadline_passed => {
                f.deadline_passed = true;
                if f.cancel_sent.is_none() {
                    send_cancel(job, id, f).await;
                }
            }
        }
    }
}

/// Sends the cancel asked (by the caller, the deadline) to Cog, once, kept in the
/// store first (`Job::keep_cancel`).
async fn send_cancel(job: &Job, id: &str, f: &mut Following) {
    f.cancel_sent = Some(Instant::now());
    job.keep_cancel().await;
    if let Err(e) = job.client.cog_cancel(id).await {
        tracing::warn!(upstream = %job.client.name, error = %e, "forwarding a cancel failed");
    }
}

/// Cog says it runs: `processing`, stored, the `start` webhook (once).
async fn mark_started(job: &Job, f: &mut Following) -> Result<(), End> {
    if f.started {
        return Ok(());
    }
    f.started = true;
    let Some(r) = job.live.update(|r| {
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
        Err(e) => tracing::warn!(error = %e, "could not store the started prediction"),
    }
    job.ctx.notify(WebhookEvent::Start, &r).await;
    Ok(())
}

/// The end, from Cog's finished record `body`. One Cog canceled without hearth
/// asking (its stream dropped) fails: `canceled` would say somebody asked.
fn completed(
    job: &Job,
    id: &str,
    f: &Following,
    body: &serde_json::Value,
    detached: bool,
) -> Result<Record, End> {
    let name = &job.client.name;
    job.client
        .intake
        .check_record(name, body)
        .map_err(End::Failed)?;
    let status = match normalize::status(body) {
        s if s.is_terminal() => s,
        _ => Status::Failed,
    };
    if status == Status::Canceled && f.cancel_sent.is_none() {
        let why = if detached {
            "Cog cancels a prediction created over an event stream once no stream follows it, and hearth's stream to it had broken (or hearth restarted)"
        } else {
            "nobody asked for it here"
        };
        return Err(End::Failed(format!(
            "Cog upstream {name} canceled prediction {id}: {why}; create it again"
        )));
    }
    let Some(r) = job.live.snapshot() else {
        return Err(End::Failed(
            "internal: the prediction's state was lost".into(),
        ));
    };
    Ok(final_record(
        job,
        r,
        id,
        body,
        status,
        &f.base_logs,
        f.since,
    ))
}

/// A model whose Cog serves no event streams (406): created with a synchronous `PUT`
/// whose answer is its end (and waited for until then, busy or not).
async fn follow_sync(
    job: &Job,
    id: &str,
    first: &mut Option<oneshot::Sender<First>>,
    f: &mut Following,
    busy_until: Instant,
) -> Result<Record, End> {
    let name = &job.client.name;
    job.note(format!(
        "Cog upstream {name} serves no event streams for this model (406): it runs in one synchronous request, and its output arrives at its end."
    ));
    let mut retry = attempts::ConnectRetry::default();
    loop {
        // Cog answers at the end: the caller is told it was taken now (a refusal
        // later fails the prediction, saying so).
        if let Some(tx) = first.take() {
            let _ = tx.send(First::Accepted);
        }
        match put_or_cancel(job, id, Put::Sync(&job.input), f).await {
            CogOpen::Finished(body) => {
                job.client.breaker.success();
                mark_started(job, f).await?;
                return completed(job, id, f, &body, false);
            }
            CogOpen::Busy(wait) if f.cancel_sent.is_none() && Instant::now() + wait <= busy_until => {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = job.live.cancel_requested() => return Err(End::Canceled(format!(
                        "Canceled while Cog upstream {name} was busy (never run there)."
                    ))),
                }
            }
            CogOpen::Busy(_) if f.cancel_sent.is_some() => {
                return Err(End::Canceled(format!(
                    "Canceled while Cog upstream {name} was busy (never run there)."
                )))
            }
            CogOpen::Busy(_) => return Err(End::Failed(format!("Cog upstream {name} stayed busy (at capacity or not ready) past this prediction's deadline; it never ran there"))),
            CogOpen::NotSent(e) => {
                let who = format!("Cog upstream {name}");
                retry.after(job, &who, &e, None).await?;
            }
            CogOpen::Lost(e) => {
                job.client.breaker.failure();
                let _ = job.client.cog_cancel(id).await;
                return Err(End::Failed(format!(
                    "the request that ran prediction {id} on Cog upstream {name} broke before its answer ({e}): Cog cancels such a prediction when its request drops, and keeps no record of it; create it again"
                )));
            }
            CogOpen::Refused {
                status,
                body,
                content_type,
            } => {
                let who = format!("Cog upstream {name}");
                return Err(attempts::refused(first, &who, status, body, content_type));
            }
            CogOpen::ServerError { status, detail } => {
                job.client.breaker.failure();
                return Err(End::Failed(format!(
                    "Cog upstream {name} answered {status} ({detail})"
                )));
            }
            CogOpen::Taken | CogOpen::Stream(_) | CogOpen::NoStreams | CogOpen::Gone(_) => {
                return Err(End::Failed(format!(
                    "Cog upstream {name} answered a synchronous create with no finished prediction"
                )))
            }
        }
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
