//! How a model writes a tool call, read from its chat template's text (never from the
//! model's name): the template that renders calls in history is the one the model was
//! trained to write them in.
//!
//! - Hermes (Qwen2/2.5/3, Hermes): `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`,
//!   one block per call. Also hearth's fallback for templates with no tool syntax.
//! - Llama 3.1/3.2/3.3: `{"name": ..., "parameters": {...}}`, bare or after
//!   `<|python_tag|>`; several calls separated by `; ` (as vLLM's parser reads them).
//! - Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.
//!
//! A trigger that is a special token of the vocabulary (`<|python_tag|>`,
//! `[TOOL_CALLS]`) vanishes from decoded text, so parsing accepts a call with or
//! without it.

use serde_json::Value;

/// The tool-call syntax of a chat template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum ToolSyntax {
    Hermes,
    Llama3,
    Mistral,
}

/// Mistral's templates refuse tool call ids that are not 9 letters or digits.
pub const MISTRAL_ID_LEN: usize = 9;

impl ToolSyntax {
    /// The syntax a chat template renders tool calls in; `None` when it has none (the
    /// tools then go in a system message, Hermes-style).
    pub fn detect(template: &str) -> Option<ToolSyntax> {
        if !template.contains("tool") {
            return None;
        }
        if template.contains("[TOOL_CALLS]") {
            Some(ToolSyntax::Mistral)
        } else if template.contains("<tool_call>") {
            Some(ToolSyntax::Hermes)
        } else if template.contains("<|python_tag|>")
            || (template.contains("<|start_header_id|>") && template.contains("\"parameters\""))
        {
            Some(ToolSyntax::Llama3)
        } else {
            None
        }
    }

    /// The text that opens the calls.
    pub fn trigger(self) -> &'static str {
        match self {
            ToolSyntax::Hermes => "<tool_call>",
            ToolSyntax::Llama3 => "<|python_tag|>",
            ToolSyntax::Mistral => "[TOOL_CALLS]",
        }
    }

    /// The key the arguments go under.
    pub fn arguments_key(self) -> &'static str {
        match self {
            ToolSyntax::Llama3 => "parameters",
            _ => "arguments",
        }
    }

    /// The calls in a finished answer: `(name, arguments as JSON text)`; `None` when
    /// the text is not calls (an answer in text, or one cut short).
    pub fn parse_calls(self, text: &str) -> Option<Vec<(String, String)>> {
        let text = text.trim();
        match self {
            ToolSyntax::Hermes => parse_hermes(text),
            ToolSyntax::Llama3 => {
                let mut rest = text.strip_prefix(self.trigger()).unwrap_or(text).trim();
                let mut calls = Vec::new();
                loop {
                    let mut it = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
                    let v = it.next()?.ok()?;
                    calls.push(call_of(&v, self.arguments_key())?);
                    rest = rest[it.byte_offset()..].trim_start();
                    if rest.is_empty() {
                        return Some(calls);
                    }
                    rest = rest.strip_prefix(';')?.trim_start();
                }
            }
            ToolSyntax::Mistral => {
                let rest = text.strip_prefix(self.trigger()).unwrap_or(text).trim();
                match serde_json::from_str::<Value>(rest).ok()? {
                    Value::Array(list) if !list.is_empty() => list
                        .iter()
                        .map(|v| call_of(v, self.arguments_key()))
                        .collect(),
                    _ => None,
                }
            }
        }
    }

    /// Whether `text`, an answer's start, may yet become calls. A stream holds such
    /// text back until it knows.
    pub fn may_be_call(self, text: &str) -> bool {
        let t = text.trim_start();
        let opens = |open: &str| open.starts_with(t) || t.starts_with(open);
        match self {
            ToolSyntax::Hermes => opens(self.trigger()),
            // The special-token trigger may have vanished in decoding.
            ToolSyntax::Llama3 => opens(self.trigger()) || opens("{"),
            ToolSyntax::Mistral => opens(self.trigger()) || opens("["),
        }
    }

    /// A tool call id as the template takes it (Mistral's: exactly 9 letters or digits,
    /// derived from the client's id so that a call and its result still match).
    pub fn template_call_id(self, id: &str) -> String {
        match self {
            ToolSyntax::Mistral => {
                let alnum: String = id.chars().filter(char::is_ascii_alphanumeric).collect();
                if alnum.len() == MISTRAL_ID_LEN {
                    return alnum;
                }
                use sha2::Digest;
                let h = sha2::Sha256::digest(id.as_bytes());
                const ALPHABET: &[u8] =
                    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
                h.iter()
                    .take(MISTRAL_ID_LEN)
                    .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
                    .collect()
            }
            _ => id.to_string(),
        }
    }
}

