//! The model's tokenizer and how a request's text becomes prompt tokens: the
//! tokenizer's own chat template (from `tokenizer_config.json`, rendered with
//! minijinja), or a Replicate-style `prompt_template` with `{prompt}` and
//! `{system_prompt}`.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{Result, RuntimeError};

pub struct TextTokenizer {
    inner: Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// The fallback chat template (ChatML).
const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// What the user asked to be completed.
#[derive(Debug, Clone, Default)]
pub struct PromptSpec {
    pub prompt: String,
    pub system_prompt: Option<String>,
    /// Replicate's `prompt_template`: `{prompt}` and `{system_prompt}` are substituted;
    /// takes precedence over the chat template.
    pub prompt_template: Option<String>,
    /// Feed `prompt` to the model as it is, with neither template.
    pub raw: bool,
    /// A whole conversation (OpenAI's chat API): rendered with the chat template,
    /// in place of `prompt` and `system_prompt`.
    pub messages: Vec<ChatMessage>,
    /// The functions the model may call, as the template's `tools` variable takes them
    /// (`{"type": "function", "function": {...}}` each); for templates with a tool
    /// syntax of their own.
    pub tools: Option<Vec<serde_json::Value>>,
}

/// One turn of a conversation, as chat templates take it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's calls, as templates with tool syntax take them:
    /// `{"id", "type": "function", "function": {"name", "arguments": {...}}}`, the
    /// arguments an object (templates write them with `tojson`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A `tool` turn's call id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Self::default()
        }
    }
}

/// A token's bytes and their text (see `TextTokenizer::token_piece`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPiece {
    pub text: String,
    pub bytes: Vec<u8>,
}

impl TokenPiece {
    fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            text: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
        }
    }
}

