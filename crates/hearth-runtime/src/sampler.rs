//! Sampling parameters, and the host sampler: penalties, then temperature, top-k,
//! top-p and min-p over one row of logits copied to the host, each a stage that can be
//! switched off on its own. The engine samples with the op in device_sampler.rs, which
//! follows the same math without the row leaving the device; this one stays as its
//! reference. The draw is seeded_draw.rs's, keyed by the request's seed and the
//! token's output position (Philox), so a seed gives the same tokens whatever else
//! shares the batch, and the same as the CUDA sampling kernel for the same logits.

use rand::Rng;
use std::collections::HashMap;

use crate::error::{Result, RuntimeError};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means off.
    pub top_k: usize,
    /// 1 means off.
    pub top_p: f32,
    /// 0 means off.
    pub min_p: f32,
    /// 1 means off; HF semantics over prompt and output tokens.
    pub repetition_penalty: f32,
    /// OpenAI semantics over output tokens.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    pub max_tokens: usize,
    pub min_tokens: usize,
    /// Matched on the text, across token boundaries; never emitted.
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Return each sampled token's log-prob and this many most likely alternatives
    /// (0 to 20); None: no log-probs.
    pub logprobs: Option<usize>,
    /// A compiled structured-output constraint (`ConstraintCompiler::compile`).
    pub constraint: Option<crate::constraint::Constraint>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: 256,
            min_tokens: 0,
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            constraint: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            ..Self::default()
        }
    }

    /// Rejects values no sampler can honour, naming the field.
    pub fn validate(&self) -> Result<()> {
        let finite = |field: &'static str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(RuntimeError::invalid(field, "must be a finite number"))
            }
        };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("repetition_penalty", self.repetition_penalty)?;
        finite("presence_penalty", self.presence_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        if self.temperature < 0.0 {
            return Err(RuntimeError::invalid("temperature", "must be >= 0"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(RuntimeError::invalid("top_p", "must be in (0, 1]"));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(RuntimeError::invalid("min_p", "must be in [0, 1]"));
        }
        if self.repetition_penalty <= 0.0 {
            return Err(RuntimeError::invalid("repetition_penalty", "must be > 0"));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(RuntimeError::invalid(
                "presence_penalty",
                "must be in [-2, 2]",
            ));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(RuntimeError::invalid(
                "frequency_penalty",
                "must be in [-2, 2]",
            ));
        }
        if self.max_tokens == 0 {
            return Err(RuntimeError::invalid("max_tokens", "must be >= 1"));
        }
        if self.min_tokens > self.max_tokens {
            return Err(RuntimeError::invalid("min_tokens", "must be <= max_tokens"));
        }
        if self
            .logprobs
            .is_some_and(|n| n > crate::device_sampler::MAX_TOP_LOGPROBS)
        {
            return Err(RuntimeError::invalid(
                "logprobs",
                format!(
                    "at most {} alternatives per token",
                    crate::device_sampler::MAX_TOP_LOGPROBS
                ),
            ));
        }
        if let Some(why) = crate::limits::stop_list_error(&self.stop) {
            return Err(RuntimeError::invalid("stop_sequences", why));
        }
        if self.seed.is_some_and(|s| s > crate::limits::SEED_MAX) {
            return Err(RuntimeError::invalid(
                "seed",
                format!("must be in [0, {}]", crate::limits::SEED_MAX),
            ));
        }
        Ok(())
    }
}

/// One request's sampling state.
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    /// Counts of generated tokens, for presence/frequency penalties.
    output_counts: HashMap<u32, u32>,
    /// Tokens seen in prompt or output, for the repetition penalty.
    seen: HashMap<u32, ()>,
    generated: usize,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        let seen = if params.repetition_penalty != 1.0 {
            prompt.iter().map(|&t| (t, ())).collect()
        } else {
            HashMap::new()
        };
        Self {
            params,
            seed,
            output_counts: HashMap::new(),
            seen,
            generated: 0,
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from one row of logits. `banned` (EOS and stop ids) are
    /// masked while fewer than `min_tokens` have been generated.
    pub fn sample(&mut self, logits: &mut [f32], banned: &[u32]) -> u32 {
        self.apply_penalties(logits);
        if self.generated < self.params.min_tokens {
            for &b in banned {
                if let Some(l) = logits.get_mut(b as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let token = if self.params.temperature <= 1e-5 {
            argmax(logits)
        } else {
            self.sample_random(logits)
        };
        self.record(token);
        token
    }

    fn record(&mut self, token: u32) {
        self.generated += 1;
        *self.output_counts.entry(token).or_insert(0) += 1;
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token, ());
        }
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &t in self.seen.keys() {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.frequency_penalty * c as f32 + p.presence_penalty;
                }
            }
        }
    }

    fn sample_random(&self, logits: &[f32]) -> u32 {
        let p = &self.params;
        crate::seeded_draw::draw(
            logits,
            &crate::seeded_draw::DrawParams {
                temperature: p.temperature,
                top_k: p.top_k,
                top_p: p.top_p,
                min_p: p.min_p,
                seed: self.seed,
                position: self.generated as u64,
            },
        )
    }
}

