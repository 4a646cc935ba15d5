//! Follows an upstream prediction's event stream (`urls.stream`, Replicate's SSE:
//! `output`, `logs`, `error`, `done`), relaying each `output` and `logs` event to the
//! local prediction as it arrives — so the caller's stream and webhooks see the
//! upstream's output as it is made, not a poll later — until `done`, after which one
//! `GET` reads the final record (`follow`).
//!
//! Every wait is bounded: opening the stream, the silence between reads (both sides
//! send a heartbeat every 15 s), the reconnects after a drop (resumed with
//! `Last-Event-ID`; an event replayed anyway is skipped by its id). A stream that
//! cannot be opened, keeps dropping, or cannot be resumed hands over to polling. When
//! the stream has carried no event for a while (1 s, doubling to 30 s), a `GET` sees
//! the start and an end the stream did not report; while events flow the upstream is
//! not polled at all.

use std::time::Duration;

use serde_json::Value;

use super::follow::{Progress, MAX_RUN};
use super::runner::{mark, End, Job};
use super::sse_reader::{id_sequence, Block, SseReader};

/// An event carries at most this much.
const EVENT_MAX: usize = 16 << 20;
/// Waiting this long for the stream's headers, it cannot be opened.
const OPEN_WAIT: Duration = Duration::from_secs(10);
/// Nothing read for this long (not even a heartbeat): the stream is dead.
const STREAM_IDLE: Duration = Duration::from_secs(45);
/// A stream that dropped is opened again at most this many times.
const RECONNECTS: u32 = 3;
const CHECK_FIRST: Duration = Duration::from_secs(1);
const CHECK_MAX: Duration = Duration::from_secs(30);

/// How following the stream ended.
pub(super) enum Streamed {
    /// Its `done` event: the final record is the upstream's `GET`.
    Done,
    /// A check saw the end first: the upstream's final record.
    Ended(Value),
    /// The stream could not be followed, for this reason: poll instead.
    Broken(String),
}

/// Whether an event with `id` was relayed before (its sequence is not past `last`).
fn replayed(id: Option<&str>, last: Option<&str>) -> bool {
    match (id.and_then(id_sequence), last.and_then(id_sequence)) {
        (Some((prefix, n)), Some((last_prefix, last_n))) => prefix == last_prefix && n <= last_n,
        _ => false,
    }
}

