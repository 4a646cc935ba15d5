//! Follows an upstream prediction from its id to its end: along the upstream's event
//! stream when it names one (`stream_follower`: each `output` and `logs` event is
//! relayed as it arrives), by polling its `GET` otherwise, or once the stream cannot
//! be opened, keeps breaking or goes silent (`poller`). Either way the end is the
//! upstream's own record, read with one `GET`: status, output, error and metrics are
//! the side's that ran it. `Progress` is what both ways share: what has been relayed,
//! the cancel forwarded, the deadline.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::client::CallError;
use super::normalize;
use super::runner::{final_record, mark, End, Job};
use super::{intake, poller, stream_follower};
use crate::record::{now_rfc3339, Record, Status};
use crate::store::StoreError;
use crate::webhook::WebhookEvent;

/// No prediction is followed longer than this (hosted ones are deleted after an hour).
pub(super) const MAX_RUN: Duration = Duration::from_secs(86400);
/// After a cancel is forwarded, how long the upstream gets to end the prediction.
const CANCEL_GRACE: Duration = Duration::from_secs(30);

/// How a prediction ends when the upstream answers its `GET` with a 4xx (not 429):
/// 404, it no longer has it; otherwise it refuses to show it.
pub(super) fn refused(name: &str, uid: &str, status: u16, body: &str) -> End {
    End::Failed(if status == 404 {
        format!("upstream {name} no longer has prediction {uid} (deleted or expired there)")
    } else {
        format!("upstream {name} refused to show prediction {uid} ({status}): {body}")
    })
}

/// Where following one prediction stands.
pub(super) struct Progress {
    pub uid: String,
    pub started: bool,
    /// The prediction's logs before the upstream's (hearth's own notes).
    base_logs: String,
    /// The upstream's logs as relayed so far.
    pub upstream_logs: String,
    pub cancel_sent: Option<Instant>,
    pub deadline: tokio::time::Instant,
    pub deadline_passed: bool,
    since: Instant,
    /// The stream was followed once: from then on, polling.
    pub stream_tried: bool,
    /// The stream said `done`: the end is a `GET` away, so that `GET` is not paced.
    pub done_seen: bool,
    /// Output bytes relayed so far (`intake`'s cap).
    out_bytes: usize,
    last_put: Instant,
}

/// Follows `uid` upstream to its end; `stream_url` is the create's `urls.stream`.
pub(super) async fn follow(
    job: &Job,
    uid: &str,
    mut stream_url: Option<String>,
) -> Result<Record, End> {
    job.live.update(|r| {
        if let Some(h) = r.prediction.hearth.as_mut() {
            h["upstream_id"] = json!(uid);
        }
    });
    let mut p = Progress::new(job, uid);
    loop {
        if let Some(url) = stream_url.take() {
            p.stream_tried = true;
            if let Err(why) = job.client.stream_target(&url) {
                tracing::warn!(upstream = %job.client.name, reason = %why, "not following an upstream's stream elsewhere; polling");
                p.note(
                    job,
                    format!("The event stream upstream {} named was not followed ({why}): polling it instead.", job.client.name),
                );
            } else {
                match stream_follower::follow(job, &url, &mut p).await? {
                    stream_follower::Streamed::Done => {
                        mark(job, "stream done");
                        p.done_seen = true;
                    }
                    stream_follower::Streamed::Ended(u) => return p.final_record(job, &u),
                    stream_follower::Streamed::Broken(why) => {
                        tracing::warn!(upstream = %job.client.name, reason = %why, "following the upstream's stream failed; polling");
                        p.note(
                        job,
                        format!(
                            "The event stream of upstream {} could not be followed ({why}): polling it instead.",
                            job.client.name
                        ),
                    );
                    }
                }
            }
        }
        match poller::poll(job, &mut p).await? {
            poller::Polled::Ended(u) => return p.final_record(job, &u),
            poller::Polled::Stream(url) => stream_url = Some(url),
        }
    }
}

/// Applies `change` to the prediction and feeds `event`'s webhook. With no webhook to
/// feed, without a copy of the record: a stream's events come one by one.
pub(super) async fn relay(job: &Job, event: WebhookEvent, change: impl FnOnce(&mut Record)) {
    if job.ctx.webhook.is_none() {
        job.live.apply(change);
    } else if let Some(r) = job.live.update(change) {
        job.ctx.notify(event, &r).await;
    }
}

/// The output already here (one resumed after a restart), in bytes.
fn snapshot_output_bytes(job: &Job) -> usize {
    job.live
        .read(|r| {
            r.prediction
                .output
                .as_deref()
                .map_or(0, intake::output_bytes)
        })
        .unwrap_or(0)
}

