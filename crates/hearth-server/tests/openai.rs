//! OpenAI's API on the same server and engines as Replicate's.

mod support;

use std::time::{Duration, Instant};

use hearth_runtime::EngineConfig;
use serde_json::{json, Value};
use support::{engine_default, start, start_with, Server, TOKEN};

async fn post(s: &Server, path: &str, body: Value) -> (u16, Value) {
    let r = s.post(path).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The `data:` payloads of an OpenAI stream, `[DONE]` included.
async fn stream(s: &Server, path: &str, body: Value) -> Vec<String> {
    let r = s.post(path).json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    r.text()
        .await
        .unwrap()
        .split("\n\n")
        .filter_map(|b| {
            b.lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_string)
        })
        .collect()
}

fn chat_body(extra: Value) -> Value {
    let mut b = json!({
        "model": "hearth/demo",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something"}],
        "max_tokens": 12, "seed": 7, "temperature": 0.9,
    });
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

#[tokio::test]
async fn chat_whole_and_streamed_agree_for_a_seed_with_usage() {
    let s = start(1 << 20).await;
    let (st, whole) = post(&s, "/v1/chat/completions", chat_body(json!({}))).await;
    assert_eq!(st, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert!(whole["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let text = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    let u = &whole["usage"];
    assert_eq!(u["completion_tokens"], 12);
    assert!(u["prompt_tokens"].as_u64().unwrap() > 5);
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + 12)
    );
    let events = stream(
        &s,
        "/v1/chat/completions",
        chat_body(json!({"stream": true, "stream_options": {"include_usage": true}})),
    )
    .await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"].get(0)?["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        streamed, text,
        "the stream and the whole answer differ for one seed"
    );
    let fin = chunks
        .iter()
        .find(|c| !c["choices"][0]["finish_reason"].is_null())
        .unwrap();
    assert_eq!(fin["choices"][0]["finish_reason"], "length");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], whole["usage"]);
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["usage"].is_null()));
}

#[tokio::test]
async fn completions_take_lists_echo_stop_and_n() {
    let s = start(1 << 20).await;
    let (st, r) = post(
        &s,
        "/v1/completions",
        json!({"model": "hearth/demo", "prompt": ["one", "two"], "n": 2, "max_tokens": 5, "seed": 1, "temperature": 1.0, "echo": true, "ignore_eos": true}),
    )
    .await;
    assert_eq!(st, 200, "{r}");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let want = if i < 2 { "one" } else { "two" };
        assert!(c["text"].as_str().unwrap().starts_with(want), "{c}");
    }
    // Different seeds per choice: the two samples of one prompt differ.
    assert_ne!(choices[0]["text"], choices[1]["text"]);
    assert_eq!(r["usage"]["completion_tokens"], 20);
    // A stop sequence taken from a greedy run ends the next one before it.
    let greedy =
        json!({"model": "hearth/demo", "prompt": "stop here", "max_tokens": 16, "temperature": 0});
    let (_, full) = post(&s, "/v1/completions", greedy.clone()).await;
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    let cut: String = text.chars().skip(4).take(2).collect();
    let mut with_stop = greedy;
    with_stop["stop"] = json!([cut.clone()]);
    let (_, stopped) = post(&s, "/v1/completions", with_stop).await;
    let c = &stopped["choices"][0];
    assert_eq!(c["finish_reason"], "stop", "{c} (stop {cut:?} in {text:?})");
    assert!(text.starts_with(c["text"].as_str().unwrap()));
    assert!(!c["text"].as_str().unwrap().contains(&cut));
}

