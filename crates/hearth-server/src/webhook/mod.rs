//! Webhooks: the prediction's JSON POSTed to the caller's URL on `start`, `output`,
//! `logs` and `completed` (filtered per prediction), signed with Standard Webhooks, in
//! one of two styles (`WebhookStyle`): Replicate's for the `/v1` routes (output and
//! logs at most every 500 ms, the newest state winning) and Cog's for the container
//! API (Cog's body, one `output` webhook per chunk, `logs` dropped within 500 ms of
//! the last webhook, `user-agent: coglet/...`; their outbox rows hold how far the
//! prediction had got, the body rendered at delivery: `deferred`). Deliveries go
//! through a durable outbox
//! in the store (`sender`), and one dispatcher task per replica makes them
//! (`dispatcher`), retrying with backoff on network errors, 429 and 5xx, with the same
//! `webhook-id` on every attempt, after a restart too.
//! Targets on loopback, private, link-local or multicast addresses are refused at
//! creation and again at every connection (`guard`), unless the operator allows them.

mod deferred;
pub mod dispatcher;
pub mod guard;
mod sender;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;
use tokio::sync::Notify;

use crate::prediction::Hub;
use crate::store::{Delivery, SharedStore, StoreError};
pub use sender::WebhookSender;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookEvent {
    Start,
    Output,
    Logs,
    Completed,
}

impl WebhookEvent {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "start" => Some(Self::Start),
            "output" => Some(Self::Output),
            "logs" => Some(Self::Logs),
            "completed" => Some(Self::Completed),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Output => "output",
            Self::Logs => "logs",
            Self::Completed => "completed",
        }
    }
    fn is_intermediate(self) -> bool {
        matches!(self, Self::Output | Self::Logs)
    }
}

/// Whose webhooks a prediction gets: the body, the throttling and the user-agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookStyle {
    /// The `/v1` routes: the prediction as `GET /v1/predictions/{id}` shows it.
    Replicate,
    /// Cog's container API: Cog's response shape, every output chunk.
    Cog,
}

impl WebhookStyle {
    /// A prediction's style from its `source`: Cog's routes get Cog's webhooks, every
    /// other route Replicate's (also when another replica ends it).
    pub fn for_source(source: &str) -> Self {
        if source == "cog" {
            Self::Cog
        } else {
            Self::Replicate
        }
    }

    /// The outbox's `event` column: the event, prefixed for a non-default style so the
    /// dispatcher knows how to deliver it (and the outbox never coalesces it).
    fn outbox_event(self, event: WebhookEvent) -> String {
        match self {
            Self::Replicate => event.as_str().to_string(),
            Self::Cog => format!("cog.{}", event.as_str()),
        }
    }

    fn from_outbox_event(event: &str) -> Self {
        if event.starts_with("cog.") {
            Self::Cog
        } else {
            Self::Replicate
        }
    }

    /// The `user-agent` deliveries carry, if any.
    fn user_agent(self) -> Option<String> {
        match self {
            Self::Replicate => None,
            Self::Cog => Some(format!("coglet/{}", crate::schema::COG_VERSION)),
        }
    }
}

