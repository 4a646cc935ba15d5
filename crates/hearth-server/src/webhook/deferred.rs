//! Cog's intermediate webhooks, written small. Each `output` or `logs` delivery of a
//! Cog prediction carries the whole output so far, one per chunk, so writing their
//! bodies to the outbox would cost O(N²) bytes over a long prediction (hundreds of MB
//! for 8k tokens). The outbox row keeps only how far the prediction had got (chunks
//! of output, bytes of logs); the dispatcher renders the body when it delivers it,
//! from the prediction's latest state cut back to that point. Output and logs only
//! ever grow, so the receiver gets exactly what the row would have carried.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::record::Record;

/// The key of a row body that is a point to render, not a body: no Cog response
/// has it.
const KEY: &str = "hearth.cog_point";

/// How far a prediction had got when an intermediate event was queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    /// Output chunks (`None`: no output yet, so the body has no `output`).
    pub output: Option<usize>,
    /// Bytes of logs.
    pub logs: usize,
}

impl Point {
    pub fn of(r: &Record) -> Self {
        Self {
            output: r.prediction.output.as_ref().map(Vec::len),
            logs: r.prediction.logs.len(),
        }
    }

    /// What the outbox stores in place of the body (a few dozen bytes).
    pub fn to_row_body(self) -> String {
        json!({ KEY: self }).to_string()
    }

    /// The point a row body holds, if it is one.
    pub fn from_row_body(body: &str) -> Option<Self> {
        // Cheap refusal of real bodies, which can be long.
        if !body.starts_with("{\"hearth.cog_point\"") {
            return None;
        }
        let v: Value = serde_json::from_str(body).ok()?;
        serde_json::from_value(v.get(KEY)?.clone()).ok()
    }

    /// Cog's body for the prediction as it was at this point, from a later state of
    /// it; `None` when `latest` has not got this far (a replica's copy behind its
    /// owner's), so the caller tries again later.
    pub fn render(self, latest: &Record) -> Option<String> {
        let p = &latest.prediction;
        let logs = p.logs.get(..self.logs)?;
        let output = match self.output {
            Some(n) => Some(p.output.as_ref()?.get(..n)?),
            None => None,
        };
        // `cog_shape::response` of the running prediction: processing, metrics `{}`
        // until the end, no error.
        let mut o = Map::new();
        o.insert("id".into(), json!(p.id));
        o.insert("logs".into(), json!(logs));
        o.insert("metrics".into(), json!({}));
        o.insert("status".into(), json!("processing"));
        if let Some(out) = output {
            o.insert("output".into(), json!(out));
        }
        Some(Value::Object(o).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Prediction, Status};

    fn record(output: Option<Vec<&str>>, logs: &str, status: Status) -> Record {
        Record {
            prediction: Prediction {
                id: "p1".into(),
                model: "m/n".into(),
                version: "v".into(),
                input: json!({}),
                logs: logs.into(),
                output: output.map(|o| o.into_iter().map(String::from).collect()),
                error: None,
                status,
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
    fn a_point_renders_what_the_prediction_was_then() {
        let then = record(Some(vec!["a", "b"]), "l1\n", Status::Processing);
        let point = Point::of(&then);
        let row = point.to_row_body();
        assert!(row.len() < 64, "{row}");
        assert_eq!(Point::from_row_body(&row), Some(point));
        let mut later = record(Some(vec!["a", "b", "c"]), "l1\nl2\n", Status::Succeeded);
        later.prediction.metrics = Some(json!({"predict_time": 1.0}));
        let want = crate::cog_shape::response(&then).to_string();
        assert_eq!(point.render(&later).as_deref(), Some(want.as_str()));
        // Behind the point: not rendered.
        let behind = record(Some(vec!["a"]), "l1\n", Status::Processing);
        assert_eq!(point.render(&behind), None);
        // Before any output, no `output` key, as Cog's.
        let start = record(None, "", Status::Processing);
        let p0 = Point::of(&start);
        assert_eq!(
            p0.render(&later).unwrap(),
            crate::cog_shape::response(&start).to_string()
        );
    }

    #[test]
    fn real_bodies_are_not_points() {
        assert_eq!(Point::from_row_body(r#"{"id":"x","logs":""}"#), None);
        assert_eq!(Point::from_row_body(r#"{"hearth.cog_point": 5}"#), None);
    }
}