/// Index of the largest value; the first one on ties, as `torch.argmax` does.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            seed: Some(1),
            ..SamplingParams::default()
        };
        f(&mut p);
        p
    }

    fn histogram(p: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(p, &[]);
        let mut h = vec![0; logits.len()];
        for _ in 0..n {
            // A fresh row each time: penalties would otherwise accumulate.
            s.output_counts.clear();
            h[s.sample(&mut logits.to_vec(), &[]) as usize] += 1;
        }
        h
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::default(), &[]);
        assert_eq!(s.sample(&mut [0.0, 3.0, 3.0, 1.0], &[]), 1);
    }

    #[test]
    fn top_k_never_leaves_the_k_best() {
        let h = histogram(
            params(|p| {
                p.temperature = 5.0;
                p.top_k = 2
            }),
            &[1.0, 4.0, 3.0, 2.0],
            2000,
        );
        assert_eq!(h[0] + h[3], 0, "{h:?}");
        assert!(h[1] > 0 && h[2] > 0, "{h:?}");
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // softmax([10, 9, 0, 0]) ≈ [0.731, 0.269, 0.00003, 0.00003]: p=0.5 keeps one.
        let h = histogram(
            params(|p| {
                p.temperature = 1.0;
                p.top_p = 0.5
            }),
            &[10.0, 9.0, 0.0, 0.0],
            500,
        );
        assert_eq!(h, vec![500, 0, 0, 0]);
        let h = histogram(
            params(|p| {
                p.temperature = 1.0;
                p.top_p = 0.9
            }),
            &[10.0, 9.0, 0.0, 0.0],
            2000,
        );
        assert!(h[1] > 300 && h[2] + h[3] == 0, "{h:?}");
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // probs ≈ [0.66, 0.24, 0.09]: min_p 0.2 keeps the first two (floor 0.13).
        let h = histogram(
            params(|p| {
                p.temperature = 1.0;
                p.min_p = 0.2
            }),
            &[2.0, 1.0, 0.0],
            3000,
        );
        assert_eq!(h[2], 0, "{h:?}");
        assert!(h[1] > 400, "{h:?}");
    }

    #[test]
    fn temperature_flattens_the_distribution() {
        let cold = histogram(params(|p| p.temperature = 0.2), &[1.0, 0.0], 2000);
        let hot = histogram(params(|p| p.temperature = 5.0), &[1.0, 0.0], 2000);
        assert!(cold[1] < 50 && hot[1] > 700, "cold {cold:?} hot {hot:?}");
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(
                params(|p| {
                    p.temperature = 1.0;
                    p.seed = Some(seed)
                }),
                &[],
            );
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens_both_signs() {
        let s = Sampler::new(params(|p| p.repetition_penalty = 2.0), &[0, 1]);
        let mut l = [2.0, -1.0, 1.5];
        s.apply_penalties(&mut l);
        assert_eq!(l, [1.0, -2.0, 1.5]);
    }

    #[test]
    fn presence_and_frequency_penalties_count_output_tokens() {
        let mut s = Sampler::new(
            params(|p| {
                p.presence_penalty = 0.5;
                p.frequency_penalty = 0.25
            }),
            &[2],
        );
        s.record(1);
        s.record(1);
        let mut l = [0.0, 0.0, 0.0];
        s.apply_penalties(&mut l);
        assert_eq!(l, [0.0, -1.0, 0.0]);
        // Greedy picks the penalised token's rival.
        let mut l = [0.0, 0.9, 0.0];
        assert_eq!(s.sample(&mut l, &[]), 0);
    }

    #[test]
    fn min_tokens_bans_eos_until_reached() {
        let mut s = Sampler::new(
            params(|p| {
                p.min_tokens = 2;
                p.max_tokens = 5
            }),
            &[],
        );
        assert_eq!(s.sample(&mut [5.0, 1.0], &[0]), 1);
        assert_eq!(s.sample(&mut [5.0, 1.0], &[0]), 1);
        assert_eq!(s.sample(&mut [5.0, 1.0], &[0]), 0);
    }

    #[test]
    fn validation_names_the_field() {
        let e = params(|p| p.top_p = 0.0).validate().unwrap_err();
        assert!(e.to_string().contains("top_p"), "{e}");
        let e = params(|p| p.temperature = f32::NAN).validate().unwrap_err();
        assert!(e.to_string().contains("temperature"), "{e}");
    }
}
