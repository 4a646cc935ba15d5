//! A prediction as Cog's container API shows it: the body of a finished sync request,
//! of an in-flight `PUT`, of SSE's `completed` event and of Cog-style webhooks. Cog
//! leaves out what Replicate's API adds (`urls`, `model`, `version`, timestamps).

use serde_json::{json, Map, Value};

use crate::record::Record;

/// `{id, logs, metrics, status}`, with `output` once there is some and `error` when
/// it failed; `metrics` is `{}` until the end, as Cog's are.
pub fn response(r: &Record) -> Value {
    let p = &r.prediction;
    let mut o = Map::new();
    o.insert("id".into(), json!(p.id));
    o.insert("logs".into(), json!(p.logs));
    o.insert(
        "metrics".into(),
        p.metrics.clone().unwrap_or_else(|| json!({})),
    );
    o.insert("status".into(), json!(p.status.as_str()));
    if let Some(out) = &p.output {
        o.insert("output".into(), json!(out));
    }
    if let Some(e) = &p.error {
        o.insert("error".into(), json!(e));
    }
    Value::Object(o)
}

/// What `PUT /predictions/{id}` answers for a prediction in flight: its state and input.
pub fn in_flight(r: &Record) -> Value {
    let mut v = response(r);
    if let Value::Object(o) = &mut v {
        o.insert("input".into(), r.prediction.input.clone());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Prediction, Status};

    fn record() -> Record {
        Record {
            prediction: Prediction {
                id: "p.1".into(),
                model: "m/n".into(),
                version: "v".into(),
                input: json!({"prompt": "x"}),
                logs: String::new(),
                output: None,
                error: None,
                status: Status::Processing,
                created_at: "t".into(),
                started_at: None,
                completed_at: None,
                deadline: None,
                data_removed: false,
                source: "cog".into(),
                metrics: None,
                hearth: None,
            },
            base_url: "http://h".into(),
            stream_token: "t".into(),
            webhook: None,
            webhook_events_filter: Vec::new(),
            created_unix: 0,
        }
    }

    #[test]
    fn keys_follow_the_state() {
        let mut r = record();
        // Sorted: serde_json keeps insertion order when a dependency asks it to.
        let keys = |v: &Value| -> Vec<String> {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(&response(&r)), ["id", "logs", "metrics", "status"]);
        assert_eq!(response(&r)["metrics"], json!({}));
        r.prediction.output = Some(vec!["a".into()]);
        r.prediction.status = Status::Failed;
        r.prediction.error = Some("boom".into());
        assert_eq!(
            keys(&response(&r)),
            ["error", "id", "logs", "metrics", "output", "status"]
        );
        assert_eq!(in_flight(&r)["input"]["prompt"], "x");
    }
}
