//! llama.cpp's CPU flash attention on an f16 cache, reproduced operation for operation
//! (`--attention-numerics llama-cpp`), so that hearth's output can be compared with an
//! unmodified llama-server, whose default `-fa auto` runs it on a CPU build
//! (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`, ggml-cpu/ops.cpp). Per query
//! row (token, head):
//! - Q rounded to f16 (unscaled), the score `s = dot_f16(k, q) · scale` summed in
//!   ggml_vec_dot_f16's order on an AVX-512 build ([`dot_f16`]);
//! - the online softmax updated at every key, in cache order, with libm's `expf`
//!   (Rust's `f32::exp` calls the same function);
//! - the running P·V sum held in f16 and rounded after every key: `acc = f16(v·w + acc)`
//!   (one fused multiply-add in f32), `acc = f16(acc · e^(M_old − M))` when the max grows;
//! - the row widened to f32 and multiplied by `1 / Σw` at the end.
//!
//! Its rounding to f16 moves scores and outputs by about 1e-4 relative, far more than the
//! default kernels' f32 arithmetic (which stays the default); this mode exists to agree
//! with llama.cpp, not to be more accurate. llama.cpp takes two other paths this does not
//! reproduce: a ubatch of ≥ 64 query tokens (its tiled f32 kernel, block-max softmax) and
//! a one-token step over ≥ 512 cache cells (keys split across its threads, merged in f32).
//! One key at a time, no SIMD: slower than the default kernels.

use half::f16;

use super::cpu::{Dims, OutPtr};
use super::AttentionMetadata;
use crate::threads;

/// `softmax(q·kᵀ·scale)·v` for every (token, head) row with llama.cpp's arithmetic;
/// `q` and the result `[T, heads, head_dim]` f32, the caches f16.
pub(super) fn attend(
    q: &[f32],
    k: &[f16],
    v: &[f16],
    meta: &AttentionMetadata,
    dims: Dims,
    scale: f32,
) -> Vec<f32> {
    let Dims { h, d, .. } = dims;
    let t = meta.num_tokens();
    let mut out = vec![0f32; t * h * d];
    // Each token's sequence and its position (the last key it sees).
    let mut token_at = Vec::with_capacity(t);
    for s in 0..meta.num_seqs() {
        let (a, b) = (meta.query_start[s], meta.query_start[s + 1]);
        let first = meta.seq_lens[s] - (b - a);
        token_at.extend((0..b - a).map(|i| (s, (first + i) as usize)));
    }
    let ptr = OutPtr(out.as_mut_ptr());
    threads::parallel_chunks(t * h, 4, |range| {
        let p = ptr;
        let (mut q16, mut acc) = (vec![f16::ZERO; d], vec![f16::ZERO; d]);
        for row in range {
            let (tok, head) = (row / h, row % h);
            let (seq, pos) = token_at[tok];
            // SAFETY: row `row` of `out` (d values) is written by this call alone.
            let dst = unsafe { std::slice::from_raw_parts_mut(p.0.add(row * d), d) };
            let q_row = &q[row * d..(row + 1) * d];
            attend_row(
                q_row,
                k,
                v,
                meta,
                dims,
                scale,
                (seq, pos, head),
                &mut q16,
                &mut acc,
                dst,
            );
        }
    });
    out
}

