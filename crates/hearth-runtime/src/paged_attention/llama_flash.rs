//! llama.cpp's CPU flash attention on an f16 cache, reproduced operation for operation
//! (`--attention-numerics llama-cpp`), so that hearth's output can be compared with an
//! unmodified llama-server, whose default `-fa auto` runs it on a CPU build
//! (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`, ggml-cpu/ops.cpp). Per query
//! row (token, head):
//! - Q rounded to f16 (unscaled), the score `s = dot_f16(k, q) · scale` summed in
//!   ggml_vec_dot_f16's order on an AVX-512 build ([`dot_f16`]) over the head dims in
//!   GGUF's order: llama.cpp's Q/K rows of `llama` models interleave the two RoPE halves
//!   that hearth un-permutes at load (dim `2i` is hearth's `i`, `2i + 1` its `i + d/2`),
//!   and which products share an accumulator lane decides the sum's rounding;
//! - the online softmax updated at every key, in cache order, with libm's `expf`
//!   (Rust's `f32::exp` calls the same function);
//! - the running P·V sum held in f16 and rounded after every key: `acc = f16(v·w + acc)`
//!   (one fused multiply-add in f32), `acc = f16(acc · e^(M_old − M))` when the max grows;
//! - the row widened to f32 and multiplied by `1 / Σw` at the end.
//!
//! Its rounding to f16 moves scores and outputs by about 1e-4 relative, far more than the
//! default kernels' f32 arithmetic; this mode exists to agree with llama.cpp, not to be
//! more accurate. A ubatch of ≥ 64 query tokens takes llama.cpp's tiled prompt kernel
//! instead (`ggml_compute_forward_flash_attn_ext_tiled`: f32 Q, f32 sums, a softmax per
//! 64-key tile), reproduced in llama_flash_tiled.rs; the choice is by the step's token
//! count, as llama.cpp's is by the ubatch's. Not reproduced: a one-token step over ≥ 512
//! cache cells, where llama.cpp splits the keys across its threads and merges the
//! partial sums in f32 (the result depends on llama-server's thread count); head dims of
//! ≥ 128 on a build with AVX512-FP16, where ggml_vec_mad_f16 runs in native f16 with the
//! weight rounded to f16 (under 128 it takes the scalar loop reproduced here); and models
//! whose GGUF rows are not interleaved (not `llama`), whose dims this still reads in the
//! interleaved order (as llama_f32.rs does).

use half::f16;

use super::cpu::{Dims, OutPtr};
#[cfg(target_arch = "x86_64")]
use super::llama_flash_simd;
use super::llama_flash_tiled::{self, KV_TILE};
use super::AttentionMetadata;
use crate::threads;

/// llama.cpp's `GGML_FA_TILE_Q`: a ubatch of at least this many tokens takes its tiled
/// kernel.
pub(super) const Q_TILE: usize = 64;

/// `softmax(q·kᵀ·scale)·v` for every (token, head) row with llama.cpp's arithmetic;
/// `q` and the result `[T, heads, head_dim]` f32, the caches f16. Runs
/// llama_flash_simd.rs's kernels where the CPU and head dim allow (the same bits).
pub(super) fn attend(
    q: &[f32],
    k: &[f16],
    v: &[f16],
    meta: &AttentionMetadata,
    dims: Dims,
    scale: f32,
) -> Vec<f32> {
    attend_with(q, k, v, meta, dims, scale, simd_fits(dims.d))
}

/// Whether llama_flash_simd.rs's kernels run here for head dim `d`.
pub(super) fn simd_fits(d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        llama_flash_simd::available() && llama_flash_simd::fits(d)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = d;
        false
    }
}

