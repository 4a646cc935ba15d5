//! OpenAI's API at `/v1`: `chat/completions` and `completions`, whole or streamed as
//! `data:` chunks ending with `[DONE]`. A client that goes away cancels its
//! generations at the engine's next step: the handler (or the stream's task) drops
//! them.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use super::json_response;
use crate::client_quota::Client;
use crate::models::ServedModel;
use crate::openai::choices::{self, Piece, Running};
use crate::openai::render::{
    chat_logprobs, completion_logprobs, usage, Collected, Header, TokenLogprob,
};
use crate::openai::request::{self, Job};
use crate::openai::{reasoning, tools};
use crate::openai::{OaiError, OaiResult};
use crate::record::new_id;
use crate::AppState;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

fn parse(body: &[u8]) -> OaiResult<Value> {
    serde_json::from_slice(body).map_err(|e| OaiError {
        param: None,
        ..OaiError::param("body", format!("malformed JSON: {e}"))
    })
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    client: Client,
    body: Bytes,
) -> Response {
    match parse(&body).and_then(|v| request::chat(&v)) {
        Ok(job) => run(state, client, job, Kind::Chat).await,
        Err(e) => e.into_response(),
    }
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    client: Client,
    body: Bytes,
) -> Response {
    match parse(&body).and_then(|v| request::completion(&v)) {
        Ok(job) => run(state, client, job, Kind::Completion).await,
        Err(e) => e.into_response(),
    }
}

/// A model by `owner/name` (or alias), version id, or bare name when unique.
pub fn find_model(state: &AppState, id: &str) -> Option<Arc<ServedModel>> {
    if let Ok((o, n)) = crate::models::split_name(id) {
        if let Some(m) = state.models.by_name(&o, &n) {
            return Some(m.clone());
        }
    }
    if let Some(m) = state.models.by_version(id) {
        return Some(m.clone());
    }
    let mut named = state.models.all().iter().filter(|m| m.name == id);
    match (named.next(), named.next()) {
        (Some(m), None) => Some(m.clone()),
        _ => None,
    }
}

async fn run(state: Arc<AppState>, client: Client, job: Job, kind: Kind) -> Response {
    let Some(model) = find_model(&state, &job.model) else {
        return OaiError::model_not_found(&job.model).into_response();
    };
    // One slot of the client's quota for the request (all its choices), until its
    // answer (or stream) ends.
    let quota = match state.quotas.take(&client) {
        Ok(slot) => slot,
        Err(e) => return OaiError::rate_limited(e.0).into_response(),
    };
    let prefix = if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let id = format!("{prefix}-{}", new_id());
    let span = tracing::info_span!("openai", %id, model = %model.full_name());
    let started = choices::start(&state, &model, &job)
        .instrument(span.clone())
        .await;
    let running = match started {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let ctx = Ctx {
        id,
        created: chrono::Utc::now().timestamp(),
        fingerprint: model.version.clone(),
        job,
        kind,
        _quota: quota,
    };
    if ctx.job.stream {
        stream(ctx, running, span)
    } else {
        match collect(&ctx, running).instrument(span).await {
            Ok(v) => json_response(StatusCode::OK, &v),
            Err(e) => e.into_response(),
        }
    }
}

struct Ctx {
    id: String,
    created: i64,
    fingerprint: String,
    job: Job,
    kind: Kind,
    _quota: crate::client_quota::Slot,
}

impl Ctx {
    fn header(&self) -> Header<'_> {
        Header {
            id: &self.id,
            created: self.created,
            model: &self.job.model,
            fingerprint: &self.fingerprint,
        }
    }
    fn choices(&self) -> usize {
        self.job.prompts.len() * self.job.n
    }
    fn echo_text<'a>(&self, running: &'a Running, index: usize) -> &'a str {
        if self.job.echo {
            &running.prompt_texts[index / self.job.n]
        } else {
            ""
        }
    }
}

