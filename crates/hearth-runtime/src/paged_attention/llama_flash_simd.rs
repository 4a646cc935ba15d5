//! AVX-512F + F16C versions of llama_flash.rs's two kernels, bit-identical to the
//! scalar code there (which stays the fallback and the reference; llama_flash_tests.rs
//! compares the two to the bit).
//!
//! One key at a time ([`one_key_row`]): SIMD across the head dims, with the same
//! operations per element as the scalar kernel. ggml_vec_dot_f16 puts GGUF dim
//! `64·b + 16·j + l` in lane `l` of accumulator `j`; GGUF's even dims are hearth's first
//! half and its odd dims the second (llama_flash.rs's module comment), so hearth's dims
//! `32·b..32·b + 32` hold the even lanes of accumulators 0..3 (lanes `2m` of accumulator
//! 0 at hearth lane `m`, of accumulator 1 at `8 + m`, of 2 and 3 in the next vector) and
//! `d/2 + 32·b..` the odd lanes. Products of f16 values are exact in f32, so accumulating
//! in hearth's order gives ggml's accumulators bit for bit, only at other lanes, and its
//! reduction `(acc0 + acc2) + (acc1 + acc3)`, then `_mm512_reduce_add_ps`, regroups into
//! the same 16-lane reduction of the even-lane sum plus that of the odd-lane sum (each
//! addition pairs the same two values; IEEE addition commutes): no permutes and no copy of
//! the key. The f16 P·V row is held as f32 values that are exactly f16 and rounded after
//! every key by `vcvtps2ph` (round to nearest even, as `half::f16::from_f32`).
//!
//! Tiled ([`tiled_item`]): one sequence's query tokens × the heads of one KV head
//! together, so that each 64-key tile is widened once for all of them: K transposed to
//! `[GGUF dim][key]` f32 (each score stays one FMA chain over the dims in GGUF order,
//! 16 keys per vector), V widened to `[key][dim]` (the value row accumulates per dim in
//! key order, 16 dims per vector). The softmax runs the scalar code's operations in its
//! order ([`ggml_expf`] is exact arithmetic, the same bits vectorized or not).

use std::arch::x86_64::*;
use std::sync::OnceLock;

use half::f16;

use super::cpu::Dims;
use super::llama_flash::{reduce_add_16, Row};
use super::llama_flash_tiled::KV_TILE;
use super::AttentionMetadata;
use crate::cpu_ops::ggml_expf;

/// Whether the CPU runs these kernels (checked once).
pub(super) fn available() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// Whether a head dim fits these kernels (whole 16-lane vectors).
pub(super) fn fits(d: usize) -> bool {
    d > 0 && d.is_multiple_of(16)
}

/// Round to nearest even, no exceptions.
const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

/// f32 lanes rounded to f16 and widened back.
#[inline(always)]
unsafe fn round_f16(x: __m512) -> __m512 {
    _mm512_cvtph_ps(_mm512_cvtps_ph::<RNE>(x))
}

/// 16 f16 values at `p` widened to f32.
#[inline(always)]
unsafe fn load_f16(p: *const f16) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
}

/// [`reduce_add_16`] on a register: lane `i + 8` + `i`, then `+ i + 4`, then
/// `(0 + 2) + (1 + 3)`.
#[inline(always)]
unsafe fn reduce16(x: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(x);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)));
    let r8 = _mm256_add_ps(hi, lo);
    let r4 = _mm_add_ps(_mm256_extractf128_ps::<1>(r8), _mm256_castps256_ps128(r8));
    // Lanes (0 + 2, 1 + 3), then their sum.
    let r2 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
    _mm_cvtss_f32(_mm_add_ss(r2, _mm_movehdup_ps(r2)))
}

/// `dot_f16` of a GGUF-ordered Q and K row, from `q` (f16 values as f32, hearth's
/// order) and the key row `k` in the cache (hearth's order); see the module comment.
#[inline(always)]
unsafe fn dot_row(q: *const f32, k: *const f16, d: usize, gguf: &[usize]) -> f32 {
    let half = d / 2;
    let mut acc = [_mm512_setzero_ps(); 4];
    for b in 0..d / 64 {
        for (j, a) in acc.iter_mut().enumerate() {
            // Even GGUF dims (accumulators' even lanes) in 0, 1; odd in 2, 3.
            let at = (j / 2) * half + 32 * b + 16 * (j % 2);
            *a = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(at)), load_f16(k.add(at)), *a);
        }
    }
    let even = _mm512_add_ps(acc[0], acc[1]);
    let odd = _mm512_add_ps(acc[2], acc[3]);
    let mut sum = (reduce16(even) + reduce16(odd)) as f64;
    for &i in &gguf[d & !63..] {
        sum += (*q.add(i) * (*k.add(i)).to_f32()) as f64;
    }
    sum as f32
}

