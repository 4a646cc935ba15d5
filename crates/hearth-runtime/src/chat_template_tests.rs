//! The test chat templates in models/fixtures/templates (written for hearth in the
//! manner of Llama 3.1's, Qwen2.5's, Mistral's and Qwen3's tool sections): their tool
//! syntax is detected from their text, and the tools, an assistant's call and the
//! tool's result are rendered by the template itself, JSON written as Python's
//! `json.dumps` writes it.

use serde_json::json;

use crate::tool_syntax::ToolSyntax;
use crate::{ChatMessage, PromptSpec, TextTokenizer};

fn with_template(name: &str) -> TextTokenizer {
    let dir = crate::demo::ensure_demo_model(&crate::demo::default_cache_dir()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    let mut tok = TextTokenizer::load(&dir.join("tokenizer.json"), Some(&cfg)).unwrap();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/fixtures/templates")
        .join(name);
    tok.set_chat_template(std::fs::read_to_string(path).unwrap());
    tok
}

fn conversation(call_id: &str) -> PromptSpec {
    PromptSpec {
        messages: vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Weather in Paris?"),
            ChatMessage {
                tool_calls: Some(vec![json!({"id": call_id, "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}}})]),
                ..ChatMessage::new("assistant", "")
            },
            ChatMessage {
                tool_call_id: Some(call_id.into()),
                ..ChatMessage::new("tool", "sunny")
            },
        ],
        tools: Some(vec![
            json!({"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}),
        ]),
        ..Default::default()
    }
}

#[test]
fn llama3_template_renders_tools_calls_and_results() {
    let tok = with_template("llama3-tools.jinja");
    assert_eq!(tok.tool_syntax(), Some(ToolSyntax::Llama3));
    assert!(!tok.thinks());
    let text = tok.render_chat(&conversation("call_1")).unwrap();
    assert!(text.contains("Environment: ipython"), "{text}");
    assert!(
        text.contains("{\n    \"function\": {\n        \"name\": \"get_weather\","),
        "{text}"
    );
    assert!(
        text.contains(
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}<|eot_id|>"
        ),
        "{text}"
    );
    assert!(
        text.contains("<|start_header_id|>ipython<|end_header_id|>\n\nsunny<|eot_id|>"),
        "{text}"
    );
    assert!(text.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
    // Without tools the template says nothing of them.
    let mut plain = conversation("call_1");
    plain.tools = None;
    plain.messages.truncate(2);
    assert!(!tok.render_chat(&plain).unwrap().contains("ipython"));
}

#[test]
fn qwen2_template_renders_tools_calls_and_results() {
    let tok = with_template("qwen2-tools.jinja");
    assert_eq!(tok.tool_syntax(), Some(ToolSyntax::Hermes));
    let text = tok.render_chat(&conversation("call_1")).unwrap();
    assert!(
        text.contains("<tools>\n{\"function\": {\"name\": \"get_weather\", \"parameters\": {\"properties\": {\"city\": {\"type\": \"string\"}}, \"type\": \"object\"}}, \"type\": \"function\"}\n</tools>"),
        "{text}"
    );
    assert!(
        text.contains("<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>"),
        "{text}"
    );
    assert!(
        text.contains("<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>"),
        "{text}"
    );
}

#[test]
fn mistral_template_renders_tools_calls_and_results() {
    let tok = with_template("mistral-tools.jinja");
    assert_eq!(tok.tool_syntax(), Some(ToolSyntax::Mistral));
    let text = tok.render_chat(&conversation("abcdefghi")).unwrap();
    assert!(
        text.contains("[AVAILABLE_TOOLS][{\"function\": {\"name\": \"get_weather\""),
        "{text}"
    );
    assert!(
        text.contains("[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}, \"id\": \"abcdefghi\"}]"),
        "{text}"
    );
    assert!(
        text.contains(
            "[TOOL_RESULTS]{\"content\": \"sunny\", \"call_id\": \"abcdefghi\"}[/TOOL_RESULTS]"
        ),
        "{text}"
    );
    // The template's own check: ids that are not 9 characters are refused.
    let e = tok.render_chat(&conversation("call_1")).unwrap_err();
    assert!(e.to_string().contains("length 9"), "{e}");
}

#[test]
fn tojson_writes_what_python_writes() {
    let mut tok = with_template("qwen2-tools.jinja");
    tok.set_chat_template(
        "{{ tools | tojson }}|{{ tools[0] | tojson(2) }}|{{ {} | tojson(indent=2) }}".into(),
    );
    let spec = PromptSpec {
        messages: vec![ChatMessage::new("user", "x")],
        tools: Some(vec![json!({"d": "<b> & 'é'", "n": [1, 2]})]),
        ..Default::default()
    };
    assert_eq!(
        tok.render_chat(&spec).unwrap(),
        "[{\"d\": \"<b> & 'é'\", \"n\": [1, 2]}]|{\n  \"d\": \"<b> & 'é'\",\n  \"n\": [\n    1,\n    2\n  ]\n}|{}"
    );
}

#[test]
fn qwen3_template_thinks() {
    let tok = with_template("qwen3-think.jinja");
    assert_eq!(tok.tool_syntax(), Some(ToolSyntax::Hermes));
    assert!(tok.thinks());
    let text = tok.render_chat(&conversation("call_1")).unwrap();
    assert!(
        text.contains("<tool_response>\nsunny\n</tool_response>"),
        "{text}"
    );
}
