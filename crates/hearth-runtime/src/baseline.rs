//! A plain single-sequence loop over the same model, without the scheduler, the
//! block tables or the sampler's bookkeeping: the ceiling that `hearth bench` compares
//! the engine's steps/s with.

use std::time::{Duration, Instant};

use crate::error::Result;
use crate::kv_cache::KvCacheTensors;
use crate::model::{ForwardBatch, Transformer};
use crate::sampler::argmax;

/// Prefills `input_len` tokens, then decodes `steps` tokens greedily. Returns the
/// time the decode steps took.
pub fn single_sequence_decode(
    model: &Transformer,
    input_len: usize,
    steps: usize,
) -> Result<Duration> {
    let cfg = model.config();
    let total = input_len + steps;
    let bs = 16;
    let cache = KvCacheTensors::new(cfg, total.div_ceil(bs), bs, model.dtype(), model.device())?;
    let table: Vec<u32> = (0..total.div_ceil(bs) as u32).collect();
    let prompt: Vec<u32> = (0..input_len)
        .map(|i| (i * 7919 % cfg.vocab_size) as u32)
        .collect();
    let mut batch = ForwardBatch::new(bs);
    batch.push(&prompt, 0, &table, true);
    let logits = model.forward(&batch, &cache)?.to_vec2::<f32>()?;
    let mut next = logits.first().map(|r| argmax(r)).unwrap_or(0);
    let started = Instant::now();
    for pos in input_len..total {
        let mut b = ForwardBatch::new(bs);
        b.push(&[next], pos, &table, true);
        let logits = model.forward(&b, &cache)?.to_vec2::<f32>()?;
        next = logits.first().map(|r| argmax(r)).unwrap_or(0);
    }
    Ok(started.elapsed())
}