#[tokio::test]
async fn errors_name_the_param_in_openai_shape() {
    let s = start(1 << 20).await;
    for (body, param) in [
        (chat_body(json!({"temperature": 9})), "temperature"),
        (chat_body(json!({"max_tokens": 1_000_000})), "max_tokens"),
        (
            chat_body(json!({"response_format": {"type": "xml"}})),
            "response_format",
        ),
        (
            chat_body(json!({"tools": [{"type": "function", "function": {"name": "f g"}}]})),
            "tools[0].function.name",
        ),
        (chat_body(json!({"messages": "hi"})), "messages"),
    ] {
        let (st, e) = post(&s, "/v1/chat/completions", body).await;
        assert_eq!(st, 400, "{e}");
        assert_eq!(e["error"]["param"], param, "{e}");
        assert_eq!(e["error"]["type"], "invalid_request_error");
        assert!(e["error"]["message"].is_string());
    }
    let (st, e) = post(
        &s,
        "/v1/completions",
        json!({"model": "hearth/demo", "prompt": "x", "suffix": "y"}),
    )
    .await;
    assert_eq!((st, e["error"]["param"].as_str()), (400, Some("suffix")));
    let (st, e) = post(
        &s,
        "/v1/chat/completions",
        chat_body(json!({"model": "nobody/nothing"})),
    )
    .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let r = s
        .client
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&chat_body(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
}

#[tokio::test]
async fn models_answer_both_clients_at_one_url() {
    let s = start(1 << 20).await;
    let list: Value = s
        .get("/v1/models")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], "hearth/demo");
    assert_eq!(list["data"][0]["object"], "model");
    assert!(list["data"][0]["created"].is_i64());
    assert_eq!(list["results"][0]["owner"], "hearth");
    assert!(list["next"].is_null());
    let one: Value = s
        .get("/v1/models/hearth%2Fdemo")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["id"], "hearth/demo");
    assert_eq!(one["owned_by"], "hearth");
    let r = s.get("/v1/models/nothing").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

