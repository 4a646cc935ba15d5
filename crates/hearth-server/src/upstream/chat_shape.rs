//! Whether a model that runs upstream only is a chat model, for the console's chat
//! view, decided from what hearth knows of it: the upstream's model document (cached,
//! `models.rs`) and its latest version's input schema. (A model served here goes by
//! its own chat template instead: `routes/models.rs`.)
//!
//! The rule, the first that applies:
//! 1. The document has `hearth.chat` (the upstream is a hearth, which knows from the
//!    model's own chat template): that decides; the conversation goes as `prompt`
//!    (or as that hearth's `hearth.chat_input` says, when the model runs further up).
//! 2. The input has `messages` of type array (OpenAI-style turns, as Replicate's
//!    hosted GPT models take them): a chat model; the conversation goes as `messages`.
//! 3. The input has `prompt` and `system_prompt`, both strings, and the model's name
//!    or description says it is tuned to chat (`instruct`, `chat`, a name ending in
//!    `-it`), as Replicate's instruct LLMs and Claude are: a chat model; the
//!    conversation goes as `prompt`.
//! 4. Anything else (a base LLM, an image model, a document without a schema): not a
//!    chat model; its playground remains.
//!
//! A model that takes one `prompt` gets earlier turns as a transcript in it (the
//! console's chat view does that); its own template then frames the whole as one
//! user turn.

use serde_json::{json, Value};

/// How the chat view sends a conversation to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatInput {
    /// `messages`: the turns as `[{role, content}]`.
    Messages,
    /// `prompt` (and `system_prompt`): one text.
    Prompt,
}

impl ChatInput {
    pub fn as_str(self) -> &'static str {
        match self {
            ChatInput::Messages => "messages",
            ChatInput::Prompt => "prompt",
        }
    }
}

/// The model document's latest version's input properties, if it has them.
fn input_properties(doc: &Value) -> Option<&serde_json::Map<String, Value>> {
    doc.pointer("/latest_version/openapi_schema/components/schemas/Input/properties")?
        .as_object()
}

fn has_type(props: &serde_json::Map<String, Value>, name: &str, ty: &str) -> bool {
    props.get(name).and_then(|p| p["type"].as_str()) == Some(ty)
}

/// Whether the name or description says the model is tuned to chat.
fn card_says_chat(doc: &Value) -> bool {
    let name = doc["name"].as_str().unwrap_or("").to_ascii_lowercase();
    let description = doc["description"]
        .as_str()
        .unwrap_or("")
        .to_ascii_lowercase();
    name.ends_with("-it")
        || [&name, &description]
            .iter()
            .any(|s| s.contains("instruct") || s.contains("chat"))
}

/// The rule above: how a conversation goes to this upstream model, or None when it is
/// not a chat model.
pub fn chat_input(doc: &Value) -> Option<ChatInput> {
    if let Some(chat) = doc["hearth"]["chat"].as_bool() {
        // A hearth whose model runs further upstream says how it takes turns.
        let input = match doc["hearth"]["chat_input"].as_str() {
            Some("messages") => ChatInput::Messages,
            _ => ChatInput::Prompt,
        };
        return chat.then_some(input);
    }
    let props = input_properties(doc)?;
    if has_type(props, "messages", "array") {
        return Some(ChatInput::Messages);
    }
    (has_type(props, "prompt", "string")
        && has_type(props, "system_prompt", "string")
        && card_says_chat(doc))
    .then_some(ChatInput::Prompt)
}

/// Writes hearth's own field into an upstream-only model's document as the front
/// answers it: `hearth.chat` as for local models, how the chat view sends a
/// conversation (`chat_input`), and the model's route. Replaces an upstream hearth's
/// own `hearth` field (its route is not this server's).
pub fn annotate(doc: &mut Value, route: &str) {
    let input = chat_input(doc);
    if let Some(obj) = doc.as_object_mut() {
        obj.insert(
            "hearth".into(),
            json!({
                "chat": input.is_some(),
                "chat_input": input.map(ChatInput::as_str),
                "route": route,
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(name: &str, description: &str, props: Value) -> Value {
        json!({
            "owner": "acme", "name": name, "description": description,
            "latest_version": {"id": "v1", "openapi_schema": {"components": {"schemas": {"Input": {
                "type": "object", "properties": props
            }}}}}
        })
    }

    #[test]
    fn the_rule_in_order() {
        let prompt_pair =
            json!({"prompt": {"type": "string"}, "system_prompt": {"type": "string"}});
        // 1: an upstream hearth's own answer wins, either way.
        let mut d = doc("llm", "a base model", prompt_pair.clone());
        d["hearth"] = json!({"chat": true});
        assert_eq!(chat_input(&d), Some(ChatInput::Prompt));
        let mut d = doc("llm-instruct", "chat", prompt_pair.clone());
        d["hearth"] = json!({"chat": false});
        assert_eq!(chat_input(&d), None);
        d["hearth"] = json!({"chat": true, "chat_input": "messages", "route": "upstream:x"});
        assert_eq!(
            chat_input(&d),
            Some(ChatInput::Messages),
            "a chain of hearths"
        );
        // 2: messages as an array, whatever the card says.
        let d = doc(
            "gpt",
            "",
            json!({"messages": {"type": "array", "items": {"type": "object"}}, "prompt": {"type": "string"}}),
        );
        assert_eq!(chat_input(&d), Some(ChatInput::Messages));
        let d = doc("gpt", "", json!({"messages": {"type": "string"}}));
        assert_eq!(chat_input(&d), None, "messages that are not an array");
        // 3: prompt and system_prompt, and a card that says chat.
        for (name, description) in [
            ("meta-llama-3-8b-instruct", ""),
            ("claude", "Anthropic's chat model"),
            ("gemma-2-9b-it", ""),
        ] {
            assert_eq!(
                chat_input(&doc(name, description, prompt_pair.clone())),
                Some(ChatInput::Prompt),
                "{name}"
            );
        }
        assert_eq!(
            chat_input(&doc("meta-llama-3-8b", "a base model", prompt_pair)),
            None
        );
        assert_eq!(
            chat_input(&doc(
                "llm-instruct",
                "",
                json!({"prompt": {"type": "string"}})
            )),
            None,
            "no system_prompt"
        );
        // 4: an image model, a document without a schema.
        assert_eq!(
            chat_input(&doc(
                "sdxl-chat",
                "",
                json!({"prompt": {"type": "string"}, "width": {"type": "integer"}})
            )),
            None
        );
        assert_eq!(chat_input(&json!({"name": "chat"})), None);
    }

    #[test]
    fn annotate_replaces_the_upstreams_field() {
        let mut d = doc(
            "x",
            "",
            json!({"messages": {"type": "array", "items": {"type": "object"}}}),
        );
        d["hearth"] = json!({"chat": false, "other": 1});
        annotate(&mut d, "upstream:hosted");
        // The upstream's hearth.chat decided (rule 1), then was replaced by the front's.
        assert_eq!(
            d["hearth"],
            json!({"chat": false, "chat_input": null, "route": "upstream:hosted"})
        );
        let mut d = doc(
            "x",
            "",
            json!({"messages": {"type": "array", "items": {"type": "object"}}}),
        );
        annotate(&mut d, "upstream:hosted");
        assert_eq!(
            d["hearth"],
            json!({"chat": true, "chat_input": "messages", "route": "upstream:hosted"})
        );
        assert_eq!(d["name"], "x", "the rest kept");
    }
}
