//! A plain Cog container's `/predictions` API as an upstream (`--upstream NAME=cog+URL`).
//! Cog has no `GET` for a prediction and forgets one once it ends, so hearth gives it
//! hearth's own prediction id and reads it along its events: one `PUT
//! /predictions/{id}` with `Accept: text/event-stream` and `Prefer: respond-async`
//! creates it and streams its events to `completed` in the same answer, so no event
//! can end between a create and an attach; `respond-async` keeps it from being tied
//! to that connection (it runs on if hearth dies). The same `PUT` again attaches to
//! a prediction in flight with that id and replays its events from the start (a
//! broken stream, a restart of hearth, a create whose answer was lost: never a second
//! run while the first is in flight). A container that answers the create with a 202
//! and no stream is attached to with the next `PUT`. Cancel is `POST
//! /predictions/{id}/cancel`; the model's document and version come from `GET
//! /openapi.json` (the version id is a hash of that schema).

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::client::{CallError, UpstreamClient};
use super::sse_reader::{Block, SseEvent, SseReader};

/// Cog sends a comment every 15 s: this long with nothing read, the stream is dead.
pub const STREAM_IDLE: Duration = Duration::from_secs(60);
/// The longest one stream is held open.
const STREAM_MAX: Duration = Duration::from_secs(86400);
/// Cog's "busy" (409 at capacity, 503 not ready) carries no `Retry-After`.
const BUSY_WAIT: Duration = Duration::from_secs(1);

/// One event of Cog's prediction stream.
#[derive(Debug, PartialEq)]
pub enum CogEvent {
    Start,
    /// The chunk at `index` of the output.
    Output {
        chunk: String,
        index: usize,
    },
    Log(String),
    /// The finished prediction in Cog's shape (`{id, status, output, logs, metrics, error}`).
    Completed(Value),
    /// Cog ends a stream it cannot continue with an `error` event: a replay past its
    /// history (`COG_STREAM_HISTORY_CAPACITY`, 1024 events by default), a reader
    /// that fell behind.
    Error(String),
}