async fn collect(ctx: &Ctx, mut running: Running) -> OaiResult<Value> {
    let mut out = vec![Collected::default(); ctx.choices()];
    for (i, c) in out.iter_mut().enumerate() {
        c.text.push_str(ctx.echo_text(&running, i));
        c.offset = c.text.chars().count();
        if ctx.job.logprobs.is_some() {
            c.logprobs = Some(Vec::new());
        }
    }
    while let Some((i, piece)) = running.pieces.next().await {
        let c = &mut out[i];
        match piece {
            Piece::Text {
                text,
                token,
                logprobs,
            } => {
                c.text.push_str(&text);
                c.tokens.push(token);
                if let (Some(all), Some(l)) = (c.logprobs.as_mut(), logprobs) {
                    all.push(l);
                }
            }
            Piece::Done {
                finish_reason,
                trailing,
            } => {
                c.text.push_str(&trailing);
                c.finish_reason = Some(finish_reason);
            }
            Piece::Failed(e) => return Err(OaiError::internal(e)),
        }
    }
    if ctx.kind == Kind::Chat && running.thinks {
        for c in out.iter_mut() {
            let (reasoning, rest) = reasoning::split(&c.text);
            c.reasoning = reasoning;
            c.text = rest;
        }
    }
    if let (Kind::Chat, Some(syntax)) = (ctx.kind, running.tool_syntax) {
        for c in out.iter_mut().filter(|c| c.finish_reason == Some("stop")) {
            if let Some(calls) = syntax.parse_calls(&c.text) {
                c.tool_calls = Some(tools::render_calls(&calls, false));
                c.finish_reason = Some("tool_calls");
            }
        }
    }
    let prompt: usize = running.prompt_tokens.iter().map(Vec::len).sum();
    let completion: usize = out.iter().map(|c| c.tokens.len()).sum();
    let h = ctx.header();
    Ok(match ctx.kind {
        Kind::Chat => h.chat(&out, usage(prompt, completion)),
        Kind::Completion => h.completion(&out, usage(prompt, completion)),
    })
}