/// SentencePiece's byte tokens: `<0x0A>`.
fn byte_fallback(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// GPT-2's byte-level alphabet read backwards: printable Latin-1 bytes stand for
/// themselves, the other 68 bytes for the characters from U+0100 on, in byte order.
fn byte_level_byte(c: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let code = c as u32;
    if code < 256 {
        return printable(code).then_some(code as u8);
    }
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth((code - 256) as usize)
        .map(|b| b as u8)
}

/// `bos_token` in tokenizer_config.json is a string or an AddedToken object.
fn special_token(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    pub fn load(
        tokenizer_json: &Path,
        tokenizer_config: Option<&serde_json::Value>,
    ) -> Result<Self> {
        let inner = Tokenizer::from_file(tokenizer_json)
            .map_err(|e| RuntimeError::Tokenizer(format!("{}: {e}", tokenizer_json.display())))?;
        let chat_template = tokenizer_config.and_then(|c| match c.get("chat_template")? {
            serde_json::Value::String(s) => Some(s.clone()),
            // A list of named templates: take the default one.
            serde_json::Value::Array(a) => a
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        });
        Ok(Self {
            inner,
            chat_template,
            bos_token: special_token(tokenizer_config.and_then(|c| c.get("bos_token"))),
            eos_token: special_token(tokenizer_config.and_then(|c| c.get("eos_token"))),
        })
    }

    /// A tokenizer built elsewhere (from a GGUF's vocabulary), with its chat template and
    /// special tokens.
    pub fn from_parts(
        inner: Tokenizer,
        chat_template: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Self {
        Self {
            inner,
            chat_template,
            bos_token,
            eos_token,
        }
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// The chat template in place of the model's own (`--chat-template`).
    pub fn set_chat_template(&mut self, template: String) {
        self.chat_template = Some(template);
    }

    /// The tool-call syntax of the chat template; `None` when it has none.
    pub fn tool_syntax(&self) -> Option<crate::tool_syntax::ToolSyntax> {
        crate::tool_syntax::ToolSyntax::detect(self.chat_template.as_deref()?)
    }

    /// Whether the chat template has Qwen3-style `<think>` blocks: the model may
    /// reason in one before its answer.
    pub fn thinks(&self) -> bool {
        self.chat_template
            .as_deref()
            .is_some_and(|t| t.contains("<think>") && t.contains("</think>"))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| RuntimeError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| RuntimeError::Tokenizer(e.to_string()))
    }

    /// One token on its own, as log-prob listings show it: its exact bytes (a piece of a
    /// multi-byte character stays a piece) and their text, lossy where the bytes are not
    /// whole UTF-8. Special tokens show as written (`<|im_end|>`).
    pub fn token_piece(&self, id: u32) -> TokenPiece {
        let Some(raw) = self.inner.id_to_token(id) else {
            return TokenPiece::from_bytes(Vec::new());
        };
        let decoded = self.inner.decode(&[id], true).unwrap_or_default();
        // Special tokens vanish when skipped; a lone SentencePiece "▁" vanishes either way.
        let special = decoded.is_empty()
            && !self
                .inner
                .decode(&[id], false)
                .unwrap_or_default()
                .is_empty();
        let bytes = if special {
            raw.into_bytes()
        } else if let Some(b) = byte_fallback(&raw) {
            vec![b]
        } else if self.byte_level() {
            raw.chars()
                .map(|c| byte_level_byte(c).unwrap_or(b'?'))
                .collect()
        } else if raw.contains('\u{2581}') {
            // SentencePiece's word marker, which decoding a lone token would strip.
            raw.replace('\u{2581}', " ").into_bytes()
        } else {
            decoded.into_bytes()
        };
        TokenPiece::from_bytes(bytes)
    }

    fn byte_level(&self) -> bool {
        use tokenizers::DecoderWrapper as D;
        fn has(d: &D) -> bool {
            match d {
                D::ByteLevel(_) => true,
                D::Sequence(s) => s.get_decoders().iter().any(has),
                _ => false,
            }
        }
        self.inner.get_decoder().is_some_and(has)
    }

    /// The prompt's tokens, templated as the spec asks.
    pub fn prompt_tokens(&self, spec: &PromptSpec) -> Result<Vec<u32>> {
        if spec.raw {
            return self.encode(&spec.prompt, true);
        }
        if !spec.messages.is_empty() {
            let text = self.render_chat(spec)?;
            return self.encode(&text, false);
        }
        if let Some(t) = &spec.prompt_template {
            if !t.contains("{prompt}") {
                return Err(RuntimeError::invalid(
                    "prompt_template",
                    "must contain {prompt}",
                ));
            }
            // A template may repeat its placeholders: the expansion's size is known
            // before it is built, and bounded.
            let system = spec.system_prompt.as_deref().unwrap_or("");
            let expanded = t
                .matches("{prompt}")
                .count()
                .saturating_mul(spec.prompt.len())
                .saturating_add(
                    t.matches("{system_prompt}")
                        .count()
                        .saturating_mul(system.len()),
                )
                .saturating_add(t.len());
            let max = crate::limits::MAX_TEMPLATED_PROMPT_BYTES;
            if expanded > max {
                return Err(RuntimeError::invalid(
                    "prompt_template",
                    format!("the templated prompt would be {expanded} bytes; at most {max}"),
                ));
            }
            let text = t
                .replace(
                    "{system_prompt}",
                    spec.system_prompt.as_deref().unwrap_or(""),
                )
                .replace("{prompt}", &spec.prompt);
            // Replicate's templates spell out the special tokens themselves.
            return self.encode(&text, false);
        }
        match &self.chat_template {
            Some(_) => {
                let text = self.render_chat(spec)?;
                // The template writes BOS itself, as transformers' apply_chat_template does.
                self.encode(&text, false)
            }
            None => {
                let text = match &spec.system_prompt {
                    Some(s) if !s.is_empty() => format!("{s}\n\n{}", spec.prompt),
                    _ => spec.prompt.clone(),
                };
                self.encode(&text, true)
            }
        }
    }

    /// The conversation as the model's chat template writes it; a model without one
    /// gets ChatML, as llama.cpp's server does, rather than a refusal.
    pub fn render_chat(&self, spec: &PromptSpec) -> Result<String> {
        let template = self.chat_template.as_deref().unwrap_or(CHATML);
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_filter("tojson", python_tojson);
        env.add_template("chat", template)
            .map_err(|e| RuntimeError::Template(e.to_string()))?;
        let messages: Vec<ChatMessage> = if spec.messages.is_empty() {
            let mut m = Vec::new();
            if let Some(s) = spec.system_prompt.as_deref().filter(|s| !s.is_empty()) {
                m.push(ChatMessage::new("system", s));
            }
            m.push(ChatMessage::new("user", spec.prompt.clone()));
            m
        } else {
            spec.messages.clone()
        };
        let tmpl = env
            .get_template("chat")
            .map_err(|e| RuntimeError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(&messages)),
            tools => spec.tools.as_ref().map(|t| minijinja::Value::from(minijinja::value::Serde(t))),
            add_generation_prompt => true,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| RuntimeError::Template(e.to_string()))
    }
}

/// Jinja's `tojson` as transformers renders chat templates: Python's `json.dumps`
/// (`", "` and `": "` between items, `indent` when given, nothing escaped for HTML),
/// so the model sees its tools and calls as it was trained to.
fn python_tojson(
    value: minijinja::Value,
    indent: Option<usize>,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<minijinja::Value, minijinja::Error> {
    let indent: Option<usize> = match indent {
        Some(n) => Some(n),
        None => kwargs.get("indent")?,
    };
    // Accepted and left as they are: the templates pass these.
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let v = serde_json::to_value(&value).map_err(|e| {
        minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
    })?;
    let mut out = String::new();
    write_python_json(&v, indent, 0, &mut out);
    Ok(minijinja::Value::from_safe_string(out))
}

fn write_python_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as V;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        V::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        V::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                out.push_str(&V::String(k.clone()).to_string());
                out.push_str(": ");
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> TextTokenizer {
        let dir = crate::demo::ensure_demo_model(&crate::demo::default_cache_dir()).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        TextTokenizer::load(&dir.join("tokenizer.json"), Some(&cfg)).unwrap()
    }

    #[test]
    fn chat_template_wraps_system_and_user() {
        let t = demo();
        let text = t
            .render_chat(&PromptSpec {
                prompt: "Hi there".into(),
                system_prompt: Some("Be brief.".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            text,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let ids = t
            .prompt_tokens(&PromptSpec {
                prompt: "Hi there".into(),
                ..Default::default()
            })
            .unwrap();
        // BOS once, from the template, not twice.
        assert_eq!(ids.iter().filter(|&&i| i == 0).count(), 1);
        assert_eq!(ids[0], 0);
    }

    #[test]
    fn a_conversation_renders_every_turn_in_order() {
        let t = demo();
        let m = |role: &str, content: &str| ChatMessage::new(role, content);
        let text = t
            .render_chat(&PromptSpec {
                messages: vec![
                    m("system", "S"),
                    m("user", "U1"),
                    m("assistant", "A1"),
                    m("user", "U2"),
                ],
                ..Default::default()
            })
            .unwrap();
        let at = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("{needle} in {text}"))
        };
        assert!(at("S<|eot_id|>") < at("U1<|eot_id|>"));
        assert!(at("assistant<|end_header_id|>\n\nA1") < at("U2<|eot_id|>"));
        assert!(text.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
    }

    #[test]
    fn a_model_without_a_chat_template_gets_chatml() {
        let dir = crate::demo::ensure_demo_model(&crate::demo::default_cache_dir()).unwrap();
        let t = TextTokenizer::load(&dir.join("tokenizer.json"), None).unwrap();
        let text = t
            .render_chat(&PromptSpec {
                messages: vec![ChatMessage::new("user", "hi")],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn prompt_template_expansion_is_bounded_before_it_is_built() {
        let t = demo();
        // 64 Ki placeholders × 64 KiB: 4 GiB if it were built.
        let spec = PromptSpec {
            prompt: "x".repeat(64 << 10),
            prompt_template: Some("{prompt}".repeat(64 << 10)),
            ..Default::default()
        };
        let e = t.prompt_tokens(&spec).unwrap_err();
        assert!(e.to_string().contains("prompt_template"), "{e}");
        let ok = PromptSpec {
            prompt: "hi".into(),
            prompt_template: Some("{prompt} {prompt}".into()),
            ..Default::default()
        };
        assert!(t.prompt_tokens(&ok).is_ok());
    }

    #[test]
    fn prompt_template_substitutes_and_requires_prompt() {
        let t = demo();
        let spec = PromptSpec {
            prompt: "abc".into(),
            system_prompt: Some("sys".into()),
            prompt_template: Some("[{system_prompt}] {prompt}!".into()),
            ..Default::default()
        };
        assert_eq!(
            t.decode(&t.prompt_tokens(&spec).unwrap()).unwrap(),
            "[sys] abc!"
        );
        let bad = PromptSpec {
            prompt_template: Some("no placeholder".into()),
            ..spec
        };
        let e = t.prompt_tokens(&bad).unwrap_err();
        assert!(e.to_string().contains("prompt_template"), "{e}");
    }
}
