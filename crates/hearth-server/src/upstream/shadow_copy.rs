//! One shadow copy on an upstream (`shadow`): sent once, then followed along the
//! upstream's event stream like a primary prediction (`stream_follower`) — its first
//! output's time and its `done` as they happen, no `GET` while it runs — and read
//! once at its end; polled only when the create names no stream hearth may follow
//! (`stream_origin`), or the stream breaks. The copy relays nothing: from the stream it
//! takes only when output began, how much came (within `intake`'s caps) and the end,
//! so once output began the stream is read in batches (`READ_EVERY`): a few wake-ups
//! of the primary's core per copy rather than one per token.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::client::{CallError, CreateOutcome, UpstreamClient};
use super::compare::{Ended, FailKind, Observation, Outcome, Side};
use super::normalize;
use super::sse_reader::{Block, SseReader};
use crate::record::Status;
use crate::AppState;

/// Past its limit, how long a copy waits for the upstream to confirm the cancel.
const COPY_GRACE: Duration = Duration::from_secs(30);
/// Polls failing this long in a row end a copy (`upstream_5xx`).
const COPY_UNREACHABLE: Duration = Duration::from_secs(60);
const POLL_MIN: Duration = Duration::from_millis(250);
const POLL_MAX: Duration = Duration::from_secs(2);
/// After the stream's `done`, the final read is asked again this soon (doubling).
const AFTER_DONE: Duration = Duration::from_millis(10);
/// Waiting this long for the stream's headers, it is given up for polling.
const OPEN_WAIT: Duration = Duration::from_secs(10);
/// Nothing read for this long (both sides send a heartbeat every 15 s): polling.
const STREAM_IDLE: Duration = Duration::from_secs(45);
/// One event of a copy's stream carries at most this much.
const EVENT_MAX: usize = 16 << 20;
/// Once a copy's output began, its stream is read at most this often: what came
/// meanwhile in one wake-up, not one per token (the copy's times are its record's;
/// its end is seen at most this late).
const READ_EVERY: Duration = Duration::from_millis(25);

/// A copy's end.
pub(super) struct Copy {
    pub(super) observation: Observation,
    pub(super) upstream_id: Option<String>,
    pub(super) output: Option<Vec<String>>,
    /// The upstream's `started_at`.
    pub(super) started_at: Option<String>,
}

fn failed(kind: FailKind, upstream_id: Option<String>) -> Option<Copy> {
    Some(Copy {
        observation: Observation::refused(kind),
        upstream_id,
        output: None,
        started_at: None,
    })
}

fn canceled(upstream_id: Option<String>) -> Option<Copy> {
    Some(Copy {
        observation: Observation {
            outcome: Outcome::Canceled,
            latency: None,
            first_output: None,
            tokens_per_second: None,
        },
        upstream_id,
        output: None,
        started_at: None,
    })
}

/// How following a copy's stream ended.
enum Streamed {
    /// Its `done`: the end is one read away.
    Done,
    /// The server is shutting down.
    Stopped,
    /// More output than `intake` allows: this error.
    Over(String),
    /// Not followed, or no longer: polling.
    Broken(String),
}

