//! Sampling where the logits are. One op over the step's `[S, vocab]` logits picks a
//! token per row (greedy argmax, or penalties → temperature → top-k → top-p → min-p →
//! a draw) and, when a request asks, the token's log-prob and the top-N alternatives;
//! only those few numbers come back to the engine, never the logits.
//!
//! Selection is partial: top-k keeps a k-sized set while scanning; top-p and min-p
//! without top-k sort only a growing head of the distribution until the cut is
//! known; plain temperature draws in vocabulary order. The math of each stage is the
//! host sampler's (sampler.rs), so a seed gives the same token wherever the candidate
//! set and its order are the same (greedy, top-k, small nuclei), and the same
//! distribution otherwise.
//!
//! CPU: rows in parallel on the barrier pool. CUDA: greedy rows without penalties or
//! log-probs are an argmax on the device and only the ids are copied; other rows are
//! copied to the host and sampled there until a CUDA kernel for this op exists.

use std::collections::{HashMap, HashSet};

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rand::{Rng, SeedableRng};

use crate::request::TokenLogprobs;
use crate::sampler::SamplingParams;
use crate::threads;

/// Most alternatives a request may ask for (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One request's sampling state across steps: its random generator and the token
/// counts the penalties need.
pub struct SamplerState {
    pub params: SamplingParams,
    rng: rand::rngs::StdRng,
    output_counts: HashMap<u32, u32>,
    seen: HashSet<u32>,
    generated: usize,
}

