//! One prediction's webhooks: filtered, throttled and written to the outbox.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{WebhookEvent, Webhooks};
use crate::store::OutboxItem;

const THROTTLE: Duration = Duration::from_millis(500);
const ATTEMPTS_INTERMEDIATE: u32 = 4;
/// Cog retries terminal webhooks this many times.
const ATTEMPTS_TERMINAL: u32 = 12;

pub struct WebhookSender {
    hooks: Arc<Webhooks>,
    prediction_id: String,
    url: String,
    events: Vec<WebhookEvent>,
    state: Mutex<Throttle>,
}

#[derive(Default)]
struct Throttle {
    last_intermediate: Option<Instant>,
    /// The newest intermediate event held back by the throttle: sent with the next
    /// event after the window, and before `completed`, so the last state arrives.
    held: Option<(WebhookEvent, String)>,
    sent: u32,
}

impl WebhookSender {
    pub(super) fn new(
        hooks: Arc<Webhooks>,
        url: String,
        filter: &[String],
        prediction_id: &str,
    ) -> Self {
        let events = if filter.is_empty() {
            vec![
                WebhookEvent::Start,
                WebhookEvent::Output,
                WebhookEvent::Logs,
                WebhookEvent::Completed,
            ]
        } else {
            filter
                .iter()
                .filter_map(|f| WebhookEvent::parse(f))
                .collect()
        };
        Self {
            hooks,
            prediction_id: prediction_id.to_string(),
            url,
            events,
            state: Mutex::new(Throttle::default()),
        }
    }

    pub fn send(&self, event: WebhookEvent, payload: &Value) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        if event == WebhookEvent::Completed {
            if let Some((ev, body)) = st.held.take() {
                self.enqueue(&mut st, ev, &body);
            }
        }
        if !self.events.contains(&event) {
            return;
        }
        let body = payload.to_string();
        if event.is_intermediate() {
            if st.last_intermediate.is_some_and(|t| t.elapsed() < THROTTLE) {
                st.held = Some((event, body));
                return;
            }
            st.last_intermediate = Some(Instant::now());
            st.held = None;
        }
        self.enqueue(&mut st, event, &body);
    }

    fn enqueue(&self, st: &mut Throttle, event: WebhookEvent, body: &str) {
        let Some(store) = &self.hooks.store else {
            return;
        };
        st.sent += 1;
        let msg_id = format!("msg_{}_{}", self.prediction_id, st.sent);
        let item = OutboxItem {
            prediction_id: &self.prediction_id,
            msg_id: &msg_id,
            url: &self.url,
            event: event.as_str(),
            body,
            max_attempts: if event == WebhookEvent::Completed {
                ATTEMPTS_TERMINAL
            } else {
                ATTEMPTS_INTERMEDIATE
            },
        };
        match store.outbox_push(&item, event.is_intermediate(), super::dispatcher::now_ms()) {
            Ok(()) => self.hooks.wake.notify_one(),
            Err(e) => tracing::error!(
                error = %e,
                target_host = %super::redact(&self.url),
                event = event.as_str(),
                "could not queue a webhook"
            ),
        }
    }
}
