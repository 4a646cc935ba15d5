//! Sampling where the logits are. One op over the step's `[S, vocab]` logits picks a
//! token per row (greedy argmax, or penalties → temperature → top-k → top-p → min-p →
//! a draw) and, when a request asks, the token's log-prob and the top-N alternatives;
//! only those few numbers come back to the engine, never the logits.
//!
//! The draw is seeded_draw.rs's (Philox-keyed Gumbel-max, fixed-order sums, our own
//! exp and ln), which kernels/sample.cu makes the same way: a seeded request gets the
//! same tokens on the CPU and on a GPU for the same logits.
//!
//! CPU: rows in parallel on the barrier pool. CUDA: greedy rows without penalties,
//! masks or log-probs are an argmax on the device; every other step runs the sampling
//! kernel (sample_kernel.rs): one upload of the rows' parameters, one small copy back.

use std::collections::{HashMap, HashSet};

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rand::Rng;

use crate::penalty_table::{PenaltyTable, TableSlot};
use crate::request::TokenLogprobs;
use crate::sampler::SamplingParams;
use crate::seeded_draw::{self, flush, DrawParams};
use crate::threads;

/// Most alternatives a request may ask for (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One request's sampling state across steps: its seed (drawn at random when the
/// request gives none), the token counts the penalties need, how many tokens it has
/// drawn (the position its next draw is keyed by), and its row of the device's
/// penalty table when it has one (penalty_table.rs; the counts here are what that row
/// is filled from).
pub struct SamplerState {
    pub params: SamplingParams,
    seed: u64,
    output_counts: HashMap<u32, u32>,
    seen: HashSet<u32>,
    generated: usize,
    pub(crate) table: Option<TableSlot>,
}

impl SamplerState {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        let seen = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Self {
            params,
            seed,
            output_counts: HashMap::new(),
            seen,
            generated: 0,
            table: None,
        }
    }

    /// Whether the penalties could come from a row of the device table: the row's
    /// counts saturate at `MAX_COUNT`, which only the frequency penalty would notice,
    /// and only past that many output tokens.
    pub fn fits_penalty_table(&self) -> bool {
        let p = &self.params;
        let counts = p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        (counts || p.repetition_penalty != 1.0)
            && (p.frequency_penalty == 0.0 || p.max_tokens <= crate::penalty_table::MAX_COUNT)
    }

    /// The row of the device table it holds, if any.
    pub fn table_slot(&self) -> Option<TableSlot> {
        self.table
    }

    /// What the op needs for this step's row.
    pub fn row<'a>(&'a mut self, eos_ids: &'a [u32]) -> RowSampling<'a> {
        let p = &self.params;
        RowSampling {
            params: p,
            seed: self.seed,
            position: self.generated as u64,
            seen: (p.repetition_penalty != 1.0).then_some(&self.seen),
            output_counts: (p.presence_penalty != 0.0 || p.frequency_penalty != 0.0)
                .then_some(&self.output_counts),
            allowed: None,
            table: self.table,
            // Under a constraint the grammar decides when EOS may come (min_tokens yields).
            banned: if self.generated < p.min_tokens && p.constraint.is_none() {
                eos_ids
            } else {
                &[]
            },
        }
    }

    /// Records the sampled token for the next step's penalties.
    pub fn record(&mut self, token: u32) {
        self.generated += 1;
        // The kernel that drew it wrote the table row (when it was new) and counted it.
        if let Some(t) = self.table.as_mut() {
            t.filled = true;
        }
        if self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0 {
            *self.output_counts.entry(token).or_insert(0) += 1;
        }
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
    }
}

/// One row's sampling inputs for one step.
pub struct RowSampling<'a> {
    pub params: &'a SamplingParams,
    /// The request's seed and the output position of this draw: its Philox key and
    /// counter (seeded_draw.rs).
    pub seed: u64,
    pub position: u64,
    pub seen: Option<&'a HashSet<u32>>,
    pub output_counts: Option<&'a HashMap<u32, u32>>,
    /// Masked for this step (EOS while under `min_tokens`).
    pub banned: &'a [u32],
    /// A structured-output constraint's bitmask (bit `i % 32` of word `i / 32`: token
    /// `i` allowed); everything else is masked before sampling and log-probs.
    pub allowed: Option<&'a [u32]>,
    /// The row of the device's penalty table that holds `seen` and `output_counts`
    /// (the sampling kernel reads it instead of a list; the CPU op ignores it).
    pub table: Option<TableSlot>,
}

