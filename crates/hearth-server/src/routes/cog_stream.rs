//! Cog's SSE answer to `Accept: text/event-stream` on `POST /predictions` (and on a
//! `PUT` that attaches to a prediction in flight, replayed from the start): `start`
//! `{id, status}`, one `output` `{chunk, index}` per chunk, `log` `{data, source}` per
//! new log text, then `completed` with the finished prediction; a comment every 15 s
//! keeps the connection open. The caller who created it and hangs up cancels it,
//! unless it asked `Prefer: respond-async` too (the prediction then runs on).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::cog_shape;
use crate::prediction::Live;
use crate::record::{Record, Status};
use crate::service::lookup;
use crate::AppState;

const HEARTBEAT: Duration = Duration::from_secs(15);

fn event(name: &str, data: serde_json::Value) -> Result<Event, Infallible> {
    Ok(Event::default().event(name).data(data.to_string()))
}

/// What has been sent of a prediction so far.
#[derive(Default)]
struct Sent {
    started: bool,
    chunks: usize,
    log_bytes: usize,
}

impl Sent {
    /// The events that bring a reader from what was sent to `r`.
    fn catch_up(&mut self, r: &Record) -> Vec<Result<Event, Infallible>> {
        let p = &r.prediction;
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            out.push(event("start", json!({"id": p.id, "status": "processing"})));
        }
        let chunks = p.output.as_deref().unwrap_or_default();
        for (index, chunk) in chunks.iter().enumerate().skip(self.chunks) {
            out.push(event("output", json!({"chunk": chunk, "index": index})));
        }
        self.chunks = self.chunks.max(chunks.len());
        // Logs only grow; text past what was sent is one `log` event.
        if let Some(new) = p.logs.get(self.log_bytes..).filter(|s| !s.is_empty()) {
            out.push(event("log", json!({"data": new, "source": "stdout"})));
            self.log_bytes = p.logs.len();
        }
        if p.status.is_terminal() {
            out.push(event("completed", cog_shape::response(r)));
        }
        out
    }
}

/// The events of prediction `id`. `created_here` is the prediction this caller
/// created: its hangup cancels it. A prediction another replica runs (a shared store)
/// is followed through the store, at the pace its owner writes its output there.
pub fn sse(state: Arc<AppState>, id: String, created_here: Option<Arc<Live>>) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    let hang_up = move || {
        if let Some(live) = &created_here {
            live.request_cancel();
        }
    };
    tokio::spawn(async move {
        let mut sent = Sent::default();
        // Polls while the prediction is neither live here nor stored as finished. With
        // a shared store that is one another replica runs (if that replica dies, a
        // survivor ends it); otherwise it is a moment between the hub and the store,
        // and one that stays so cannot progress here.
        let shared = state.store.is_shared();
        let mut limbo = 0u32;
        loop {
            let current = state.hub.get(&id);
            let changed = current.as_ref().map(|l| l.subscribe());
            let snapshot = match &current {
                Some(l) => l.snapshot(),
                None => lookup(&state, &id).await.ok(),
            };
            let Some(mut r) = snapshot else { return };
            if current.is_none() && !shared && !r.prediction.status.is_terminal() {
                limbo += 1;
                if limbo > 100 {
                    r.prediction.status = Status::Failed;
                    r.prediction.error =
                        Some("the prediction is not running on this server".into());
                }
            }
            let terminal = r.prediction.status.is_terminal();
            for ev in sent.catch_up(&r) {
                if tx.send(ev).await.is_err() {
                    hang_up();
                    return;
                }
            }
            if terminal {
                return;
            }
            let pause = match changed {
                Some(c) => {
                    tokio::select! {
                        _ = c => continue,
                        _ = tx.closed() => {
                            hang_up();
                            return;
                        }
                    }
                }
                None if shared => crate::prediction::OUTPUT_FLUSH,
                None => Duration::from_millis(20),
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = tx.closed() => {
                    hang_up();
                    return;
                }
            }
        }
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(HEARTBEAT))
        .into_response()
}