/// What one `PUT /predictions/{id}` asks for (`UpstreamClient::cog_put`).
#[derive(Clone, Copy)]
pub enum Put<'a> {
    /// Creates it with this input and streams its events in the same answer.
    Create(&'a Value),
    /// Streams the events of the prediction in flight with this id, replayed from the
    /// start, and never creates one: its input (`ATTACH_ONLY`) is not an object, which
    /// Cog checks only after it looked for the id in flight, so an id that is not in
    /// flight (ended, canceled, never received, a restarted container) is a 422.
    Attach,
    /// Creates it with this input and waits for its end (a model whose Cog does not
    /// stream: 406 to an event stream).
    Sync(&'a Value),
}

/// The input of an attach (`Put::Attach`): anything but an object.
const ATTACH_ONLY: &str = "attach to the prediction in flight with this id; never create one";

/// What became of a `PUT /predictions/{id}`.
pub enum CogOpen {
    /// The create was taken (202) without a stream: attach with the next `PUT`.
    Taken,
    Stream(Box<CogStream>),
    /// The finished prediction (`Put::Sync`), in Cog's shape.
    Finished(Value),
    /// 406: this model's Cog serves no event streams (`@cog.streaming` is opt-in).
    NoStreams,
    /// An attach found no prediction in flight with this id (a 422 or 409): it ended
    /// while nobody followed it, or never ran there. The start of the answer.
    Gone(String),
    /// 409 "at capacity", 503 "not ready", 429: nothing was taken; ask again later.
    Busy(Duration),
    /// A 4xx (422 validation, or a 409 for an id Cog will not take): its answer.
    Refused {
        status: u16,
        body: Vec<u8>,
        content_type: String,
    },
    ServerError {
        status: u16,
        detail: String,
    },
    /// No connection was made.
    NotSent(String),
    /// Sent, answer lost: it may run there (an attach finds it).
    Lost(String),
}

/// Reads Cog's server-sent events one at a time.
pub struct CogStream {
    reader: SseReader,
}

impl CogStream {
    /// The next event; `None` when the stream ended. Cancel-safe (`SseReader`).
    pub async fn next(&mut self) -> Result<Option<CogEvent>, String> {
        loop {
            match self.reader.next().await? {
                None => return Ok(None),
                Some(Block::Comment) => {}
                Some(Block::Event(ev)) => {
                    if let Some(ev) = cog_event(ev)? {
                        return Ok(Some(ev));
                    }
                }
            }
        }
    }
}

/// One block as Cog's event (comments and unknown events are none).
#[cfg(test)]
fn parse_block(block: &str) -> Result<Option<CogEvent>, String> {
    match super::sse_reader::parse_block(block) {
        Block::Comment => Ok(None),
        Block::Event(ev) => cog_event(ev),
    }
}

/// Cog's event from its SSE form: the data is JSON.
fn cog_event(ev: SseEvent) -> Result<Option<CogEvent>, String> {
    let event = ev.event.as_str();
    if ev.data.is_empty() && event == "message" {
        return Ok(None);
    }
    let data: Value = serde_json::from_str(&ev.data)
        .map_err(|e| format!("a {event} event whose data is not JSON: {e}"))?;
    Ok(match event {
        "start" => Some(CogEvent::Start),
        "output" => Some(CogEvent::Output {
            chunk: match &data["chunk"] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            },
            index: data["index"]
                .as_u64()
                .and_then(|i| usize::try_from(i).ok())
                .ok_or("an output event without an index")?,
        }),
        "log" => Some(CogEvent::Log(
            data["data"].as_str().unwrap_or_default().to_string(),
        )),
        "completed" => Some(CogEvent::Completed(data)),
        "error" => Some(CogEvent::Error(match &data["error"] {
            Value::String(s) => s.clone(),
            _ => data.to_string(),
        })),
        _ => None,
    })
}

