//! OpenAI's tool calling on chat: `tools`, `tool_choice`, `parallel_tool_calls`, and
//! tool calls and results in the conversation.
//!
//! When the model's chat template has a tool syntax of its own (Llama 3.x, Qwen2/3's
//! `<tool_call>`, Mistral's `[TOOL_CALLS]`: runtime's tool_syntax.rs, detected from the
//! template's text), the template renders the tools (its `tools` variable), the calls
//! in history and the tool results, and the model's calls are written and parsed in
//! that syntax. Otherwise (SmolLM2's template has none) the model is told about the
//! functions in a system message, Hermes-style: signatures in `<tools>`, each call as
//! `<tool_call>{"name", "arguments"}</tool_call>`, results in `<tool_response>`.
//!
//! Decoding is constrained (tool_grammar.rs in the runtime): a forced call
//! (`required`, a named function) is nothing but calls whose arguments match the
//! function's schema; with `auto` the model answers in text or starts a call, and a
//! started call is held to the grammar. The output is parsed back into
//! `message.tool_calls`.

use hearth_runtime::tool_grammar::{valid_function_name, ToolCallGrammar, MAX_PARALLEL_CALLS};
use hearth_runtime::tool_syntax::ToolSyntax;
use hearth_runtime::{ChatMessage, ConstraintSpec};
use serde_json::{json, Map, Value};

use super::{OaiError, OaiResult};

/// Most functions one request may offer.
pub const MAX_TOOLS: usize = 128;
/// Largest `tools` list, as JSON.
pub const MAX_TOOLS_BYTES: usize = 256 * 1024;

/// What `tool_choice` asks for, when the model is to see the tools at all.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    Auto,
    Required,
    Named(String),
}

/// The request's tools, validated.
#[derive(Debug, Clone)]
pub struct ToolUse {
    /// `{"type": "function", "function": {...}}` per tool, as the preamble lists them.
    pub tools: Vec<Value>,
    pub choice: ToolChoice,
    pub parallel: bool,
    /// The constraint decoding follows.
    pub grammar: ToolCallGrammar,
}

fn present<'a>(o: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    o.get(k).filter(|v| !v.is_null())
}

fn function(tool: &Value, at: &str) -> OaiResult<(String, Value, Value)> {
    let t = tool
        .as_object()
        .ok_or_else(|| OaiError::param(at, "expected an object"))?;
    match t.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(other) => {
            return Err(OaiError::unsupported(
                &format!("{at}.type"),
                format!("tools of type {other:?} are not supported; only \"function\""),
            ))
        }
        None => {
            return Err(OaiError::param(
                format!("{at}.type"),
                "required: \"function\"",
            ))
        }
    }
    let f = t
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| OaiError::param(format!("{at}.function"), "required: an object"))?;
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| OaiError::param(format!("{at}.function.name"), "required: a string"))?;
    if !valid_function_name(name) {
        return Err(OaiError::param(
            format!("{at}.function.name"),
            format!("{name:?} must be 1 to 64 of a-z, A-Z, 0-9, _ and -"),
        ));
    }
    if present(f, "description").is_some_and(|d| !d.is_string()) {
        return Err(OaiError::param(
            format!("{at}.function.description"),
            "expected a string",
        ));
    }
    if present(f, "strict").is_some_and(|d| !d.is_boolean()) {
        return Err(OaiError::param(
            format!("{at}.function.strict"),
            "expected a boolean",
        ));
    }
    // Absent: a function without arguments, as OpenAI has it.
    let params = match present(f, "parameters") {
        None => json!({"type": "object", "properties": {}}),
        Some(p @ (Value::Object(_) | Value::Bool(_))) => p.clone(),
        Some(_) => {
            return Err(OaiError::param(
                format!("{at}.function.parameters"),
                "expected a JSON Schema object",
            ))
        }
    };
    // Checked here too so that the refusal names the tool; compiling checks again.
    if let Err(e) = hearth_runtime::schema_check::check_schema(&params) {
        return Err(OaiError::param(format!("{at}.function.parameters"), e));
    }
    let mut listed = Map::new();
    listed.insert("name".into(), json!(name));
    if let Some(d) = present(f, "description") {
        listed.insert("description".into(), d.clone());
    }
    listed.insert("parameters".into(), params.clone());
    Ok((
        name.to_string(),
        params,
        json!({"type": "function", "function": listed}),
    ))
}

