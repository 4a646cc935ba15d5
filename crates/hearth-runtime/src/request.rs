//! What goes into the engine and what comes back out of it.

use std::time::Duration;

use crate::sampler::SamplingParams;

#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
}

/// A request's scheduling class. `Background` work (shadow copies of traffic served
/// elsewhere) only fills what callers' `Normal` work leaves: it is admitted when no
/// normal request waits, preempted before any normal one, and waits in its own
/// bounded queue (`EngineConfig::max_waiting_background`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    #[default]
    Normal,
    Background,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token or a stop sequence.
    Stop,
    /// `max_tokens`, or the model's context length.
    Length,
    Canceled,
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Canceled => "canceled",
            FinishReason::Error => "error",
        }
    }
}

/// Intervals measured by the engine, from the request's arrival.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub queued: Duration,
    pub time_to_first_token: Option<Duration>,
    pub total: Duration,
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_prompt_tokens: usize,
    pub preemptions: u32,
    pub timings: Timings,
    pub error: Option<String>,
    /// Output held back (a possible stop sequence that never completed) and released
    /// at the end; append it after the tokens' text.
    pub trailing_text: String,
}

/// Log-probabilities of the model's distribution at one step (before penalties and
/// temperature): the sampled token's, and the `n` most likely tokens', highest first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone)]
pub enum GenerationEvent {
    /// The request got its first step.
    Started { cached_prompt_tokens: usize },
    /// One generated token; `text` is what it completes, possibly empty (held back
    /// for a partial character or a possible stop sequence). `logprobs` when the
    /// request asked for them (`SamplingParams::logprobs`).
    Token {
        id: u32,
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    /// Last event of every request.
    Finished(Completion),
}