pub(super) async fn follow(job: &Job, url: &str, p: &mut Progress) -> Result<Streamed, End> {
    let name = &job.client.name;
    let mut last_id: Option<String> = None;
    let mut relayed = false;
    let mut first_event = true;
    let mut drops = 0u32;
    let event_max = EVENT_MAX.min(job.client.intake.event_max());
    let mut check_every = CHECK_FIRST;
    loop {
        let open = tokio::time::timeout(
            OPEN_WAIT,
            job.client.open_stream(url, last_id.as_deref(), MAX_RUN),
        );
        let Some(opened) = p.read_or_cancel(job, open).await? else {
            // A cancel went out meanwhile: opened again, its grace checked first.
            p.grace(job)?;
            continue;
        };
        let opened =
            opened.unwrap_or_else(|_| Err(format!("no answer within {}s", OPEN_WAIT.as_secs())));
        let why = match opened {
            Err(e) if drops == 0 => return Ok(Streamed::Broken(format!("opening it: {e}"))),
            Err(e) => format!("opening it again: {e}"),
            Ok(resp) => {
                mark(job, "stream connected");
                let mut reader = SseReader::new(resp, event_max, &job.client.budget);
                // The silence bound and the next check are due from the last read and
                // the last event: each read only notes its time, and one timer, moved
                // when it fires, looks at both (a timer armed and dropped at every
                // event costs more than the relay of the event itself).
                let mut last_read = tokio::time::Instant::now();
                let mut last_event = last_read;
                let due =
                    |read: tokio::time::Instant, event: tokio::time::Instant, every: Duration| {
                        (read + STREAM_IDLE).min(event + every)
                    };
                let wake = tokio::time::sleep_until(due(last_read, last_event, check_every));
                tokio::pin!(wake);
                let deadline = tokio::time::sleep_until(p.deadline);
                tokio::pin!(deadline);
                loop {
                    p.grace(job)?;
                    let grace_left = p.grace_left();
                    let block = tokio::select! {
                        b = reader.next() => b,
                        _ = &mut wake => {
                            let now = tokio::time::Instant::now();
                            if now >= last_read + STREAM_IDLE {
                                break format!("nothing for {}s", STREAM_IDLE.as_secs());
                            }
                            if now >= last_event + check_every {
                                // Quiet for a while: a GET sees a start or an end the
                                // stream has not said.
                                check_every = (check_every * 2).min(CHECK_MAX);
                                last_event = now;
                                if let Some(u) = p.check(job).await? {
                                    return Ok(Streamed::Ended(u));
                                }
                            }
                            wake.as_mut().reset(due(last_read, last_event, check_every));
                            continue;
                        }
                        _ = job.live.cancel_requested(), if p.cancel_sent.is_none() => {
                            p.forward_cancel(job).await;
                            continue;
                        }
                        _ = &mut deadline, if !p.deadline_passed => {
                            p.deadline_hit(job).await?;
                            continue;
                        }
                        _ = async {
                            match grace_left {
                                Some(g) => tokio::time::sleep(g).await,
                                None => std::future::pending().await,
                            }
                        } => continue,
                    };
                    last_read = tokio::time::Instant::now();
                    let ev = match block {
                        Ok(Some(Block::Event(ev))) => {
                            // Events flowing say it runs: no check while they do.
                            last_event = last_read;
                            if first_event {
                                first_event = false;
                                mark(job, "first event");
                            }
                            ev
                        }
                        Ok(Some(Block::Comment)) => continue,
                        Ok(None) => break "it ended before its done event".to_string(),
                        Err(e) => break e,
                    };
                    if replayed(ev.id.as_deref(), last_id.as_deref()) {
                        continue;
                    }
                    if ev.id.is_some() {
                        last_id = ev.id;
                    }
                    match ev.event.as_str() {
                        "output" => {
                            relayed = true;
                            p.mark_started(job, None).await?;
                            p.push_output(job, vec![ev.data]).await?;
                            p.flush(job, false).await?;
                        }
                        "logs" => {
                            relayed = true;
                            p.mark_started(job, None).await?;
                            let mut line = ev.data;
                            if !line.ends_with('\n') {
                                line.push('\n');
                            }
                            p.append_logs(job, &line).await?;
                            p.flush(job, false).await?;
                        }
                        // The final record carries the error and how it ended.
                        "done" => return Ok(Streamed::Done),
                        _ => {}
                    }
                }
            }
        };
        drops += 1;
        if drops > RECONNECTS {
            return Ok(Streamed::Broken(format!(
                "it dropped {drops} times; the last: {why}"
            )));
        }
        if relayed && last_id.is_none() {
            return Ok(Streamed::Broken(format!(
                "it dropped ({why}) and its events carry no ids to resume after"
            )));
        }
        tracing::info!(upstream = %name, reason = %why, "the upstream's stream dropped; reconnecting");
        tokio::time::sleep(Duration::from_millis(100 << drops.min(4))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::replayed;

    #[test]
    fn a_replayed_event_is_known_by_its_id() {
        assert!(replayed(Some("17:3"), Some("17:3")));
        assert!(replayed(Some("17:2"), Some("17:3")));
        assert!(!replayed(Some("17:4"), Some("17:3")));
        assert!(!replayed(Some("18:1"), Some("17:3")));
        assert!(!replayed(None, Some("17:3")));
        assert!(!replayed(Some("17:0"), None));
    }
}
