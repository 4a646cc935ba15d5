//! What a request may ask of a model: every number a request controls, bounded by
//! what it reaches (the vocabulary, the context, the KV cache) or by a fixed limit,
//! before anything is allocated for it. One check (`RequestLimits::check`) that the
//! engine runs on every submit, whichever API the request came through; the HTTP
//! schemas read their `maximum`s and limits from here rather than repeating them.
//! An allocation a request could size without a bound would abort the process (no
//! panic handler catches an allocation failure), which is why nothing is left open.

use crate::engine::EngineLimits;
use crate::error::{Result, RuntimeError};
use crate::request::GenerationRequest;
use crate::sampler::SamplingParams;

/// Most stop sequences one request may give.
pub const MAX_STOP_SEQUENCES: usize = 16;
/// Longest stop sequence, in UTF-8 bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// Most alternatives per token a request may ask log-probs for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = crate::device_sampler::MAX_TOP_LOGPROBS;
/// Most generations one request may start (OpenAI's prompts × `n`).
pub const MAX_CHOICES: usize = 128;
/// Seeds are integers in `0..=SEED_MAX` on every API: what a signed 64-bit integer
/// holds and is not negative, so a seed means the same number everywhere (JSON
/// parsers, PostgreSQL's BIGINT, Python's int) and no API accepts one another refuses.
pub const SEED_MAX: u64 = i64::MAX as u64;
/// Longest prompt text a `prompt_template` may expand to, in bytes: a template can
/// repeat `{prompt}`, so the expansion is bounded before it is built.
pub const MAX_TEMPLATED_PROMPT_BYTES: usize = 4 << 20;

/// The bounds of one served model, derived from its engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    pub vocab_size: usize,
    /// The context: prompt and output tokens together.
    pub max_model_len: usize,
    /// Tokens the whole KV cache holds; one request can never use more.
    pub kv_capacity_tokens: usize,
}

impl From<EngineLimits> for RequestLimits {
    fn from(l: EngineLimits) -> Self {
        Self {
            vocab_size: l.vocab_size,
            max_model_len: l.max_model_len,
            kv_capacity_tokens: l.kv_capacity_tokens,
        }
    }
}

impl EngineLimits {
    pub fn request(&self) -> RequestLimits {
        RequestLimits::from(*self)
    }
}

impl RequestLimits {
    /// Tokens one sequence (prompt and output) can ever hold.
    pub fn max_sequence_tokens(&self) -> usize {
        self.max_model_len.min(self.kv_capacity_tokens)
    }

    /// The largest `max_tokens` any request can have (with a one-token prompt).
    pub fn max_tokens(&self) -> usize {
        self.max_sequence_tokens().saturating_sub(1).max(1)
    }

    /// The largest `top_k`: the vocabulary (larger would select the same tokens).
    pub fn max_top_k(&self) -> usize {
        self.vocab_size
    }

    /// `max_tokens` when a request gives none and asks for "as much as fits" (OpenAI's
    /// chat): what the context and the KV cache leave after the prompt.
    pub fn default_max_tokens(&self, prompt_len: usize) -> usize {
        self.max_sequence_tokens().saturating_sub(prompt_len).max(1)
    }

    /// The one check every request passes before it is queued: sampling values, then
    /// every size against the model. Names the field and the bound it broke.
    pub fn check(&self, req: &GenerationRequest) -> Result<()> {
        req.params.validate()?;
        self.check_prompt(&req.prompt)?;
        self.check_sizes(&req.params)?;
        let total = req.prompt.len().saturating_add(req.params.max_tokens);
        if total > self.max_model_len {
            return Err(RuntimeError::invalid(
                "max_tokens",
                format!(
                    "prompt tokens ({}) + max_tokens ({}) = {total} exceeds the model's context of {} tokens",
                    req.prompt.len(),
                    req.params.max_tokens,
                    self.max_model_len
                ),
            ));
        }
        if total > self.kv_capacity_tokens {
            return Err(RuntimeError::invalid(
                "max_tokens",
                format!(
                    "prompt + max_tokens = {total} tokens can never fit in the KV cache of {} tokens",
                    self.kv_capacity_tokens
                ),
            ));
        }
        Ok(())
    }

    /// Everything but the prompt: what an API can check before tokenizing.
    pub fn check_params(&self, p: &SamplingParams) -> Result<()> {
        p.validate()?;
        self.check_sizes(p)
    }

    fn check_sizes(&self, p: &SamplingParams) -> Result<()> {
        if p.top_k > self.max_top_k() {
            return Err(RuntimeError::invalid(
                "top_k",
                format!(
                    "must be at most the vocabulary size ({}), got {}",
                    self.max_top_k(),
                    p.top_k
                ),
            ));
        }
        if p.max_tokens > self.max_tokens() {
            return Err(RuntimeError::invalid(
                "max_tokens",
                format!(
                    "must be at most {} (the model's context of {} tokens, a KV cache of {} tokens, less one prompt token), got {}",
                    self.max_tokens(),
                    self.max_model_len,
                    self.kv_capacity_tokens,
                    p.max_tokens
                ),
            ));
        }
        Ok(())
    }

