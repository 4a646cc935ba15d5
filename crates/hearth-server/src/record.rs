//! The prediction as clients see it and as the store keeps it. Depends on nothing else
//! in the crate, so the store, the runner and the routes can all use it.

use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Starting,
    Processing,
    Succeeded,
    Failed,
    Canceled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Starting => "starting",
            Status::Processing => "processing",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Canceled => "canceled",
        }
    }
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Canceled)
    }
}

/// The public object, as `GET /v1/predictions/{id}` returns it (urls added on output).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prediction {
    pub id: String,
    pub model: String,
    pub version: String,
    pub input: Value,
    pub logs: String,
    pub output: Option<Vec<String>>,
    pub error: Option<String>,
    pub status: Status,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    /// When `Cancel-After` cancels it (RFC 3339), as SDK v2's `Prediction.deadline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    pub data_removed: bool,
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Value>,
    /// hearth's own key, beside Replicate's fields: for a model with a route, which
    /// side ran the prediction (`{"side": "upstream", "upstream": NAME, ...}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hearth: Option<Value>,
}

impl Prediction {
    /// Moves it to a terminal status. Every model hearth serves streams an iterator of
    /// strings, so a finished prediction always carries a list (`[]` when nothing was
    /// generated): JS's `run` returns `output` as is and apps join it.
    pub fn finish(&mut self, status: Status, now: &str) {
        self.status = status;
        self.completed_at = Some(now.to_string());
        if self.started_at.is_none() {
            self.started_at = self.completed_at.clone();
        }
        self.output.get_or_insert_with(Vec::new);
    }

    /// Seconds from creation to `now`, for predictions that end without the runner's
    /// own timings (interrupted by a restart).
    pub fn seconds_since_created(&self, now: &str) -> f64 {
        match (
            chrono::DateTime::parse_from_rfc3339(&self.created_at),
            chrono::DateTime::parse_from_rfc3339(now),
        ) {
            (Ok(a), Ok(b)) => ((b - a).num_microseconds().unwrap_or(0).max(0)) as f64 / 1e6,
            _ => 0.0,
        }
    }
}

/// What is stored: the prediction and what only the server needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub prediction: Prediction,
    /// Absolute base the prediction's URLs were made with (`http://host:port`).
    pub base_url: String,
    /// The capability in the stream and web URLs: they need no API token.
    pub stream_token: String,
    pub webhook: Option<String>,
    pub webhook_events_filter: Vec<String>,
    /// Unix seconds of creation: the first half of SSE event ids.
    pub created_unix: i64,
}

impl Record {
    pub fn urls(&self) -> Value {
        let p = &self.prediction;
        let b = &self.base_url;
        json!({
            "get": format!("{b}/v1/predictions/{}", p.id),
            "cancel": format!("{b}/v1/predictions/{}/cancel", p.id),
            "stream": format!("{b}/streams/{}/{}", p.id, self.stream_token),
            "web": format!("{b}/p/{}/{}", p.id, self.stream_token),
        })
    }

    /// The JSON clients get, urls absolute.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(&self.prediction).unwrap_or(Value::Null);
        if let Value::Object(o) = &mut v {
            o.insert("urls".into(), self.urls());
        }
        v
    }
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// 26 lowercase base32 characters, like Replicate's.
pub fn new_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut rng = rand::rng();
    (0..26)
        .map(|_| ALPHABET[rng.random_range(0..32)] as char)
        .collect()
}

/// 128 random bits as 32 hex characters: stream and web URL capabilities.
pub fn new_token() -> String {
    let mut rng = rand::rng();
    (0..32)
        .map(|_| format!("{:x}", rng.random_range(0..16u8)))
        .collect()
}

/// Equal strings in time that does not depend on where they differ, for secrets.
pub fn secret_eq(a: &str, b: &str) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    // Hashing first makes the comparison fixed-length, so not even the length leaks.
    Sha256::digest(a.as_bytes())
        .ct_eq(&Sha256::digest(b.as_bytes()))
        .into()
}
