//! Structured outputs in OpenAI requests: chat's `response_format` (`json_object`,
//! `json_schema`) and, on `/v1/completions`, vLLM's extra fields `guided_json`,
//! `guided_regex`, `guided_choice` and `guided_grammar`. Parsing here; compiling (which
//! can refuse the schema, naming the keyword) is `compile`, off the async threads.

use std::sync::Arc;

use hearth_runtime::{Constraint, ConstraintSpec};
use serde_json::{Map, Value};

use super::{OaiError, OaiResult};
use crate::models::ServedModel;

/// A constraint as the request states it, and the field errors name.
pub type Requested = Option<(ConstraintSpec, &'static str)>;

fn present<'a>(o: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    o.get(k).filter(|v| !v.is_null())
}

/// Chat's `response_format`.
pub fn response_format(o: &Map<String, Value>) -> OaiResult<Requested> {
    const F: &str = "response_format";
    let Some(rf) = present(o, F) else {
        return Ok(None);
    };
    let kind = rf
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| OaiError::param(F, "expected an object with a \"type\""))?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some((ConstraintSpec::JsonObject, F))),
        "json_schema" => {
            let js = rf
                .get("json_schema")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    OaiError::param(
                        "response_format.json_schema",
                        "required: an object with \"name\" and \"schema\"",
                    )
                })?;
            if js.get("name").and_then(Value::as_str).is_none() {
                return Err(OaiError::param(
                    "response_format.json_schema.name",
                    "required: a string",
                ));
            }
            // Absent means any JSON value, as OpenAI has it; `strict` changes nothing
            // here: every schema hearth accepts is enforced exactly.
            let schema = js
                .get("schema")
                .cloned()
                .unwrap_or(Value::Object(Map::new()));
            Ok(Some((
                ConstraintSpec::JsonSchema(schema),
                "response_format.json_schema.schema",
            )))
        }
        other => Err(OaiError::param(
            F,
            format!(
                "unknown type {other:?}; expected \"text\", \"json_object\" or \"json_schema\""
            ),
        )),
    }
}

/// vLLM's `guided_*` extra fields on `/v1/completions`; at most one.
pub fn guided(o: &Map<String, Value>) -> OaiResult<Requested> {
    let mut found: Requested = None;
    let mut set = |spec: ConstraintSpec, field: &'static str| {
        if let Some((_, other)) = &found {
            return Err(OaiError::param(
                field,
                format!("only one of the guided_* fields may be given; {other} is too"),
            ));
        }
        found = Some((spec, field));
        Ok(())
    };
    if let Some(v) = present(o, "guided_json") {
        let schema = match v {
            Value::String(s) => serde_json::from_str(s)
                .map_err(|e| OaiError::param("guided_json", format!("not a JSON Schema: {e}")))?,
            Value::Object(_) | Value::Bool(_) => v.clone(),
            _ => return Err(OaiError::param("guided_json", "expected a JSON Schema")),
        };
        set(ConstraintSpec::JsonSchema(schema), "guided_json")?;
    }
    if let Some(v) = present(o, "guided_regex") {
        let rx = v
            .as_str()
            .ok_or_else(|| OaiError::param("guided_regex", "expected a string"))?;
        set(ConstraintSpec::Regex(rx.into()), "guided_regex")?;
    }
    if let Some(v) = present(o, "guided_choice") {
        let list = v
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|c| c.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| OaiError::param("guided_choice", "expected a list of strings"))?;
        set(ConstraintSpec::Choice(list), "guided_choice")?;
    }
    if let Some(v) = present(o, "guided_grammar") {
        let g = v
            .as_str()
            .ok_or_else(|| OaiError::param("guided_grammar", "expected a string"))?;
        set(ConstraintSpec::Lark(g.into()), "guided_grammar")?;
    }
    Ok(found)
}

/// Compiles the request's constraint for the model on a blocking thread; a 400 naming
/// the field (and keyword) when it cannot be enforced.
pub async fn compile(
    model: &Arc<ServedModel>,
    requested: &Requested,
) -> OaiResult<Option<Constraint>> {
    let Some((spec, field)) = requested.clone() else {
        return Ok(None);
    };
    let compiler = model.engine.constraints().clone();
    tokio::task::spawn_blocking(move || compiler.compile(&spec, field))
        .await
        .map_err(OaiError::internal)?
        .map(Some)
        .map_err(|e| OaiError::from_runtime(e, field))
}
