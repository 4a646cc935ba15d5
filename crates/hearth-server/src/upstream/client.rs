//! One upstream's HTTP client: Replicate's API at a base URL with a bearer token.
//! Every call is bounded (connect and whole-request timeouts) and classified so the
//! runner can tell a throttle (retry after the delay), a refusal (relay it), a
//! server fault and a network failure apart — and, for a create, whether the request
//! may have reached the upstream (`Ambiguous`), which is never resent blindly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

use super::breaker::Breaker;
use super::budget::ByteBudget;
use super::intake::{json_len, read_body, IntakeLimits, ReadError};
use super::stream_origin::{self, Reach};
use super::Secret;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of an error body kept for a message.
const DETAIL_MAX: usize = 2000;
/// A `Retry-After` longer than this is taken as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);
/// A page of the upstream's predictions may carry their inputs: this much beyond one
/// record's room.
const PAGE_EXTRA: usize = 32 << 20;

/// Why a call did not return what was asked.
#[derive(Debug)]
pub enum CallError {
    /// 429: try again after this.
    Throttled(Duration),
    /// Any other non-success status, with the body's text.
    Status {
        status: u16,
        body: String,
    },
    Network(String),
    /// The answer was larger than the prediction's output and logs may take
    /// (`intake`): this message says so.
    TooLarge(String),
    /// The process-wide memory budget for upstream answers stayed spent (`budget`):
    /// hearth's limit, not the upstream's fault; try again later.
    Budget(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Throttled(d) => write!(f, "throttled (retry after {}s)", d.as_secs()),
            CallError::Status { status, body } => write!(f, "HTTP {status}: {body}"),
            CallError::Network(e) | CallError::TooLarge(e) | CallError::Budget(e) => {
                write!(f, "{e}")
            }
        }
    }
}

/// What became of a create.
#[derive(Debug)]
pub enum CreateOutcome {
    Created(Value),
    /// 429: not processed; send it again after the delay.
    Throttled(Duration),
    /// A 4xx other than 429: the upstream's answer, to relay unchanged.
    Rejected {
        status: u16,
        body: Vec<u8>,
        content_type: String,
    },
    /// A 5xx: it may have been received; never resent.
    ServerError {
        status: u16,
        detail: String,
    },
    /// The connection was never made: nothing was sent, so it may be sent again.
    NotSent(String),
    /// The request went out but its answer was lost: it may be running upstream.
    Ambiguous(String),
}

/// Counts by outcome, for `/metrics`.
#[derive(Default)]
pub struct CallCounts {
    pub ok: AtomicU64,
    pub throttled: AtomicU64,
    pub rejected: AtomicU64,
    pub server_error: AtomicU64,
    pub network: AtomicU64,
    pub ambiguous: AtomicU64,
}

pub struct UpstreamClient {
    pub name: String,
    base: String,
    token: Option<Secret>,
    http: reqwest::Client,
    /// Sibling hosts' streams (`stream_origin`): public addresses only, unless
    /// `--webhook-allow-private`.
    sibling_http: reqwest::Client,
    /// `--upstream-stream-origin`s: other origins its streams may be on.
    stream_origins: Vec<url::Origin>,
    pub breaker: Breaker,
    pub counts: CallCounts,
    /// A plain Cog container (`cog+URL`) rather than a Replicate-compatible API.
    pub cog: bool,
    /// Copies file outputs into hearth's store (`super::files`).
    pub mirror: Option<super::files::Mirror>,
    /// What one prediction may bring back from it (`super::intake`).
    pub intake: IntakeLimits,
    /// The bytes all upstream answers being read may hold, shared by every client.
    pub budget: ByteBudget,
}

fn retry_after(h: &reqwest::header::HeaderMap) -> Duration {
    h.get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1))
        .clamp(Duration::from_millis(100), MAX_RETRY_AFTER)
}