    fn check_prompt(&self, prompt: &[u32]) -> Result<()> {
        if prompt.is_empty() {
            return Err(RuntimeError::invalid("prompt", "the prompt has no tokens"));
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(RuntimeError::invalid(
                "prompt",
                format!(
                    "token id {bad} is outside the vocabulary of {}",
                    self.vocab_size
                ),
            ));
        }
        if prompt.len() >= self.max_model_len {
            return Err(RuntimeError::invalid(
                "prompt",
                format!(
                    "the prompt has {} tokens; the model's context is {} tokens",
                    prompt.len(),
                    self.max_model_len
                ),
            ));
        }
        Ok(())
    }
}

/// Why a stop list is refused, if it is: too many entries, an empty or too long one.
/// Each API names its own field (`stop`, `stop_sequences`).
pub fn stop_list_error(stops: &[String]) -> Option<String> {
    if stops.len() > MAX_STOP_SEQUENCES {
        return Some(format!(
            "at most {MAX_STOP_SEQUENCES} stop sequences, got {}",
            stops.len()
        ));
    }
    if stops.iter().any(|s| s.is_empty()) {
        return Some("an empty stop sequence would end every completion".into());
    }
    if let Some((i, s)) = stops
        .iter()
        .enumerate()
        .find(|(_, s)| s.len() > MAX_STOP_BYTES)
    {
        return Some(format!(
            "stop sequence {i} is {} bytes; at most {MAX_STOP_BYTES}",
            s.len()
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RequestLimits {
        RequestLimits {
            vocab_size: 512,
            max_model_len: 8192,
            kv_capacity_tokens: 4096,
        }
    }

    fn req(f: impl FnOnce(&mut SamplingParams)) -> GenerationRequest {
        let mut params = SamplingParams::greedy(16);
        f(&mut params);
        GenerationRequest {
            prompt: vec![1, 2, 3],
            params,
        }
    }

    fn field(r: Result<()>) -> &'static str {
        match r {
            Err(RuntimeError::InvalidRequest { field, .. }) => field,
            other => panic!("expected an invalid request, got {other:?}"),
        }
    }

    /// The values that took the process down (an allocation of 2 × top_k entries on
    /// the engine thread): refused before they reach it, naming the vocabulary.
    #[test]
    fn top_k_above_the_vocabulary_is_refused() {
        let l = limits();
        for k in [
            513,
            4_294_967_295,
            100_000_000_000_000_000,
            1 << 61,
            usize::MAX,
        ] {
            let r = l.check(&req(|p| p.top_k = k));
            assert_eq!(field(r), "top_k", "top_k {k}");
        }
        let e = l.check(&req(|p| p.top_k = 513)).unwrap_err().to_string();
        assert!(e.contains("512"), "{e}");
        assert!(l.check(&req(|p| p.top_k = 512)).is_ok());
        assert!(l.check(&req(|p| p.top_k = 0)).is_ok());
    }

    #[test]
    fn sizes_are_bounded_by_context_and_cache() {
        let l = limits();
        assert_eq!(l.max_tokens(), 4095);
        assert_eq!(field(l.check(&req(|p| p.max_tokens = 4096))), "max_tokens");
        assert_eq!(
            field(l.check(&req(|p| p.max_tokens = usize::MAX))),
            "max_tokens"
        );
        assert!(l.check(&req(|p| p.max_tokens = 4093)).is_ok());
        assert_eq!(field(l.check(&req(|p| p.max_tokens = 4094))), "max_tokens");
        assert_eq!(
            field(l.check(&req(|p| {
                p.max_tokens = 4;
                p.min_tokens = usize::MAX
            }))),
            "min_tokens"
        );
        let mut r = req(|_| {});
        r.prompt = vec![512];
        assert_eq!(field(l.check(&r)), "prompt");
        r.prompt = vec![0; 8192];
        assert_eq!(field(l.check(&r)), "prompt");
    }

    #[test]
    fn default_max_tokens_fits_the_cache_not_only_the_context() {
        let l = limits();
        // The context would leave 8,189; the cache holds 4,096 in all.
        let d = l.default_max_tokens(3);
        assert_eq!(d, 4093);
        assert!(l.check(&req(|p| p.max_tokens = d)).is_ok());
        assert_eq!(l.default_max_tokens(10_000), 1);
    }

    #[test]
    fn stop_lists_are_bounded_in_count_and_length() {
        let s = |n: usize, len: usize| vec!["x".repeat(len); n];
        assert!(stop_list_error(&s(16, 256)).is_none());
        assert!(stop_list_error(&s(17, 1)).unwrap().contains("at most 16"));
        assert!(stop_list_error(&s(1, 257)).unwrap().contains("at most 256"));
        assert!(stop_list_error(&s(1, 0)).is_some());
        // Through the engine's check as well, whichever API sent it.
        let l = limits();
        assert_eq!(
            field(l.check(&req(|p| p.stop = s(17, 1)))),
            "stop_sequences"
        );
        assert_eq!(
            field(l.check(&req(|p| p.stop = s(1, 300)))),
            "stop_sequences"
        );
    }

    #[test]
    fn seeds_past_the_signed_range_are_refused() {
        let l = limits();
        assert!(l.check(&req(|p| p.seed = Some(SEED_MAX))).is_ok());
        assert_eq!(
            field(l.check(&req(|p| p.seed = Some(SEED_MAX + 1)))),
            "seed"
        );
    }
}
