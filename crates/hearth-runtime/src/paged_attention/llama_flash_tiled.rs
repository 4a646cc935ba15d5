//! llama.cpp's tiled CPU flash attention for a ubatch of ≥ 64 query tokens
//! (`ggml_compute_forward_flash_attn_ext_tiled`, ggml-cpu/ops.cpp), one query row at a
//! time. Unlike its one-key-at-a-time kernel (llama_flash.rs) it keeps everything in f32:
//! - Q stays f32 (not rounded to f16); K and V are widened from the f16 cache;
//! - keys go in tiles of 64 aligned to cache cell 0; a tile's scores come from
//!   `simd_gemm`, one fused multiply-add chain per score over the head dims in GGUF's
//!   order, then `· scale`; masked cells are −∞;
//! - per tile: the tile's max `M' = max(M, max s)`, and when it grows the running sum and
//!   value row scale by libm's `expf(M − M')`; the probabilities `ggml_v_expf(s − M')`
//!   (ggml_vec_soft_max_f32: each 16 cells reduced as `_mm512_reduce_add_ps` into an
//!   f64, added to the f32 sum once per tile);
//! - the value row accumulated in f32 by `simd_gemm`: one FMA per cell, in cell order;
//! - the row multiplied by `1 / Σ` at the end.

use super::llama_flash::{reduce_add_16, Row, Scratch};
use crate::cpu_ops::ggml_expf;

/// llama.cpp's `GGML_FA_TILE_KV`: cells per tile.
pub(super) const KV_TILE: usize = 64;

/// One query row over keys `0..=pos` of its sequence.
pub(super) fn attend_row(row: &Row, bufs: &mut Scratch, out: &mut [f32]) {
    let (_, pos, _) = row.at;
    let d = row.op.dims.d;
    let Scratch {
        q32, acc32, scores, ..
    } = bufs;
    for (x, &i) in q32.iter_mut().zip(row.op.gguf) {
        *x = row.q[i];
    }
    acc32.fill(0.0);
    let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
    // Tiles past the last key are masked throughout, and llama.cpp skips them.
    for tile in (0..=pos).step_by(KV_TILE) {
        let n = (pos + 1 - tile).min(KV_TILE);
        for (c, s) in scores.iter_mut().enumerate() {
            *s = if c < n {
                let at = row.key_at(tile + c);
                let k = &row.op.k[at..at + d];
                let mut dot = 0f32;
                for (&qx, &i) in q32.iter().zip(row.op.gguf) {
                    dot = qx.mul_add(k[i].to_f32(), dot);
                }
                dot * row.op.scale
            } else {
                f32::NEG_INFINITY
            };
        }
        let tile_max = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let m_new = m.max(tile_max);
        if m_new > m {
            let ms = (m - m_new).exp();
            for a in acc32.iter_mut() {
                *a *= ms;
            }
            sum *= ms;
        }
        m = m_new;
        let mut tile_sum = 0f64;
        for chunk in scores.chunks_mut(16) {
            let mut lanes = [0f32; 16];
            for (s, lane) in chunk.iter_mut().zip(&mut lanes) {
                // ggml_v_expf(−∞) is 0: masked cells add nothing.
                *s = ggml_expf(*s - m);
                *lane = *s;
            }
            tile_sum += reduce_add_16(&lanes) as f64;
        }
        sum = (sum as f64 + tile_sum) as f32;
        for (c, &p) in scores[..n].iter().enumerate() {
            let at = row.key_at(tile + c);
            for (a, x) in acc32.iter_mut().zip(&row.op.v[at..at + d]) {
                *a = x.to_f32().mul_add(p, *a);
            }
        }
    }
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, a) in out.iter_mut().zip(acc32.iter()) {
        *o = a * inv;
    }
}
