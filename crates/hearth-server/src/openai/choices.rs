//! Running one OpenAI request's choices (every prompt × `n`) on the engine and
//! merging their events. Choice 0 of a prompt runs first; the others follow once
//! its prefill is done, so they find the prompt's blocks in the prefix cache.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::stream::{self, Stream, StreamExt};
use hearth_runtime::tool_syntax::ToolSyntax;
use hearth_runtime::{
    ConstraintSpec, FinishReason, GenerationEvent, GenerationRequest, PromptSpec, SamplingParams,
    TextTokenizer,
};

use super::render::TokenLogprob;
use super::request::{Job, PromptInput};
use super::{OaiError, OaiResult};
use crate::models::ServedModel;
use crate::service::{self, Generation};
use crate::AppState;

/// What a choice produced, as the renderers take it.
#[derive(Debug, Clone)]
pub enum Piece {
    Text {
        text: String,
        token: u32,
        /// When the request asked for log-probs.
        logprobs: Option<TokenLogprob>,
    },
    Done {
        finish_reason: &'static str,
        trailing: String,
    },
    Failed(String),
}

pub type Pieces = Pin<Box<dyn Stream<Item = (usize, Piece)> + Send>>;

/// The prompts, tokenized, and the merged stream of every choice's pieces.
pub struct Running {
    /// With tools on the request: the syntax the calls are written in.
    pub tool_syntax: Option<hearth_runtime::tool_syntax::ToolSyntax>,
    /// The answer may open with a `<think>` block (chat on a template that has them).
    pub thinks: bool,
    pub prompt_tokens: Vec<Vec<u32>>,
    /// The prompts as text, for `echo`.
    pub prompt_texts: Vec<String>,
    pub pieces: Pieces,
}

pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        // The server stopped it (shutdown): vLLM's name.
        FinishReason::Canceled | FinishReason::Error => "abort",
    }
}

fn to_piece(ev: GenerationEvent, tok: &TextTokenizer) -> Option<Piece> {
    match ev {
        GenerationEvent::Started { .. } => None,
        GenerationEvent::Token { id, text, logprobs } => Some(Piece::Text {
            text,
            token: id,
            logprobs: logprobs.map(|l| TokenLogprob {
                token: tok.token_piece(id),
                logprob: l.logprob,
                top: l
                    .top
                    .iter()
                    .map(|&(t, lp)| (tok.token_piece(t), lp))
                    .collect(),
            }),
        }),
        GenerationEvent::Finished(c) if c.reason == FinishReason::Error => Some(Piece::Failed(
            c.error.unwrap_or_else(|| "generation failed".into()),
        )),
        GenerationEvent::Finished(c) => Some(Piece::Done {
            finish_reason: finish_reason(c.reason),
            trailing: c.trailing_text,
        }),
    }
}

fn choice_stream(
    index: usize,
    first: Vec<GenerationEvent>,
    gen: Generation,
    tok: Arc<TextTokenizer>,
) -> Pieces {
    let finished = first
        .iter()
        .any(|e| matches!(e, GenerationEvent::Finished(_)));
    let head = stream::iter(first);
    let rest = stream::unfold((!finished).then_some(gen), |g| async move {
        let mut g = g?;
        match g.next().await {
            Some(ev) => {
                let done = matches!(ev, GenerationEvent::Finished(_));
                Some((ev, if done { None } else { Some(g) }))
            }
            None => Some((
                GenerationEvent::Finished(hearth_runtime::Completion {
                    reason: FinishReason::Error,
                    prompt_tokens: 0,
                    output_tokens: 0,
                    cached_prompt_tokens: 0,
                    preemptions: 0,
                    timings: Default::default(),
                    error: Some("the engine stopped".into()),
                    trailing_text: String::new(),
                }),
                None,
            )),
        }
    });
    Box::pin(head.chain(rest).filter_map(move |ev| {
        let piece = to_piece(ev, &tok);
        async move { piece.map(|p| (index, p)) }
    }))
}

