//! The tail of a step: one sampling op over the step's logits (constrained rows masked,
//! their masks taken back from the mask workers), then each row's token appended, the
//! matchers advanced (masks.rs: the next masks start right away, off this thread), the
//! tokens handed to the output worker and the sequences that ended finished.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::Tensor;

use super::{Active, Engine};
use crate::constraint::Progress;
use crate::device_sampler::{sample_rows_with, Sampled};
use crate::error::{Result, RuntimeError};
use crate::output::{OutToken, OutputMsg};
use crate::request::FinishReason;
use crate::scheduler::SeqId;

impl Engine {
    /// Samples the rows of `ids` (in the logits' order).
    pub(super) fn sample(&mut self, logits: &Tensor, ids: &[SeqId]) -> Result<Vec<Sampled>> {
        self.masks.collect(&mut self.active, ids);
        let (eos, masks, penalties) = (&self.eos_ids, &self.masks, &mut self.penalties);
        let mut by_id: HashMap<SeqId, &mut Active> = self
            .active
            .iter_mut()
            .filter(|(id, _)| ids.contains(id))
            .map(|(id, a)| (*id, a))
            .collect();
        let rows: Vec<_> = ids
            .iter()
            .filter_map(|id| {
                by_id.remove(id).map(|a| {
                    let Active {
                        sampler,
                        constraint,
                        ..
                    } = a;
                    penalties.attach(sampler);
                    let mut row = sampler.row(eos);
                    row.allowed = constraint.as_ref().map(|slot| masks.row_mask(slot));
                    row
                })
            })
            .collect();
        if rows.len() != ids.len() {
            return Err(RuntimeError::Device(
                "a scheduled sequence has no request".into(),
            ));
        }
        Ok(sample_rows_with(logits, &rows, Some(penalties))?)
    }

    /// Appends each row's token, advances the grammars, sends the tokens on and ends
    /// the sequences that ended.
    pub(super) fn emit(&mut self, ids: Vec<SeqId>, sampled: Vec<Sampled>) {
        let now = Instant::now();
        let rows: Vec<(SeqId, u32)> = ids
            .iter()
            .zip(&sampled)
            .map(|(&id, s)| (id, s.token))
            .collect();
        let faults = &self.sup.faults;
        let grammar = self
            .masks
            .advance(&mut self.active, &rows, &|id| faults.mask_panics(id));
        let mut tokens = Vec::with_capacity(sampled.len());
        let mut ended = Vec::new();
        for (id, s) in ids.into_iter().zip(sampled) {
            let Some(a) = self.active.get_mut(&id) else {
                continue;
            };
            a.sampler.record(s.token);
            a.output_tokens += 1;
            self.stats.generation_tokens_total += 1;
            self.scheduler.append_token(id, s.token);
            let is_eos = self.eos_ids.contains(&s.token);
            let mut eos = !a.sampler.params.ignore_eos && is_eos;
            let total = a.prompt_len + a.output_tokens;
            let at_length =
                a.output_tokens >= a.sampler.params.max_tokens || total >= self.max_model_len;
            match grammar.get(&id) {
                // The grammar's accept state ends the sequence, whatever ignore_eos says.
                Some(p) => {
                    eos = is_eos;
                    ended.push(match p {
                        Progress::Failed(e) => (id, FinishReason::Error, Some(e.clone())),
                        _ => (id, FinishReason::Stop, None),
                    });
                }
                None if eos => ended.push((id, FinishReason::Stop, None)),
                None if at_length => ended.push((id, FinishReason::Length, None)),
                None => {}
            }
            tokens.push(OutToken {
                id,
                token: s.token,
                eos,
                logprobs: s.logprobs,
            });
        }
        let _ = self.output.send(OutputMsg::Tokens { at: now, tokens });
        for (id, reason, error) in ended {
            self.finish(id, reason, error);
        }
    }
}
