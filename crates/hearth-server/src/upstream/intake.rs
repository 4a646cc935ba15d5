//! How much an upstream may send hearth for one prediction: its output and its logs,
//! each capped (`--upstream-max-output-bytes`, `--upstream-max-log-bytes`), on every
//! path they arrive by — a polled `GET`, the event stream, a Cog container's events
//! and its final record. Past a cap the prediction fails with an error naming it
//! (and is canceled upstream), so a runaway or hostile upstream costs one prediction,
//! never the server's memory. A response body is read only up to what the caps allow
//! plus room for the rest of the record (`body_max`).

use serde_json::Value;

/// The output a prediction may bring back from an upstream by default.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 64 << 20;
/// Its logs, by default.
pub const DEFAULT_MAX_LOG_BYTES: usize = 8 << 20;
/// What a record carries besides output and logs: the input echoed back (inlined
/// files up to `files::INLINE_MAX` each, a few of them), ids, URLs, metrics.
const ENVELOPE: usize = 4 * super::files::INLINE_MAX as usize + (1 << 20);

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
    /// The most of one response body read from the upstream.
    pub fn body_max(&self) -> usize {
        self.max_output_bytes
            .saturating_add(self.max_log_bytes)
            .saturating_add(ENVELOPE)
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

    /// The error for a response body past `body_max`.
    pub fn body_error(&self, name: &str) -> String {
        format!(
            "upstream {name} sent a response over {} bytes, more than this prediction's output and logs may take (--upstream-max-output-bytes {}, --upstream-max-log-bytes {}); it was stopped and canceled there",
            self.body_max(),
            self.max_output_bytes,
            self.max_log_bytes
        )
    }
}

/// Reads `resp`'s body, at most `max` bytes; `Err(None)` past it, `Err(Some(e))` when
/// reading failed.
pub async fn read_body(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, Option<reqwest::Error>> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(None);
    }
    let mut out = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(b)) => {
                if out.len() + b.len() > max {
                    return Err(None);
                }
                out.extend_from_slice(&b);
            }
            Ok(None) => return Ok(out),
            Err(e) => return Err(Some(e)),
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
        assert!(l.body_max() > 15);
    }

    #[tokio::test]
    async fn a_body_is_read_only_up_to_its_cap() {
        let resp = |s: &str| reqwest::Response::from(axum::http::Response::new(s.to_string()));
        assert_eq!(read_body(resp("abc"), 3).await.unwrap(), b"abc");
        assert!(matches!(read_body(resp("abcd"), 3).await, Err(None)));
    }
}