fn truncate(s: &str) -> String {
    let mut end = s.len().min(DETAIL_MAX);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

impl UpstreamClient {
    pub fn new(
        name: String,
        base: &str,
        token: Option<Secret>,
        breaker: Breaker,
    ) -> Result<Self, String> {
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(REQUEST_TIMEOUT)
                // Redirects could carry the token elsewhere.
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("hearth/", env!("CARGO_PKG_VERSION")))
        };
        let http = builder()
            .build()
            .map_err(|e| format!("upstream {name}: {e}"))?;
        // The addresses connected to are the ones checked (no DNS rebinding).
        let sibling_http = builder()
            .dns_resolver(std::sync::Arc::new(
                crate::webhook::guard::PublicOnlyResolver,
            ))
            .build()
            .map_err(|e| format!("upstream {name}: {e}"))?;
        Ok(Self {
            name,
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
            sibling_http,
            stream_origins: Vec::new(),
            breaker,
            counts: CallCounts::default(),
            cog: false,
            mirror: None,
            intake: IntakeLimits::default(),
            budget: ByteBudget::default(),
        })
    }

    /// The process's `--upstream-memory-budget` (one for every upstream).
    pub fn with_budget(mut self, budget: ByteBudget) -> Self {
        self.budget = budget;
        self
    }

    /// `--upstream-max-output-bytes` and `--upstream-max-log-bytes`.
    pub fn with_intake(mut self, intake: IntakeLimits) -> Self {
        self.intake = intake;
        self
    }

    /// Other origins its streams may be on (`--upstream-stream-origin`), and whether
    /// sibling hosts' streams may be at private addresses (`--webhook-allow-private`).
    pub fn with_stream_origins(mut self, origins: Vec<url::Origin>, allow_private: bool) -> Self {
        self.stream_origins = origins;
        if allow_private {
            self.sibling_http = self.http.clone();
        }
        self
    }

    /// `url` (an upstream's `urls.stream`, absolute or relative) resolved against the
    /// base, when it may be followed (`stream_origin`: its own origin, a sibling host,
    /// a configured origin), and where it is: the only URLs an upstream hands hearth
    /// that hearth follows, so a record cannot send hearth (or the token) to any host
    /// or address it names.
    pub fn stream_target(&self, url: &str) -> Result<(url::Url, Reach), String> {
        let base = url::Url::parse(&self.base).map_err(|e| format!("the base URL: {e}"))?;
        // The URL itself stays out of messages: it may be a capability.
        let target = base
            .join(url)
            .map_err(|e| format!("its URL does not parse: {e}"))?;
        let reach = stream_origin::reach(&base, &self.stream_origins, &target, &self.name)?;
        Ok((target, reach))
    }

    pub fn with_mirror(mut self, mirror: Option<super::files::Mirror>) -> Self {
        self.mirror = mirror;
        self
    }

    /// Speaks Cog's container API (`super::cog`) when `cog`.
    pub fn with_cog(mut self, cog: bool) -> Self {
        self.cog = cog;
        self
    }

    pub(super) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t.expose()),
            None => r,
        }
    }

    /// Sends a create for `model` (`owner/name`), at `version` when given.
    pub async fn create(
        &self,
        model: &str,
        version: Option<&str>,
        input: &Value,
        cancel_after: Option<Duration>,
    ) -> CreateOutcome {
        let (path, body) = match version {
            Some(v) => (
                "/v1/predictions".to_string(),
                json!({"version": format!("{model}:{v}"), "input": input}),
            ),
            None => (
                format!("/v1/models/{model}/predictions"),
                json!({"input": input}),
            ),
        };
        let mut req = self.request(reqwest::Method::POST, &path).json(&body);
        if let Some(d) = cancel_after {
            // The hosted API's minimum is 5 s.
            req = req.header("Cancel-After", format!("{}s", d.as_secs().max(5)));
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_connect() => {
                self.counts.network.fetch_add(1, Ordering::Relaxed);
                return CreateOutcome::NotSent(e.to_string());
            }
            Err(e) => {
                self.counts.ambiguous.fetch_add(1, Ordering::Relaxed);
                return CreateOutcome::Ambiguous(e.to_string());
            }
        };
        let status = resp.status().as_u16();
        if status == 429 {
            self.counts.throttled.fetch_add(1, Ordering::Relaxed);
            return CreateOutcome::Throttled(retry_after(resp.headers()));
        }
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_string();
        let max = self.intake.body_max(json_len(input));
        let (bytes, _held) = match read_body(resp, max, &self.budget).await {
            Ok(b) => b,
            Err(ReadError::Failed(e)) => {
                // The status line came back, the body did not: it was received.
                self.counts.ambiguous.fetch_add(1, Ordering::Relaxed);
                return CreateOutcome::Ambiguous(format!("reading the answer: {e}"));
            }
            Err(ReadError::Budget(e)) => {
                // Received, its answer unread: found again in the upstream's list.
                self.counts.ambiguous.fetch_add(1, Ordering::Relaxed);
                return CreateOutcome::Ambiguous(format!("reading the answer: {e}"));
            }
            Err(ReadError::TooLarge) => {
                self.counts.server_error.fetch_add(1, Ordering::Relaxed);
                return CreateOutcome::ServerError {
                    status,
                    detail: self.intake.body_error(&self.name, max),
                };
            }
        };
        match status {
            200..=299 => match serde_json::from_slice::<Value>(&bytes) {
                Ok(v) => {
                    self.counts.ok.fetch_add(1, Ordering::Relaxed);
                    CreateOutcome::Created(v)
                }
                Err(e) => {
                    self.counts.ambiguous.fetch_add(1, Ordering::Relaxed);
                    CreateOutcome::Ambiguous(format!("its answer is not JSON: {e}"))
                }
            },
            400..=499 => {
                self.counts.rejected.fetch_add(1, Ordering::Relaxed);
                CreateOutcome::Rejected {
                    status,
                    body: bytes.to_vec(),
                    content_type,
                }
            }
            _ => {
                self.counts.server_error.fetch_add(1, Ordering::Relaxed);
                CreateOutcome::ServerError {
                    status,
                    detail: truncate(&String::from_utf8_lossy(&bytes)),
                }
            }
        }
    }

    /// A call whose answer is JSON of at most `max` bytes.
    pub(super) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        max: usize,
    ) -> Result<Value, CallError> {
        let resp = self.send(method, path).await?;
        let status = resp.status().as_u16();
        let (bytes, _held) = match read_body(resp, max, &self.budget).await {
            Ok(b) => b,
            Err(ReadError::Failed(e)) => {
                self.counts.network.fetch_add(1, Ordering::Relaxed);
                return Err(CallError::Network(e.to_string()));
            }
            Err(ReadError::Budget(e)) => return Err(CallError::Budget(e)),
            Err(ReadError::TooLarge) => {
                self.counts.server_error.fetch_add(1, Ordering::Relaxed);
                return Err(CallError::TooLarge(self.intake.body_error(&self.name, max)));
            }
        };
        if !(200..300).contains(&status) {
            return Err(self.refused(status, &bytes));
        }
        self.counts.ok.fetch_add(1, Ordering::Relaxed);
        serde_json::from_slice(&bytes).map_err(|e| CallError::Status {
            status,
            body: format!("the answer is not JSON: {e}"),
        })
    }

    /// A prediction whose input was `sent_input` bytes of JSON (`json_len`): the
    /// upstream echoes it back.
    pub async fn get_prediction(&self, id: &str, sent_input: usize) -> Result<Value, CallError> {
        let max = self.intake.body_max(sent_input);
        self.call(reqwest::Method::GET, &format!("/v1/predictions/{id}"), max)
            .await
    }

    pub async fn cancel(&self, id: &str) -> Result<(), CallError> {
        self.send_only(
            reqwest::Method::POST,
            &format!("/v1/predictions/{id}/cancel"),
        )
        .await
    }

    /// A call whose answer only matters by its status (a cancel: the prediction it
    /// returns is read when it ends): the body is not kept, beyond an error's start.
    pub(super) async fn send_only(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<(), CallError> {
        let resp = self.send(method, path).await?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            self.counts.ok.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        // An error's start, for its message: one that cannot be read is left out.
        let body = match read_body(resp, DETAIL_MAX, &self.budget).await {
            Ok((b, _held)) => b,
            Err(_) => Vec::new(),
        };
        Err(self.refused(status, &body))
    }

    /// Sends a call's request: a network failure and a 429 (with its delay) are the
    /// same for every call; any other answer is the caller's to read.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::Response, CallError> {
        let resp = match self.request(method, path).send().await {
            Ok(r) => r,
            Err(e) => {
                self.counts.network.fetch_add(1, Ordering::Relaxed);
                return Err(CallError::Network(e.to_string()));
            }
        };
        if resp.status().as_u16() == 429 {
            self.counts.throttled.fetch_add(1, Ordering::Relaxed);
            return Err(CallError::Throttled(retry_after(resp.headers())));
        }
        Ok(resp)
    }

    /// A non-success status other than 429, counted as a server fault (5xx) or a
    /// refusal, with the start of its body.
    fn refused(&self, status: u16, body: &[u8]) -> CallError {
        if status >= 500 {
            self.counts.server_error.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counts.rejected.fetch_add(1, Ordering::Relaxed);
        }
        CallError::Status {
            status,
            body: truncate(&String::from_utf8_lossy(body)),
        }
    }

    /// Opens a prediction's event stream (`urls.stream`, resolved against the base),
    /// resuming after `last_id`. Only where `stream_target` allows: a stream elsewhere
    /// is not opened, and the caller polls instead. The token goes only to the
    /// upstream's own origin.
    pub(super) async fn open_stream(
        &self,
        url: &str,
        last_id: Option<&str>,
        max_open: Duration,
    ) -> Result<reqwest::Response, String> {
        let (target, reach) = self.stream_target(url)?;
        let http = match reach {
            Reach::Sibling => &self.sibling_http,
            Reach::Own | Reach::Configured => &self.http,
        };
        let mut req = http
            .get(target)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .timeout(max_open);
        if let Some(id) = last_id {
            req = req.header("Last-Event-ID", id);
        }
        if let (Some(t), Reach::Own) = (&self.token, reach) {
            req = req.bearer_auth(t.expose());
        }
        // Without the URL: a stream URL is a capability, and this text reaches the
        // prediction's logs.
        let resp = req.send().await.map_err(|e| {
            self.counts.network.fetch_add(1, Ordering::Relaxed);
            e.without_url().to_string()
        })?;
        let status = resp.status().as_u16();
        let is_stream = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !(200..300).contains(&status) || !is_stream {
            self.counts.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(format!("it answered {status} without an event stream"));
        }
        self.counts.ok.fetch_add(1, Ordering::Relaxed);
        Ok(resp)
    }

    /// The newest page of the upstream's predictions.
    pub async fn recent_predictions(&self) -> Result<Vec<Value>, CallError> {
        // Other predictions' inputs come back too, whatever their size.
        let max = self.intake.body_max(0).saturating_add(PAGE_EXTRA);
        let page = self
            .call(reqwest::Method::GET, "/v1/predictions", max)
            .await?;
        Ok(page["results"].as_array().cloned().unwrap_or_default())
    }

    /// A model or version document (`/v1/models/...`).
    pub async fn get_path(&self, path: &str) -> Result<Value, CallError> {
        let max = self.intake.body_max(0);
        if self.cog {
            let openapi = self
                .call(reqwest::Method::GET, "/openapi.json", max)
                .await?;
            return super::cog::document(path, &openapi);
        }
        self.call(reqwest::Method::GET, path, max).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_followed_on_the_own_origin_a_sibling_or_a_configured_origin_only() {
        let c = UpstreamClient::new(
            "up".into(),
            "http://127.0.0.1:8000/",
            None,
            Breaker::new(Default::default()),
        )
        .unwrap()
        .with_stream_origins(
            vec![stream_origin::parse_origin("http://127.0.0.1:9000").unwrap()],
            false,
        );
        let ok = |u: &str| c.stream_target(u).map(|(u, r)| (u.to_string(), r));
        assert_eq!(
            ok("/v1/predictions/x/stream").unwrap(),
            (
                "http://127.0.0.1:8000/v1/predictions/x/stream".into(),
                Reach::Own
            )
        );
        assert_eq!(
            ok("http://127.0.0.1:8000/s?token=abc").unwrap().1,
            Reach::Own
        );
        assert_eq!(
            ok("http://127.0.0.1:9000/s?token=abc").unwrap().1,
            Reach::Configured
        );
        for elsewhere in [
            "http://127.0.0.1:8001/s",
            "https://127.0.0.1:8000/s",
            "http://localhost:8000/s",
            "http://169.254.169.254/latest",
            "//evil.example/s",
        ] {
            let e = ok(elsewhere).unwrap_err();
            assert!(
                e.contains("not upstream up's own origin"),
                "{elsewhere}: {e}"
            );
            assert!(!e.contains("token"), "{e}");
        }
        let hosted = UpstreamClient::new(
            "hosted".into(),
            "https://api.replicate.com",
            None,
            Breaker::new(Default::default()),
        )
        .unwrap();
        let (u, r) = hosted
            .stream_target("https://stream.replicate.com/v1/streams/abc")
            .unwrap();
        assert_eq!(
            (u.host_str(), r),
            (Some("stream.replicate.com"), Reach::Sibling)
        );
        assert!(hosted.stream_target("https://evil.com/x").is_err());
    }
}
