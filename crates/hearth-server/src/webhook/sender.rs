//! One prediction's webhooks: filtered, throttled in its style, rendered and written
//! to the outbox.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::deferred::Point;
use super::{WebhookEvent, WebhookStyle, Webhooks};
use crate::record::Record;
use crate::store::Delivery;

/// Replicate's and Cog's throttle window (Cog's `COG_THROTTLE_RESPONSE_INTERVAL`).
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
    style: WebhookStyle,
    state: Mutex<Throttle>,
}

#[derive(Default)]
struct Throttle {
    /// Replicate's: the last intermediate event sent.
    last_intermediate: Option<Instant>,
    /// Cog's: the last webhook of any kind sent.
    last_sent: Option<Instant>,
    /// Replicate's: the newest intermediate event held back by the throttle: replaced
    /// by the next one, sent when one comes after the window, or at the end.
    held: Option<WebhookEvent>,
    sent: u32,
}

/// A delivery decided under the lock, pushed to the outbox outside it.
type Due = (WebhookEvent, String, String);

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
            msg_prefix: format!("msg_{prediction_id}_{}", &crate::record::new_token()[..6]),
            url,
            events,
            style,
            state: Mutex::new(Throttle::default()),
        }
    }

    /// The prediction changed (`event`); `record` is its state now. Queues what the
    /// event calls for in the outbox (nothing, when filtered or held by the throttle)
    /// and returns once it is stored, so events stay in order.
    pub async fn send(&self, event: WebhookEvent, record: &Record) {
        let due = self.prepare(event, record);
        self.push(&due).await;
    }

    /// What `event` calls for, decided (throttle and `webhook-id`s advance) but not
    /// queued: for `Store::finish`, which queues the last ones with the final state.
    /// The prediction is rendered only when a delivery is due: most intermediate events
    /// are filtered or throttled, and a long output is long.
    pub fn prepare(&self, event: WebhookEvent, record: &Record) -> Vec<Delivery> {
        let due = {
            let Ok(mut st) = self.state.lock() else {
                return Vec::new();
            };
            match self.style {
                WebhookStyle::Replicate => {
                    self.decide(&mut st, event, &|| record.to_json().to_string())
                }
                // Cog's output and logs events queue how far the prediction had got,
                // rendered at delivery (`deferred`): each carries the whole output.
                WebhookStyle::Cog if event.is_intermediate() => {
                    self.decide_cog(&mut st, event, &|| Point::of(record).to_row_body())
                }
                WebhookStyle::Cog => self.decide_cog(&mut st, event, &|| {
                    crate::cog_shape::response(record).to_string()
                }),
            }
        };
        due.into_iter()
            .map(|(event, msg_id, body)| Delivery {
                prediction_id: self.prediction_id.clone(),
                msg_id,
                url: self.url.clone(),
                event: self.style.outbox_event(event),
                body,
                max_attempts: if event == WebhookEvent::Completed {
                    ATTEMPTS_TERMINAL
                } else {
                    ATTEMPTS_INTERMEDIATE
                },
                // Replicate's intermediate events may replace one not yet sent; Cog's
                // are each delivered (a receiver rebuilding the output needs every one).
                coalesce: self.style == WebhookStyle::Replicate && event.is_intermediate(),
            })
            .collect()
    }

    /// Queues deliveries `prepare` decided, in order.
    pub async fn push(&self, due: &[Delivery]) {
        let Some(store) = &self.hooks.store else {
            return;
        };
        for d in due {
            match store
                .outbox_push(&d.item(), d.coalesce, super::dispatcher::now_ms())
                .await
            {
                Ok(()) => self.queued(std::slice::from_ref(d)),
                Err(e) => tracing::error!(
                    error = %e,
                    target_host = %super::redact(&self.url),
                    event = %d.event,
                    "could not queue a webhook"
                ),
            }
        }
    }

    /// Deliveries were queued (by `push` or with the final state): counted, and the
    /// dispatcher woken.
    pub fn queued(&self, due: &[Delivery]) {
        self.hooks.count_queued(due);
        self.hooks.wake.notify_one();
    }

    /// The next `webhook-id`.
    fn next_msg_id(&self, st: &mut Throttle) -> String {
        st.sent += 1;
        format!("{}_{}", self.msg_prefix, st.sent)
    }

    /// Cog's rule: every output chunk and the start and end go out; a `logs` event
    /// only when no webhook went out in the last 500 ms (else it is dropped: its
    /// lines arrive with the next one).
    fn decide_cog(
        &self,
        st: &mut Throttle,
        event: WebhookEvent,
        body: &dyn Fn() -> String,
    ) -> Vec<Due> {
        if !self.events.contains(&event) {
            return Vec::new();
        }
        if event == WebhookEvent::Logs && st.last_sent.is_some_and(|t| t.elapsed() < THROTTLE) {
            return Vec::new();
        }
        st.last_sent = Some(Instant::now());
        vec![(event, self.next_msg_id(st), body())]
    }

    /// Replicate's rule: intermediate events at most one per 500 ms (the newest held
    /// back goes out later), every subscriber gets the final state. Each delivery
    /// with its `webhook-id`.
    fn decide(
        &self,
        st: &mut Throttle,
        event: WebhookEvent,
        body: &dyn Fn() -> String,
    ) -> Vec<Due> {
        let mut due = Vec::new();
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
                due.push((ev, self.next_msg_id(st), body.clone()));
            }
            if wants_completed {
                due.push((event, self.next_msg_id(st), body));
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
        due.push((event, self.next_msg_id(st), body()));
        due
    }
}