impl Progress {
    fn new(job: &Job, uid: &str) -> Self {
        let snapshot = job.live.snapshot();
        let far = tokio::time::Instant::now() + MAX_RUN;
        Progress {
            uid: uid.to_string(),
            started: snapshot
                .as_ref()
                .is_some_and(|r| r.prediction.status != Status::Starting),
            base_logs: snapshot.map(|r| r.prediction.logs).unwrap_or_default(),
            upstream_logs: String::new(),
            cancel_sent: None,
            deadline: job.ctx.deadline.unwrap_or(far),
            deadline_passed: false,
            since: Instant::now(),
            stream_tried: false,
            done_seen: false,
            out_bytes: snapshot_output_bytes(job),
            last_put: Instant::now(),
        }
    }

    /// Past one of the caps on what the upstream may send (`intake`): the prediction
    /// is canceled there and fails here, with `why`.
    pub async fn over_limit(&mut self, job: &Job, why: String) -> End {
        tracing::warn!(upstream = %job.client.name, reason = %why, "an upstream prediction sent more than it may");
        if self.cancel_sent.is_none() {
            self.forward_cancel(job).await;
        }
        End::Failed(why)
    }

    /// A line of hearth's own in the prediction's logs, kept through the end.
    pub fn note(&mut self, job: &Job, line: String) {
        self.base_logs.push_str(&line);
        self.base_logs.push('\n');
        let all = format!("{}{}", self.base_logs, self.upstream_logs);
        job.live.update(|r| r.prediction.logs = all);
    }

    /// Sends the cancel the caller asked for upstream (once), kept in the store first
    /// (`Job::keep_cancel`); the upstream ends it.
    pub async fn forward_cancel(&mut self, job: &Job) {
        self.cancel_sent = Some(Instant::now());
        job.keep_cancel().await;
        if let Err(e) = job.client.cancel(&self.uid).await {
            tracing::warn!(upstream = %job.client.name, error = %e, "forwarding a cancel failed; following on");
        }
    }

    /// The prediction's deadline passed: its cancel goes upstream; without one (the
    /// day-long bound), it fails here.
    pub async fn deadline_hit(&mut self, job: &Job) -> Result<(), End> {
        self.deadline_passed = true;
        if job.ctx.deadline.is_none() {
            return Err(End::Failed(format!(
                "upstream {} did not finish prediction {} within {} hours",
                job.client.name,
                self.uid,
                MAX_RUN.as_secs() / 3600
            )));
        }
        if self.cancel_sent.is_none() {
            self.forward_cancel(job).await;
        }
        Ok(())
    }

    /// `read` (a call upstream that is safe to drop: a `GET`, opening a stream) raced
    /// with what must not wait for it: a cancel asked meanwhile is forwarded at once,
    /// not after the read's timeout (an upstream that hangs holds a `GET` 30 s), and
    /// so is the deadline's; a forwarded cancel's grace running out ends the wait.
    /// `None`: the read was dropped for one of those (the caller reads again, and its
    /// next `grace` check ends it when the grace is spent).
    pub async fn read_or_cancel<T>(
        &mut self,
        job: &Job,
        read: impl std::future::Future<Output = T>,
    ) -> Result<Option<T>, End> {
        let grace = self.grace_left();
        tokio::select! {
            out = read => Ok(Some(out)),
            _ = job.live.cancel_requested(), if self.cancel_sent.is_none() => {
                self.forward_cancel(job).await;
                Ok(None)
            }
            _ = tokio::time::sleep_until(self.deadline), if !self.deadline_passed => {
                self.deadline_hit(job).await?;
                Ok(None)
            }
            _ = async {
                match grace {
                    Some(g) => tokio::time::sleep(g).await,
                    None => std::future::pending().await,
                }
            } => Ok(None),
        }
    }

    /// A forwarded cancel the upstream has not confirmed in time ends it here.
    pub fn grace(&self, job: &Job) -> Result<(), End> {
        match self.cancel_sent {
            Some(at) if at.elapsed() > CANCEL_GRACE => Err(End::Canceled(format!(
                "Canceled here; upstream {} had not confirmed the cancel of {} within {}s.",
                job.client.name,
                self.uid,
                CANCEL_GRACE.as_secs()
            ))),
            _ => Ok(()),
        }
    }

    /// How long until the grace above runs out (none while no cancel was sent).
    pub fn grace_left(&self) -> Option<Duration> {
        self.cancel_sent
            .map(|at| CANCEL_GRACE.saturating_sub(at.elapsed()) + Duration::from_millis(10))
    }