/// `tools`, `tool_choice` and `parallel_tool_calls`; `None` when the model is not to
/// see tools (none given, or `tool_choice: "none"`).
pub fn parse(o: &Map<String, Value>) -> OaiResult<Option<ToolUse>> {
    for k in ["functions", "function_call"] {
        if present(o, k).is_some() {
            return Err(OaiError::unsupported(
                k,
                "the deprecated functions API is not supported; use tools and tool_choice",
            ));
        }
    }
    let list = match present(o, "tools") {
        None => &Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(OaiError::param("tools", "expected a list of tools")),
    };
    if list.len() > MAX_TOOLS {
        return Err(OaiError::param(
            "tools",
            format!("{} tools; at most {MAX_TOOLS}", list.len()),
        ));
    }
    let size = present(o, "tools").map_or(0, |t| t.to_string().len());
    if size > MAX_TOOLS_BYTES {
        return Err(OaiError::param(
            "tools",
            format!("{size} bytes of tools; at most {MAX_TOOLS_BYTES}"),
        ));
    }
    let mut functions: Vec<(String, Value)> = Vec::with_capacity(list.len());
    let mut listed = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let (name, params, shown) = function(t, &format!("tools[{i}]"))?;
        if functions.iter().any(|(n, _)| *n == name) {
            return Err(OaiError::param(
                format!("tools[{i}].function.name"),
                format!("{name:?} is given twice"),
            ));
        }
        functions.push((name, params));
        listed.push(shown);
    }
    let choice = match present(o, "tool_choice") {
        None if functions.is_empty() => return Ok(None),
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => return Ok(None),
            "auto" if functions.is_empty() => return Ok(None),
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(OaiError::param(
                    "tool_choice",
                    format!(
                        "{other:?} is not \"none\", \"auto\", \"required\" or a named function"
                    ),
                ))
            }
        },
        Some(Value::Object(c)) => {
            if c.get("type").and_then(Value::as_str) != Some("function") {
                return Err(OaiError::param(
                    "tool_choice.type",
                    "expected \"function\"",
                ));
            }
            let name = c
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| OaiError::param("tool_choice.function.name", "required"))?;
            ToolChoice::Named(name.to_string())
        }
        Some(_) => {
            return Err(OaiError::param(
                "tool_choice",
                "expected \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
            ))
        }
    };
    if functions.is_empty() {
        return Err(OaiError::param(
            "tool_choice",
            "a call is required but no tools are given",
        ));
    }
    let parallel = match present(o, "parallel_tool_calls") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(OaiError::param("parallel_tool_calls", "expected a boolean")),
    };
    let grammar = match &choice {
        ToolChoice::Named(name) => {
            let Some(f) = functions.iter().find(|(n, _)| n == name) else {
                return Err(OaiError::param(
                    "tool_choice.function.name",
                    format!("{name:?} is not one of the tools"),
                ));
            };
            ToolCallGrammar {
                functions: vec![f.clone()],
                allow_text: false,
                parallel: false,
                syntax: ToolSyntax::Hermes,
            }
        }
        c => ToolCallGrammar {
            functions,
            allow_text: *c == ToolChoice::Auto,
            parallel,
            syntax: ToolSyntax::Hermes,
        },
    };
    Ok(Some(ToolUse {
        tools: listed,
        choice,
        parallel,
        grammar,
    }))
}

impl ToolUse {
    /// The calls' grammar in `syntax`.
    pub fn constraint(&self, syntax: ToolSyntax) -> ConstraintSpec {
        ConstraintSpec::ToolCalls(ToolCallGrammar {
            syntax,
            ..self.grammar.clone()
        })
    }

