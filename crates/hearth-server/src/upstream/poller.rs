//! Polls an upstream prediction's `GET` with backoff (honouring `Retry-After`),
//! turning what changed into hearth's events — `start`, output deltas, logs — until
//! it ends. The way to follow a prediction whose upstream names no event stream, or
//! whose stream failed (`follow`); its first `GET` also finds the stream of one
//! resumed after a restart.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::client::CallError;
use super::follow::Progress;
use super::normalize::{self, Change};
use super::runner::{End, Job};
use crate::record::Status;

const POLL_MIN: Duration = Duration::from_millis(200);
/// After the stream's `done` the end is moments away: asked again this soon
/// (doubling), not at the running pace.
const AFTER_DONE: Duration = Duration::from_millis(10);
const POLL_MAX: Duration = Duration::from_secs(5);
/// Polls failing for this long in a row end the prediction (the upstream is gone).
const UNREACHABLE_LIMIT: Duration = Duration::from_secs(600);

/// Why polling stopped.
pub(super) enum Polled {
    /// The upstream's final record.
    Ended(Value),
    /// The upstream names an event stream, not followed yet, and nothing has been
    /// relayed: follow that instead.
    Stream(String),
}

/// Polls `p.uid` until it ends, or until a stream to follow shows up.
pub(super) async fn poll(job: &Job, p: &mut Progress) -> Result<Polled, End> {
    let name = &job.client.name;
    let uid = p.uid.clone();
    let live = &job.live;
    let mut interval = Duration::ZERO;
    let mut last_ok = Instant::now();
    loop {
        let grace = p.grace_left().unwrap_or(Duration::MAX);
        // No pause to wait out (the first read, the one after the stream's done): no
        // timer either — a timer rounds up to the driver's next millisecond tick.
        tokio::select! {
            biased;
            _ = std::future::ready(()), if interval.is_zero() => {}
            _ = tokio::time::sleep(interval) => {}
            _ = live.cancel_requested(), if p.cancel_sent.is_none() => p.forward_cancel(job).await,
            _ = tokio::time::sleep_until(p.deadline), if !p.deadline_passed => p.deadline_hit(job).await?,
            _ = tokio::time::sleep(grace), if p.cancel_sent.is_some() => {}
        }
        p.grace(job)?;
        let read = job.client.get_prediction(&uid, job.input_bytes);
        let Some(got) = p.read_or_cancel(job, read).await? else {
            // Dropped for a cancel (now forwarded) or its grace: read again at once.
            interval = Duration::ZERO;
            continue;
        };
        let u = match got {
            Ok(u) => {
                job.client.breaker.success();
                last_ok = Instant::now();
                u
            }
            Err(CallError::Throttled(wait)) => {
                interval = wait.min(Duration::from_secs(60));
                continue;
            }
            Err(CallError::Status { status, body }) if status < 500 => {
                return Err(super::follow::refused(name, &uid, status, &body))
            }
            Err(CallError::TooLarge(why)) => return Err(p.over_limit(job, why).await),
            Err(e) => {
                // Hearth's own memory budget is no fault of the upstream's.
                if !matches!(e, CallError::Budget(_)) {
                    job.client.breaker.failure();
                }
                if last_ok.elapsed() > UNREACHABLE_LIMIT {
                    return Err(End::Failed(format!(
                        "lost contact with upstream {name} for {} minutes ({e}); prediction {uid} may still be running there",
                        UNREACHABLE_LIMIT.as_secs() / 60
                    )));
                }
                interval = (interval * 2).clamp(POLL_MIN, POLL_MAX);
                continue;
            }
        };
        let status = normalize::status(&u);
        if status.is_terminal() {
            return Ok(Polled::Ended(u));
        }
        let current = live
            .read(|r| r.prediction.output.clone())
            .flatten()
            .unwrap_or_default();
        // A stream replays from its start: followed only while nothing is out here
        // (one resumed after a restart with output keeps polling).
        if let Some(url) = u["urls"]["stream"].as_str() {
            if !p.stream_tried && current.is_empty() && p.cancel_sent.is_none() {
                return Ok(Polled::Stream(url.to_string()));
            }
        }
        let mut changed = false;
        if !p.started && status != Status::Starting {
            changed = true;
            p.mark_started(job, u["started_at"].as_str()).await?;
        }
        match normalize::change(&current, &u["output"]) {
            Change::None => {}
            Change::Append(new) => {
                changed = true;
                p.push_output(job, new).await?;
            }
            Change::Replace(all) => {
                changed = true;
                p.replace_output(job, all).await?;
            }
        }
        if let Some(logs) = u["logs"].as_str().filter(|l| *l != p.upstream_logs) {
            changed = true;
            p.set_logs(job, logs.to_string()).await?;
        }
        if changed {
            p.flush(job, true).await?;
        }
        interval = if p.done_seen {
            (interval * 2).clamp(AFTER_DONE, POLL_MAX)
        } else if changed {
            POLL_MIN
        } else {
            (interval * 3 / 2).clamp(POLL_MIN, POLL_MAX)
        };
    }
}