impl RowSampling<'_> {
    pub(crate) fn top_n(&self) -> Option<usize> {
        self.params.logprobs.map(|n| n.min(MAX_TOP_LOGPROBS))
    }

    /// Whether the row needs more than a plain argmax.
    pub(crate) fn needs_sampling_kernel(&self) -> bool {
        self.params.temperature > 1e-5
            || self.seen.is_some()
            || self.output_counts.is_some()
            || !self.banned.is_empty()
            || self.params.logprobs.is_some()
            || self.allowed.is_some()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprobs: Option<TokenLogprobs>,
}

/// Samples one token per row of `logits` (`[S, vocab]`, f32).
pub fn sample_rows(logits: &Tensor, rows: &[RowSampling]) -> Result<Vec<Sampled>> {
    sample_rows_with(logits, rows, None)
}

/// [`sample_rows`], with the device's penalty table for rows that hold a slot in it.
pub fn sample_rows_with(
    logits: &Tensor,
    rows: &[RowSampling],
    table: Option<&mut PenaltyTable>,
) -> Result<Vec<Sampled>> {
    let (s, _vocab) = logits.dims2()?;
    if s != rows.len() {
        candle_core::bail!("sampling: {s} rows of logits for {} requests", rows.len());
    }
    if s == 0 {
        return Ok(Vec::new());
    }
    if !logits.device().is_cpu() {
        if rows.iter().all(|r| !r.needs_sampling_kernel()) {
            let ids = logits.argmax_keepdim(1)?.flatten_all()?.to_vec1::<u32>()?;
            return Ok(ids
                .into_iter()
                .map(|token| Sampled {
                    token,
                    logprobs: None,
                })
                .collect());
        }
        #[cfg(feature = "cuda")]
        if logits.device().is_cuda() {
            return Ok(unpack(
                &crate::sample_kernel::sample_cuda(logits, rows, table)?,
                rows,
            ));
        }
        #[cfg(not(feature = "cuda"))]
        let _ = table;
        return sample_rows(&logits.to_device(&Device::Cpu)?, rows);
    }
    let width = crate::sample_kernel::out_width(rows);
    let packed = logits
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1_no_bwd(&SampleOp { rows, width })?
        .to_vec2::<u32>()?;
    Ok(unpack(&packed, rows))
}

/// Rows of the packed output (see `SampleOp`) as tokens and log-probs.
fn unpack(packed: &[Vec<u32>], rows: &[RowSampling]) -> Vec<Sampled> {
    packed
        .iter()
        .zip(rows)
        .map(|(p, r)| Sampled {
            token: p[0],
            logprobs: r.top_n().map(|n| TokenLogprobs {
                logprob: f32::from_bits(p[1]),
                top: (0..n)
                    .map(|i| (p[2 + 2 * i], f32::from_bits(p[3 + 2 * i])))
                    .collect(),
            }),
        })
        .collect()
}

/// Output row: `[token, logprob bits, (alt token, alt logprob bits) × N]`.
struct SampleOp<'a, 'b> {
    rows: &'a [RowSampling<'b>],
    width: usize,
}

#[derive(Clone, Copy)]
struct OutPtr(*mut u32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl CustomOp1 for SampleOp<'_, '_> {
    fn name(&self) -> &'static str {
        "hearth-sample"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (s, v) = layout.shape().dims2()?;
        let CpuStorage::F32(all) = storage else {
            candle_core::bail!("sampling: logits must be f32");
        };
        let logits = &all[layout.start_offset()..layout.start_offset() + s * v];
        let w = self.width;
        let mut out = vec![0u32; s * w];
        let ptr = OutPtr(out.as_mut_ptr());
        threads::parallel_chunks(s, 1, |range| {
            let p = ptr;
            for i in range {
                let packed = sample_one(&logits[i * v..(i + 1) * v], &self.rows[i]);
                // SAFETY: row i of `out` is written by this iteration only.
                let dst = unsafe { std::slice::from_raw_parts_mut(p.0.add(i * w), w) };
                dst[..packed.len().min(w)].copy_from_slice(&packed[..packed.len().min(w)]);
            }
        });
        Ok((CpuStorage::U32(out), Shape::from((s, w))))
    }
}

