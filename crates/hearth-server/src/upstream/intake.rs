//! How much an upstream may send hearth for one prediction: its output and its logs,
//! each capped (`--upstream-max-output-bytes`, `--upstream-max-log-bytes`), on every
//! path they arrive by — a polled `GET`, the event stream, a Cog container's events
//! and its final record. Past a cap the prediction fails with an error naming it
//! (and is canceled upstream), so a runaway or hostile upstream costs one prediction,
//! never the server's memory. A response body is read only up to what the caps allow
//! plus room for the rest of the record (`body_max`): the input hearth sent, which
//! the upstream echoes back (data URLs of inlined files included), and a little more.
//! Every body read takes its bytes from the process-wide `budget` first.

use serde_json::Value;

use super::budget::{ByteBudget, Held};

/// The output a prediction may bring back from an upstream by default.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 64 << 20;
/// Its logs, by default.
pub const DEFAULT_MAX_LOG_BYTES: usize = 8 << 20;
/// What a record carries besides its output, logs and input: ids, URLs, metrics, an
/// error.
const ENVELOPE: usize = 1 << 20;
/// The input comes back as the upstream writes JSON, which may escape what hearth
/// sent as UTF-8: `\uXXXX` for each non-ASCII character is at most 3 times its bytes
/// (6 for 2, 12 for 4).
const ECHO_EXPANSION: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntakeLimits {
    pub max_output_bytes: usize,
    pub max_log_bytes: usize,
}

impl Default for IntakeLimits {
    fn default() -> Self {
        IntakeLimits {
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
        }
    }
}

/// The bytes of an output as hearth holds it (chunks, or one value's JSON text).
pub fn output_bytes(chunks: &[String]) -> usize {
    chunks.iter().map(String::len).sum()
}

