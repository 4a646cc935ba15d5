//! One prediction's webhooks: filtered, throttled and written to the outbox.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{WebhookEvent, Webhooks};
use crate::record::Record;
use crate::store::OutboxItem;

const THROTTLE: Duration = Duration::from_millis(500);
const ATTEMPTS_INTERMEDIATE: u32 = 4;
/// Cog retries terminal webhooks this many times.
const ATTEMPTS_TERMINAL: u32 = 12;

pub struct WebhookSender {
    hooks: Arc<Webhooks>,
    prediction_id: String,
    /// `webhook-id`s are this and a count: unique even when a prediction's events
    /// come from two replicas (its owner, then the one that ended it).
    msg_prefix: String,
    url: String,
    events: Vec<WebhookEvent>,
    state: Mutex<Throttle>,
}

#[derive(Default)]
struct Throttle {
    last_intermediate: Option<Instant>,
    /// The newest intermediate event held back by the throttle: replaced by the next
    /// one, sent when one comes after the window, or at the end.
    held: Option<WebhookEvent>,
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
            msg_prefix: format!("msg_{prediction_id}_{}", &crate::record::new_token()[..6]),
            url,
            events,
            state: Mutex::new(Throttle::default()),
        }
    }

    /// Queues what `event` calls for in the outbox (nothing, when filtered or held
    /// by the throttle). Returns once it is stored, so events stay in order.
    /// The prediction is serialized only when a delivery is due: most intermediate
    /// events are filtered or throttled, and a long output is long.
    pub async fn send(&self, event: WebhookEvent, record: &Record) {
        let due = {
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            self.decide(&mut st, event, &|| record.to_json().to_string())
        };
        for (ev, msg_id, body) in due {
            self.enqueue(ev, &msg_id, &body).await;
        }
    }

    /// The deliveries an event makes now, each with its `webhook-id`.
    fn decide(
        &self,
        st: &mut Throttle,
        event: WebhookEvent,
        body: &dyn Fn() -> String,
    ) -> Vec<(WebhookEvent, String, String)> {
        let mut due = Vec::new();
        let mut push = |st: &mut Throttle, ev: WebhookEvent, body: &str| {
            st.sent += 1;
            due.push((
                ev,
                format!("{}_{}", self.msg_prefix, st.sent),
                body.to_string(),
            ));
        };
        if event == WebhookEvent::Completed {
            // The last state reaches every subscriber: an intermediate event held by
            // the throttle goes out now with the final state, and one who asked for
            // output but not `completed` gets the final output as an output event.
            let held = st.held.take();
            let wants_completed = self.events.contains(&event);
            let last = held.or_else(|| {
                (!wants_completed && self.events.contains(&WebhookEvent::Output))
                    .then_some(WebhookEvent::Output)
            });
            let body = body();
            if let Some(ev) = last {
                push(st, ev, &body);
            }
            if wants_completed {
                push(st, event, &body);
            }
            return due;
        }
        if !self.events.contains(&event) {
            return due;
        }
        if event.is_intermediate() {
            if st.last_intermediate.is_some_and(|t| t.elapsed() < THROTTLE) {
                st.held = Some(event);
                return due;
            }
            st.last_intermediate = Some(Instant::now());
            st.held = None;
        }
        push(st, event, &body());
        due
    }

    async fn enqueue(&self, event: WebhookEvent, msg_id: &str, body: &str) {
        let Some(store) = &self.hooks.store else {
            return;
        };
        let item = OutboxItem {
            prediction_id: &self.prediction_id,
            msg_id,
            url: &self.url,
            event: event.as_str(),
            body,
            max_attempts: if event == WebhookEvent::Completed {
                ATTEMPTS_TERMINAL
            } else {
                ATTEMPTS_INTERMEDIATE
            },
        };
        match store
            .outbox_push(&item, event.is_intermediate(), super::dispatcher::now_ms())
            .await
        {
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