    /// The upstream runs it: `processing`, stored, the `start` webhook (once).
    pub async fn mark_started(&mut self, job: &Job, at: Option<&str>) -> Result<(), End> {
        if self.started {
            return Ok(());
        }
        self.started = true;
        let at = at.map(str::to_string).unwrap_or_else(now_rfc3339);
        let Some(r) = job.live.update(|r| {
            r.prediction.status = Status::Processing;
            r.prediction.started_at = Some(at);
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

    /// New output chunks after those out: to the stream and `output` webhooks; past
    /// the output cap, the end.
    pub async fn push_output(&mut self, job: &Job, chunks: Vec<String>) -> Result<(), End> {
        self.out_bytes += intake::output_bytes(&chunks);
        if let Err(why) = job.client.intake.check(&job.client.name, self.out_bytes, 0) {
            return Err(self.over_limit(job, why).await);
        }
        for chunk in chunks {
            relay(job, WebhookEvent::Output, |r| {
                r.prediction.output.get_or_insert_with(Vec::new).push(chunk)
            })
            .await;
        }
        Ok(())
    }

    /// The output anew (the upstream's is no continuation of what is here).
    pub async fn replace_output(&mut self, job: &Job, all: Vec<String>) -> Result<(), End> {
        self.out_bytes = intake::output_bytes(&all);
        if let Err(why) = job.client.intake.check(&job.client.name, self.out_bytes, 0) {
            return Err(self.over_limit(job, why).await);
        }
        if let Some(r) = job.live.update(|r| r.prediction.output = Some(all)) {
            job.ctx.notify(WebhookEvent::Output, &r).await;
        }
        Ok(())
    }

    /// `new` appended to the upstream's logs; past the logs' cap, the end. In place:
    /// rebuilding the whole text per event made a stream of many small `logs` events
    /// quadratic in the logs' size.
    pub async fn append_logs(&mut self, job: &Job, new: &str) -> Result<(), End> {
        let total = self.upstream_logs.len() + new.len();
        if let Err(why) = job.client.intake.check(&job.client.name, 0, total) {
            return Err(self.over_limit(job, why).await);
        }
        self.upstream_logs.push_str(new);
        relay(job, WebhookEvent::Logs, |r| r.prediction.logs.push_str(new)).await;
        Ok(())
    }

    /// The upstream's logs so far are `logs`; past the logs' cap, the end.
    pub async fn set_logs(&mut self, job: &Job, logs: String) -> Result<(), End> {
        if let Err(why) = job.client.intake.check(&job.client.name, 0, logs.len()) {
            return Err(self.over_limit(job, why).await);
        }
        self.upstream_logs = logs;
        let all = format!("{}{}", self.base_logs, self.upstream_logs);
        if let Some(r) = job.live.update(|r| r.prediction.logs = all) {
            job.ctx.notify(WebhookEvent::Logs, &r).await;
        }
        Ok(())
    }

    /// With a store other replicas read, what changed is written there: at once when
    /// `now`, else at most every `OUTPUT_FLUSH` (a stream's events come one by one).
    pub async fn flush(&mut self, job: &Job, now: bool) -> Result<(), End> {
        if !job.ctx.store.is_shared()
            || (!now && self.last_put.elapsed() < crate::prediction::OUTPUT_FLUSH)
        {
            return Ok(());
        }
        self.last_put = Instant::now();
        if let Some(r) = job.live.snapshot() {
            match job.ctx.store.put(&r).await {
                Ok(()) => {}
                Err(StoreError::NotOwner(_)) => return Err(End::TakenOver),
                Err(e) => tracing::warn!(error = %e, "could not write streamed output"),
            }
        }
        Ok(())
    }

    /// One `GET` while the stream is followed: the start, or the end, when the stream
    /// has not said so. A prediction the upstream no longer has or refuses to show
    /// ends as the poller ends it; other failures count against the upstream's
    /// breaker and are left to the stream (and then the poller's limits).
    pub async fn check(&mut self, job: &Job) -> Result<Option<Value>, End> {
        let uid = self.uid.clone();
        let read = job.client.get_prediction(&uid, job.input_bytes);
        let Some(got) = self.read_or_cancel(job, read).await? else {
            return Ok(None);
        };
        let u = match got {
            Ok(u) => u,
            Err(CallError::Throttled(_) | CallError::Budget(_)) => return Ok(None),
            Err(CallError::Status { status, body }) if status < 500 => {
                return Err(refused(&job.client.name, &self.uid, status, &body))
            }
            Err(CallError::TooLarge(why)) => return Err(self.over_limit(job, why).await),
            Err(e) => {
                job.client.breaker.failure();
                tracing::debug!(upstream = %job.client.name, error = %e, "checking a followed prediction failed");
                return Ok(None);
            }
        };
        job.client.breaker.success();
        let status = normalize::status(&u);
        if status != Status::Starting {
            self.mark_started(job, u["started_at"].as_str()).await?;
        }
        Ok(status.is_terminal().then_some(u))
    }

    /// The end, from the upstream's final record `u` (within the caps on output and
    /// logs, or failed).
    pub fn final_record(&self, job: &Job, u: &Value) -> Result<Record, End> {
        mark(job, "final record read");
        job.client
            .intake
            .check_record(&job.client.name, u)
            .map_err(End::Failed)?;
        let Some(r) = job.live.snapshot() else {
            return Err(End::Failed(
                "internal: the prediction's state was lost".into(),
            ));
        };
        let status = normalize::status(u);
        Ok(final_record(
            job,
            r,
            &self.uid,
            u,
            status,
            &self.base_logs,
            self.since,
        ))
    }
}
