//! Upstream records in hearth's form: output as a list of text chunks (what every
//! model hearth serves streams), statuses as hearth's, and the output that arrived
//! since the last poll as new chunks, so streams and `output` webhooks carry deltas.

use serde_json::Value;

use crate::record::Status;

/// An upstream status: `aborted` (its `Cancel-After` passed before it started) is a
/// cancel here; anything unknown is still running.
pub fn status(v: &Value) -> Status {
    match v["status"].as_str() {
        Some("starting") => Status::Starting,
        Some("succeeded") => Status::Succeeded,
        Some("failed") => Status::Failed,
        Some("canceled") | Some("aborted") => Status::Canceled,
        _ => Status::Processing,
    }
}

/// The output as chunks: a list's items (text as is, anything else as its JSON), a
/// string as one chunk, null as none yet.
pub fn chunks(output: &Value) -> Vec<String> {
    match output {
        Value::Null => Vec::new(),
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        other => vec![other.to_string()],
    }
}

/// How the output changed since `current`.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    None,
    /// New chunks after the ones already out.
    Append(Vec<String>),
    /// Not a continuation (the upstream rewrote it): the whole output anew.
    Replace(Vec<String>),
}

/// Compares the upstream's output with what hearth has. A string that grows is one
/// new chunk per poll (its new suffix); a list that grows, its new items.
pub fn change(current: &[String], output: &Value) -> Change {
    if let Value::String(s) = output {
        let joined: String = current.concat();
        return match s.strip_prefix(joined.as_str()) {
            Some("") => Change::None,
            Some(rest) => Change::Append(vec![rest.to_string()]),
            None => Change::Replace(vec![s.clone()]),
        };
    }
    let target = chunks(output);
    if target.len() >= current.len() && target[..current.len()] == *current {
        if target.len() == current.len() {
            Change::None
        } else {
            Change::Append(target[current.len()..].to_vec())
        }
    } else if output.is_null() {
        Change::None
    } else {
        Change::Replace(target)
    }
}

/// An upstream's error as text.
pub fn error(v: &Value) -> Option<String> {
    match &v["error"] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// Ids the upstream hands out, before they go into a URL path.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn outputs_become_chunks_and_deltas() {
        let cur = vec!["a".to_string(), "b".to_string()];
        assert_eq!(change(&cur, &json!(["a", "b"])), Change::None);
        assert_eq!(
            change(&cur, &json!(["a", "b", "c", "d"])),
            Change::Append(vec!["c".into(), "d".into()])
        );
        assert_eq!(
            change(&cur, &json!("abcd")),
            Change::Append(vec!["cd".into()])
        );
        assert_eq!(change(&cur, &json!("ab")), Change::None);
        assert_eq!(
            change(&cur, &json!("xy")),
            Change::Replace(vec!["xy".into()])
        );
        assert_eq!(
            change(&cur, &json!(["z"])),
            Change::Replace(vec!["z".into()])
        );
        assert_eq!(change(&cur, &Value::Null), Change::None);
        assert_eq!(chunks(&json!([1, {"a": 2}])), vec!["1", "{\"a\":2}"]);
        assert_eq!(status(&json!({"status": "aborted"})), Status::Canceled);
        assert!(valid_id("abc-123_x") && !valid_id("../x") && !valid_id(""));
    }
}