/// Follows the copy's stream to its `done`, noting when output began.
async fn follow_stream(
    state: &AppState,
    c: &UpstreamClient,
    url: &str,
    deadline: Instant,
    sent: Instant,
    first_seen: &mut Option<f64>,
) -> Streamed {
    let opened = tokio::select! {
        r = tokio::time::timeout(OPEN_WAIT, c.open_stream(url, None, COPY_GRACE + deadline.saturating_duration_since(Instant::now()))) => r,
        _ = state.stop.cancelled() => return Streamed::Stopped,
    };
    let resp = match opened {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Streamed::Broken(e),
        Err(_) => return Streamed::Broken("no answer to opening it".into()),
    };
    let mut reader = SseReader::new(resp, EVENT_MAX.min(c.intake.event_max()), &c.budget);
    let mut out_bytes = 0usize;
    // One timer for the limit, armed once; an event already read costs no timer.
    let past_limit = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline));
    tokio::pin!(past_limit);
    loop {
        let block = tokio::select! {
            biased;
            b = tokio::time::timeout(STREAM_IDLE, reader.next()) => b,
            _ = state.stop.cancelled() => return Streamed::Stopped,
            // Past its limit the poll loop cancels it and waits out the grace.
            _ = &mut past_limit => return Streamed::Broken("its time limit passed".into()),
        };
        let ev = match block {
            Ok(Ok(Some(Block::Event(ev)))) => ev,
            Ok(Ok(Some(Block::Comment))) => continue,
            Ok(Ok(None)) => return Streamed::Broken("it ended before its done event".into()),
            Ok(Err(e)) => return Streamed::Broken(e),
            Err(_) => return Streamed::Broken("it went silent".into()),
        };
        match ev.event.as_str() {
            "output" => {
                if first_seen.is_none() {
                    *first_seen = Some(sent.elapsed().as_secs_f64());
                    // From here only the end matters, and its time is the upstream's
                    // record's: the rest is read in batches.
                    reader.pace(READ_EVERY);
                }
                out_bytes += ev.data.len();
                if let Err(why) = c.intake.check(&c.name, out_bytes, 0) {
                    return Streamed::Over(why);
                }
            }
            "done" => return Streamed::Done,
            _ => {}
        }
    }
}

