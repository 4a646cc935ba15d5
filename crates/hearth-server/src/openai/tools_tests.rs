use super::*;

fn parse_body(v: Value) -> OaiResult<Option<ToolUse>> {
    parse(v.as_object().unwrap())
}

fn weather() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "d",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
}

fn param(r: OaiResult<Option<ToolUse>>) -> String {
    r.unwrap_err().param.unwrap_or_default()
}

#[test]
fn choices_and_their_grammars() {
    let t = parse_body(json!({"tools": [weather()]})).unwrap().unwrap();
    assert_eq!(t.choice, ToolChoice::Auto);
    assert!(t.grammar.allow_text && t.grammar.parallel);
    let t = parse_body(
        json!({"tools": [weather()], "tool_choice": "required", "parallel_tool_calls": false}),
    )
    .unwrap()
    .unwrap();
    assert!(!t.grammar.allow_text && !t.grammar.parallel);
    let t = parse_body(
        json!({"tools": [weather(), {"type": "function", "function": {"name": "noop"}}],
        "tool_choice": {"type": "function", "function": {"name": "noop"}}}),
    )
    .unwrap()
    .unwrap();
    assert_eq!(t.grammar.functions.len(), 1);
    assert_eq!(t.grammar.functions[0].0, "noop");
    assert!(
        parse_body(json!({"tools": [weather()], "tool_choice": "none"}))
            .unwrap()
            .is_none()
    );
    assert!(parse_body(json!({"tools": [], "tool_choice": "auto"}))
        .unwrap()
        .is_none());
}

#[test]
fn bad_tools_name_their_param() {
    assert_eq!(param(parse_body(json!({"tools": {}}))), "tools");
    assert_eq!(
        param(parse_body(json!({"tools": [{"type": "code_interpreter"}]}))),
        "tools[0].type"
    );
    assert_eq!(
        param(parse_body(
            json!({"tools": [{"type": "function", "function": {"name": "a b"}}]})
        )),
        "tools[0].function.name"
    );
    assert_eq!(
        param(parse_body(json!({"tools": [weather(), weather()]}))),
        "tools[1].function.name"
    );
    assert_eq!(
        param(parse_body(
            json!({"tools": [{"type": "function", "function": {"name": "f",
            "parameters": {"type": "object", "properties": {"t": {"type": "array", "uniqueItems": true}}}}}]})
        )),
        "tools[0].function.parameters"
    );
    assert_eq!(
        param(parse_body(
            json!({"tools": [weather()], "tool_choice": "always"})
        )),
        "tool_choice"
    );
    assert_eq!(
        param(parse_body(json!({"tools": [weather()],
            "tool_choice": {"type": "function", "function": {"name": "nope"}}}))),
        "tool_choice.function.name"
    );
    assert_eq!(
        param(parse_body(json!({"tool_choice": "required"}))),
        "tool_choice"
    );
    assert_eq!(
        param(parse_body(
            json!({"tools": [weather()], "parallel_tool_calls": "yes"})
        )),
        "parallel_tool_calls"
    );
    assert_eq!(param(parse_body(json!({"functions": []}))), "functions");
    let many: Vec<Value> = (0..=MAX_TOOLS)
        .map(|i| json!({"type": "function", "function": {"name": format!("f{i}")}}))
        .collect();
    assert_eq!(param(parse_body(json!({"tools": many}))), "tools");
}

#[test]
fn calls_round_trip_through_text() {
    let calls = assistant_calls(
        &json!([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]),
        "messages[1].tool_calls",
    )
    .unwrap();
    let history = vec![ChatMessage {
        tool_calls: Some(calls),
        ..ChatMessage::new("assistant", "")
    }];
    let (fallback, tools) = for_template(&history, None, None);
    assert!(tools.is_none() && fallback[0].tool_calls.is_none());
    let hermes = ToolSyntax::Hermes;
    assert_eq!(
        hermes.parse_calls(&fallback[0].content).unwrap(),
        vec![("f".into(), "{\"a\":1}".into()), ("g".into(), "{}".into())]
    );
    let mut hold = CallHold::new(Some(hermes), 2);
    assert_eq!(hold.push(0, "<tool_"), "");
    assert_eq!(hold.push(1, "<b"), "<b");
    assert_eq!(hold.push(1, "<tool_call>"), "<tool_call>");
    assert_eq!(
        hold.push(0, "call>\n{\"name\": \"f\", \"arguments\": {}}"),
        ""
    );
    let (text, calls) = hold.finish(0, "\n</tool_call>", "stop");
    assert_eq!(
        (text.as_str(), calls),
        ("", Some(vec![("f".into(), "{}".into())]))
    );
    let mut hold = CallHold::new(Some(hermes), 1);
    hold.push(
        0,
        "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    );
    let (text, calls) = hold.finish(0, "", "length");
    assert!(calls.is_none() && text.starts_with("<tool_call>"));
    let e = assistant_calls(
        &json!([{"function": {"name": "f", "arguments": "{"}}]),
        "messages[1].tool_calls",
    )
    .unwrap_err();
    assert_eq!(
        e.param.as_deref(),
        Some("messages[1].tool_calls[0].function.arguments")
    );
}

#[test]
fn native_templates_get_structured_history_and_mistral_ids() {
    let calls = assistant_calls(
        &json!([{"id": "call_abcdefghijklmnop", "type": "function",
                 "function": {"name": "f", "arguments": "{\"a\": 1}"}}]),
        "m",
    )
    .unwrap();
    let history = vec![
        ChatMessage {
            tool_calls: Some(calls),
            ..ChatMessage::new("assistant", "")
        },
        ChatMessage {
            tool_call_id: Some("call_abcdefghijklmnop".into()),
            ..ChatMessage::new("tool", "sunny")
        },
    ];
    let t = parse(json!({"tools": [weather()]}).as_object().unwrap())
        .unwrap()
        .unwrap();
    let (out, tools) = for_template(&history, Some(&t), Some(ToolSyntax::Mistral));
    assert_eq!(tools.unwrap().len(), 1);
    let id = out[0].tool_calls.as_ref().unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(id.len(), 9);
    assert_eq!(out[1].tool_call_id.as_deref(), Some(id.as_str()));
    assert_eq!(
        out[0].tool_calls.as_ref().unwrap()[0]["function"]["arguments"],
        json!({"a": 1})
    );
    let (out, _) = for_template(&history, Some(&t), Some(ToolSyntax::Hermes));
    assert_eq!(
        out[1].tool_call_id.as_deref(),
        Some("call_abcdefghijklmnop")
    );
    assert_eq!(out.len(), 2, "no preamble for a native template");
}
