use super::*;
use serde_json::json;

fn param_of(r: OaiResult<Job>) -> String {
    r.unwrap_err().param.unwrap_or_default()
}

#[test]
fn chat_parses_messages_parts_and_sampling() {
    let j = chat(&json!({
        "model": "hearth/demo",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": null},
        ],
        "max_completion_tokens": 7, "max_tokens": 99, "temperature": 0, "top_k": -1, "seed": 5,
        "stop": "END", "n": 2, "stream": true, "stream_options": {"include_usage": true},
        "logprobs": true, "top_logprobs": 3, "user": "u1", "some_future_field": {"x": 1},
    }))
    .unwrap();
    let PromptInput::Chat(m) = &j.prompts[0] else {
        panic!()
    };
    assert_eq!(m[0].role, "system");
    assert_eq!(m[1].content, "hi there");
    assert_eq!(m[2].content, "");
    assert_eq!(j.max_tokens, Some(7));
    assert_eq!(j.params.temperature, 0.0);
    assert_eq!(j.params.top_k, 0);
    assert_eq!(j.params.seed, Some(5));
    assert_eq!(j.params.stop, vec!["END"]);
    assert_eq!(
        (j.n, j.stream, j.include_usage, j.logprobs),
        (2, true, true, Some(3))
    );
}

#[test]
fn bad_values_name_their_param() {
    let base = || json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
    let with = |k: &str, v: Value| {
        let mut b = base();
        b[k] = v;
        chat(&b)
    };
    assert_eq!(param_of(with("temperature", json!(3))), "temperature");
    assert_eq!(param_of(with("temperature", json!("hot"))), "temperature");
    assert_eq!(param_of(with("n", json!(0))), "n");
    assert_eq!(param_of(with("top_p", json!(0))), "top_p");
    assert_eq!(param_of(with("max_tokens", json!(0))), "max_tokens");
    assert_eq!(param_of(with("stop", json!([1]))), "stop");
    assert_eq!(param_of(with("top_logprobs", json!(2))), "top_logprobs");
    assert_eq!(
        param_of(with("stream_options", json!({"include_usage": true}))),
        "stream_options"
    );
    assert!(with("response_format", json!({"type": "json_object"}))
        .unwrap()
        .constraint
        .is_some());
    assert_eq!(
        param_of(with(
            "response_format",
            json!({"type": "json_schema", "json_schema": {}})
        )),
        "response_format.json_schema.name"
    );
    assert_eq!(
        param_of(with("response_format", json!({"type": "xml"}))),
        "response_format"
    );
    assert_eq!(
        param_of(with("tools", json!([{"type": "function", "function": {}}]))),
        "tools[0].function.name"
    );
    assert_eq!(param_of(with("logit_bias", json!({"5": 10}))), "logit_bias");
    assert_eq!(param_of(with("messages", json!([]))), "messages");
    assert_eq!(
        param_of(with(
            "messages",
            json!([{"role": "function", "content": "x"}])
        )),
        "messages[0].role"
    );
    assert_eq!(
        param_of(with(
            "messages",
            json!([{"role": "user", "content": "x", "tool_calls": []}])
        )),
        "messages[0].tool_calls"
    );
    assert_eq!(
        param_of(with(
            "messages",
            json!([{"role": "user", "content": [{"type": "image_url"}]}])
        )),
        "messages[0].content[0].type"
    );
    assert!(with("response_format", json!({"type": "text"})).is_ok());
    assert!(with("tools", json!([])).is_ok());
    assert_eq!(param_of(chat(&json!({"messages": []}))), "model");
}

#[test]
fn completion_prompts_and_refusals() {
    let j = completion(&json!({"model": "m", "prompt": ["a", "b"], "n": 3, "echo": true})).unwrap();
    assert_eq!(
        (j.prompts.len(), j.n, j.echo, j.max_tokens),
        (2, 3, true, Some(16))
    );
    let j = completion(&json!({"model": "m", "prompt": [1, 2, 3], "logprobs": 2})).unwrap();
    assert!(matches!(&j.prompts[0], PromptInput::Tokens(t) if t == &[1, 2, 3]));
    assert_eq!(j.logprobs, Some(2));
    assert_eq!(
        param_of(completion(
            &json!({"model": "m", "prompt": "x", "suffix": "y"})
        )),
        "suffix"
    );
    assert_eq!(
        param_of(completion(&json!({"model": "m", "prompt": {}}))),
        "prompt"
    );
    assert_eq!(
        param_of(completion(
            &json!({"model": "m", "prompt": "x", "echo": true, "logprobs": 1})
        )),
        "echo"
    );
    assert_eq!(
        param_of(completion(
            &json!({"model": "m", "prompt": "x", "best_of": 3})
        )),
        "best_of"
    );
}

/// OpenAI's API took `top_k: 4294967295`, which reached the sampler and killed
/// the engine; seeds took any i64 where Replicate's took any u64 (and 2^64).
#[test]
fn top_k_and_seed_follow_the_runtime_limits() {
    let limits = hearth_runtime::RequestLimits {
        vocab_size: 512,
        max_model_len: 8192,
        kv_capacity_tokens: 8192,
    };
    let with = |extra: Value| {
        let mut b = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        chat(&b)
    };
    for k in [json!(513), json!(4294967295u64), json!(i64::MAX)] {
        let job = with(json!({"top_k": k})).unwrap();
        let e = check_model(&job, &limits).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("top_k"), "{k}");
        assert!(e.message.contains("512"), "{}", e.message);
    }
    let job = with(json!({"top_k": 512, "max_tokens": 8191})).unwrap();
    assert!(check_model(&job, &limits).is_ok());
    let job = with(json!({"max_tokens": 8192})).unwrap();
    assert_eq!(
        check_model(&job, &limits).unwrap_err().param.as_deref(),
        Some("max_tokens")
    );
    let raw = |text: &str| chat(&serde_json::from_str(text).unwrap());
    for seed in ["-1", "9223372036854775808", "18446744073709551616", "1e300"] {
        let body = format!(
            r#"{{"model": "m", "messages": [{{"role": "user", "content": "x"}}], "seed": {seed}}}"#
        );
        assert_eq!(param_of(raw(&body)), "seed", "{seed}");
    }
    let big = r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 9007199254740993}"#;
    assert_eq!(raw(big).unwrap().params.seed, Some(9007199254740993));
    assert_eq!(param_of(with(json!({"stop": vec!["s"; 17]}))), "stop");
    assert_eq!(param_of(with(json!({"stop": "x".repeat(257)}))), "stop");
}
