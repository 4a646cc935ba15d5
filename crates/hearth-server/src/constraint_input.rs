//! Structured outputs on the Replicate and Cog routes: the `json_schema`, `regex` and
//! `grammar` inputs of a language model, compiled at create so a schema that cannot be
//! enforced is a 422 naming the input (and the keyword and its path), and a prediction
//! that ran out of tokens before its constraint was complete says so in its logs.

use std::sync::Arc;

use hearth_runtime::{Constraint, ConstraintSpec, FinishReason, PromptSpec};
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
/// `prompt` is the prediction's: whether the chat template renders it decides whether
/// a `<think>` block comes first.
pub async fn compile(
    model: &Arc<ServedModel>,
    requested: Option<(ConstraintSpec, &'static str)>,
    prompt: &PromptSpec,
) -> Result<Option<Constraint>, ApiError> {
    let thinks = model.engine.tokenizer().thinks();
    let Some((spec, name)) = after_thinking(requested, prompt, thinks) else {
        return Ok(None);
    };
    let compiler = model.engine.constraints().clone();
    let compiled = tokio::task::spawn_blocking(move || compiler.compile(&spec, name))
        .await
        .map_err(ApiError::internal)?;
    compiled.map(Some).map_err(ApiError::from)
}

/// With a Qwen3-style template the model thinks first: the constraint applies after
/// its `<think>` block, as on the OpenAI routes (a schema from the first token would
/// forbid the block the template asks for). Only when the chat template renders the
/// prompt: a `prompt_template` or a raw prompt has no thinking turn.
fn after_thinking(
    requested: Option<(ConstraintSpec, &'static str)>,
    prompt: &PromptSpec,
    template_thinks: bool,
) -> Option<(ConstraintSpec, &'static str)> {
    if !template_thinks || prompt.raw || prompt.prompt_template.is_some() {
        return requested;
    }
    requested.map(|(spec, name)| (ConstraintSpec::AfterThinking(Box::new(spec)), name))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Option<(ConstraintSpec, &'static str)> {
        Some((ConstraintSpec::Regex("[0-9]+".into()), "regex"))
    }

    #[test]
    fn a_thinking_chat_template_puts_the_constraint_after_the_block() {
        let chat = PromptSpec {
            prompt: "hi".into(),
            ..Default::default()
        };
        let Some((ConstraintSpec::AfterThinking(inner), "regex")) =
            after_thinking(schema(), &chat, true)
        else {
            panic!("not wrapped");
        };
        assert!(matches!(*inner, ConstraintSpec::Regex(ref r) if r == "[0-9]+"));
        // No thinking turn: a template that does not think, a prompt_template, raw.
        let templated = PromptSpec {
            prompt_template: Some("{prompt}".into()),
            ..chat.clone()
        };
        let raw = PromptSpec {
            raw: true,
            ..chat.clone()
        };
        for (prompt, thinks) in [(&chat, false), (&templated, true), (&raw, true)] {
            assert!(matches!(
                after_thinking(schema(), prompt, thinks),
                Some((ConstraintSpec::Regex(_), "regex"))
            ));
        }
        assert!(after_thinking(None, &chat, true).is_none());
    }
}