fn call_of(v: &Value, key: &str) -> Option<(String, String)> {
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = v.get(key)?;
    arguments.is_object().then(|| (name, arguments.to_string()))
}

fn parse_hermes(text: &str) -> Option<Vec<(String, String)>> {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let mut rest = text;
    if !rest.starts_with(OPEN) {
        return None;
    }
    let mut calls = Vec::new();
    while !rest.is_empty() {
        let body = rest.strip_prefix(OPEN)?;
        let end = body.find(CLOSE)?;
        let v: Value = serde_json::from_str(body[..end].trim()).ok()?;
        calls.push(call_of(&v, "arguments")?);
        rest = body[end + CLOSE.len()..].trim_start();
    }
    Some(calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_each_syntax_from_template_text() {
        assert_eq!(
            ToolSyntax::detect("{% for tool in tools %}<tool_call>{% endfor %}"),
            Some(ToolSyntax::Hermes)
        );
        assert_eq!(
            ToolSyntax::detect("{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]"),
            Some(ToolSyntax::Mistral)
        );
        assert_eq!(
            ToolSyntax::detect(
                "<|start_header_id|>{% if tools %}{\"name\": ..., \"parameters\": ...}{% endif %}"
            ),
            Some(ToolSyntax::Llama3)
        );
        assert_eq!(
            ToolSyntax::detect("{{ tools }}<|python_tag|>"),
            Some(ToolSyntax::Llama3)
        );
        // SmolLM2's: ChatML, no tools.
        assert_eq!(
            ToolSyntax::detect("{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}"),
            None
        );
    }

    #[test]
    fn parses_each_syntax_with_and_without_its_trigger() {
        let want = Some(vec![("f".to_string(), "{\"a\":1}".to_string())]);
        assert_eq!(
            ToolSyntax::Hermes.parse_calls(
                "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>"
            ),
            want
        );
        for t in [
            "<|python_tag|>{\"name\": \"f\", \"parameters\": {\"a\": 1}}",
            " {\"name\": \"f\", \"parameters\": {\"a\": 1}}",
        ] {
            assert_eq!(ToolSyntax::Llama3.parse_calls(t), want, "{t}");
        }
        assert_eq!(
            ToolSyntax::Llama3
                .parse_calls(
                    "{\"name\": \"f\", \"parameters\": {}}; {\"name\": \"g\", \"parameters\": {}}"
                )
                .map(|c| c.len()),
            Some(2)
        );
        for t in [
            "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"a\": 1}}]",
            "[{\"name\": \"f\", \"arguments\": {\"a\": 1}}]",
        ] {
            assert_eq!(ToolSyntax::Mistral.parse_calls(t), want, "{t}");
        }
        assert_eq!(ToolSyntax::Llama3.parse_calls("Hello"), None);
        assert_eq!(
            ToolSyntax::Llama3.parse_calls("{\"name\": \"f\", \"parameters\": {}} and more"),
            None
        );
        assert_eq!(ToolSyntax::Mistral.parse_calls("[]"), None);
        assert_eq!(
            ToolSyntax::Mistral.parse_calls("[TOOL_CALLS][{\"name\": \"f\", \"argu"),
            None
        );
        assert!(ToolSyntax::Llama3.may_be_call("<|py") && ToolSyntax::Llama3.may_be_call("{\"na"));
        assert!(!ToolSyntax::Llama3.may_be_call("Sure"));
        assert!(ToolSyntax::Mistral.may_be_call("[TOOL") && !ToolSyntax::Mistral.may_be_call("No"));
    }

    #[test]
    fn mistral_ids_are_nine_alphanumerics_and_stable() {
        let a = ToolSyntax::Mistral.template_call_id("call_0123456789abcdef");
        assert_eq!(a.len(), 9);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(
            a,
            ToolSyntax::Mistral.template_call_id("call_0123456789abcdef")
        );
        assert_eq!(
            ToolSyntax::Mistral.template_call_id("abcDEF123"),
            "abcDEF123"
        );
        assert_eq!(ToolSyntax::Hermes.template_call_id("call_x"), "call_x");
    }
}