/// [`attend`] with the SIMD kernels (`simd`, which needs [`simd_fits`]) or the scalar
/// reference.
pub(super) fn attend_with(
    q: &[f32],
    k: &[f16],
    v: &[f16],
    meta: &AttentionMetadata,
    dims: Dims,
    scale: f32,
    simd: bool,
) -> Vec<f32> {
    let Dims { h, d, .. } = dims;
    let t = meta.num_tokens();
    let mut out = vec![0f32; t * h * d];
    let tiled = t >= Q_TILE;
    // GGUF's dim `g` is hearth's `gguf[g]`.
    let gguf: Vec<usize> = (0..d).map(|g| gguf_dim(g, d / 2)).collect();
    let op = Operands {
        q,
        k,
        v,
        meta,
        dims,
        scale,
        gguf: &gguf,
    };
    #[cfg(target_arch = "x86_64")]
    if simd {
        if tiled {
            tiled_simd(&op, &mut out);
        } else {
            one_key_simd(&op, &mut out);
        }
        return out;
    }
    // Each token's sequence and its position (the last key it sees).
    let mut token_at = Vec::with_capacity(t);
    for s in 0..meta.num_seqs() {
        let (toks, first) = meta.queries(s);
        token_at.extend((0..toks.len()).map(|i| (s, first + i)));
    }
    let ptr = OutPtr(out.as_mut_ptr());
    threads::parallel_chunks(t * h, 4, |range| {
        let p = ptr;
        let mut bufs = Scratch::new(d);
        for row in range {
            let (tok, head) = (row / h, row % h);
            let (seq, pos) = token_at[tok];
            // SAFETY: row `row` of `out` (d values) is written by this call alone.
            let dst = unsafe { std::slice::from_raw_parts_mut(p.0.add(row * d), d) };
            let q_row = &q[row * d..(row + 1) * d];
            let row = Row {
                op,
                q: q_row,
                at: (seq, pos, head),
            };
            if tiled {
                llama_flash_tiled::attend_row(&row, &mut bufs, dst);
            } else {
                attend_row(&row, &mut bufs, dst);
            }
        }
    });
    out
}

/// The one-key kernel on llama_flash_simd.rs: a work item per token and KV head (its
/// query heads together, at most [`llama_flash_simd::GROUP_MAX`] at a time).
#[cfg(target_arch = "x86_64")]
fn one_key_simd(op: &Operands, out: &mut [f32]) {
    use llama_flash_simd::GROUP_MAX;
    let Dims { h, kvh, d, .. } = op.dims;
    let group = h / kvh;
    let splits = group.div_ceil(GROUP_MAX);
    let per = group.div_ceil(splits);
    // (token, first head, heads) per item, with the token's sequence and position.
    let mut items = Vec::new();
    for s in 0..op.meta.num_seqs() {
        let (toks, first) = op.meta.queries(s);
        for (i, tok) in toks.enumerate() {
            for kv_head in 0..kvh {
                for h0 in (kv_head * group..(kv_head + 1) * group).step_by(per) {
                    let n = per.min((kv_head + 1) * group - h0);
                    items.push((s, first + i, kv_head, tok * h + h0, n));
                }
            }
        }
    }
    let ptr = OutPtr(out.as_mut_ptr());
    threads::parallel_chunks(items.len(), 1, |range| {
        let p = ptr;
        let (mut qh, mut acc) = (vec![0f32; GROUP_MAX * d], vec![0f32; GROUP_MAX * d]);
        for &(seq, pos, kv_head, row0, n) in &items[range] {
            // SAFETY: rows `row0..row0 + n` of `out` are this item's alone.
            let dst = unsafe { std::slice::from_raw_parts_mut(p.0.add(row0 * d), n * d) };
            let q_rows = &op.q[row0 * d..(row0 + n) * d];
            // SAFETY: the caller checked `simd_fits(d)`; the metadata was validated
            // against the caches.
            unsafe {
                llama_flash_simd::one_key_group(
                    op,
                    q_rows,
                    (seq, pos, kv_head),
                    &mut qh,
                    &mut acc,
                    dst,
                );
            }
        }
    });
}

