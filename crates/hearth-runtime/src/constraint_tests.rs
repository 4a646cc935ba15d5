//! The constraint engine driven token by token over the demo model's vocabulary: each
//! template syntax's tool-call grammar and the free `<think>` block before a
//! constrained answer accept what they should and refuse what they should not.

use serde_json::json;

use crate::constraint::{mask_allows, Progress, SeqConstraint};
use crate::tool_grammar::ToolCallGrammar;
use crate::tool_syntax::ToolSyntax;
use crate::{Constraint, ConstraintCompiler, ConstraintSpec, TextTokenizer};

const EOS: u32 = 2;

fn compiler() -> (ConstraintCompiler, std::sync::Arc<TextTokenizer>) {
    let dir = crate::demo::ensure_demo_model(&crate::demo::default_cache_dir()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    let tok =
        std::sync::Arc::new(TextTokenizer::load(&dir.join("tokenizer.json"), Some(&cfg)).unwrap());
    let vocab = tok.inner().get_vocab_size(true);
    (ConstraintCompiler::new(tok.clone(), vocab, &[EOS]), tok)
}

/// Whether the grammar lets the model write exactly `text` and then end.
fn accepts(c: &Constraint, tok: &TextTokenizer, text: &str) -> bool {
    let mut seq = SeqConstraint::new(c, &[EOS]).unwrap();
    let ids = tok.encode(text, false).unwrap();
    for (k, &id) in ids.iter().enumerate() {
        if !mask_allows(seq.compute_mask(), id as usize) {
            eprintln!("{text:?}: {:?} refused", tok.token_piece(id).text);
            return false;
        }
        match seq.advance(id) {
            Progress::Continue => {}
            // The grammar's end: right only after the last token.
            Progress::Accepted => return k + 1 == ids.len(),
            Progress::Failed(_) => return false,
        }
    }
    mask_allows(seq.compute_mask(), EOS as usize)
}

fn args_schema() -> serde_json::Value {
    json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
           "additionalProperties": false})
}

fn tools(syntax: ToolSyntax, allow_text: bool, parallel: bool) -> ConstraintSpec {
    ConstraintSpec::ToolCalls(ToolCallGrammar {
        functions: vec![("f".into(), args_schema())],
        allow_text,
        parallel,
        syntax,
    })
}

#[test]
fn each_template_syntax_has_its_own_call_grammar() {
    let (c, tok) = compiler();
    let llama = c
        .compile(&tools(ToolSyntax::Llama3, false, true), "tools")
        .unwrap();
    assert!(accepts(
        &llama,
        &tok,
        r#"{"name": "f", "parameters": {"a": 1}}"#
    ));
    assert!(accepts(
        &llama,
        &tok,
        r#"<|python_tag|>{"name": "f", "parameters": {"a": 1}}"#
    ));
    assert!(accepts(
        &llama,
        &tok,
        r#"{"name": "f", "parameters": {"a": 1}}; {"name": "f", "parameters": {"a": 2}}"#
    ));
    assert!(!accepts(
        &llama,
        &tok,
        r#"{"name": "f", "arguments": {"a": 1}}"#
    ));
    assert!(!accepts(&llama, &tok, "Hello"));

    let mistral = c
        .compile(&tools(ToolSyntax::Mistral, false, false), "tools")
        .unwrap();
    assert!(accepts(
        &mistral,
        &tok,
        r#"[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}]"#
    ));
    assert!(!accepts(
        &mistral,
        &tok,
        r#"[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"name": "f", "arguments": {"a": 1}}]"#
    ));
    assert!(!accepts(
        &mistral,
        &tok,
        r#"[{"name": "f", "arguments": {"a": "x"}}]"#
    ));

    let hermes = c
        .compile(&tools(ToolSyntax::Hermes, false, false), "tools")
        .unwrap();
    assert!(accepts(
        &hermes,
        &tok,
        "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>"
    ));

    // `auto`: text, or a call held to the grammar once begun.
    let auto = c
        .compile(&tools(ToolSyntax::Llama3, true, false), "tools")
        .unwrap();
    assert!(accepts(&auto, &tok, "It is sunny."));
    assert!(accepts(
        &auto,
        &tok,
        r#"{"name": "f", "parameters": {"a": 1}}"#
    ));
    assert!(!accepts(
        &auto,
        &tok,
        r#"{"name": "g", "parameters": {"a": 1}}"#
    ));
    let auto = c
        .compile(&tools(ToolSyntax::Mistral, true, false), "tools")
        .unwrap();
    assert!(accepts(&auto, &tok, "It is sunny."));
    assert!(!accepts(&auto, &tok, "[TOOL_CALLS] nonsense"));
}