/// Why the webhook signer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("webhook client: {0}")]
    Io(#[from] std::io::Error),
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's signing secret, HTTP client and outbox.
pub struct Webhooks {
    client: reqwest::Client,
    /// `whsec_...`
    pub secret: String,
    key: Vec<u8>,
    /// Deliver to private and loopback addresses too (tests, trusted networks).
    pub allow_private: bool,
    store: Option<SharedStore>,
    /// Wakes the dispatcher when a delivery is queued.
    wake: Notify,
    /// This process's predictions in flight: where deferred Cog bodies are rendered
    /// from (the store's copy when not here).
    hub: OnceLock<Arc<Hub>>,
    /// Deliveries handed to the outbox, and the bytes of their bodies.
    queued_rows: AtomicU64,
    queued_bytes: AtomicU64,
}

impl Webhooks {
    /// The secret every replica signs with: the store's, made on first start.
    pub async fn open(store: SharedStore, allow_private: bool) -> Result<Self, OpenError> {
        let mut bytes = [0u8; 32];
        rand::rng().fill(&mut bytes);
        let fresh = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        );
        let secret = store.webhook_secret(&fresh).await?;
        let mut w = Self::build(secret, allow_private)?;
        w.store = Some(store);
        Ok(w)
    }

    /// A signer alone (no outbox): what a receiver uses to check signatures.
    pub fn with_secret(secret: String) -> std::io::Result<Self> {
        Self::build(secret, true)
    }

    fn build(secret: String, allow_private: bool) -> std::io::Result<Self> {
        let key = base64::engine::general_purpose::STANDARD
            .decode(secret.trim_start_matches("whsec_"))
            .map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("webhook secret: {e}"),
                )
            })?;
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(REQUEST_TIMEOUT)
            // A proxy would resolve the host itself, past the address check.
            .no_proxy();
        if !allow_private {
            builder = builder.dns_resolver(Arc::new(guard::PublicOnlyResolver));
        }
        let client = builder.build().map_err(std::io::Error::other)?;
        Ok(Self {
            client,
            secret,
            key,
            allow_private,
            store: None,
            wake: Notify::new(),
            hub: OnceLock::new(),
            queued_rows: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
        })
    }

    /// Where this process's predictions in flight are (set once, when the server is
    /// built): deferred Cog bodies render from them.
    pub fn render_from(&self, hub: Arc<Hub>) {
        let _ = self.hub.set(hub);
    }

    /// Deliveries this process handed to the outbox so far, and the bytes of their
    /// bodies (what a long prediction costs the store).
    pub fn queued_totals(&self) -> (u64, u64) {
        (
            self.queued_rows.load(Ordering::Relaxed),
            self.queued_bytes.load(Ordering::Relaxed),
        )
    }

    fn count_queued(&self, due: &[Delivery]) {
        let bytes: usize = due.iter().map(|d| d.body.len()).sum();
        self.queued_rows
            .fetch_add(due.len() as u64, Ordering::Relaxed);
        self.queued_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A deferred Cog body: the prediction at `point`, rendered from its state in
    /// this process (in flight, or finished and not yet stored), else the store's.
    /// `None` while neither has got that far: with a shared store another replica may
    /// own it, and the store's copy is up to `OUTPUT_FLUSH` behind; at the end the
    /// store has the final state before the runner's copy does.
    async fn render(&self, id: &str, point: deferred::Point) -> Result<Option<String>, StoreError> {
        if let Some(hub) = self.hub.get() {
            let here = hub.get(id).and_then(|l| l.snapshot());
            for r in [here, hub.unsaved(id)].into_iter().flatten() {
                if let Some(body) = point.render(&r) {
                    return Ok(Some(body));
                }
            }
        }
        let Some(store) = &self.store else {
            return Ok(None);
        };
        Ok(store.get(id).await?.and_then(|r| point.render(&r)))
    }

    /// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &str) -> String {
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => return String::new(),
        };
        mac.update(format!("{msg_id}.{timestamp}.{body}").as_bytes());
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        )
    }

    /// The deliveries of one prediction.
    pub fn sender(
        self: &Arc<Self>,
        url: String,
        filter: &[String],
        prediction_id: &str,
        style: WebhookStyle,
    ) -> WebhookSender {
        WebhookSender::new(self.clone(), url, filter, prediction_id, style)
    }
}

/// `scheme://host[:port]` of a URL: what logs may show of a webhook, whose path and
/// query may carry the receiver's secrets.
pub fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{}://{h}:{p}", u.scheme()),
            (Some(h), None) => format!("{}://{h}", u.scheme()),
            _ => format!("{}://?", u.scheme()),
        },
        Err(_) => "(unparseable URL)".into(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_matches_the_standard_webhooks_test_vector() {
        let w =
            super::Webhooks::with_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()).unwrap();
        assert_eq!(
            w.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                r#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn logs_show_scheme_and_host_only() {
        assert_eq!(
            super::redact("https://user:pw@hooks.example.com/t/SECRET?k=SECRET"),
            "https://hooks.example.com"
        );
        assert_eq!(
            super::redact("http://127.0.0.1:9/x?token=1"),
            "http://127.0.0.1:9"
        );
    }
}
