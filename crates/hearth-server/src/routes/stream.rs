//! Server-sent events at `urls.stream`: one `output` event per text chunk, then
//! `done`. Every event has an id (`{created}:{n}`), so a client reconnecting with
//! `Last-Event-ID` resumes after it; a finished prediction replays and ends.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::AppResult;
use crate::error::ApiError;
use crate::record::{secret_eq, Record, Status};
use crate::service::lookup;
use crate::AppState;

/// Python's read timeout is 30 s; a comment every 15 s keeps it open.
const HEARTBEAT: Duration = Duration::from_secs(15);

/// Where a reconnecting client resumes: after the `n` of the `{created}:{n}` id it
/// sent in `Last-Event-ID` (absent: from the start). The ids are ours, so one that is
/// not of that form, or whose successor does not fit, is a 400 naming the header, not
/// a silent replay of the whole stream.
fn resume_index(headers: &HeaderMap) -> Result<usize, ApiError> {
    let Some(v) = headers.get("last-event-id") else {
        return Ok(0);
    };
    let bad = || {
        ApiError::bad_request(
            "Last-Event-ID: expected the id of an event this stream sent ({created}:{n})",
        )
    };
    let text = v.to_str().map_err(|_| bad())?.trim();
    if text.is_empty() {
        return Ok(0);
    }
    let n = text.rsplit(':').next().unwrap_or(text);
    n.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_add(1))
        .ok_or_else(bad)
}

/// What a stream needs of a prediction: the output after what was sent, the status.
struct View {
    created_unix: i64,
    new_output: Vec<String>,
    /// The whole output's length.
    len: usize,
    status: Status,
    error: Option<String>,
}

impl View {
    fn of(r: &Record, next: usize) -> View {
        let output = r.prediction.output.as_deref().unwrap_or_default();
        View {
            created_unix: r.created_unix,
            new_output: output.get(next..).unwrap_or_default().to_vec(),
            len: output.len(),
            status: r.prediction.status,
            error: r.prediction.error.clone(),
        }
    }
}

pub async fn sse(
    State(state): State<Arc<AppState>>,
    Path((id, token)): Path<(String, String)>,
    headers: HeaderMap,
) -> AppResult<Response> {
    let record = lookup(&state, &id).await?;
    if !secret_eq(&record.stream_token, &token) {
        return Err(ApiError::not_found(format!("prediction {id} not found")));
    }
    let mut next = resume_index(&headers)?;
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        // Polls while a prediction is neither live here nor finished. With a shared
        // store that is one another replica runs: its output arrives through the store
        // (and if that replica dies, a survivor ends it). Otherwise it is a moment
        // between the hub and the store; one that stays so cannot progress.
        let shared = state.store.is_shared();
        let mut limbo = 0u32;
        loop {
            let live = state.hub.get(&id);
            let changed = live.as_ref().map(|l| l.subscribe());
            // What is new since `next`, read in place while it runs here (no copy of
            // the whole record at every chunk).
            let current: Option<View> = match &live {
                Some(l) => l.read(|r| View::of(r, next)),
                None => lookup(&state, &id).await.ok().map(|r| View::of(&r, next)),
            };
            let Some(mut r) = current else { return };
            if live.is_none() && !shared && !r.status.is_terminal() {
                limbo += 1;
                if limbo > 100 {
                    r.status = Status::Failed;
                    r.error = Some("the prediction is not running on this server".into());
                }
            }
            let ts = r.created_unix;
            for chunk in &r.new_output {
                let ev = Event::default()
                    .event("output")
                    .id(format!("{ts}:{next}"))
                    .data(chunk);
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
                next += 1;
            }
            if r.status.is_terminal() {
                let mut n = r.len;
                if r.status == Status::Failed {
                    let msg = r
                        .error
                        .clone()
                        .unwrap_or_else(|| "prediction failed".into());
                    let _ = tx
                        .send(Ok(Event::default()
                            .event("error")
                            .id(format!("{ts}:{n}"))
                            .data(msg)))
                        .await;
                    n += 1;
                }
                let payload = match r.status {
                    Status::Canceled => r#"{"reason":"canceled"}"#,
                    Status::Failed => r#"{"reason":"error"}"#,
                    _ => "{}",
                };
                let _ = tx
                    .send(Ok(Event::default()
                        .event("done")
                        .id(format!("{ts}:{n}"))
                        .data(payload)))
                    .await;
                return;
            }
            match changed {
                Some(c) => {
                    tokio::select! {
                        _ = c => {}
                        _ = tx.closed() => return,
                    }
                }
                // Not live here but not terminal: look again shortly.
                None => {
                    let pause = if shared {
                        crate::prediction::OUTPUT_FLUSH
                    } else {
                        Duration::from_millis(20)
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = tx.closed() => return,
                    }
                }
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(HEARTBEAT).text("keep-alive"))
        .into_response())
}