/// The tiled kernel on llama_flash_simd.rs: work items of up to
/// [`llama_flash_simd::TILED_TOKENS`] tokens of one sequence × one KV head's query heads.
#[cfg(target_arch = "x86_64")]
fn tiled_simd(op: &Operands, out: &mut [f32]) {
    use llama_flash_simd::{TiledItem, TiledScratch, TILED_TOKENS};
    let mut items = Vec::new();
    for seq in 0..op.meta.num_seqs() {
        let (toks, first) = op.meta.queries(seq);
        for kv_head in 0..op.dims.kvh {
            for tok0 in toks.clone().step_by(TILED_TOKENS) {
                items.push(TiledItem {
                    seq,
                    kv_head,
                    tok0,
                    pos0: first + tok0 - toks.start,
                    n_tok: TILED_TOKENS.min(toks.end - tok0),
                });
            }
        }
    }
    // The longest items (most keys) first, so the last ones to finish are short.
    items.sort_by_key(|it| std::cmp::Reverse(it.pos0));
    let ptr = OutPtr(out.as_mut_ptr());
    threads::parallel_chunks(items.len(), 1, |range| {
        let p = ptr;
        let mut scratch = TiledScratch::default();
        for &it in &items[range] {
            // SAFETY: the caller checked `simd_fits(d)`; the metadata was validated
            // against the caches; each (token, head) row belongs to one item.
            unsafe {
                llama_flash_simd::tiled_item(op, it, p.0, &mut scratch);
            }
        }
    });
}

/// What every kernel of this mode reads: the step's queries `[T, heads, head_dim]` and
/// the paged f16 caches, in hearth's dim order, and the map to GGUF's.
#[derive(Clone, Copy)]
pub(super) struct Operands<'a> {
    pub q: &'a [f32],
    pub k: &'a [f16],
    pub v: &'a [f16],
    pub meta: &'a AttentionMetadata,
    pub dims: Dims,
    pub scale: f32,
    /// GGUF's dim `g` is hearth's `gguf[g]`.
    pub gguf: &'a [usize],
}

/// One query row: its `q` (hearth's dim order) and the (sequence, position, head) it
/// attends from.
pub(super) struct Row<'a> {
    pub op: Operands<'a>,
    pub q: &'a [f32],
    pub at: (usize, usize, usize),
}

impl Row<'_> {
    /// Where `key`'s row of this row's KV head starts in the caches.
    pub fn key_at(&self, key: usize) -> usize {
        let Dims { h, kvh, d, bs } = self.op.dims;
        let (seq, _, head) = self.at;
        let kv_head = head / (h / kvh);
        let m = self.op.meta.max_blocks;
        let block = self.op.meta.block_tables[seq * m + key / bs] as usize;
        ((block * bs + key % bs) * kvh + kv_head) * d
    }
}

/// Per-thread buffers, reused across rows.
pub(super) struct Scratch {
    pub q16: Vec<f16>,
    pub k16: Vec<f16>,
    pub acc16: Vec<f16>,
    pub q32: Vec<f32>,
    pub acc32: Vec<f32>,
    pub scores: [f32; KV_TILE],
}

impl Scratch {
    fn new(d: usize) -> Self {
        Self {
            q16: vec![f16::ZERO; d],
            k16: vec![f16::ZERO; d],
            acc16: vec![f16::ZERO; d],
            q32: vec![0.0; d],
            acc32: vec![0.0; d],
            scores: [0.0; KV_TILE],
        }
    }
}

