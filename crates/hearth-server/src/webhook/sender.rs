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
    /// The newest intermediate event held back by the throttle: replaced by the next
    /// one, sent when one comes after the window, or at the end.
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
        let body = payload.to_string();
        if event == WebhookEvent::Completed {
            // The last state reaches every subscriber: an intermediate event held by
            // the throttle goes out now with the final state, and one who asked for
            // output but not `completed` gets the final output as an output event.
            let held = st.held.take().map(|(ev, _)| ev);
            let wants_completed = self.events.contains(&event);
            let last = held.or_else(|| {
                (!wants_completed && self.events.contains(&WebhookEvent::Output))
                    .then_some(WebhookEvent::Output)
            });
            if let Some(ev) = last {
                self.enqueue(&mut st, ev, &body);
            }
            if wants_completed {
                self.enqueue(&mut st, event, &body);
            }
            return;
        }
        if !self.events.contains(&event) {
            return;
        }
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