impl SamplerState {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(s) => rand::rngs::StdRng::seed_from_u64(s),
            None => rand::rngs::StdRng::from_os_rng(),
        };
        let seen = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Self {
            params,
            rng,
            output_counts: HashMap::new(),
            seen,
            generated: 0,
        }
    }

    fn is_greedy(&self) -> bool {
        self.params.temperature <= 1e-5
    }

    /// What the op needs for this step's row; draws the step's random number (only
    /// when sampling, as the host sampler does, so both consume the same stream).
    pub fn row<'a>(&'a mut self, eos_ids: &'a [u32]) -> RowSampling<'a> {
        let uniform = if self.is_greedy() {
            0.0
        } else {
            self.rng.random::<f32>()
        };
        let p = &self.params;
        RowSampling {
            params: p,
            uniform,
            seen: (p.repetition_penalty != 1.0).then_some(&self.seen),
            output_counts: (p.presence_penalty != 0.0 || p.frequency_penalty != 0.0)
                .then_some(&self.output_counts),
            allowed: None,
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
    /// The step's draw in [0, 1) (unused when greedy).
    pub uniform: f32,
    pub seen: Option<&'a HashSet<u32>>,
    pub output_counts: Option<&'a HashMap<u32, u32>>,
    /// Masked for this step (EOS while under `min_tokens`).
    pub banned: &'a [u32],
    /// A structured-output constraint's bitmask (bit `i % 32` of word `i / 32`: token
    /// `i` allowed); everything else is masked before sampling and log-probs.
    pub allowed: Option<&'a [u32]>,
}

impl RowSampling<'_> {
    fn top_n(&self) -> Option<usize> {
        self.params.logprobs.map(|n| n.min(MAX_TOP_LOGPROBS))
    }

    fn needs_host_row(&self) -> bool {
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
    let (s, _vocab) = logits.dims2()?;
    if s != rows.len() {
        candle_core::bail!("sampling: {s} rows of logits for {} requests", rows.len());
    }
    if s == 0 {
        return Ok(Vec::new());
    }
    if !logits.device().is_cpu() {
        if rows.iter().all(|r| !r.needs_host_row()) {
            let ids = logits.argmax_keepdim(1)?.flatten_all()?.to_vec1::<u32>()?;
            return Ok(ids
                .into_iter()
                .map(|token| Sampled {
                    token,
                    logprobs: None,
                })
                .collect());
        }
        return sample_rows(&logits.to_device(&Device::Cpu)?, rows);
    }
    let width = 2 + 2 * rows.iter().filter_map(|r| r.top_n()).max().unwrap_or(0);
    let packed = logits
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1_no_bwd(&SampleOp { rows, width })?
        .to_vec2::<u32>()?;
    Ok(packed
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
        .collect())
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

fn sample_one(raw: &[f32], r: &RowSampling) -> Vec<u32> {
    let p = r.params;
    // A constraint's mask comes first: log-probs are then the masked distribution's.
    let masked;
    let raw: &[f32] = match r.allowed {
        Some(mask) => {
            masked = crate::constraint::apply_mask(raw, mask);
            &masked
        }
        None => raw,
    };
    // Penalties and bans change a few entries: only then is the row copied.
    let adjusted;
    let row: &[f32] = if r.seen.is_some() || r.output_counts.is_some() || !r.banned.is_empty() {
        let mut x = raw.to_vec();
        if let Some(seen) = r.seen {
            for &t in seen {
                if let Some(l) = x.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if let Some(counts) = r.output_counts {
            for (&t, &c) in counts {
                if let Some(l) = x.get_mut(t as usize) {
                    *l -= p.frequency_penalty * c as f32 + p.presence_penalty;
                }
            }
        }
        for &b in r.banned {
            if let Some(l) = x.get_mut(b as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        adjusted = x;
        &adjusted
    } else {
        raw
    };
    let token = if p.temperature <= 1e-5 {
        argmax(row)
    } else {
        sample_random(row, p, r.uniform)
    };
    let mut out = vec![token, 0];
    if let Some(n) = r.top_n() {
        // Log-probs of the model's own distribution (before penalties and temperature),
        // as vLLM and OpenAI report them.
        let lse = log_sum_exp(raw);
        out[1] = (raw[token as usize] - lse).to_bits();
        for (id, l) in top_n(raw, n) {
            out.push(id);
            out.push((l - lse).to_bits());
        }
    }
    out
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

fn log_sum_exp(v: &[f32]) -> f32 {
    let m = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    if !m.is_finite() {
        return m;
    }
    m + v.iter().map(|x| (x - m).exp()).sum::<f32>().ln()
}

/// Highest first, lower id first on ties: the host sampler's candidate order.
fn by_value(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The `n` largest finite entries, sorted, without sorting the row: a bounded set
/// refilled by a threshold scan.
fn top_n(v: &[f32], n: usize) -> Vec<(u32, f32)> {
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

/// Temperature, top-k, top-p, min-p, then a draw with `u` in [0, 1).
fn sample_random(row: &[f32], p: &SamplingParams, u: f32) -> u32 {
    let t = p.temperature;
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return argmax(row);
    }
    let max_t = max / t;
    let cand: Vec<(u32, f32)>;
    let sum: f32;
    if p.top_k > 0 {
        cand = top_n(row, p.top_k)
            .into_iter()
            .map(|(i, l)| (i, l / t))
            .collect();
        sum = cand.iter().map(|c| (c.1 - max_t).exp()).sum();
    } else if p.top_p < 1.0 || p.min_p > 0.0 {
        sum = row
            .iter()
            .filter(|l| l.is_finite())
            .map(|l| (l / t - max_t).exp())
            .sum();
        cand = nucleus_head(row, p, max_t, sum);
    } else {
        // Plain temperature: an inverse-CDF draw in vocabulary order, no sort at all.
        let weights = row.iter().map(|l| {
            if l.is_finite() {
                (l / t - max_t).exp()
            } else {
                0.0
            }
        });
        let total: f32 = weights.clone().sum();
        let mut r = u * total;
        let mut last = 0;
        for (i, w) in weights.enumerate() {
            if w > 0.0 {
                last = i;
                r -= w;
                if r <= 0.0 {
                    return i as u32;
                }
            }
        }
        return last as u32;
    }
    pick(&cand, sum, p, u)
}

/// The head of the sorted distribution that surely holds every token top-p and
/// min-p keep: sort the best 64, then 256, ... until a cut falls inside.
fn nucleus_head(row: &[f32], p: &SamplingParams, max_t: f32, sum: f32) -> Vec<(u32, f32)> {
    let t = p.temperature;
    let finite = row.iter().filter(|l| l.is_finite()).count();
    let mut k = 64.min(finite);
    loop {
        let head: Vec<(u32, f32)> = top_n(row, k).into_iter().map(|(i, l)| (i, l / t)).collect();
        if k >= finite {
            return head;
        }
        let mut cum = 0f32;
        let floor = p.min_p; // relative to the top token's probability (1/sum · sum)
        for &(_, l) in &head {
            let e = (l - max_t).exp();
            cum += e / sum;
            if (p.top_p < 1.0 && cum >= p.top_p) || (p.min_p > 0.0 && e < floor) {
                return head;
            }
        }
        k = (k * 4).min(finite);
    }
}

/// The host sampler's tail: probabilities over the sorted candidates, the top-p and
/// min-p cuts, and the draw.
fn pick(cand: &[(u32, f32)], sum: f32, p: &SamplingParams, u: f32) -> u32 {
    if cand.is_empty() {
        return 0;
    }
    let max = cand[0].1;
    let probs: Vec<f32> = cand.iter().map(|(_, l)| (l - max).exp() / sum).collect();
    let mut keep = probs.len();
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        for (i, &pr) in probs.iter().enumerate() {
            cum += pr;
            if cum >= p.top_p {
                keep = i + 1;
                break;
            }
        }
    }
    if p.min_p > 0.0 {
        let floor = p.min_p * probs[0];
        keep = keep.min(probs.iter().take_while(|&&x| x >= floor).count().max(1));
    }
    let total: f32 = probs[..keep].iter().sum();
    let mut r = u * total;
    for i in 0..keep {
        r -= probs[i];
        if r <= 0.0 {
            return cand[i].0;
        }
    }
    cand[keep - 1].0
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