/// One query row over keys `0..=pos` of its sequence.
#[allow(clippy::too_many_arguments)]
fn attend_row(
    q: &[f32],
    k: &[f16],
    v: &[f16],
    meta: &AttentionMetadata,
    dims: Dims,
    scale: f32,
    (seq, pos, head): (usize, usize, usize),
    q16: &mut [f16],
    acc: &mut [f16],
    out: &mut [f32],
) {
    let Dims { h, kvh, d, bs } = dims;
    let kv_head = head / (h / kvh);
    let table = &meta.block_tables[seq * meta.max_blocks..(seq + 1) * meta.max_blocks];
    for (x, &y) in q16.iter_mut().zip(q) {
        *x = f16::from_f32(y);
    }
    acc.fill(f16::ZERO);
    let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
    for key in 0..=pos {
        let at = ((table[key / bs] as usize * bs + key % bs) * kvh + kv_head) * d;
        let (kr, vr) = (&k[at..at + d], &v[at..at + d]);
        let s = dot_f16(kr, q16) * scale;
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
        for (a, x) in acc.iter_mut().zip(vr) {
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
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = a.to_f32() * inv;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paged_attention::{paged_attention, AttentionNumerics};
    use candle_core::{Device, Tensor};
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    /// One (token, head) row as ggml_compute_forward_flash_attn_ext_f16_one_chunk computes
    /// it over an f16 V, written out from its loop on a dense cache (`k`, `v`: `[key][kvh][d]`
    /// of one sequence, keys `0..=pos`): Q to f16; `s = dot·scale`; on a new maximum
    /// `ggml_vec_scale_f16` (a pass rounding to f16), otherwise `vs = expf(s − M)`; then
    /// `ggml_vec_mad_f16` (a second pass, FMA rounded to f16); `S = S·ms + vs`; at the end
    /// the f16 row widened and scaled by `1/S`.
    fn ggml_one_chunk_row(
        q: &[f32],
        k: &[f16],
        v: &[f16],
        (kvh, kv_head, pos): (usize, usize, usize),
        scale: f32,
    ) -> Vec<f32> {
        let d = q.len();
        let q_q: Vec<f16> = q.iter().map(|&x| f16::from_f32(x)).collect();
        let mut vkq16 = vec![f16::ZERO; d];
        let (mut s_sum, mut m) = (0f32, f32::NEG_INFINITY);
        for ic in 0..=pos {
            let at = (ic * kvh + kv_head) * d;
            let mut s = dot_f16(&k[at..at + d], &q_q);
            s *= scale;
            let m_old = m;
            let (mut ms, mut vs) = (1f32, 1f32);
            if s > m {
                m = s;
                ms = (m_old - m).exp();
                for y in vkq16.iter_mut() {
                    *y = f16::from_f32(y.to_f32() * ms);
                }
            } else {
                vs = (s - m).exp();
            }
            for (y, x) in vkq16.iter_mut().zip(&v[at..at + d]) {
                *y = f16::from_f32(x.to_f32().mul_add(vs, y.to_f32()));
            }
            s_sum = s_sum.mul_add(ms, vs);
        }
        let s_inv = if s_sum == 0.0 { 0.0 } else { 1.0 / s_sum };
        vkq16.iter().map(|y| y.to_f32() * s_inv).collect()
    }

    /// The same row in f64 throughout: the attention the f16 arithmetic approximates.
    fn exact_row(
        q: &[f32],
        k: &[f16],
        v: &[f16],
        (kvh, kv_head, pos): (usize, usize, usize),
        scale: f32,
    ) -> Vec<f64> {
        let d = q.len();
        let scores: Vec<f64> = (0..=pos)
            .map(|ic| {
                let at = (ic * kvh + kv_head) * d;
                let dot: f64 = (0..d).map(|i| q[i] as f64 * k[at + i].to_f64()).sum();
                dot * scale as f64
            })
            .collect();
        let mx = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
        let z: f64 = w.iter().sum();
        (0..d)
            .map(|i| {
                (0..=pos)
                    .map(|ic| w[ic] * v[(ic * kvh + kv_head) * d + i].to_f64())
                    .sum::<f64>()
                    / z
            })
            .collect()
    }

    /// The public op with `AttentionNumerics::LlamaCpp` on ragged batches (several
    /// sequences, prefill chunks and one-token decodes, GQA, shuffled cache blocks, head
    /// dims with and without a tail past 64) equals, to the bit, ggml's loop run on each
    /// sequence's keys laid out densely. The inputs make the f16 arithmetic visible: the
    /// rows differ from exact attention by far more than f32 rounding, so a kernel with
    /// f32 sums, another key order or a block-max softmax fails here (checked by mutation:
    /// dropping the rescale's f16 rounding, or summing the keys in reverse, fails it).
    #[test]
    fn equals_ggml_flash_attention_on_ragged_batches() {
        let mut rng = StdRng::seed_from_u64(22);
        let mut f16_visible = 0f64;
        for (h, kvh, d, bs) in [
            (6, 2, 64, 16),
            (9, 3, 80, 4),
            (4, 4, 32, 8),
            (8, 1, 128, 16),
        ] {
            // (query tokens, keys): decodes, a whole prompt, a chunk after cached keys.
            let seqs = [
                (1usize, 1usize),
                (5, 5),
                (1, 37),
                (3, 70),
                (1, 129),
                (17, 40),
            ];
            let need: usize = seqs.iter().map(|&(_, l)| l.div_ceil(bs)).sum();
            let num_blocks = need + 2;
            let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
            ids.shuffle(&mut rng);
            let mut meta = AttentionMetadata::new(bs);
            meta.numerics = AttentionNumerics::LlamaCpp;
            let (mut kc, mut vc) = (
                vec![f16::ZERO; num_blocks * bs * kvh * d],
                vec![f16::ZERO; num_blocks * bs * kvh * d],
            );
            let (mut q, mut dense) = (Vec::new(), Vec::new());
            let mut next = 0;
            for &(ql, l) in &seqs {
                let blocks = &ids[next..next + l.div_ceil(bs)];
                next += blocks.len();
                meta.push(ql, l, blocks);
                // Large, varied scores (a max that keeps growing) and values of mixed
                // magnitude, so the f16 running sum rounds at every key.
                let mut dk = vec![f16::ZERO; l * kvh * d];
                let mut dv = vec![f16::ZERO; l * kvh * d];
                for key in 0..l {
                    let slot = blocks[key / bs] as usize * bs + key % bs;
                    for j in 0..kvh * d {
                        let kx = f16::from_f32(
                            rng.random_range(-2.0f32..2.0) * (1.0 + key as f32 / 16.0),
                        );
                        let vx = f16::from_f32(
                            rng.random_range(-1.0f32..1.0) * [1.0, 30.0, 0.01][j % 3],
                        );
                        dk[key * kvh * d + j] = kx;
                        dv[key * kvh * d + j] = vx;
                        kc[slot * kvh * d + j] = kx;
                        vc[slot * kvh * d + j] = vx;
                    }
                }
                for i in 0..ql {
                    q.extend((0..h * d).map(|_| rng.random_range(-1.5f32..1.5)));
                    dense.push((l - ql + i, dk.clone(), dv.clone()));
                }
            }
            let t = q.len() / (h * d);
            let scale = 1.0 / (d as f32).sqrt();
            let dev = Device::Cpu;
            let qt = Tensor::from_vec(q.clone(), (t, h, d), &dev).unwrap();
            let kt = Tensor::from_vec(kc, (num_blocks, bs, kvh, d), &dev).unwrap();
            let vt = Tensor::from_vec(vc, (num_blocks, bs, kvh, d), &dev).unwrap();
            let got: Vec<f32> = paged_attention(&qt, &kt, &vt, &meta, scale)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (tok, (pos, dk, dv)) in dense.iter().enumerate() {
                for head in 0..h {
                    let row = tok * h + head;
                    let qr = &q[row * d..(row + 1) * d];
                    let at = (kvh, head / (h / kvh), *pos);
                    let want = ggml_one_chunk_row(qr, dk, dv, at, scale);
                    let out = &got[row * d..(row + 1) * d];
                    let same = out
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "h {h} kvh {kvh} d {d}: token {tok} (position {pos}) head {head}:\n got {out:?}\nwant {want:?}");
                    let exact = exact_row(qr, dk, dv, at, scale);
                    for (a, e) in out.iter().zip(&exact) {
                        f16_visible = f16_visible.max((*a as f64 - e).abs() / e.abs().max(1.0));
                    }
                }
            }
        }
        // f32 arithmetic stays within ~1e-5 of exact here; the f16 running sum does not.
        assert!(
            f16_visible > 1e-4,
            "f16 rounding not visible: {f16_visible}"
        );
        assert!(f16_visible < 0.2, "far from attention: {f16_visible}");
    }

    /// The reduction order, on products whose f32 sum depends on it: 2^24 at index 0,
    /// 1 at indices 8, 24, 32 and 48. ggml folds the accumulators first: lane 0 becomes
    /// (2^24 + 1) + (0 + 1) = 2^24 (each 1 alone is lost to rounding), lane 8 becomes
    /// (1 + 0) + (1 + 0) = 2, and lane 0 + lane 8 = 2^24 + 2. A sum in index order loses
    /// every 1 (2^24); the exact sum is 2^24 + 4.
    #[test]
    fn dot_f16_sums_in_ggml_order() {
        let mut x = vec![f16::ZERO; 64];
        let y = vec![f16::ONE; 64];
        x[0] = f16::from_f32(2048.0);
        let mut y0 = y.clone();
        y0[0] = f16::from_f32(8192.0);
        for i in [8, 24, 32, 48] {
            x[i] = f16::ONE;
        }
        assert_eq!(dot_f16(&x, &y0), 16_777_218.0);
        let in_order: f32 = x
            .iter()
            .zip(&y0)
            .map(|(a, b)| a.to_f32() * b.to_f32())
            .sum();
        assert_eq!(in_order, 16_777_216.0);
        // A tail past the 64-element steps is added after the reduction (2^24 + 3,
        // rounded to f32 at the end: 2^24 + 4).
        let (mut x2, mut y2) = (x.clone(), y0.clone());
        x2.push(f16::ONE);
        y2.push(f16::ONE);
        assert_eq!(dot_f16(&x2, &y2), 16_777_220.0);
    }
}