/// Tokenizes the prompts, checks them, and starts every choice.
pub async fn start(
    state: &Arc<AppState>,
    model: &Arc<ServedModel>,
    job: &Job,
) -> OaiResult<Running> {
    if state.is_draining() {
        return Err(OaiError::unavailable("the server is shutting down"));
    }
    let limits = model.limits();
    super::request::check_model(job, &limits)?;
    let tok = model.engine.tokenizer();
    let prompt_name = match job.prompts.first() {
        Some(PromptInput::Chat(_)) => "messages",
        _ => "prompt",
    };
    let chat = matches!(job.prompts.first(), Some(PromptInput::Chat(_)));
    // The template's own tool syntax, else the Hermes fallback in a system message.
    let native = if chat { tok.tool_syntax() } else { None };
    let tool_syntax = job
        .tools
        .as_ref()
        .map(|_| native.unwrap_or(ToolSyntax::Hermes));
    let thinks = chat && tok.thinks();
    let mut requested = job.constraint.clone();
    if let (Some(t), Some(syntax)) = (&job.tools, tool_syntax) {
        requested = Some((t.constraint(syntax), "tools"));
    }
    if thinks {
        requested =
            requested.map(|(spec, field)| (ConstraintSpec::AfterThinking(Box::new(spec)), field));
    }
    let mut prompt_tokens = Vec::with_capacity(job.prompts.len());
    let mut prompt_texts = Vec::with_capacity(job.prompts.len());
    for p in &job.prompts {
        let (ids, text) = match p {
            PromptInput::Chat(messages) => {
                let (messages, tools) =
                    super::tools::for_template(messages, job.tools.as_ref(), native);
                let spec = PromptSpec {
                    messages,
                    tools,
                    ..Default::default()
                };
                (tok.prompt_tokens(&spec), String::new())
            }
            PromptInput::Text(t) => (
                tok.prompt_tokens(&PromptSpec {
                    prompt: t.clone(),
                    raw: true,
                    ..Default::default()
                }),
                t.clone(),
            ),
            PromptInput::Tokens(ids) => (Ok(ids.clone()), tok.decode(ids).unwrap_or_default()),
        };
        prompt_tokens.push(ids.map_err(|e| OaiError::from_runtime(e, prompt_name))?);
        prompt_texts.push(text);
    }
    let constraint = super::constrained::compile(model, &requested).await?;
    let mut streams: Vec<Pieces> = Vec::new();
    for (pi, prompt) in prompt_tokens.iter().enumerate() {
        let max_tokens = match job.max_tokens {
            Some(m) => m,
            // Chat without a limit: whatever the context and the KV cache leave (the
            // cache can be smaller than the context: the CPU default).
            None => limits.default_max_tokens(prompt.len()),
        };
        let request = |i: usize| GenerationRequest {
            prompt: prompt.clone(),
            params: SamplingParams {
                max_tokens,
                // Distinct samples per choice, reproducible from the request's seed.
                seed: job.params.seed.map(|s| s.wrapping_add(i as u64)),
                logprobs: job.logprobs,
                constraint: constraint.clone(),
                ..job.params.clone()
            },
        };
        let submit = |i: usize| {
            service::generate(state, model, request(i))
                .map_err(|e| OaiError::from_runtime(e, prompt_name))
        };
        let mut first = submit(0)?;
        let mut head = Vec::new();
        if job.n > 1 {
            // Wait for choice 0's prefill, so the others share its cached blocks.
            while let Some(ev) = first.next().await {
                let past_prefill = !matches!(ev, GenerationEvent::Started { .. });
                head.push(ev);
                if past_prefill {
                    break;
                }
            }
        }
        streams.push(choice_stream(pi * job.n, head, first, tok.clone()));
        for i in 1..job.n {
            streams.push(choice_stream(
                pi * job.n + i,
                Vec::new(),
                submit(i)?,
                tok.clone(),
            ));
        }
    }
    Ok(Running {
        tool_syntax,
        thinks,
        prompt_tokens,
        prompt_texts,
        pieces: Box::pin(stream::select_all(streams)),
    })
}
