//! The one task that makes webhook deliveries from the outbox: up to 32 at once, at
//! most `store::PER_HOST_IN_FLIGHT` to one host (hosts take turns, so a few slow
//! receivers cannot hold every slot), each prediction's in order, retried with
//! exponential backoff; a receiver far behind gets the latest state (the store drops
//! superseded intermediate deliveries). Cog's intermediate bodies are rendered here,
//! from the prediction's latest state (`deferred`). At shutdown it goes on
//! delivering what is due for a bounded time; what is left waits in the store for the
//! next start.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::deferred::Point;
use super::{guard, redact, WebhookStyle, Webhooks};
use crate::store::{OutboxRow, SharedStore};

const MAX_IN_FLIGHT: usize = 32;
/// How often the outbox is looked at when nothing wakes the dispatcher (retries).
const POLL: Duration = Duration::from_millis(200);

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

enum Outcome {
    Delivered,
    Retry(String),
    GiveUp(String),
}

/// Delivers until `stop` is cancelled, then what is due for at most `flush` more.
pub async fn run(hooks: Arc<Webhooks>, stop: CancellationToken, flush: Duration) {
    let Some(store) = hooks.store.clone() else {
        return;
    };
    // A store no other process uses: what the last process had out is due again.
    // (A shared store's claims expire by themselves.)
    let released = if store.is_shared() {
        Ok(0)
    } else {
        store.outbox_release_claims().await
    };
    match released {
        Ok(n) if n > 0 => tracing::info!(
            n,
            "webhook deliveries interrupted by the last stop are due again"
        ),
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "webhook outbox"),
    }
    let mut tasks = JoinSet::new();
    let mut flush_until: Option<tokio::time::Instant> = None;
    loop {
        if flush_until.is_none() && stop.is_cancelled() {
            flush_until = Some(tokio::time::Instant::now() + flush);
        }
        if let Some(until) = flush_until {
            let due = store.outbox_due(now_ms()).await.unwrap_or(0);
            if tokio::time::Instant::now() >= until || (due == 0 && tasks.is_empty()) {
                break;
            }
        }
        let room = MAX_IN_FLIGHT.saturating_sub(tasks.len());
        if room > 0 {
            match store.outbox_claim(now_ms(), room).await {
                Ok(rows) => {
                    for row in rows {
                        tasks.spawn(deliver(hooks.clone(), store.clone(), row));
                    }
                }
                Err(e) => tracing::error!(error = %e, "webhook outbox"),
            }
        }
        tokio::select! {
            _ = hooks.wake.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = stop.cancelled(), if flush_until.is_none() => {}
        }
    }
    // Whatever is still out is due again: now for other replicas, or at next start.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    if let Err(e) = store.outbox_release_claims().await {
        tracing::error!(error = %e, "webhook outbox");
    }
}

async fn deliver(hooks: Arc<Webhooks>, store: SharedStore, row: OutboxRow) {
    let outcome = match body(&hooks, &row).await {
        Ok(body) => attempt(&hooks, &row, &body).await,
        Err(why) => Outcome::Retry(why),
    };
    let target = redact(&row.url);
    let result = match outcome {
        Outcome::Delivered => store.outbox_remove(row.seq).await,
        Outcome::GiveUp(why) => {
            tracing::warn!(target_host = %target, prediction = %row.prediction_id, event = %row.event, %why, "webhook not delivered");
            store.outbox_remove(row.seq).await
        }
        Outcome::Retry(why) if row.attempts >= row.max_attempts => {
            tracing::warn!(target_host = %target, prediction = %row.prediction_id, event = %row.event, attempts = row.attempts, %why, "webhook delivery failed; giving up");
            store.outbox_remove(row.seq).await
        }
        Outcome::Retry(why) => {
            tracing::warn!(target_host = %target, prediction = %row.prediction_id, event = %row.event, attempt = row.attempts, %why, "webhook delivery failed; will retry");
            store
                .outbox_retry_at(row.seq, now_ms() + backoff(row.attempts).as_millis() as i64)
                .await
        }
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "webhook outbox");
    }
}

/// 250 ms, doubling, at most 30 s.
fn backoff(attempts: u32) -> Duration {
    let ms = 250u64.saturating_mul(1 << attempts.saturating_sub(1).min(10));
    Duration::from_millis(ms.min(30_000))
}

/// The row's body: as stored, or rendered now when it holds how far a Cog prediction
/// had got (`deferred`).
async fn body(hooks: &Webhooks, row: &OutboxRow) -> Result<String, String> {
    let Some(point) = Point::from_row_body(&row.body) else {
        return Ok(row.body.clone());
    };
    match hooks.render(&row.prediction_id, point).await {
        Ok(Some(body)) => Ok(body),
        Ok(None) => Err("the prediction's state has not reached this event yet".into()),
        Err(e) => Err(format!("could not read the prediction: {e}")),
    }
}

async fn attempt(hooks: &Webhooks, row: &OutboxRow, body: &str) -> Outcome {
    let url = match reqwest::Url::parse(&row.url) {
        Ok(u) => u,
        Err(e) => return Outcome::GiveUp(format!("not a URL: {e}")),
    };
    if !hooks.allow_private && !guard::literal_allowed(&url) {
        return Outcome::GiveUp("the target is not a public address".into());
    }
    let ts = chrono::Utc::now().timestamp();
    let mut req = hooks.client.post(url);
    if let Some(ua) = WebhookStyle::from_outbox_event(&row.event).user_agent() {
        req = req.header("user-agent", ua);
    }
    let res = req
        .header("content-type", "application/json")
        .header("webhook-id", &row.msg_id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", hooks.sign(&row.msg_id, ts, body))
        .body(body.to_string())
        .send()
        .await;
    match res {
        Ok(r) if r.status().as_u16() == 429 || r.status().is_server_error() => {
            Outcome::Retry(format!("status {}", r.status().as_u16()))
        }
        Ok(r) if r.status().is_client_error() => {
            Outcome::GiveUp(format!("the receiver answered {}", r.status().as_u16()))
        }
        Ok(_) => Outcome::Delivered,
        // reqwest's error text can contain the URL: keep only its kind.
        Err(e) => Outcome::Retry(error_kind(&e)),
    }
}

fn error_kind(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_request() {
        "request error"
    } else {
        "network error"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() || detail.contains("://") {
        kind.to_string()
    } else {
        format!("{kind}: {detail}")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(super::backoff(1).as_millis(), 250);
        assert_eq!(super::backoff(2).as_millis(), 500);
        assert_eq!(super::backoff(3).as_millis(), 1000);
        assert_eq!(super::backoff(20).as_millis(), 30_000);
    }
}