/// One row, as the kernel does it: the constraint's mask, then penalties and bans on a
/// flushed copy, then argmax or the seeded draw; log-probs from the masked row.
pub(crate) fn sample_one(x: &[f32], r: &RowSampling) -> Vec<u32> {
    let p = r.params;
    // A constraint's mask comes first: log-probs are then the masked distribution's.
    let raw: Vec<f32> = match r.allowed {
        Some(mask) => crate::constraint::apply_mask(x, mask)
            .into_iter()
            .map(flush)
            .collect(),
        None => x.iter().map(|&v| flush(v)).collect(),
    };
    let mut row = raw.clone();
    for (t, seen, count) in penalty_entries(r) {
        let Some(l) = row.get_mut(t as usize) else {
            continue;
        };
        if seen {
            *l = flush(if *l > 0.0 {
                *l / p.repetition_penalty
            } else {
                *l * p.repetition_penalty
            });
        }
        if count > 0 {
            *l = flush(*l - (p.frequency_penalty * count as f32 + p.presence_penalty));
        }
    }
    for &b in r.banned {
        if let Some(l) = row.get_mut(b as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
    let token = if p.temperature <= 1e-5 {
        argmax(&row)
    } else {
        seeded_draw::draw(&row, &draw_params(r))
    };
    let mut out = vec![token, 0];
    if let Some(n) = r.top_n() {
        // Log-probs of the model's own distribution (before penalties and temperature),
        // as vLLM and OpenAI report them.
        let norm = seeded_draw::log_norm(&raw);
        out[1] = seeded_draw::log_prob(raw[token as usize], norm).to_bits();
        for (id, l) in top_n(&raw, n) {
            out.push(id);
            out.push(seeded_draw::log_prob(l, norm).to_bits());
        }
    }
    out
}

/// The draw's parameters, flushed as the kernel sees them.
pub(crate) fn draw_params(r: &RowSampling) -> DrawParams {
    let p = r.params;
    DrawParams {
        temperature: flush(p.temperature),
        top_k: p.top_k,
        top_p: flush(p.top_p),
        min_p: flush(p.min_p),
        seed: r.seed,
        position: r.position,
    }
}

/// The row's penalised tokens, each once, ascending: (token, seen by the repetition
/// penalty, output count for the presence/frequency penalties).
pub(crate) fn penalty_entries(r: &RowSampling) -> Vec<(u32, bool, u32)> {
    let mut e: HashMap<u32, (bool, u32)> = HashMap::new();
    if let Some(seen) = r.seen {
        for &t in seen {
            e.entry(t).or_default().0 = true;
        }
    }
    if let Some(counts) = r.output_counts {
        for (&t, &c) in counts {
            e.entry(t).or_default().1 = c;
        }
    }
    let mut v: Vec<(u32, bool, u32)> = e.into_iter().map(|(t, (s, c))| (t, s, c)).collect();
    v.sort_unstable_by_key(|x| x.0);
    v
}

/// Index of the largest value; the first one on ties.
fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &x) in v.iter().enumerate() {
        if x > best_v {
            best = i;
            best_v = x;
        }
    }
    best as u32
}

/// Highest first, lower id first on ties: the host sampler's candidate order.
fn by_value(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The `n` largest finite entries, sorted, without sorting the row: a bounded set
/// refilled by a threshold scan.
pub(crate) fn top_n(v: &[f32], n: usize) -> Vec<(u32, f32)> {
    // The engine refuses a top_k above the vocabulary; this keeps the reservation
    // bounded by the row whoever calls it.
    let n = n.min(v.len());
    if n == 0 {
        return Vec::new();
    }
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(2 * n);
    let mut floor = f32::NEG_INFINITY;
    for (i, &x) in v.iter().enumerate() {
        if x.is_finite() && (best.len() < n || x > floor) {
            best.push((i as u32, x));
            if best.len() == 2 * n {
                best.select_nth_unstable_by(n - 1, by_value);
                best.truncate(n);
                floor = best.iter().map(|c| c.1).fold(f32::INFINITY, f32::min);
            }
        }
    }
    best.sort_unstable_by(by_value);
    best.truncate(n);
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_n_is_the_sorted_head_with_low_ids_first_on_ties() {
        let v = [1.0, 5.0, 3.0, 5.0, f32::NEG_INFINITY, 4.0, 2.0];
        assert_eq!(
            top_n(&v, 3),
            vec![(1, 5.0), (3, 5.0), (5, 4.0)],
            "ties by id"
        );
        assert_eq!(top_n(&v, 10).len(), 6, "never the -inf entry");
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, 1.0]), 1);
    }
}
