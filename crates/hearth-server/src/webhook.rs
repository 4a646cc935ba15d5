//! Webhooks as Replicate sends them: the prediction's JSON POSTed to the caller's URL
//! on `start`, `output`, `logs` and `completed` (filtered per prediction; output and
//! logs at most every 500 ms), signed with Standard Webhooks, retried with backoff on
//! network errors, 429 and 5xx. Delivery runs on its own task per prediction, so a
//! slow receiver never holds up the engine or other predictions.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::Rng;
use serde_json::Value;
use sha2::Sha256;
use tokio::sync::mpsc;

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
}

const THROTTLE: Duration = Duration::from_millis(500);
const ATTEMPTS_INTERMEDIATE: u32 = 4;
const ATTEMPTS_TERMINAL: u32 = 12;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's signing secret and HTTP client.
pub struct Webhooks {
    client: reqwest::Client,
    /// `whsec_...`
    pub secret: String,
    key: Vec<u8>,
}

impl Webhooks {
    /// Loads the secret from the data dir, creating it on first start.
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let path = data_dir.join("webhook_secret");
        let secret = match std::fs::read_to_string(&path) {
            Ok(s) if s.trim().starts_with("whsec_") => s.trim().to_string(),
            _ => {
                let mut bytes = [0u8; 32];
                rand::rng().fill(&mut bytes);
                let s = format!(
                    "whsec_{}",
                    base64::engine::general_purpose::STANDARD.encode(bytes)
                );
                std::fs::write(&path, &s)?;
                s
            }
        };
        Self::with_secret(secret)
    }

    pub fn with_secret(secret: String) -> std::io::Result<Self> {
        let key = base64::engine::general_purpose::STANDARD
            .decode(secret.trim_start_matches("whsec_"))
            .map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("webhook secret: {e}"),
                )
            })?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(std::io::Error::other)?;
        Ok(Self {
            client,
            secret,
            key,
        })
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

    /// A delivery queue for one prediction.
    pub fn sender(
        self: &std::sync::Arc<Self>,
        url: String,
        filter: &[String],
        prediction_id: &str,
    ) -> WebhookSender {
        let events: Vec<WebhookEvent> = if filter.is_empty() {
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
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(deliver(self.clone(), url, prediction_id.to_string(), rx));
        WebhookSender {
            tx,
            events,
            last_throttled: std::sync::Mutex::new(None),
        }
    }
}

pub struct WebhookSender {
    tx: mpsc::UnboundedSender<(WebhookEvent, Value)>,
    events: Vec<WebhookEvent>,
    last_throttled: std::sync::Mutex<Option<Instant>>,
}

impl WebhookSender {
    pub fn send(&self, event: WebhookEvent, payload: Value) {
        if !self.events.contains(&event) {
            return;
        }
        if matches!(event, WebhookEvent::Output | WebhookEvent::Logs) {
            let Ok(mut last) = self.last_throttled.lock() else {
                return;
            };
            if last.is_some_and(|t| t.elapsed() < THROTTLE) {
                return;
            }
            *last = Some(Instant::now());
        }
        let _ = self.tx.send((event, payload));
    }
}

async fn deliver(
    hooks: std::sync::Arc<Webhooks>,
    url: String,
    prediction_id: String,
    mut rx: mpsc::UnboundedReceiver<(WebhookEvent, Value)>,
) {
    let mut n = 0u32;
    while let Some((event, payload)) = rx.recv().await {
        n += 1;
        let msg_id = format!("msg_{prediction_id}_{n}");
        let body = payload.to_string();
        let attempts = if event == WebhookEvent::Completed {
            ATTEMPTS_TERMINAL
        } else {
            ATTEMPTS_INTERMEDIATE
        };
        let mut delay = Duration::from_millis(250);
        for attempt in 1..=attempts {
            let ts = chrono::Utc::now().timestamp();
            let res = hooks
                .client
                .post(&url)
                .header("content-type", "application/json")
                .header("webhook-id", &msg_id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", hooks.sign(&msg_id, ts, &body))
                .body(body.clone())
                .send()
                .await;
            let retry = match &res {
                Ok(r) => r.status().as_u16() == 429 || r.status().is_server_error(),
                Err(_) => true,
            };
            if !retry {
                break;
            }
            tracing::warn!(%url, attempt, status = ?res.as_ref().map(|r| r.status().as_u16()).ok(), "webhook delivery failed");
            if attempt < attempts {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
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
}
