//! Follows an upstream prediction's event stream (`urls.stream`, Replicate's SSE:
//! `output`, `logs`, `error`, `done`), relaying each `output` and `logs` event to the
//! local prediction as it arrives — so the caller's stream and webhooks see the
//! upstream's output as it is made, not a poll later — until `done`, after which one
//! `GET` reads the final record (`follow`).
//!
//! Every wait is bounded: opening the stream, the silence between reads (both sides
//! send a heartbeat every 15 s), the reconnects after a drop (resumed with
//! `Last-Event-ID`; an event replayed anyway is skipped by its id). A stream that
//! cannot be opened, keeps dropping, or cannot be resumed hands over to polling. While
//! the stream runs, a `GET` now and then (1 s, doubling to 30 s) sees the start and
//! an end the stream did not report.

use std::time::Duration;

use serde_json::Value;

use super::follow::{Progress, MAX_RUN};
use super::runner::{End, Job};
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
    let mut drops = 0u32;
    let mut check_every = CHECK_FIRST;
    let mut next_check = tokio::time::Instant::now() + check_every;
    loop {
        let opened = tokio::time::timeout(
            OPEN_WAIT,
            job.client.open_stream(url, last_id.as_deref(), MAX_RUN),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", OPEN_WAIT.as_secs())));
        let why = match opened {
            Err(e) if drops == 0 => return Ok(Streamed::Broken(format!("opening it: {e}"))),
            Err(e) => format!("opening it again: {e}"),
            Ok(resp) => {
                let mut reader = SseReader::new(resp, EVENT_MAX);
                // One deadline across the loop's turns, moved only by a read: the
                // other branches (the checks among them, at most 30 s apart) must not
                // restart the silence count.
                let mut silent_until = tokio::time::Instant::now() + STREAM_IDLE;
                loop {
                    p.grace(job)?;
                    let grace = p.grace_left().unwrap_or(Duration::MAX);
                    let block = tokio::select! {
                        b = reader.next() => b,
                        _ = tokio::time::sleep_until(silent_until) => {
                            break format!("nothing for {}s", STREAM_IDLE.as_secs());
                        }
                        _ = job.live.cancel_requested(), if p.cancel_sent.is_none() => {
                            p.forward_cancel(job).await;
                            continue;
                        }
                        _ = tokio::time::sleep_until(p.deadline), if !p.deadline_passed => {
                            p.deadline_hit(job).await?;
                            continue;
                        }
                        _ = tokio::time::sleep(grace), if p.cancel_sent.is_some() => continue,
                        _ = tokio::time::sleep_until(next_check) => {
                            check_every = (check_every * 2).min(CHECK_MAX);
                            next_check = tokio::time::Instant::now() + check_every;
                            match p.check(job).await? {
                                Some(u) => return Ok(Streamed::Ended(u)),
                                None => continue,
                            }
                        }
                    };
                    silent_until = tokio::time::Instant::now() + STREAM_IDLE;
                    let ev = match block {
                        Ok(Some(Block::Event(ev))) => ev,
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
                            p.push_output(job, vec![ev.data]).await;
                            p.flush(job, false).await?;
                        }
                        "logs" => {
                            relayed = true;
                            p.mark_started(job, None).await?;
                            let mut logs = std::mem::take(&mut p.upstream_logs);
                            logs.push_str(&ev.data);
                            if !logs.ends_with('\n') {
                                logs.push('\n');
                            }
                            p.set_logs(job, logs).await;
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