/// Sends one copy upstream and follows it to its end. None: the upstream throttled
/// the create (it never ran there).
pub(super) async fn run_copy(
    state: &AppState,
    c: &UpstreamClient,
    model: &str,
    version: Option<&str>,
    input: &Value,
    limit: Duration,
) -> Option<Copy> {
    // A copy admitted just before shutdown is not created: the drain would not wait
    // for its cancel, and it would run (and bill) upstream unwatched.
    if state.stop.is_cancelled() {
        return None;
    }
    let sent = Instant::now();
    let (uid, stream) = match c.create(model, version, input, Some(limit)).await {
        CreateOutcome::Created(v) => {
            c.breaker.success();
            match v["id"].as_str().filter(|id| normalize::valid_id(id)) {
                Some(id) => (
                    id.to_string(),
                    v["urls"]["stream"].as_str().map(str::to_string),
                ),
                None => return failed(FailKind::Upstream5xx, None),
            }
        }
        CreateOutcome::Throttled(_) => return None,
        CreateOutcome::Rejected { status, .. } => {
            tracing::info!(status, "the upstream refused a shadow copy's input");
            return failed(FailKind::Validation, None);
        }
        CreateOutcome::ServerError { .. } | CreateOutcome::NotSent(_) => {
            c.breaker.failure();
            return failed(FailKind::Upstream5xx, None);
        }
        CreateOutcome::Ambiguous(e) => {
            // Never resent: a copy is not worth a second bill.
            c.breaker.failure();
            tracing::warn!(error = %e, "a shadow copy's create answer was lost; not sent again");
            return failed(FailKind::Upstream5xx, None);
        }
    };
    let some_uid = Some(uid.clone());
    let sent_input = super::intake::json_len(input);
    let deadline = sent + limit + Duration::from_secs(5);
    let mut first_seen = None;
    let mut interval = POLL_MIN;
    let mut done_seen = false;
    // Only a stream where `stream_target` allows is followed.
    if let Some(url) = stream.filter(|u| c.stream_target(u).is_ok()) {
        match follow_stream(state, c, &url, deadline, sent, &mut first_seen).await {
            Streamed::Done => {
                done_seen = true;
                interval = Duration::ZERO;
            }
            Streamed::Stopped => {
                // Shutting down: a copy left running upstream would bill for nothing.
                let _ = c.cancel(&uid).await;
                return canceled(some_uid);
            }
            Streamed::Over(why) => {
                tracing::warn!(reason = %why, "a shadow copy sent more than it may; canceled");
                let _ = c.cancel(&uid).await;
                return failed(FailKind::Upstream5xx, some_uid);
            }
            Streamed::Broken(why) => {
                tracing::debug!(reason = %why, "a shadow copy's stream could not be followed; polling");
            }
        }
    }
    let mut last_ok = Instant::now();
    let mut seen_chunks = 0usize;
    let mut cancel_sent: Option<Instant> = None;
    loop {
        // After the stream's done, read at once: no timer, which would round up to
        // the driver's next millisecond tick.
        tokio::select! {
            biased;
            _ = std::future::ready(()), if interval.is_zero() => {}
            _ = tokio::time::sleep(interval) => {}
            _ = state.stop.cancelled(), if cancel_sent.is_none() => {
                let _ = c.cancel(&uid).await;
                return canceled(some_uid);
            }
        }
        if cancel_sent.is_none() && Instant::now() > deadline {
            let _ = c.cancel(&uid).await;
            cancel_sent = Some(Instant::now());
        }
        if cancel_sent.is_some_and(|t| t.elapsed() > COPY_GRACE) {
            return failed(FailKind::Timeout, some_uid);
        }
        let u = match c.get_prediction(&uid, sent_input).await {
            Ok(u) => {
                last_ok = Instant::now();
                u
            }
            Err(CallError::Throttled(wait)) => {
                interval = wait.clamp(POLL_MIN, Duration::from_secs(30));
                continue;
            }
            Err(CallError::Status { status, .. }) if status < 500 => {
                return failed(FailKind::Upstream5xx, some_uid);
            }
            Err(CallError::TooLarge(why)) => {
                tracing::warn!(reason = %why, "a shadow copy sent more than it may; canceled");
                let _ = c.cancel(&uid).await;
                return failed(FailKind::Upstream5xx, some_uid);
            }
            Err(_) => {
                if last_ok.elapsed() > COPY_UNREACHABLE {
                    return failed(FailKind::Upstream5xx, some_uid);
                }
                interval = (interval * 2).clamp(POLL_MIN, POLL_MAX);
                continue;
            }
        };
        if let Err(why) = c.intake.check_record(&c.name, &u) {
            tracing::warn!(reason = %why, "a shadow copy sent more than it may; canceled");
            if !normalize::status(&u).is_terminal() {
                let _ = c.cancel(&uid).await;
            }
            return failed(FailKind::Upstream5xx, some_uid);
        }
        let status = normalize::status(&u);
        let output = normalize::chunks(&u["output"]);
        if first_seen.is_none() && !output.is_empty() {
            first_seen = Some(sent.elapsed().as_secs_f64());
        }
        if status.is_terminal() {
            if cancel_sent.is_some() && status == Status::Canceled {
                // Canceled by its time limit here.
                return failed(FailKind::Timeout, some_uid);
            }
            let error = normalize::error(&u);
            let observation = Observation::from_parts(
                Ended {
                    status,
                    error: error.as_deref(),
                    logs: u["logs"].as_str().unwrap_or(""),
                    created_at: u["created_at"].as_str().unwrap_or(""),
                    completed_at: u["completed_at"].as_str(),
                    metrics: Some(&u["metrics"]),
                },
                Side::Upstream,
                sent.elapsed().as_secs_f64(),
                first_seen,
            );
            return Some(Copy {
                observation,
                upstream_id: some_uid,
                output: Some(output),
                started_at: u["started_at"].as_str().map(str::to_string),
            });
        }
        interval = if done_seen {
            (interval * 2).clamp(AFTER_DONE, POLL_MAX)
        } else if output.len() != seen_chunks {
            POLL_MIN
        } else {
            (interval * 3 / 2).clamp(POLL_MIN, POLL_MAX)
        };
        seen_chunks = output.len();
    }
}
