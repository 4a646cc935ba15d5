//! One prediction's webhooks: filtered, throttled in its style, rendered and written
//! to the outbox.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{WebhookEvent, WebhookStyle, Webhooks};
use crate::record::Record;
use crate::store::OutboxItem;

/// Replicate's and Cog's throttle window (Cog's `COG_THROTTLE_RESPONSE_INTERVAL`).
const THROTTLE: Duration = Duration::from_millis(500);
const ATTEMPTS_INTERMEDIATE: u32 = 4;
/// Cog retries terminal webhooks this many times.
const ATTEMPTS_TERMINAL: u32 = 12;

pub struct WebhookSender {
    hooks: Arc<Webhooks>,
    prediction_id: String,
    url: String,
    events: Vec<WebhookEvent>,
    style: WebhookStyle,
    state: Mutex<Throttle>,
}

#[derive(Default)]
struct Throttle {
    /// Replicate's: the last intermediate event sent.
    last_intermediate: Option<Instant>,
    /// Cog's: the last webhook of any kind sent.
    last_sent: Option<Instant>,
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
        style: WebhookStyle,
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
            style,
            state: Mutex::new(Throttle::default()),
        }
    }

    /// The prediction changed (`event`); `r` is its state now.
    pub fn send(&self, event: WebhookEvent, r: &Record) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        match self.style {
            WebhookStyle::Replicate => {
                self.send_replicate(&mut st, event, &r.to_json().to_string())
            }
            WebhookStyle::Cog => {
                self.send_cog(&mut st, event, &crate::cog_shape::response(r).to_string())
            }
        }
    }

    /// Cog's rule: every output chunk and the start and end go out; a `logs` event
    /// only when no webhook went out in the last 500 ms (else it is dropped: its
    /// lines arrive with the next one).
    fn send_cog(&self, st: &mut Throttle, event: WebhookEvent, body: &str) {
        if !self.events.contains(&event) {
            return;
        }
        if event == WebhookEvent::Logs && st.last_sent.is_some_and(|t| t.elapsed() < THROTTLE) {
            return;
        }
        st.last_sent = Some(Instant::now());
        self.enqueue(st, event, body);
    }

    fn send_replicate(&self, st: &mut Throttle, event: WebhookEvent, body: &str) {
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
                self.enqueue(st, ev, body);
            }
            if wants_completed {
                self.enqueue(st, event, body);
            }
            return;
        }
        if !self.events.contains(&event) {
            return;
        }
        if event.is_intermediate() {
            if st.last_intermediate.is_some_and(|t| t.elapsed() < THROTTLE) {
                st.held = Some((event, body.to_string()));
                return;
            }
            st.last_intermediate = Some(Instant::now());
            st.held = None;
        }
        self.enqueue(st, event, body);
    }

    fn enqueue(&self, st: &mut Throttle, event: WebhookEvent, body: &str) {
        let Some(store) = &self.hooks.store else {
            return;
        };
        st.sent += 1;
        let msg_id = format!("msg_{}_{}", self.prediction_id, st.sent);
        let outbox_event = self.style.outbox_event(event);
        let item = OutboxItem {
            prediction_id: &self.prediction_id,
            msg_id: &msg_id,
            url: &self.url,
            event: &outbox_event,
            body,
            max_attempts: if event == WebhookEvent::Completed {
                ATTEMPTS_TERMINAL
            } else {
                ATTEMPTS_INTERMEDIATE
            },
        };
        // Replicate's intermediate events may replace one not yet sent; Cog's are each
        // delivered (a receiver rebuilding the output from them needs every one).
        let coalesce = self.style == WebhookStyle::Replicate && event.is_intermediate();
        match store.outbox_push(&item, coalesce, super::dispatcher::now_ms()) {
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
