//! `hearth bench --url`: one request against a running server, through Replicate's
//! API (a prediction and its SSE stream) or OpenAI's (a streamed completion or chat
//! completion), timed as a client sees the chunks arrive.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::bench::RequestResult;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Replicate,
    OpenAiCompletions,
    OpenAiChat,
    LlamaCpp,
}

impl Api {
    pub fn parse(backend: &str) -> Self {
        match backend {
            "openai" => Api::OpenAiCompletions,
            "openai-chat" => Api::OpenAiChat,
            "llama-cpp" => Api::LlamaCpp,
            _ => Api::Replicate,
        }
    }
}

pub struct HttpTarget {
    pub api: Api,
    pub client: reqwest::Client,
    pub base: String,
    pub model: String,
    pub token: Option<String>,
}

impl HttpTarget {
    fn auth(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(tok) => r.bearer_auth(tok),
            None => r,
        }
    }
}

pub async fn request(
    t: Arc<HttpTarget>,
    prompt: String,
    output_len: usize,
) -> anyhow::Result<RequestResult> {
    match t.api {
        Api::Replicate => replicate(t, prompt, output_len).await,
        Api::OpenAiCompletions | Api::OpenAiChat => openai(t, prompt, output_len).await,
        Api::LlamaCpp => llama_cpp(t, prompt, output_len).await,
    }
}

/// Times one chunk of output.
struct Clock {
    start: Instant,
    last: Instant,
    chunks: usize,
}

impl Clock {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            start: now,
            last: now,
            chunks: 0,
        }
    }
    fn chunk(&mut self, r: &mut RequestResult) {
        let now = Instant::now();
        if self.chunks == 0 {
            r.ttft = (now - self.start).as_secs_f64();
        } else {
            r.itls.push((now - self.last).as_secs_f64());
        }
        self.last = now;
        self.chunks += 1;
    }
}

/// Calls `f` with each SSE event (the text between blank lines) until it returns false.
async fn each_event(
    resp: reqwest::Response,
    mut f: impl FnMut(&str) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    while let Some(bytes) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&bytes?));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            if !f(&event)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Creates a prediction and reads its SSE stream; token counts come from the finished
/// prediction's metrics.
async fn replicate(
    t: Arc<HttpTarget>,
    prompt: String,
    output_len: usize,
) -> anyhow::Result<RequestResult> {
    let mut clock = Clock::new();
    let body = json!({"input": {
        "prompt": prompt, "max_tokens": output_len, "ignore_eos": true, "temperature": 0,
        "prompt_template": "{prompt}",
    }});
    let created = t
        .auth(
            t.client
                .post(format!("{}/v1/models/{}/predictions", t.base, t.model)),
        )
        .json(&body)
        .send()
        .await?;
    if !created.status().is_success() {
        bail!(
            "create: HTTP {}: {}",
            created.status(),
            created.text().await.unwrap_or_default()
        );
    }
    let p: Value = created.json().await?;
    let stream_url = p["urls"]["stream"]
        .as_str()
        .context("no urls.stream")?
        .to_string();
    let get_url = p["urls"]["get"]
        .as_str()
        .context("no urls.get")?
        .to_string();
    let resp = t
        .client
        .get(&stream_url)
        .header("Accept", "text/event-stream")
        .send()
        .await?;
    let mut r = RequestResult::default();
    each_event(resp, |event| {
        let name = event
            .lines()
            .find_map(|l| l.strip_prefix("event:"))
            .map(str::trim);
        match name {
            Some("output") => clock.chunk(&mut r),
            Some("done") => return Ok(false),
            Some("error") => bail!("stream error: {event}"),
            _ => {}
        }
        Ok(true)
    })
    .await?;
    r.e2e = clock.start.elapsed().as_secs_f64();
    let done: Value = t.auth(t.client.get(&get_url)).send().await?.json().await?;
    r.ok = done["status"] == "succeeded";
    r.output_tokens = done["metrics"]["output_token_count"]
        .as_u64()
        .unwrap_or(clock.chunks as u64) as usize;
    r.prompt_len = done["metrics"]["input_token_count"].as_u64().unwrap_or(0) as usize;
    Ok(r)
}

/// A streamed OpenAI completion; token counts from the usage chunk.
async fn openai(
    t: Arc<HttpTarget>,
    prompt: String,
    output_len: usize,
) -> anyhow::Result<RequestResult> {
    let mut clock = Clock::new();
    let chat = t.api == Api::OpenAiChat;
    let mut body = json!({
        "model": t.model, "max_tokens": output_len, "ignore_eos": true, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true},
    });
    let path = if chat {
        body["messages"] = json!([{"role": "user", "content": prompt}]);
        "chat/completions"
    } else {
        body["prompt"] = json!(prompt);
        "completions"
    };
    let resp = t
        .auth(t.client.post(format!("{}/v1/{path}", t.base)))
        .json(&body)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!(
            "{path}: HTTP {}: {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
    }
    let mut r = RequestResult::default();
    let mut done = false;
    each_event(resp, |event| {
        let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else {
            return Ok(true);
        };
        if data == "[DONE]" {
            done = true;
            return Ok(false);
        }
        let v: Value = serde_json::from_str(data)?;
        if let Some(e) = v.get("error") {
            bail!("stream error: {e}");
        }
        let c = &v["choices"][0];
        let text = if chat {
            c["delta"]["content"].as_str()
        } else {
            c["text"].as_str()
        };
        if text.is_some_and(|t| !t.is_empty()) {
            clock.chunk(&mut r);
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            r.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
            r.prompt_len = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
        }
        Ok(true)
    })
    .await?;
    r.e2e = clock.start.elapsed().as_secs_f64();
    r.ok = done && r.output_tokens > 0;
    Ok(r)
}

/// llama-server's `/completion`, streamed: one `data:` line per token; the last one
/// carries the counts.
async fn llama_cpp(
    t: Arc<HttpTarget>,
    prompt: String,
    output_len: usize,
) -> anyhow::Result<RequestResult> {
    let mut clock = Clock::new();
    let body = json!({
        "prompt": prompt, "n_predict": output_len, "temperature": 0, "ignore_eos": true,
        "stream": true, "cache_prompt": false,
    });
    let resp = t
        .client
        .post(format!("{}/completion", t.base))
        .json(&body)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!(
            "HTTP {}: {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
    }
    let mut r = RequestResult::default();
    each_event(resp, |event| {
        for line in event.lines() {
            let Some(data) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let v: Value = serde_json::from_str(data.trim())?;
            if v["stop"].as_bool() == Some(true) {
                r.output_tokens = v["timings"]["predicted_n"]
                    .as_u64()
                    .unwrap_or(clock.chunks as u64) as usize;
                r.prompt_len = v["timings"]["prompt_n"].as_u64().unwrap_or(0) as usize;
                r.ok = true;
                return Ok(false);
            }
            clock.chunk(&mut r);
        }
        Ok(true)
    })
    .await?;
    r.e2e = clock.start.elapsed().as_secs_f64();
    Ok(r)
}