/// llama_flash.rs's `attend_row` (one key at a time): needs [`available`] and
/// [`fits`]`(d)`; `qh` and `acc` hold `d` values each.
///
/// # Safety
/// The metadata was validated against the caches (every key's row is in bounds).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn one_key_row(row: &Row, qh: &mut [f32], acc: &mut [f32], out: &mut [f32]) {
    let Dims { h, kvh, d, bs } = row.dims;
    let (seq, pos, head) = row.at;
    let kv_head = head / (h / kvh);
    for (x, &y) in qh.iter_mut().zip(row.q) {
        *x = f16::from_f32(y).to_f32();
    }
    acc.fill(0.0);
    let (qp, ap) = (qh.as_ptr(), acc.as_mut_ptr());
    let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
    let table = &row.meta.block_tables[seq * row.meta.max_blocks..];
    for (blk, &block) in table[..=pos / bs].iter().enumerate() {
        let first = blk * bs;
        let base = (block as usize * bs * kvh + kv_head) * d;
        for cell in 0..bs.min(pos + 1 - first) {
            let at = base + cell * kvh * d;
            // SAFETY: `at..at + d` is a row of the validated caches.
            let (kr, vr) = (row.k.as_ptr().add(at), row.v.as_ptr().add(at));
            let s = dot_row(qp, kr, d, row.gguf) * row.scale;
            let (ms, vs) = if s > m {
                let m_old = m;
                m = s;
                ((m_old - m).exp(), 1f32)
            } else {
                (1f32, (s - m).exp())
            };
            let (msv, vsv) = (_mm512_set1_ps(ms), _mm512_set1_ps(vs));
            for c in (0..d).step_by(16) {
                let mut a = _mm512_loadu_ps(ap.add(c));
                if ms != 1.0 {
                    a = round_f16(_mm512_mul_ps(a, msv));
                }
                a = round_f16(_mm512_fmadd_ps(load_f16(vr.add(c)), vsv, a));
                _mm512_storeu_ps(ap.add(c), a);
            }
            sum = sum.mul_add(ms, vs);
        }
    }
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = a * inv;
    }
}

/// Query tokens per tiled work item: with a KV head's 3 query heads, 48 rows share each
/// widened tile, and their states (~25 KB at head dim 64) stay in L2.
pub(super) const TILED_TOKENS: usize = 16;

/// One tiled work item: tokens `toks` (indices into the step's tokens, all of sequence
/// `seq`, positions `pos0..`) × the query heads of `kv_head`.
#[derive(Clone, Copy)]
pub(super) struct TiledItem {
    pub seq: usize,
    pub kv_head: usize,
    pub tok0: usize,
    pub pos0: usize,
    pub n_tok: usize,
}

/// The tiled kernel's buffers, reused across items.
#[derive(Default)]
pub(super) struct TiledScratch {
    kt: Vec<f32>,
    vt: Vec<f32>,
    kw: Vec<f32>,
    q: Vec<f32>,
    acc: Vec<f32>,
    state: Vec<(f32, f32)>,
}