#[test]
fn a_think_block_is_free_and_the_answer_after_it_is_held() {
    let (c, tok) = compiler();
    let spec = ConstraintSpec::AfterThinking(Box::new(ConstraintSpec::JsonSchema(args_schema())));
    let g = c.compile(&spec, "response_format").unwrap();
    assert!(accepts(
        &g,
        &tok,
        "<think>\nNot JSON { at all, \"a\": \"x\"\n</think>\n\n{\"a\": 1}"
    ));
    assert!(accepts(&g, &tok, "{\"a\": 1}"), "the block is optional");
    assert!(!accepts(&g, &tok, "<think>fine</think>\n\nhello"));
    assert!(!accepts(&g, &tok, "<think>fine</think>{\"a\": \"x\"}"));
    assert!(!accepts(&g, &tok, "hello"));
    // Without the wrapper a think block is refused.
    let plain = c
        .compile(
            &ConstraintSpec::JsonSchema(args_schema()),
            "response_format",
        )
        .unwrap();
    assert!(!accepts(&plain, &tok, "<think>x</think>\n{\"a\": 1}"));
    let tools = ConstraintSpec::AfterThinking(Box::new(tools(ToolSyntax::Hermes, false, false)));
    let g = c.compile(&tools, "tools").unwrap();
    assert!(accepts(
        &g,
        &tok,
        "<think>\nCall f.\n</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>"
    ));
}

/// Writes `prefix`, then as many digit tokens as the grammar allows (any allowed one
/// each step, up to `cap` steps); the digits written.
fn digits_allowed(c: &Constraint, tok: &TextTokenizer, prefix: &str, cap: usize) -> String {
    let mut seq = SeqConstraint::new(c, &[EOS]).unwrap();
    for id in tok.encode(prefix, false).unwrap() {
        assert!(mask_allows(seq.compute_mask(), id as usize));
        assert!(matches!(seq.advance(id), Progress::Continue));
    }
    let vocab = tok.inner().get_vocab_size(true) as u32;
    let mut digits = String::new();
    for _ in 0..cap {
        let mask = seq.compute_mask().to_vec();
        let next = (0..vocab).find(|&id| {
            let t = tok.token_piece(id).text;
            mask_allows(&mask, id as usize)
                && !t.is_empty()
                && t.bytes().all(|b| b.is_ascii_digit())
                // A leading 0 ends the integer; start it with another digit.
                && !(digits.is_empty() && t.starts_with('0'))
        });
        let Some(id) = next else { break };
        digits.push_str(&tok.token_piece(id).text);
        assert!(matches!(seq.advance(id), Progress::Continue));
    }
    digits
}

#[test]
fn an_unbounded_integer_can_no_longer_run_past_sixteen_digits() {
    let (c, tok) = compiler();
    let schema = json!({"type": "object", "properties": {"n": {"type": "integer"},
        "x": {"type": "number"}}, "required": ["n", "x"], "additionalProperties": false});
    let g = c
        .compile(&ConstraintSpec::JsonSchema(schema), "response_format")
        .unwrap();
    // Without the bound the digits go on until the cap.
    let n = digits_allowed(&g, &tok, "{\"n\": ", 100);
    assert!(n.len() <= 16, "{} digits: {n}", n.len());
    let n = digits_allowed(&g, &tok, "{\"n\": -", 100);
    assert!(n.len() <= 16, "{} digits: -{n}", n.len());
    let x = digits_allowed(&g, &tok, "{\"n\": 1, \"x\": ", 100);
    assert!(x.len() <= 16, "number: {} integer digits: {x}", x.len());
    assert!(accepts(&g, &tok, "{\"n\": 9007199254740991, \"x\": -2.5}"));
    // A bounded number is written without an exponent (llguidance's range regex).
    assert!(accepts(
        &g,
        &tok,
        "{\"n\": -9007199254740991, \"x\": 1250.125}"
    ));
    assert!(!accepts(&g, &tok, "{\"n\": 9007199254740992, \"x\": 0}"));
    assert!(!accepts(
        &g,
        &tok,
        "{\"n\": 123456789012345678901, \"x\": 0}"
    ));
    // Explicit bounds are the caller's: wider than the default range, still enforced.
    let wide = json!({"type": "integer", "minimum": 0, "maximum": 99_999_999_999_999_999i64});
    let g = c
        .compile(&ConstraintSpec::JsonSchema(wide), "response_format")
        .unwrap();
    assert!(accepts(&g, &tok, "99999999999999999"));
    assert!(!accepts(&g, &tok, "-1"));
    // Tool-call arguments are bounded the same way.
    let g = c
        .compile(&tools(ToolSyntax::Hermes, false, false), "tools")
        .unwrap();
    let a = digits_allowed(
        &g,
        &tok,
        "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": ",
        100,
    );
    assert!(a.len() <= 16, "{} digits: {a}", a.len());
}
