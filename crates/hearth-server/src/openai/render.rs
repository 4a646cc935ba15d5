//! OpenAI's response shapes: whole responses and stream chunks, for chat and for
//! completions.

use serde_json::{json, Value};

/// One choice, collected.
#[derive(Debug, Default, Clone)]
pub struct Collected {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish_reason: Option<&'static str>,
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
                json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": null,
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
                    "index": i, "text": c.text, "logprobs": null,
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
    pub fn chat_chunk(
        &self,
        index: usize,
        delta: Value,
        finish: Option<&str>,
        include_usage: bool,
    ) -> Value {
        let mut v = self.object(
            "chat.completion.chunk",
            vec![
                json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}),
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
        finish: Option<&str>,
        include_usage: bool,
    ) -> Value {
        let mut v = self.object(
            "text_completion",
            vec![json!({"index": index, "text": text, "logprobs": null, "finish_reason": finish})],
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