/// One query row over keys `0..=pos` of its sequence, as
/// `ggml_compute_forward_flash_attn_ext_f16_one_chunk` computes it.
fn attend_row(row: &Row, bufs: &mut Scratch, out: &mut [f32]) {
    let (_, pos, _) = row.at;
    let d = row.op.dims.d;
    let Scratch {
        q16, k16, acc16, ..
    } = bufs;
    for (x, &i) in q16.iter_mut().zip(row.op.gguf) {
        *x = f16::from_f32(row.q[i]);
    }
    acc16.fill(f16::ZERO);
    let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
    for key in 0..=pos {
        let at = row.key_at(key);
        let (kr, vr) = (&row.op.k[at..at + d], &row.op.v[at..at + d]);
        for (x, &i) in k16.iter_mut().zip(row.op.gguf) {
            *x = kr[i];
        }
        let s = dot_f16(k16, q16) * row.op.scale;
        // A new maximum rescales the sum (ms = e^(M_old − M), vs = e^0 = 1); otherwise
        // ms = 1 and vs = e^(s − M).
        let (ms, vs) = if s > m {
            let m_old = m;
            m = s;
            ((m_old - m).exp(), 1f32)
        } else {
            (1f32, (s - m).exp())
        };
        let rescale = ms != 1.0;
        for (a, x) in acc16.iter_mut().zip(vr) {
            // ggml_vec_scale_f16 (rounded to f16) when the max grew, then
            // ggml_vec_mad_f16 (one FMA, rounded to f16): two passes there, one here.
            let kept = if rescale {
                f16::from_f32(a.to_f32() * ms).to_f32()
            } else {
                a.to_f32()
            };
            *a = f16::from_f32(x.to_f32().mul_add(vs, kept));
        }
        // GCC contracts llama.cpp's `S = S*ms + vs` (-ffp-contract=fast under gnu++17).
        sum = sum.mul_add(ms, vs);
    }
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, a) in out.iter_mut().zip(acc16.iter()) {
        *o = a.to_f32() * inv;
    }
}

/// hearth's dim of GGUF's dim `g` in a head of `2·half` dims (see the module comment).
pub(super) fn gguf_dim(g: usize, half: usize) -> usize {
    if g.is_multiple_of(2) {
        g / 2
    } else {
        half + g / 2
    }
}

/// ggml's `GGML_F32_VEC_REDUCE` of four 16-lane accumulators on an AVX-512 build:
/// (0 + 2) + (1 + 3) lane by lane, then [`reduce_add_16`].
pub(super) fn reduce_f32x16x4(acc: &[[f32; 16]; 4]) -> f32 {
    let mut r = [0f32; 16];
    for (l, x) in r.iter_mut().enumerate() {
        *x = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
    }
    reduce_add_16(&r)
}

/// `_mm512_reduce_add_ps` as GCC expands it: lane i + i+8, then + i+4, then
/// (0 + 2) + (1 + 3).
pub(super) fn reduce_add_16(r: &[f32; 16]) -> f32 {
    let mut r8 = [0f32; 8];
    for (l, x) in r8.iter_mut().enumerate() {
        *x = r[l + 8] + r[l];
    }
    let mut r4 = [0f32; 4];
    for (l, x) in r4.iter_mut().enumerate() {
        *x = r8[l + 4] + r8[l];
    }
    (r4[0] + r4[2]) + (r4[1] + r4[3])
}

/// `Σ x·y` of two f16 rows as ggml_vec_dot_f16 sums it on an AVX-512 build: four 16-lane
/// f32 accumulators over 64-element steps (the products of two f16 values are exact in
/// f32), folded as (0 + 2) + (1 + 3), the 16 lanes reduced as `_mm512_reduce_add_ps`
/// does (lane i + i+8, + i+4, then (0 + 2) + (1 + 3)), and a tail of `n % 64` elements
/// added in f64.
pub(super) fn dot_f16(x: &[f16], y: &[f16]) -> f32 {
    let n = x.len();
    let np = n & !63;
    let mut acc = [[0f32; 16]; 4];
    for i in (0..np).step_by(64) {
        for (j, lanes) in acc.iter_mut().enumerate() {
            for (l, a) in lanes.iter_mut().enumerate() {
                let at = i + j * 16 + l;
                *a = x[at].to_f32().mul_add(y[at].to_f32(), *a);
            }
        }
    }
    let mut sum = reduce_f32x16x4(&acc) as f64;
    for i in np..n {
        sum += (x[i].to_f32() * y[i].to_f32()) as f64;
    }
    sum as f32
}