    /// The system message's text that describes the tools.
    pub fn preamble(&self) -> String {
        let mut s = String::from(
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
             You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
        );
        for t in &self.tools {
            s.push('\n');
            s.push_str(&t.to_string());
        }
        s.push_str(
            "\n</tools>\n\nFor each function call, return a json object with function name and \
             arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
             {\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
        );
        match &self.choice {
            ToolChoice::Auto => {}
            ToolChoice::Required => s.push_str("\n\nCall a function now."),
            ToolChoice::Named(n) => s.push_str(&format!("\n\nCall the function {n:?} now.")),
        }
        s
    }

    /// The preamble in the conversation: appended to a leading system message, or one
    /// of its own before the first.
    pub fn add_preamble(&self, messages: &mut Vec<ChatMessage>) {
        let preamble = self.preamble();
        match messages.first_mut() {
            Some(m) if m.role == "system" => {
                if !m.content.is_empty() {
                    m.content.push_str("\n\n");
                }
                m.content.push_str(&preamble);
            }
            _ => messages.insert(0, ChatMessage::new("system", preamble)),
        }
    }
}

/// One call as the Hermes fallback writes it.
fn hermes_call_text(name: &str, arguments: &Value) -> String {
    format!(
        "<tool_call>\n{}\n</tool_call>",
        json!({"name": name, "arguments": arguments})
    )
}

/// An assistant message's `tool_calls`, checked, as templates take them: each
/// `{"id", "type": "function", "function": {"name", "arguments": {...}}}` with the
/// arguments parsed from their JSON text.
pub fn assistant_calls(calls: &Value, at: &str) -> OaiResult<Vec<Value>> {
    let list = calls
        .as_array()
        .ok_or_else(|| OaiError::param(at, "expected a list of tool calls"))?;
    if list.len() > MAX_PARALLEL_CALLS * 4 {
        return Err(OaiError::param(
            at,
            format!(
                "{} tool calls; at most {}",
                list.len(),
                MAX_PARALLEL_CALLS * 4
            ),
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (j, c) in list.iter().enumerate() {
        let at = format!("{at}[{j}]");
        let f = c
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| OaiError::param(format!("{at}.function"), "required: an object"))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| OaiError::param(format!("{at}.function.name"), "required: a string"))?;
        let arguments = match f.get("arguments") {
            Some(Value::String(s)) => serde_json::from_str::<Value>(s).map_err(|e| {
                OaiError::param(format!("{at}.function.arguments"), format!("not JSON: {e}"))
            })?,
            _ => {
                return Err(OaiError::param(
                    format!("{at}.function.arguments"),
                    "required: a string of JSON",
                ))
            }
        };
        let id = match c.get("id") {
            None | Some(Value::Null) => format!("call_{j}"),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(OaiError::param(format!("{at}.id"), "expected a string")),
        };
        out.push(json!({
            "id": id, "type": "function",
            "function": {"name": name, "arguments": arguments},
        }));
    }
    Ok(out)
}

/// The conversation and the template's `tools` as the model is to see them. With a
/// template tool syntax (`native`) the template renders tools, calls and results
/// itself; otherwise they are written out Hermes-style: the tools in a system
/// message, calls after the assistant's text, results in a user turn.
pub fn for_template(
    messages: &[ChatMessage],
    tools: Option<&ToolUse>,
    native: Option<ToolSyntax>,
) -> (Vec<ChatMessage>, Option<Vec<Value>>) {
    if let Some(syntax) = native {
        let id = |v: &str| syntax.template_call_id(v);
        let out = messages
            .iter()
            .map(|m| {
                let mut m = m.clone();
                if let Some(calls) = m.tool_calls.as_mut() {
                    for c in calls.iter_mut() {
                        if let Some(v) = c.get("id").and_then(Value::as_str).map(id) {
                            c["id"] = json!(v);
                        }
                    }
                }
                m.tool_call_id = m.tool_call_id.as_deref().map(id);
                m
            })
            .collect();
        return (out, tools.map(|t| t.tools.clone()));
    }
    let mut out: Vec<ChatMessage> = messages
        .iter()
        .map(|m| {
            if m.role == "tool" {
                return ChatMessage::new(
                    "user",
                    format!("<tool_response>\n{}\n</tool_response>", m.content),
                );
            }
            let mut content = m.content.clone();
            for c in m.tool_calls.iter().flatten() {
                let f = &c["function"];
                if !content.is_empty() {
                    content.push('\n');
                }
                content.push_str(&hermes_call_text(
                    f["name"].as_str().unwrap_or_default(),
                    &f["arguments"],
                ));
            }
            ChatMessage::new(m.role.clone(), content)
        })
        .collect();
    if let Some(t) = tools {
        t.add_preamble(&mut out);
    }
    (out, None)
}

/// The calls as `message.tool_calls` (or a stream's delta, with `index`), each with a
/// fresh id.
pub fn render_calls(calls: &[(String, String)], with_index: bool) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(k, (name, arguments))| {
            let mut v = json!({
                "id": format!("call_{}", crate::record::new_id()),
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            });
            if with_index {
                v["index"] = json!(k);
            }
            v
        })
        .collect()
}

/// A stream's text held back per choice while it may still become tool calls (with
/// tools on the request, in `syntax`): the calls go out whole once the choice
/// finishes, text as soon as it cannot be a call.
pub struct CallHold {
    syntax: ToolSyntax,
    /// Per choice: the text held back, or `None` once the choice is known to be text.
    held: Vec<Option<String>>,
}

impl CallHold {
    pub fn new(syntax: Option<ToolSyntax>, choices: usize) -> Self {
        Self {
            syntax: syntax.unwrap_or(ToolSyntax::Hermes),
            held: (0..choices)
                .map(|_| syntax.is_some().then(String::new))
                .collect(),
        }
    }

    /// The text of choice `i` to send now.
    pub fn push(&mut self, i: usize, text: &str) -> String {
        let Some(buf) = self.held.get_mut(i).and_then(Option::as_mut) else {
            return text.to_string();
        };
        buf.push_str(text);
        if self.syntax.may_be_call(buf) {
            return String::new();
        }
        let out = std::mem::take(buf);
        self.held[i] = None;
        out
    }

    /// At the choice's end: the text still to send, or the calls when the answer is
    /// calls that finished (not cut short by length).
    pub fn finish(
        &mut self,
        i: usize,
        trailing: &str,
        finish_reason: &str,
    ) -> (String, Option<Vec<(String, String)>>) {
        let Some(mut buf) = self.held.get_mut(i).and_then(Option::take) else {
            return (trailing.to_string(), None);
        };
        buf.push_str(trailing);
        match self
            .syntax
            .parse_calls(&buf)
            .filter(|_| finish_reason == "stop")
        {
            Some(calls) => (String::new(), Some(calls)),
            None => (buf, None),
        }
    }
}

#[cfg(test)]
#[path = "tools_tests.rs"]
mod tests;