/// The bytes of `v` as JSON (what hearth sends of an input), counted without
/// writing them anywhere.
pub fn json_len(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // Writing a `Value` to a sink that takes everything cannot fail.
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// The bytes of a record's `output` as the upstream sent it.
pub fn value_bytes(v: &Value) -> usize {
    match v {
        Value::Null => 0,
        Value::String(s) => s.len(),
        Value::Array(a) => a.iter().map(value_bytes).sum(),
        other => other.to_string().len(),
    }
}

impl IntakeLimits {
    /// The most of one response body about a prediction whose input was `sent_input`
    /// bytes of JSON: its output and logs within the caps, the input echoed back, the
    /// rest of the record. Bounded, as the input is (by `--max-body-bytes` and the
    /// inline limit on files).
    pub fn body_max(&self, sent_input: usize) -> usize {
        self.max_output_bytes
            .saturating_add(self.max_log_bytes)
            .saturating_add(ENVELOPE)
            .saturating_add(ECHO_EXPANSION.saturating_mul(sent_input))
    }

    /// The most one event of a stream may carry: no more than the caps allow.
    pub fn event_max(&self) -> usize {
        self.max_output_bytes
            .max(self.max_log_bytes)
            .saturating_add(64 << 10)
    }

    /// Whether `output` and `logs` bytes from upstream `name` are within the caps; if
    /// not, the error the prediction fails with.
    pub fn check(&self, name: &str, output: usize, logs: usize) -> Result<(), String> {
        if output > self.max_output_bytes {
            return Err(format!(
                "upstream {name} sent more than {} bytes of output for this prediction, the most hearth accepts from an upstream (--upstream-max-output-bytes, HEARTH_UPSTREAM_MAX_OUTPUT_BYTES); it was stopped and canceled there",
                self.max_output_bytes
            ));
        }
        if logs > self.max_log_bytes {
            return Err(format!(
                "upstream {name} sent more than {} bytes of logs for this prediction, the most hearth accepts from an upstream (--upstream-max-log-bytes, HEARTH_UPSTREAM_MAX_LOG_BYTES); it was stopped and canceled there",
                self.max_log_bytes
            ));
        }
        Ok(())
    }

    /// `check` on an upstream record `u` (its `output` and `logs`).
    pub fn check_record(&self, name: &str, u: &Value) -> Result<(), String> {
        let logs = u["logs"].as_str().map_or(0, str::len);
        self.check(name, value_bytes(&u["output"]), logs)
    }

    /// The error for a response body past `max` (`body_max`).
    pub fn body_error(&self, name: &str, max: usize) -> String {
        format!(
            "upstream {name} sent a response over {max} bytes, more than this prediction's output and logs (--upstream-max-output-bytes {}, --upstream-max-log-bytes {}) and its input echoed back may take; it was stopped and canceled there",
            self.max_output_bytes,
            self.max_log_bytes
        )
    }
}

/// Why a body was not read.
#[derive(Debug)]
pub enum ReadError {
    /// Past its `max`.
    TooLarge,
    /// The memory budget stayed spent (`budget`): this says so.
    Budget(String),
    Failed(reqwest::Error),
}

/// Reads `resp`'s body, at most `max` bytes, its bytes taken from `budget` before
/// they are buffered; they are held until the returned `Held` is dropped.
pub async fn read_body(
    mut resp: reqwest::Response,
    max: usize,
    budget: &ByteBudget,
) -> Result<(Vec<u8>, Held), ReadError> {
    let mut held = Held::default();
    let known = resp.content_length();
    if known.is_some_and(|n| n > max as u64) {
        return Err(ReadError::TooLarge);
    }
    if let Some(n) = known {
        budget
            .reserve(&mut held, n as usize)
            .await
            .map_err(ReadError::Budget)?;
    }
    let mut out = Vec::with_capacity(known.map_or(0, |n| n as usize));
    loop {
        match resp.chunk().await {
            Ok(Some(b)) => {
                let need = out.len() + b.len();
                if need > max {
                    return Err(ReadError::TooLarge);
                }
                if need > out.capacity() {
                    // The buffer grows by doubling, never past `max`, and what it
                    // takes is what the budget counts.
                    let room = need.max(out.capacity() * 2).min(max);
                    budget
                        .reserve(&mut held, room)
                        .await
                        .map_err(ReadError::Budget)?;
                    out.reserve_exact(room - out.len());
                }
                out.extend_from_slice(&b);
            }
            Ok(None) => return Ok((out, held)),
            Err(e) => return Err(ReadError::Failed(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn caps_name_the_limit_and_count_every_shape_of_output() {
        let l = IntakeLimits {
            max_output_bytes: 10,
            max_log_bytes: 5,
        };
        assert!(l.check("up", 10, 5).is_ok());
        let e = l.check("up", 11, 0).unwrap_err();
        assert!(
            e.contains("--upstream-max-output-bytes") && e.contains("10 bytes"),
            "{e}"
        );
        let e = l.check("up", 0, 6).unwrap_err();
        assert!(e.contains("--upstream-max-log-bytes"), "{e}");
        assert_eq!(value_bytes(&json!(["ab", "cde"])), 5);
        assert_eq!(value_bytes(&json!("abcdef")), 6);
        assert_eq!(value_bytes(&json!({"a": 1})), 7);
        assert!(l
            .check_record("up", &json!({"output": ["0123456789", "x"], "logs": ""}))
            .is_err());
        // The input sent comes back: its bytes, escaped as JSON may, are room too.
        assert_eq!(l.body_max(100) - l.body_max(0), 300);
    }

    #[tokio::test]
    async fn a_body_is_read_only_up_to_its_cap_within_the_budget() {
        let resp = |s: &str| reqwest::Response::from(axum::http::Response::new(s.to_string()));
        let budget = ByteBudget::new(1 << 20).with_wait(std::time::Duration::from_millis(50));
        let (b, held) = read_body(resp("abc"), 3, &budget).await.unwrap();
        assert_eq!(b, b"abc");
        assert!(held.bytes() >= 3);
        assert!(matches!(
            read_body(resp("abcd"), 3, &budget).await,
            Err(ReadError::TooLarge)
        ));
        // N bodies at once hold no more than the budget: the second waits, then fails,
        // while the first is held; once it is dropped the same read goes through.
        let big = "x".repeat(600 << 10);
        let first = read_body(resp(&big), 1 << 20, &budget).await.unwrap();
        assert!(budget.available() < 600 << 10);
        match read_body(resp(&big), 1 << 20, &budget).await {
            Err(ReadError::Budget(e)) => assert!(e.contains("--upstream-memory-budget"), "{e}"),
            other => panic!("{other:?}"),
        }
        drop((first, held));
        let (b, _held) = read_body(resp(&big), 1 << 20, &budget).await.unwrap();
        assert_eq!(b.len(), 600 << 10);
    }

    /// The upstream echoes the input hearth sent: a file inlined near the inline
    /// limit and a prompt it writes back as `\uXXXX` (as Python's JSON does) make an
    /// answer far over what a fixed allowance gave, with tight output and log caps.
    /// It is read; one larger than the input accounts for is still refused.
    #[tokio::test]
    async fn an_answer_echoing_a_large_input_is_read_and_still_bounded() {
        use super::super::breaker::Breaker;
        use super::super::client::{CallError, UpstreamClient};
        let inline = super::super::files::INLINE_MAX as usize;
        let data = format!("data:image/png;base64,{}", "A".repeat(inline / 3 * 4 - 64));
        let prompt = "\u{e9}".repeat(5 << 20);
        let input = json!({"image": data, "prompt": prompt});
        let escaped: String = "\\u00e9".repeat(5 << 20);
        let echo = format!(
            r#"{{"id":"p1","status":"succeeded","output":["ok"],"logs":"","input":{{"image":"{data}","prompt":"{escaped}"}}}}"#
        );
        let limits = IntakeLimits {
            max_output_bytes: 64 << 10,
            max_log_bytes: 64 << 10,
        };
        let sent = json_len(&input);
        assert!(echo.len() > 40 << 20 && echo.len() < limits.body_max(sent));
        let too_big = format!(
            r#"{{"id":"p2","x":"{}"}}"#,
            "y".repeat(limits.body_max(sent))
        );
        let app = axum::Router::new()
            .route(
                "/v1/predictions/p1",
                axum::routing::get(move || async move { echo }),
            )
            .route(
                "/v1/predictions/p2",
                axum::routing::get(move || async move { too_big }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let c = UpstreamClient::new("up".into(), &base, None, Breaker::new(Default::default()))
            .unwrap()
            .with_intake(limits);
        let u = c.get_prediction("p1", sent).await.unwrap();
        assert_eq!(u["input"], input);
        assert!(limits.check_record("up", &u).is_ok());
        match c.get_prediction("p2", sent).await {
            Err(CallError::TooLarge(e)) => assert!(e.contains("input echoed back"), "{e}"),
            other => panic!("{other:?}"),
        }
        // Every byte read was given back to the budget.
        assert_eq!(c.budget.available(), c.budget.total());
    }
}