fn stream(ctx: Ctx, mut running: Running, span: tracing::Span) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    let task = async move {
        let send = |v: Value| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(Event::default().data(v.to_string())))
                    .await
                    .is_ok()
            }
        };
        let h = ctx.header();
        let include_usage = ctx.job.include_usage;
        let mut lp = StreamLogprobs::new(ctx.job.logprobs.is_some(), ctx.choices());
        let mut hold = tools::CallHold::new(running.tool_syntax, ctx.choices());
        let mut think =
            reasoning::ReasoningSplit::new(ctx.kind == Kind::Chat && running.thinks, ctx.choices());
        let chunk = |i: usize, text: &str, finish: Option<&str>, logprobs: Value| match ctx.kind {
            Kind::Chat => {
                h.chat_chunk(i, json!({"content": text}), logprobs, finish, include_usage)
            }
            Kind::Completion => h.completion_chunk(i, text, logprobs, finish, include_usage),
        };
        for i in 0..ctx.choices() {
            let first = match ctx.kind {
                Kind::Chat => h.chat_chunk(
                    i,
                    json!({"role": "assistant", "content": ""}),
                    Value::Null,
                    None,
                    include_usage,
                ),
                Kind::Completion if ctx.job.echo => {
                    let echo = ctx.echo_text(&running, i);
                    lp.offsets[i] = echo.chars().count();
                    chunk(i, echo, None, Value::Null)
                }
                Kind::Completion => continue,
            };
            if !send(first).await {
                return;
            }
        }
        let mut completion_tokens = 0usize;
        loop {
            let next = tokio::select! {
                n = running.pieces.next() => n,
                // The client went away: dropping `running` cancels the generations.
                _ = tx.closed() => return,
            };
            let Some((i, piece)) = next else { break };
            let sent = match piece {
                Piece::Text { text, logprobs, .. } => {
                    completion_tokens += 1;
                    lp.pending[i].extend(logprobs);
                    let (thought, text) = think.push(i, &text);
                    let thought_sent = thought.is_empty()
                        || send(h.chat_chunk(
                            i,
                            json!({"reasoning_content": thought}),
                            Value::Null,
                            None,
                            include_usage,
                        ))
                        .await;
                    let text = if text.is_empty() {
                        text
                    } else {
                        hold.push(i, &text)
                    };
                    thought_sent
                        && (text.is_empty()
                            || send(chunk(i, &text, None, lp.take(ctx.kind, i))).await)
                }
                Piece::Done {
                    finish_reason,
                    trailing,
                } => match ctx.kind {
                    // Held-back text (or the calls) and its tokens' log-probs first,
                    // then the finish.
                    Kind::Chat => {
                        let (thought, held) = think.push(i, &trailing);
                        let (thought_end, held_end) = think.finish(i);
                        let thought = thought + &thought_end;
                        if !thought.is_empty()
                            && !send(h.chat_chunk(
                                i,
                                json!({"reasoning_content": thought}),
                                Value::Null,
                                None,
                                include_usage,
                            ))
                            .await
                        {
                            return;
                        }
                        let (text, calls) = hold.finish(i, &(held + &held_end), finish_reason);
                        let (sent, finish) = match calls {
                            Some(calls) => {
                                let delta =
                                    json!({"tool_calls": tools::render_calls(&calls, true)});
                                let logprobs = lp.take(ctx.kind, i);
                                let c = h.chat_chunk(i, delta, logprobs, None, include_usage);
                                (send(c).await, "tool_calls")
                            }
                            None if !text.is_empty() || !lp.pending[i].is_empty() => {
                                let logprobs = lp.take(ctx.kind, i);
                                (send(chunk(i, &text, None, logprobs)).await, finish_reason)
                            }
                            None => (true, finish_reason),
                        };
                        sent && send(h.chat_chunk(
                            i,
                            json!({}),
                            Value::Null,
                            Some(finish),
                            include_usage,
                        ))
                        .await
                    }
                    Kind::Completion => {
                        let logprobs = lp.take(ctx.kind, i);
                        send(chunk(i, &trailing, Some(finish_reason), logprobs)).await
                    }
                },
                Piece::Failed(e) => {
                    let _ = send(OaiError::internal(e).body()).await;
                    break;
                }
            };
            if !sent {
                return;
            }
        }
        if include_usage {
            let prompt: usize = running.prompt_tokens.iter().map(Vec::len).sum();
            let object = match ctx.kind {
                Kind::Chat => "chat.completion.chunk",
                Kind::Completion => "text_completion",
            };
            if !send(h.usage_chunk(object, usage(prompt, completion_tokens))).await {
                return;
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    };
    tokio::spawn(task.instrument(span));
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// Log-probs in a stream, per choice: those of tokens whose text is still held back
/// (they go out with the next chunk that has text) and the characters sent so far.
struct StreamLogprobs {
    wanted: bool,
    pending: Vec<Vec<TokenLogprob>>,
    offsets: Vec<usize>,
}

impl StreamLogprobs {
    fn new(wanted: bool, choices: usize) -> Self {
        Self {
            wanted,
            pending: vec![Vec::new(); choices],
            offsets: vec![0; choices],
        }
    }

    /// The next chunk's `logprobs` for choice `i`.
    fn take(&mut self, kind: Kind, i: usize) -> Value {
        if !self.wanted {
            return Value::Null;
        }
        let entries = std::mem::take(&mut self.pending[i]);
        let v = match kind {
            Kind::Chat => chat_logprobs(&entries),
            Kind::Completion => completion_logprobs(&entries, self.offsets[i]),
        };
        self.offsets[i] += entries
            .iter()
            .map(|e| e.token.text.chars().count())
            .sum::<usize>();
        v
    }
}