/// The version id of a Cog container's schema: stable while the schema is.
pub fn version_id(openapi: &Value) -> String {
    let d = Sha256::digest(openapi.to_string().as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Replicate's model and version documents for a model served by a Cog container,
/// from its `/openapi.json`: what `GET /v1/models/{owner}/{name}[/versions[/{id}]]`
/// answers, so the official clients find the version and its schema.
pub fn document(path: &str, openapi: &Value) -> Result<Value, CallError> {
    let not_found = |what: String| CallError::Status {
        status: 404,
        body: json!({"detail": format!("{what} not found")}).to_string(),
    };
    let rest = path
        .strip_prefix("/v1/models/")
        .ok_or_else(|| not_found(path.to_string()))?;
    let parts: Vec<&str> = rest.split('/').collect();
    let id = version_id(openapi);
    let version = json!({
        "id": id,
        "created_at": "1970-01-01T00:00:00Z",
        "cog_version": openapi["info"]["x-cog-version"].as_str().unwrap_or(crate::schema::COG_VERSION),
        "openapi_schema": openapi,
    });
    match parts.as_slice() {
        [owner, name] => Ok(json!({
            "owner": owner, "name": name,
            "description": openapi["info"]["description"].as_str().unwrap_or("a Cog container"),
            "visibility": "public", "github_url": null, "paper_url": null, "license_url": null,
            "run_count": 0, "cover_image_url": null, "default_example": null,
            "latest_version": version,
        })),
        [_, _, "versions"] => Ok(json!({"next": null, "previous": null, "results": [version]})),
        [owner, name, "versions", v] if *v == id => Ok(version),
        [owner, name, "versions", v] => Err(not_found(format!("version {v} of {owner}/{name}"))),
        _ => Err(not_found(path.to_string())),
    }
}

impl UpstreamClient {
    /// `PUT /predictions/{id}` as `put` says. A create asks for its events with
    /// `Prefer: respond-async` too: hearth's own Cog API then keeps the prediction
    /// running when the stream drops; Cog 0.23.1 ignores it and cancels a prediction
    /// created over a stream once no stream follows it.
    pub async fn cog_put(&self, id: &str, put: Put<'_>) -> CogOpen {
        let input = match put {
            Put::Create(input) | Put::Sync(input) => input.clone(),
            Put::Attach => json!(ATTACH_ONLY),
        };
        let mut req = self
            .request(reqwest::Method::PUT, &format!("/predictions/{id}"))
            .json(&json!({"id": id, "input": input}))
            .timeout(STREAM_MAX);
        if !matches!(put, Put::Sync(_)) {
            req = req
                .header(reqwest::header::ACCEPT, "text/event-stream")
                .header("Prefer", "respond-async");
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_connect() => {
                self.counts.network.fetch_add(1, Ordering::Relaxed);
                return CogOpen::NotSent(e.to_string());
            }
            Err(e) => {
                self.counts.ambiguous.fetch_add(1, Ordering::Relaxed);
                return CogOpen::Lost(e.to_string());
            }
        };
        let status = resp.status().as_u16();
        let is_stream = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        // A `completed` event carries the whole record, the input echoed back
        // included: no more than a body about this input.
        let max = self.intake.body_max(super::intake::json_len(&input));
        if (200..300).contains(&status) && is_stream {
            self.counts.ok.fetch_add(1, Ordering::Relaxed);
            return CogOpen::Stream(Box::new(CogStream {
                reader: SseReader::new(resp, max, &self.budget),
            }));
        }
        if (200..300).contains(&status) && matches!(put, Put::Create(_)) {
            // A Cog that streams no create: its 202 took it.
            self.counts.ok.fetch_add(1, Ordering::Relaxed);
            return CogOpen::Taken;
        }
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_string();
        // A sync answer is the record; an error's body: only its start is shown.
        let (limit, wait) = match put {
            Put::Sync(_) => (max, STREAM_IDLE),
            _ => (64 << 10, Duration::from_secs(30)),
        };
        let sync_ok = matches!(put, Put::Sync(_)) && (200..300).contains(&status);
        let body =
            match tokio::time::timeout(wait, super::intake::read_body(resp, limit, &self.budget))
                .await
            {
                Ok(Ok((b, _held))) => b,
                Ok(Err(super::intake::ReadError::TooLarge)) if sync_ok => {
                    self.counts.server_error.fetch_add(1, Ordering::Relaxed);
                    return CogOpen::ServerError {
                        status,
                        detail: self.intake.body_error(&self.name, limit),
                    };
                }
                Ok(Err(_)) | Err(_) if sync_ok => {
                    self.counts.ambiguous.fetch_add(1, Ordering::Relaxed);
                    return CogOpen::Lost(format!(
                        "its answer ({status}) could not be read within {}s",
                        wait.as_secs()
                    ));
                }
                _ => Vec::new(),
            };
        let text = String::from_utf8_lossy(&body);
        let busy =
            status == 429 || status == 503 || (status == 409 && text.contains("At capacity"));
        if busy {
            self.counts.throttled.fetch_add(1, Ordering::Relaxed);
            return CogOpen::Busy(BUSY_WAIT);
        }
        let start = || text.chars().take(500).collect::<String>();
        match (status, put) {
            // Cog answers 406 also while it starts (it learns from its schema, loaded
            // at the end of setup, whether the model streams): only a ready one means
            // it.
            (406, Put::Create(_) | Put::Attach) if !self.cog_ready().await => {
                self.counts.throttled.fetch_add(1, Ordering::Relaxed);
                CogOpen::Busy(BUSY_WAIT)
            }
            (406, Put::Create(_) | Put::Attach) => {
                self.counts.rejected.fetch_add(1, Ordering::Relaxed);
                CogOpen::NoStreams
            }
            (422 | 409, Put::Attach) => {
                self.counts.rejected.fetch_add(1, Ordering::Relaxed);
                CogOpen::Gone(format!("{status}: {}", start()))
            }
            (200..=299, Put::Sync(_)) => match serde_json::from_slice::<Value>(&body) {
                Ok(v) => {
                    self.counts.ok.fetch_add(1, Ordering::Relaxed);
                    CogOpen::Finished(v)
                }
                Err(e) => {
                    self.counts.ambiguous.fetch_add(1, Ordering::Relaxed);
                    CogOpen::Lost(format!("its answer ({status}) is not JSON: {e}"))
                }
            },
            (200..=299, _) => {
                self.counts.ambiguous.fetch_add(1, Ordering::Relaxed);
                CogOpen::Lost(format!(
                    "answered {status} without an event stream: {}",
                    start()
                ))
            }
            (400..=499, _) => {
                self.counts.rejected.fetch_add(1, Ordering::Relaxed);
                CogOpen::Refused {
                    status,
                    body,
                    content_type,
                }
            }
            _ => {
                self.counts.server_error.fetch_add(1, Ordering::Relaxed);
                CogOpen::ServerError {
                    status,
                    detail: text.chars().take(2000).collect(),
                }
            }
        }
    }

    /// Whether Cog's `/health-check` says its setup is done (`READY`, or `BUSY`: every
    /// slot taken).
    async fn cog_ready(&self) -> bool {
        self.call(reqwest::Method::GET, "/health-check", 1 << 20)
            .await
            .is_ok_and(|h| matches!(h["status"].as_str(), Some("READY" | "BUSY")))
    }

    /// `POST /predictions/{id}/cancel`.
    pub async fn cog_cancel(&self, id: &str) -> Result<(), CallError> {
        self.send_only(reqwest::Method::POST, &format!("/predictions/{id}/cancel"))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cog_events_parse() {
        assert_eq!(
            parse_block("event: start\ndata: {\"id\":\"a\",\"status\":\"processing\"}").unwrap(),
            Some(CogEvent::Start)
        );
        assert_eq!(
            parse_block("event: output\r\ndata: {\"chunk\":\"hi\",\"index\":3}\r").unwrap(),
            Some(CogEvent::Output {
                chunk: "hi".into(),
                index: 3
            })
        );
        assert_eq!(
            parse_block("event: log\ndata: {\"data\":\"x\\n\",\"source\":\"stdout\"}").unwrap(),
            Some(CogEvent::Log("x\n".into()))
        );
        assert_eq!(
            parse_block("event: error\ndata: {\"error\":\"SSE stream replay truncated; events were dropped\",\"skipped\":3}").unwrap(),
            Some(CogEvent::Error("SSE stream replay truncated; events were dropped".into()))
        );
        assert_eq!(parse_block(": keep-alive").unwrap(), None);
        assert!(parse_block("event: output\ndata: {\"chunk\":\"a\"}").is_err());
        assert!(parse_block("event: completed\ndata: nope").is_err());
    }

    #[test]
    fn documents_come_from_the_schema() {
        let schema = json!({"info": {"title": "Cog"}, "components": {"schemas": {"Output": {"type": "string"}}}});
        let id = version_id(&schema);
        assert_eq!(id.len(), 64);
        let m = document("/v1/models/acme/cogged", &schema).unwrap();
        assert_eq!(m["name"], "cogged");
        assert_eq!(m["latest_version"]["id"], id.as_str());
        assert_eq!(m["latest_version"]["openapi_schema"], schema);
        let v = document(&format!("/v1/models/acme/cogged/versions/{id}"), &schema).unwrap();
        assert_eq!(v["id"], id.as_str());
        let l = document("/v1/models/acme/cogged/versions", &schema).unwrap();
        assert_eq!(l["results"][0]["id"], id.as_str());
        assert!(matches!(
            document("/v1/models/acme/cogged/versions/abc", &schema),
            Err(CallError::Status { status: 404, .. })
        ));
    }
}
