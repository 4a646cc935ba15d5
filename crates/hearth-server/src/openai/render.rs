//! OpenAI's response shapes: whole responses and stream chunks, for chat and for
//! completions.

use hearth_runtime::TokenPiece;
use serde_json::{json, Map, Value};

/// One choice, collected.
#[derive(Debug, Default, Clone)]
pub struct Collected {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish_reason: Option<&'static str>,
    /// Present when the request asked for log-probs.
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// Characters before the first generated token (the echoed prompt).
    pub offset: usize,
    /// The answer parsed as tool calls (`message.tool_calls`, in place of content).
    pub tool_calls: Option<Vec<Value>>,
    /// A `<think>` block the answer opened with (`message.reasoning_content`).
    pub reasoning: Option<String>,
}

/// One generated token's log-prob and the most likely alternatives at its step.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: TokenPiece,
    pub logprob: f32,
    pub top: Vec<(TokenPiece, f32)>,
}

/// JSON has no -inf: a token the model rules out gets vLLM's -9999.
fn finite(lp: f32) -> f32 {
    if lp.is_finite() {
        lp
    } else {
        -9999.0
    }
}

/// Chat's `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}], "refusal"}`.
pub fn chat_logprobs(entries: &[TokenLogprob]) -> Value {
    let item =
        |t: &TokenPiece, lp: f32| json!({"token": t.text, "logprob": finite(lp), "bytes": t.bytes});
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut v = item(&e.token, e.logprob);
            v["top_logprobs"] = e.top.iter().map(|(t, lp)| item(t, *lp)).collect();
            v
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Completions' `logprobs`: parallel lists, each token's offset in the choice's text
/// counted from `offset`, and per token a map of the alternatives and the chosen token.
pub fn completion_logprobs(entries: &[TokenLogprob], offset: usize) -> Value {
    let mut at = offset;
    let mut text_offset = Vec::with_capacity(entries.len());
    for e in entries {
        text_offset.push(at);
        at += e.token.text.chars().count();
    }
    let top: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut m = Map::new();
            for (t, lp) in &e.top {
                m.insert(t.text.clone(), json!(finite(*lp)));
            }
            m.entry(e.token.text.clone())
                .or_insert_with(|| json!(finite(e.logprob)));
            Value::Object(m)
        })
        .collect();
    json!({
        "tokens": entries.iter().map(|e| e.token.text.as_str()).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| finite(e.logprob)).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}

pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// What every response and chunk starts with.
pub struct Header<'a> {
    pub id: &'a str,
    pub created: i64,
    pub model: &'a str,
    /// The served version: OpenAI's `system_fingerprint`.
    pub fingerprint: &'a str,
}

impl Header<'_> {
    fn object(&self, object: &str, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "system_fingerprint": self.fingerprint, "choices": choices,
        })
    }

    pub fn chat(&self, choices: &[Collected], usage: Value) -> Value {
        let choices = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut message = match &c.tool_calls {
                    Some(calls) => {
                        json!({"role": "assistant", "content": null, "tool_calls": calls})
                    }
                    None => json!({"role": "assistant", "content": c.text}),
                };
                if let Some(r) = &c.reasoning {
                    message["reasoning_content"] = json!(r);
                }
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": c.logprobs.as_deref().map(chat_logprobs),
                    "finish_reason": c.finish_reason.unwrap_or("stop"),
                })
            })
            .collect();
        let mut v = self.object("chat.completion", choices);
        v["usage"] = usage;
        v
    }

    pub fn completion(&self, choices: &[Collected], usage: Value) -> Value {
        let choices = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({
                    "index": i, "text": c.text,
                    "logprobs": c.logprobs.as_deref().map(|l| completion_logprobs(l, c.offset)),
                    "finish_reason": c.finish_reason.unwrap_or("stop"),
                })
            })
            .collect();
        let mut v = self.object("text_completion", choices);
        v["usage"] = usage;
        v
    }

    /// A chat chunk for one choice. With `include_usage`, every chunk carries
    /// `"usage": null` and a last chunk the totals, as OpenAI sends them.
    /// A chat chunk for one choice; `logprobs` is that chunk's (already rendered).
    pub fn chat_chunk(
        &self,
        index: usize,
        delta: Value,
        logprobs: Value,
        finish: Option<&str>,
        include_usage: bool,
    ) -> Value {
        let mut v = self.object(
            "chat.completion.chunk",
            vec![
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}),
            ],
        );
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    pub fn completion_chunk(
        &self,
        index: usize,
        text: &str,
        logprobs: Value,
        finish: Option<&str>,
        include_usage: bool,
    ) -> Value {
        let mut v = self.object(
            "text_completion",
            vec![
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}),
            ],
        );
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    pub fn usage_chunk(&self, object: &str, usage: Value) -> Value {
        let mut v = self.object(object, Vec::new());
        v["usage"] = usage;
        v
    }
}
