//! The grammar of a tool call, Hermes-style as Qwen2/3 and Hermes models write it:
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! the arguments constrained by the function's JSON Schema. When the call is forced
//! the output is nothing but calls; when the model may choose (`tool_choice: "auto"`)
//! it is either free text that does not start with `<tool_call>`, or calls: once the
//! trigger is written, the rest is held to the grammar, so a call the model starts is
//! always one that parses and validates.
//!
//! A model whose chat template has a tool syntax of its own (tool_syntax.rs) gets its
//! calls in that syntax: Llama 3's `{"name", "parameters"}` after an optional
//! `<|python_tag|>`, Mistral's `[TOOL_CALLS][...]`. A trigger that is one special
//! token of the vocabulary is written as that token.

use serde_json::{json, Value};

use crate::tool_syntax::ToolSyntax;

/// The opening and closing tags of one call.
pub const CALL_OPEN: &str = "<tool_call>";
pub const CALL_CLOSE: &str = "</tool_call>";

/// Most calls one answer may make when parallel calls are allowed.
pub const MAX_PARALLEL_CALLS: usize = 16;

/// The functions a model may call and how.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCallGrammar {
    /// Each function's name and the JSON Schema of its arguments.
    pub functions: Vec<(String, Value)>,
    /// Text in place of calls is allowed (`auto`).
    pub allow_text: bool,
    /// More than one call is allowed (up to `MAX_PARALLEL_CALLS`).
    pub parallel: bool,
    /// How the calls are written.
    pub syntax: ToolSyntax,
}

/// A function name as OpenAI allows it: it is spliced into the grammar.
pub fn valid_function_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl ToolCallGrammar {
    /// llguidance's Lark source; an error names the function whose schema cannot be
    /// enforced (and the keyword and its path). `special` gives the id of a text that
    /// is one special token of the vocabulary.
    pub fn lark(
        &self,
        json_options: &Value,
        special: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<String, String> {
        if self.functions.is_empty() {
            return Err("no functions to call".into());
        }
        let syntax = self.syntax;
        let key = syntax.arguments_key();
        let mut rules = Vec::with_capacity(self.functions.len());
        let mut alts = Vec::with_capacity(self.functions.len());
        for (i, (name, params)) in self.functions.iter().enumerate() {
            if !valid_function_name(name) {
                return Err(format!(
                    "function name {name:?} is not [a-zA-Z0-9_-]{{1,64}}"
                ));
            }
            crate::schema_check::check_schema(params)
                .map_err(|e| format!("function {name:?}: {e}"))?;
            let schema = match params {
                Value::Bool(true) => json!({}),
                Value::Bool(false) => {
                    return Err(format!(
                        "function {name:?}: the schema `false` matches nothing"
                    ))
                }
                other => other.clone(),
            };
            let schema = crate::constraint::with_json_options(schema, json_options);
            let head = format!("{{\"name\": \"{name}\", \"{key}\": ");
            rules.push(format!(
                "fn_{i}: {} %json {schema} \"}}\"",
                lark_string(&head)
            ));
            alts.push(format!("fn_{i}"));
        }
        // Further calls after the first, when parallel calls are allowed.
        let more = |sep: &str| {
            if self.parallel {
                format!(
                    " ({} call){{0,{}}}",
                    lark_string(sep),
                    MAX_PARALLEL_CALLS - 1
                )
            } else {
                String::new()
            }
        };
        let trigger = syntax.trigger();
        let trigger_ref = match special(trigger) {
            Some(id) => format!("<[{id}]>"),
            None => lark_string(trigger),
        };
        let mut src = String::new();
        src.push_str(if self.allow_text {
            "start: TEXT | calls\n"
        } else {
            "start: calls\n"
        });
        let one = format!("({})", alts.join(" | "));
        match syntax {
            ToolSyntax::Hermes => {
                src.push_str(&format!("calls: call{}\n", more("\n")));
                src.push_str(&format!(
                    "call: {trigger_ref} \"\\n\" {one} {}\n",
                    lark_string(&format!("\n{CALL_CLOSE}")),
                ));
            }
            ToolSyntax::Llama3 => {
                src.push_str(&format!("calls: {trigger_ref}? call{}\n", more("; ")));
                src.push_str(&format!("call: {one}\n"));
            }
            ToolSyntax::Mistral => {
                src.push_str(&format!(
                    "calls: {trigger_ref} \"[\" call{} \"]\"\n",
                    more(", ")
                ));
                src.push_str(&format!("call: {one}\n"));
            }
        }
        for r in rules {
            src.push_str(&r);
            src.push('\n');
        }
        if self.allow_text {
            // Any text but one that starts the call syntax: a started call is held to
            // the call's grammar. (A special-token trigger is never part of text.)
            let starts = match syntax {
                ToolSyntax::Hermes => vec![trigger],
                ToolSyntax::Llama3 => vec![trigger, "{"],
                ToolSyntax::Mistral => vec![trigger, "["],
            };
            let not: Vec<String> = starts
                .iter()
                .map(|s| format!(" & ~/(?s:{}.*)/", regex_escape(s)))
                .collect();
            src.push_str(&format!("TEXT: /(?s:.+)/{}\n", not.concat()));
        }
        Ok(src)
    }
}

/// A literal for a regex inside Lark's `/.../` (the slash too).
fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A Lark string literal (its escapes are JSON's).
fn lark_string(s: &str) -> String {
    Value::String(s.into()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_schemas_refused_with_the_function() {
        let g = |name: &str, params: Value| ToolCallGrammar {
            functions: vec![(name.into(), params)],
            allow_text: false,
            parallel: false,
            syntax: ToolSyntax::Hermes,
        };
        let none = |_: &str| None;
        assert!(g("get weather", json!({})).lark(&json!({}), &none).is_err());
        let e = g(
            "f",
            json!({"type": "object", "properties": {"t": {"type": "array", "uniqueItems": true}}}),
        )
        .lark(&json!({}), &none)
        .unwrap_err();
        assert!(e.contains("\"f\"") && e.contains("uniqueItems"), "{e}");
        let src = g("get_weather", json!({"type": "object"}))
            .lark(&json!({}), &none)
            .unwrap();
        assert!(
            src.contains("get_weather") && !src.contains("TEXT"),
            "{src}"
        );
    }
}
