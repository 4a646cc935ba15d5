//! Structured outputs on the Replicate and Cog routes: the `json_schema`, `regex` and
//! `grammar` inputs of a language model, compiled at create so a schema that cannot be
//! enforced is a 422 naming the input (and the keyword and its path), and a prediction
//! that ran out of tokens before its constraint was complete says so in its logs.

use std::sync::Arc;

use hearth_runtime::{Constraint, ConstraintSpec, FinishReason};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::models::ServedModel;

/// The inputs that constrain the output, in the order they are looked for.
pub const INPUTS: [&str; 3] = ["json_schema", "regex", "grammar"];

/// The constraint the (type-checked) inputs ask for; an empty string is "none".
pub fn requested(
    merged: &Map<String, Value>,
) -> Result<Option<(ConstraintSpec, &'static str)>, ApiError> {
    let given: Vec<&'static str> = INPUTS
        .into_iter()
        .filter(|k| match merged.get(*k) {
            None | Some(Value::Null) => false,
            Some(Value::String(s)) => !s.trim().is_empty(),
            Some(_) => true,
        })
        .collect();
    if given.len() > 1 {
        return Err(ApiError::invalid_at(
            &["input", given[1]],
            format!(
                "only one of json_schema, regex and grammar may be given; {} is too",
                given[0]
            ),
        ));
    }
    let Some(&name) = given.first() else {
        return Ok(None);
    };
    let value = &merged[name];
    let spec = match (name, value) {
        ("json_schema", Value::String(s)) => {
            let schema = serde_json::from_str(s).map_err(|e| {
                ApiError::invalid_at(&["input", name], format!("not valid JSON: {e}"))
            })?;
            ConstraintSpec::JsonSchema(schema)
        }
        ("json_schema", v) => ConstraintSpec::JsonSchema(v.clone()),
        ("regex", v) => ConstraintSpec::Regex(v.as_str().unwrap_or_default().into()),
        (_, v) => ConstraintSpec::Lark(v.as_str().unwrap_or_default().into()),
    };
    Ok(Some((spec, name)))
}

/// Compiles on a blocking thread: a 422 at `input.<name>` when it cannot be enforced.
pub async fn compile(
    model: &Arc<ServedModel>,
    requested: Option<(ConstraintSpec, &'static str)>,
) -> Result<Option<Constraint>, ApiError> {
    let Some((spec, name)) = requested else {
        return Ok(None);
    };
    let compiler = model.engine.constraints().clone();
    let compiled = tokio::task::spawn_blocking(move || compiler.compile(&spec, name))
        .await
        .map_err(ApiError::internal)?;
    compiled.map(Some).map_err(ApiError::from)
}

/// A logs line for a constrained prediction that stopped by length: its output is
/// valid so far but incomplete. None otherwise.
pub fn incomplete_note(input: &Value, reason: FinishReason) -> Option<&'static str> {
    let constrained = INPUTS.iter().any(|k| match input.get(*k) {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => !s.trim().is_empty(),
        Some(_) => true,
    });
    (constrained && reason == FinishReason::Length).then_some(
        "Output incomplete: max_tokens (or the context) ran out before the output matched its json_schema/regex/grammar; it is a valid prefix, not a complete match.\n",
    )
}