async fn running(s: &Server) -> f64 {
    let text = s
        .get("/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with("vllm:num_requests_running{"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap()
}

async fn wait_idle(s: &Server, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while running(s).await > 0.0 {
        assert!(
            Instant::now() < deadline,
            "{what}: the engine still runs the request"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Until the engine runs a request. The first chunk can reach the client before the
/// engine admits the request (a fixed pause raced a loaded machine; and a fast one
/// could finish the generation within it).
async fn wait_running(s: &Server, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while running(s).await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "{what}: the engine never ran the request"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_its_generation() {
    let s = start(1 << 20).await;
    let long = json!({"max_tokens": 1500, "ignore_eos": true});
    // Streaming: read one chunk, hang up.
    let mut r = s
        .post("/v1/chat/completions")
        .json(&chat_body(
            json!({"stream": true, "max_tokens": 1500, "ignore_eos": true}),
        ))
        .send()
        .await
        .unwrap();
    let _ = r.chunk().await.unwrap();
    wait_running(&s, "streaming").await;
    drop(r);
    wait_idle(&s, "streaming").await;
    // Whole: give up before the answer.
    let c = reqwest::Client::builder()
        .timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    let e = c
        .post(format!("{}/v1/chat/completions", s.base))
        .bearer_auth(TOKEN)
        .json(&chat_body(long))
        .send()
        .await;
    assert!(e.is_err(), "answered within 400 ms?");
    wait_idle(&s, "non-streaming").await;
    let text = s
        .get("/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(
            "hearth:predictions_finished{model_name=\"hearth/demo\",status=\"canceled\"} 2"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn a_full_queue_is_a_429_with_retry_after_in_openai_shape() {
    let s = start_with(
        1 << 20,
        EngineConfig {
            max_num_seqs: 1,
            max_waiting: 1,
            ..engine_default()
        },
    )
    .await;
    let body = chat_body(json!({"max_tokens": 1500, "ignore_eos": true, "stream": true}));
    let mut held = Vec::new();
    let mut saw = None;
    for _ in 0..4 {
        let r = s
            .post("/v1/chat/completions")
            .json(&body)
            .send()
            .await
            .unwrap();
        if r.status().as_u16() == 429 {
            let ra = r.headers()["retry-after"].to_str().unwrap().to_string();
            let e: Value = r.json().await.unwrap();
            saw = Some((ra, e));
        } else {
            held.push(r);
        }
    }
    let (ra, e) = saw.expect("no 429");
    assert_eq!(ra, "1");
    assert_eq!(e["error"]["type"], "rate_limit_error");
}

/// The text a listing's tokens spell, special tokens (`<|...|>`, which the reply's text
/// skips) left out; bytes that are not UTF-8 (the demo model's weights are random) read
/// as the reply reads them.
fn spelled(tokens: &[(String, Vec<u8>)]) -> String {
    let bytes: Vec<u8> = tokens
        .iter()
        .filter(|(t, _)| !(t.starts_with("<|") && t.ends_with("|>")))
        .flat_map(|(_, b)| b.clone())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Chat's `logprobs.content` entries as (token, bytes, logprob), checked on the way:
/// greedy, so the chosen token's log-prob is the best alternative's; alternatives
/// descending, `top` of them, their probabilities summing to at most 1.
fn chat_entries(content: &Value, top: usize) -> Vec<(String, Vec<u8>, f64)> {
    content
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let token = e["token"].as_str().unwrap().to_string();
            let bytes: Vec<u8> = e["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
                .collect();
            assert_eq!(String::from_utf8_lossy(&bytes), token, "{e}");
            let lp = f(&e["logprob"]);
            assert!(lp <= 0.0, "{e}");
            let alts = e["top_logprobs"].as_array().unwrap();
            assert_eq!(alts.len(), top, "{e}");
            assert!((f(&alts[0]["logprob"]) - lp).abs() < 1e-4, "greedy: {e}");
            assert!(alts
                .windows(2)
                .all(|w| f(&w[0]["logprob"]) >= f(&w[1]["logprob"])));
            let mass: f64 = alts.iter().map(|a| f(&a["logprob"]).exp()).sum();
            assert!(mass <= 1.0 + 1e-4, "{e}");
            (token, bytes, lp)
        })
        .collect()
}

#[tokio::test]
async fn chat_logprobs_whole_and_streamed() {
    let s = start(1 << 20).await;
    let body = chat_body(
        json!({"temperature": 0, "logprobs": true, "top_logprobs": 3, "ignore_eos": true}),
    );
    let (st, whole) = post(&s, "/v1/chat/completions", body.clone()).await;
    assert_eq!(st, 200, "{whole}");
    let c = &whole["choices"][0];
    let entries = chat_entries(&c["logprobs"]["content"], 3);
    assert_eq!(entries.len(), 12);
    let pairs: Vec<(String, Vec<u8>)> =
        entries.iter().map(|e| (e.0.clone(), e.1.clone())).collect();
    assert_eq!(spelled(&pairs), c["message"]["content"].as_str().unwrap());

    // Streamed: the chunks' entries together are the same tokens and log-probs.
    let mut streamed_body = body;
    streamed_body["stream"] = json!(true);
    let events = stream(&s, "/v1/chat/completions", streamed_body).await;
    let mut streamed = Vec::new();
    for e in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(e).unwrap();
        let lp = &chunk["choices"][0]["logprobs"];
        if !lp.is_null() {
            streamed.extend(chat_entries(&lp["content"], 3));
        }
    }
    assert_eq!(streamed.len(), entries.len());
    for (a, b) in streamed.iter().zip(&entries) {
        assert_eq!(a.0, b.0);
        assert!((a.2 - b.2).abs() < 1e-4, "{a:?} vs {b:?}");
    }

    // Not asked: null, as OpenAI answers.
    let (_, plain) = post(&s, "/v1/chat/completions", chat_body(json!({}))).await;
    assert!(plain["choices"][0]["logprobs"].is_null(), "{plain}");
}

#[tokio::test]
async fn completion_logprobs_whole_and_streamed() {
    let s = start(1 << 20).await;
    let body = json!({"model": "hearth/demo", "prompt": "Hello there", "max_tokens": 10,
                      "temperature": 0, "logprobs": 2, "ignore_eos": true});
    let (st, whole) = post(&s, "/v1/completions", body.clone()).await;
    assert_eq!(st, 200, "{whole}");
    let c = &whole["choices"][0];
    let lp = &c["logprobs"];
    let tokens: Vec<String> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    assert_eq!(tokens.len(), 10);
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    let mut at = 0u64;
    for (j, t) in tokens.iter().enumerate() {
        assert_eq!(offsets[j], at, "text_offset of token {j} in {lp}");
        at += t.chars().count() as u64;
        let chosen = f(&lp["token_logprobs"][j]);
        let alts = lp["top_logprobs"][j].as_object().unwrap();
        // The two best and the chosen one (greedy: among them).
        assert!(alts.len() <= 2 && !alts.is_empty(), "{lp}");
        assert!((f(&alts[t]) - chosen).abs() < 1e-6, "{lp}");
        let best = alts.values().map(f).fold(f64::MIN, f64::max);
        assert!((best - chosen).abs() < 1e-4, "greedy: {lp}");
    }
    let pairs: Vec<(String, Vec<u8>)> = tokens
        .iter()
        .map(|t| (t.clone(), t.as_bytes().to_vec()))
        .collect();
    let text = c["text"].as_str().unwrap();
    // The listing's tokens are texts, lossy for pieces of characters: compare whole ones.
    if !text.contains('\u{fffd}') {
        assert_eq!(spelled(&pairs), text);
    }

    let mut streamed_body = body;
    streamed_body["stream"] = json!(true);
    let events = stream(&s, "/v1/completions", streamed_body).await;
    let (mut s_tokens, mut s_offsets) = (Vec::new(), Vec::new());
    for e in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(e).unwrap();
        let lp = &chunk["choices"][0]["logprobs"];
        for t in lp["tokens"].as_array().into_iter().flatten() {
            s_tokens.push(t.as_str().unwrap().to_string());
        }
        for o in lp["text_offset"].as_array().into_iter().flatten() {
            s_offsets.push(o.as_u64().unwrap());
        }
    }
    assert_eq!(s_tokens, tokens);
    assert_eq!(s_offsets, offsets);
}

/// Chat without `max_tokens` asked for the whole remaining context; with a KV cache
/// smaller than the context (the CPU default) every such request was refused.
#[tokio::test]
async fn chat_without_max_tokens_fits_a_cache_smaller_than_the_context() {
    // The demo keeps 1 KiB per token (f16 cache): a 256-token cache, a 8,192-token context.
    let s = start_with(
        1 << 20,
        EngineConfig {
            kv_cache_memory: Some(128 * 2048),
            ..engine_default()
        },
    )
    .await;
    let limits = s.state.models.all()[0].engine.limits();
    assert!(
        limits.kv_capacity_tokens < limits.max_model_len,
        "{limits:?}"
    );
    let body = json!({"model": "hearth/demo", "messages": [{"role": "user", "content": "hi"}],
                      "temperature": 0, "ignore_eos": true});
    let (st, v) = post(&s, "/v1/chat/completions", body.clone()).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert_eq!(
        v["usage"]["total_tokens"].as_u64(),
        Some(limits.kv_capacity_tokens as u64),
        "the default fills the cache: {v}"
    );
    // An explicit max_tokens the cache cannot hold is still an error.
    let mut too_many = body;
    too_many["max_tokens"] = json!(limits.kv_capacity_tokens);
    let (st, e) = post(&s, "/v1/chat/completions", too_many).await;
    assert_eq!(
        (st, e["error"]["param"].as_str()),
        (400, Some("max_tokens")),
        "{e}"
    );
}

/// A sequence that ends inside a character lost the character's bytes on OpenAI's
/// routes (`text: ""` with 6 completion tokens for greedy "Once upon" on the demo);
/// they come out as U+FFFD now, as a whole decode shows them. Per choice, the text is
/// the lossy decode of its tokens' bytes.
#[tokio::test]
async fn a_character_cut_off_at_the_end_is_output_not_dropped() {
    let s = start(1 << 20).await;
    let (st, v) = post(
        &s,
        "/v1/completions",
        json!({"model": "hearth/demo", "prompt": "Once upon", "max_tokens": 6, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    if v["usage"]["completion_tokens"] == 6 {
        assert_ne!(v["choices"][0]["text"], "", "{v}");
    }
    let mut cut = 0;
    for seed in 0..8 {
        let (st, v) = post(
            &s,
            "/v1/chat/completions",
            chat_body(json!({"seed": seed, "max_tokens": 5, "logprobs": true})),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        let bytes: Vec<u8> = v["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .iter()
            // Special tokens show as written in log-probs and as nothing in the text.
            .filter(|t| {
                !hearth_runtime::demo::SPECIAL_TOKENS.contains(&t["token"].as_str().unwrap())
            })
            .flat_map(|t| t["bytes"].as_array().unwrap().clone())
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        cut += usize::from(std::str::from_utf8(&bytes).is_err());
        assert_eq!(
            v["choices"][0]["message"]["content"].as_str().unwrap(),
            String::from_utf8_lossy(&bytes),
            "seed {seed}: {v}"
        );
    }
    eprintln!("{cut} of 8 outputs were not whole UTF-8");
}
