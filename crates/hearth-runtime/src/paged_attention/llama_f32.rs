//! llama.cpp's CPU attention without flash attention over an f32 cache, reproduced
//! operation for operation (`--attention-numerics llama-cpp` with `--kv-cache-dtype f32`,
//! the arithmetic of `llama-server -fa off -ctk f32 -ctv f32`): `kq = mul_mat(k, q)`,
//! `soft_max_ext(kq · scale)`, `kqv = mul_mat(vᵀ, kq)`. Per query row (token, head):
//! - scores by ggml_vec_dot_f32 (q is a permuted view, so no GEMM), summed over the head
//!   dims in GGUF's order: llama.cpp's Q/K rows interleave the two RoPE halves that
//!   hearth un-permutes at load, so dim `2i` is hearth's `i` and `2i + 1` its `i + d/2`;
//! - `w = s · scale`, the max, `e = ggml_expf(w − max)`, summed per 16 cells with
//!   `_mm512_reduce_add_ps` into an f64, probabilities `e · f32(1 / sum)`;
//! - the value sum as llama.cpp's mul_mat takes it: a ubatch of ≥ 2 tokens goes through
//!   llamafile's tinyBLAS (one 16-lane FMA accumulator over the cells, then the lane
//!   reduction), a one-token step through ggml_vec_dot_f32 (four 16-lane accumulators).
//!
//! Cells past the row's last key (masked, or padding up to llama.cpp's 256) add exact
//! zeros there, so only the keys `0..=pos` are visited here. Scalar and one row at a
//! time: slower than the default kernels, for agreeing with llama.cpp to the bit.

use super::cpu::{Dims, OutPtr};
use super::llama_flash::{gguf_dim, reduce_add_16, reduce_f32x16x4};
use super::AttentionMetadata;
use crate::cpu_ops::ggml_expf;
use crate::threads;

/// `softmax(q·kᵀ·scale)·v` for every (token, head) row with llama.cpp's f32 arithmetic;
/// `q` and the result `[T, heads, head_dim]`, the caches f32.
pub(super) fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    meta: &AttentionMetadata,
    dims: Dims,
    scale: f32,
) -> Vec<f32> {
    let Dims { h, d, .. } = dims;
    let t = meta.num_tokens();
    let mut out = vec![0f32; t * h * d];
    let mut token_at = Vec::with_capacity(t);
    for s in 0..meta.num_seqs() {
        let (toks, first) = meta.queries(s);
        token_at.extend((0..toks.len()).map(|i| (s, first + i)));
    }
    // llama.cpp's choice is by the ubatch's token count, not per sequence.
    let gemm = t >= 2;
    let ptr = OutPtr(out.as_mut_ptr());
    threads::parallel_chunks(t * h, 4, |range| {
        let p = ptr;
        let mut probs = Vec::new();
        for row in range {
            let (tok, head) = (row / h, row % h);
            // SAFETY: row `row` of `out` (d values) is written by this call alone.
            let dst = unsafe { std::slice::from_raw_parts_mut(p.0.add(row * d), d) };
            let q_row = &q[row * d..(row + 1) * d];
            let (seq, pos) = token_at[tok];
            attend_row(
                q_row,
                k,
                v,
                meta,
                dims,
                scale,
                (seq, pos, head),
                gemm,
                &mut probs,
                dst,
            );
        }
    });
    out
}

/// ggml_vec_dot_f32 of a query and a key row, both read in GGUF's dim order: four
/// 16-lane FMA accumulators over steps of 64, the reduction, then the tail in f32.
fn dot_gguf_order(q: &[f32], k: &[f32]) -> f32 {
    let (n, half) = (q.len(), q.len() / 2);
    let np = n & !63;
    let mut acc = [[0f32; 16]; 4];
    for g in 0..np {
        let i = gguf_dim(g, half);
        let a = &mut acc[(g % 64) / 16][g % 16];
        *a = q[i].mul_add(k[i], *a);
    }
    let mut sum = reduce_f32x16x4(&acc);
    for g in np..n {
        let i = gguf_dim(g, half);
        sum = q[i].mul_add(k[i], sum);
    }
    sum
}

/// One query row over keys `0..=pos` of its sequence.
#[allow(clippy::too_many_arguments)]
fn attend_row(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    meta: &AttentionMetadata,
    dims: Dims,
    scale: f32,
    (seq, pos, head): (usize, usize, usize),
    gemm: bool,
    probs: &mut Vec<f32>,
    out: &mut [f32],
) {
    let Dims { h, kvh, d, bs } = dims;
    let kv_head = head / (h / kvh);
    let table = &meta.block_tables[seq * meta.max_blocks..(seq + 1) * meta.max_blocks];
    let at = |key: usize| ((table[key / bs] as usize * bs + key % bs) * kvh + kv_head) * d;
    probs.clear();
    probs.extend((0..=pos).map(|key| dot_gguf_order(q, &k[at(key)..at(key) + d]) * scale));
    let max = probs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // ggml_vec_soft_max_f32: e^(w − max) per cell, each 16 cells' sum into an f64.
    let mut sum = 0f64;
    for chunk in probs.chunks_mut(16) {
        let mut lanes = [0f32; 16];
        for (e, lane) in chunk.iter_mut().zip(&mut lanes) {
            *e = ggml_expf(*e - max);
            *lane = *e;
        }
        sum += reduce_add_16(&lanes) as f64;
    }
    let inv = (1.0 / sum) as f32;
    for e in probs.iter_mut() {
        *e *= inv;
    }
    for (dim, o) in out.iter_mut().enumerate() {
        let value = |key: usize| v[at(key) + dim];
        *o = if gemm {
            // tinyBLAS: one accumulator lane per cell index mod 16.
            let mut acc = [0f32; 16];
            for (key, p) in probs.iter().enumerate() {
                acc[key % 16] = value(key).mul_add(*p, acc[key % 16]);
            }
            reduce_add_16(&acc)
        } else {
            // ggml_vec_dot_f32: cell index mod 64 picks the accumulator and lane (the
            // cell count is a multiple of 64 there, so there is no tail).
            let mut acc = [[0f32; 16]; 4];
            for (key, p) in probs.iter().enumerate() {
                let a = &mut acc[(key % 64) / 16][key % 16];
                *a = value(key).mul_add(*p, *a);
            }
            reduce_f32x16x4(&acc)
        };
    }
}