/// llama_flash_tiled.rs's `attend_row` for every row of `it`, writing row
/// `tok · h + head` of `out`: needs [`available`] and [`fits`]`(d)`.
///
/// # Safety
/// The metadata was validated against the caches; `out` has room for every (token,
/// head) row and no other thread writes this item's rows.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn tiled_item(
    q: &[f32],
    k: &[f16],
    v: &[f16],
    meta: &AttentionMetadata,
    dims: Dims,
    scale: f32,
    gguf: &[usize],
    it: TiledItem,
    out: *mut f32,
    s: &mut TiledScratch,
) {
    let Dims { h, kvh, d, bs } = dims;
    let group = h / kvh;
    let rows = it.n_tok * group;
    s.kt.resize(d * KV_TILE, 0.0);
    s.vt.resize(KV_TILE * d, 0.0);
    s.kw.resize(d, 0.0);
    s.q.resize(rows * d, 0.0);
    s.acc.clear();
    s.acc.resize(rows * d, 0.0);
    s.state.clear();
    s.state.resize(rows, (f32::NEG_INFINITY, 0.0));
    // Row r is token tok0 + r / group, head kv_head · group + r % group; Q in GGUF order.
    for r in 0..rows {
        let src = ((it.tok0 + r / group) * h + it.kv_head * group + r % group) * d;
        for (x, &i) in s.q[r * d..(r + 1) * d].iter_mut().zip(gguf) {
            *x = q[src + i];
        }
    }
    let table = &meta.block_tables[it.seq * meta.max_blocks..];
    let last = it.pos0 + it.n_tok - 1;
    let mut scores = [0f32; KV_TILE];
    for tile in (0..=last).step_by(KV_TILE) {
        let n_tile = (last + 1 - tile).min(KV_TILE);
        // Widen the tile: K to [GGUF dim][key], V to [key][dim].
        for c in 0..n_tile {
            let key = tile + c;
            let at = ((table[key / bs] as usize * bs + key % bs) * kvh + it.kv_head) * d;
            for j in (0..d).step_by(16) {
                _mm512_storeu_ps(s.kw.as_mut_ptr().add(j), load_f16(k.as_ptr().add(at + j)));
                _mm512_storeu_ps(
                    s.vt.as_mut_ptr().add(c * d + j),
                    load_f16(v.as_ptr().add(at + j)),
                );
            }
            for (g, &i) in gguf.iter().enumerate() {
                s.kt[g * KV_TILE + c] = s.kw[i];
            }
        }
        if n_tile < KV_TILE {
            // Cells past the last key: finite inputs for scores that are masked anyway.
            for g in 0..d {
                s.kt[g * KV_TILE + n_tile..(g + 1) * KV_TILE].fill(0.0);
            }
        }
        for r in 0..rows {
            let pos = it.pos0 + r / group;
            if pos < tile {
                continue;
            }
            let n = (pos + 1 - tile).min(KV_TILE);
            tile_scores(&s.kt, &s.q[r * d..(r + 1) * d], n, scale, &mut scores);
            let acc = &mut s.acc[r * d..(r + 1) * d];
            let (m, sum) = &mut s.state[r];
            // From here the scalar kernel's operations, in its order.
            let tile_max = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let m_new = m.max(tile_max);
            if m_new > *m {
                let ms = (*m - m_new).exp();
                for a in acc.iter_mut() {
                    *a *= ms;
                }
                *sum *= ms;
            }
            *m = m_new;
            let mut tile_sum = 0f64;
            for chunk in scores.chunks_mut(16) {
                let mut lanes = [0f32; 16];
                for (x, lane) in chunk.iter_mut().zip(&mut lanes) {
                    *x = ggml_expf(*x - *m);
                    *lane = *x;
                }
                tile_sum += reduce_add_16(&lanes) as f64;
            }
            *sum = (*sum as f64 + tile_sum) as f32;
            accumulate_values(&s.vt, &scores[..n], acc);
        }
    }
    for r in 0..rows {
        let (_, sum) = s.state[r];
        let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
        let row = (it.tok0 + r / group) * h + it.kv_head * group + r % group;
        for (j, a) in s.acc[r * d..(r + 1) * d].iter().enumerate() {
            *out.add(row * d + j) = a * inv;
        }
    }
}

/// A tile's scores for one row: cell `c < n` gets `(Σ_g q[g]·k[g][c]) · scale`, one FMA
/// chain in GGUF order from 0, the rest −∞.
#[inline(always)]
unsafe fn tile_scores(kt: &[f32], q: &[f32], n: usize, scale: f32, out: &mut [f32; KV_TILE]) {
    let vecs = n.div_ceil(16);
    let mut acc = [_mm512_setzero_ps(); KV_TILE / 16];
    let kp = kt.as_ptr();
    for (g, &qg) in q.iter().enumerate() {
        let qv = _mm512_set1_ps(qg);
        for (i, a) in acc.iter_mut().enumerate().take(vecs) {
            *a = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kp.add(g * KV_TILE + 16 * i)), *a);
        }
    }
    let sv = _mm512_set1_ps(scale);
    for (i, a) in acc.iter().enumerate() {
        let keep: u32 = if 16 * i >= n {
            0
        } else {
            (1u32 << (n - 16 * i).min(16)) - 1
        };
        let x = _mm512_mask_mul_ps(_mm512_set1_ps(f32::NEG_INFINITY), keep as u16, *a, sv);
        _mm512_storeu_ps(out.as_mut_ptr().add(16 * i), x);
    }
}

/// `acc[j] = fma(v[c][j], p[c], acc[j])` for every cell `c` in order, 16 dims at a time.
#[inline(always)]
unsafe fn accumulate_values(vt: &[f32], p: &[f32], acc: &mut [f32]) {
    let d = acc.len();
    let (vp, ap) = (vt.as_ptr(), acc.as_mut_ptr());
    for j in (0..d).step_by(16) {
        let mut a = _mm512_loadu_ps(ap.add(j));
        for (c, &pc) in p.iter().enumerate() {
            a = _mm512_fmadd_ps(_mm512_loadu_ps(vp.add(c * d + j)), _mm512_set1_ps(pc), a);
        }
        _mm512_storeu_ps(ap.add(j), a);
    }
}

/// Rounds `x` (a multiple of 16 values) to f16 and back as the kernels do, for the
/// tests; needs [`available`].
#[cfg(test)]
pub(super) fn round_f16_slice(x: &mut [f32]) {
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn run(x: &mut [f32]) {
        for c in x.chunks_exact_mut(16) {
            _mm512_storeu_ps(c.as_mut_ptr(), round_f16(_mm512_loadu_ps(c.as_ptr())));
        }
    }
    assert!(available() && x.len().is_multiple_of(16));
    // SAFETY: checked above that the CPU has the features `run` enables.
    unsafe { run(x) }
}
