//! AVX-512F + F16C versions of llama_flash.rs's two kernels, bit-identical to the
//! scalar code there (which stays the fallback and the reference; llama_flash_tests.rs
//! compares the two to the bit).
//!
//! One key at a time ([`one_key_group`]): SIMD across the head dims, with the same
//! operations per element as the scalar kernel, the query heads of one KV head together
//! (each key widened once, their running sums independent chains). ggml_vec_dot_f16 puts GGUF dim
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
use super::llama_flash::{reduce_add_16, Operands};
use super::llama_flash_tiled::KV_TILE;
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

/// Query heads run together by [`one_key_group`] (a GQA group larger than this is split).
pub(super) const GROUP_MAX: usize = 8;

/// One query token's rows `heads` (at most [`GROUP_MAX`], all reading KV head
/// `kv_head`) over keys `0..=pos` of sequence `seq`: llama_flash.rs's `attend_row` for
/// each row, every key's K and V widened once for all of them, their independent
/// running sums interleaved. `q` and `out` hold the rows, contiguous (`heads.len() · d`);
/// `qh` and `acc` as much room. Needs [`available`] and [`fits`]`(d)`.
///
/// # Safety
/// The metadata was validated against the caches (every key's row is in bounds).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn one_key_group(
    op: &Operands,
    q: &[f32],
    (seq, pos, kv_head): (usize, usize, usize),
    qh: &mut [f32],
    acc: &mut [f32],
    out: &mut [f32],
) {
    let Operands {
        k,
        v,
        meta,
        dims,
        scale,
        gguf,
        ..
    } = *op;
    let Dims { kvh, d, bs, .. } = dims;
    let g = q.len() / d;
    debug_assert!(g <= GROUP_MAX && out.len() == g * d);
    for (x, &y) in qh[..g * d].iter_mut().zip(q) {
        *x = f16::from_f32(y).to_f32();
    }
    acc[..g * d].fill(0.0);
    let (qp, ap) = (qh.as_ptr(), acc.as_mut_ptr());
    let mut m = [f32::NEG_INFINITY; GROUP_MAX];
    let mut sum = [0f32; GROUP_MAX];
    let (mut ms, mut vs) = ([1f32; GROUP_MAX], [1f32; GROUP_MAX]);
    let table = &meta.block_tables[seq * meta.max_blocks..];
    for (blk, &block) in table[..=pos / bs].iter().enumerate() {
        let first = blk * bs;
        let base = (block as usize * bs * kvh + kv_head) * d;
        for cell in 0..bs.min(pos + 1 - first) {
            let at = base + cell * kvh * d;
            // SAFETY: `at..at + d` is a row of the validated caches.
            let (kr, vr) = (k.as_ptr().add(at), v.as_ptr().add(at));
            for r in 0..g {
                let s = dot_row(qp.add(r * d), kr, d, gguf) * scale;
                (ms[r], vs[r]) = if s > m[r] {
                    let m_old = m[r];
                    m[r] = s;
                    ((m_old - s).exp(), 1f32)
                } else {
                    (1f32, (s - m[r]).exp())
                };
                sum[r] = sum[r].mul_add(ms[r], vs[r]);
            }
            for c in (0..d).step_by(16) {
                let x = load_f16(vr.add(c));
                for r in 0..g {
                    let p = ap.add(r * d + c);
                    let mut a = _mm512_loadu_ps(p);
                    if ms[r] != 1.0 {
                        a = round_f16(_mm512_mul_ps(a, _mm512_set1_ps(ms[r])));
                    }
                    a = round_f16(_mm512_fmadd_ps(x, _mm512_set1_ps(vs[r]), a));
                    _mm512_storeu_ps(p, a);
                }
            }
        }
    }
    for r in 0..g {
        let inv = if sum[r] == 0.0 { 0.0 } else { 1.0 / sum[r] };
        for (o, a) in out[r * d..(r + 1) * d]
            .iter_mut()
            .zip(&acc[r * d..(r + 1) * d])
        {
            *o = a * inv;
        }
    }
}

/// Query tokens per tiled work item: with a KV head's 3 query heads, 192 rows share each
/// widened tile (its transposition was ~20% of the kernel's time at 16 tokens, perf),
/// and their states (~100 KB at head dim 64) stay in L2.
pub(super) const TILED_TOKENS: usize = 64;

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
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn tiled_item(op: &Operands, it: TiledItem, out: *mut f32, s: &mut TiledScratch) {
    let Operands {
        q,
        k,
        v,
        meta,
        dims,
        scale,
        gguf,
    } = *op;
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
            let (kt, kw) = (s.kt.as_mut_ptr(), s.kw.as_ptr());
            for (g, &i) in gguf.iter().enumerate() {
                // SAFETY: `g < d` and `i < d` (a permutation of 0..d), `c < KV_TILE`.
                *kt.add(g * KV_TILE + c) = *kw.add(i);
            }
        }
        if n_tile < KV_TILE {
            // Cells past the last key: finite inputs for scores that are masked anyway.
            for g in 0..d {
                s.kt[g * KV_TILE + n_tile..(g + 1) * KV_TILE].fill(0.0);
            }
        }
        // A token's query heads have the same keys: up to ROWS of them at a time share
        // every load of the tile, their sums independent chains.
        for tok in 0..it.n_tok {
            let pos = it.pos0 + tok;
            if pos < tile {
                continue;
            }
            let n = (pos + 1 - tile).min(KV_TILE);
            let mut r0 = tok * group;
            while r0 < (tok + 1) * group {
                let nr = ((tok + 1) * group - r0).min(ROWS);
                match nr {
                    1 => rows_tile::<1>(s, r0, d, n, scale),
                    2 => rows_tile::<2>(s, r0, d, n, scale),
                    3 => rows_tile::<3>(s, r0, d, n, scale),
                    _ => rows_tile::<4>(s, r0, d, n, scale),
                }
                r0 += nr;
            }
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

/// Rows of one token processed together by [`rows_tile`].
const ROWS: usize = 4;

/// One tile for rows `r0..r0 + R` (one token's heads, keys `0..n` of the tile): the
/// scalar kernel's operations per row. Each score `(Σ_g q[g]·k[g][c]) · scale` is one
/// FMA chain in GGUF order from 0 (cells past `n`: −∞); the softmax is the scalar code;
/// the value row `acc[j] = fma(v[c][j], p[c], acc[j])` over the cells in order.
#[inline(always)]
unsafe fn rows_tile<const R: usize>(
    s: &mut TiledScratch,
    r0: usize,
    d: usize,
    n: usize,
    scale: f32,
) {
    let mut scores = [[0f32; KV_TILE]; R];
    let mut acc = [[_mm512_setzero_ps(); KV_TILE / 16]; R];
    let (kp, qp) = (s.kt.as_ptr(), s.q.as_ptr().add(r0 * d));
    for g in 0..d {
        let mut kv = [_mm512_setzero_ps(); KV_TILE / 16];
        for (i, x) in kv.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(kp.add(g * KV_TILE + 16 * i));
        }
        for (r, a) in acc.iter_mut().enumerate() {
            let qv = _mm512_set1_ps(*qp.add(r * d + g));
            for (x, &k) in a.iter_mut().zip(&kv) {
                *x = _mm512_fmadd_ps(qv, k, *x);
            }
        }
    }
    let sv = _mm512_set1_ps(scale);
    for (a, out) in acc.iter().zip(scores.iter_mut()) {
        for (i, x) in a.iter().enumerate() {
            let keep = if 16 * i >= n {
                0
            } else {
                ((1u32 << (n - 16 * i).min(16)) - 1) as u16
            };
            let y = _mm512_mask_mul_ps(_mm512_set1_ps(f32::NEG_INFINITY), keep, *x, sv);
            _mm512_storeu_ps(out.as_mut_ptr().add(16 * i), y);
        }
    }
    for (r, scores) in scores.iter_mut().enumerate() {
        let row = &mut s.acc[(r0 + r) * d..(r0 + r + 1) * d];
        let (m, sum) = &mut s.state[r0 + r];
        // From here the scalar kernel's operations, in its order.
        let tile_max = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let m_new = m.max(tile_max);
        if m_new > *m {
            let ms = (*m - m_new).exp();
            for a in row.iter_mut() {
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
    }
    // P·V, 64 dims (4 vectors) per pass with every row's accumulators in registers,
    // then any 16-dim rest.
    let (vp, ap) = (s.vt.as_ptr(), s.acc.as_mut_ptr().add(r0 * d));
    let mut j = 0;
    while j + 64 <= d {
        pv_block::<R, 4>(vp.add(j), ap.add(j), d, &scores, n);
        j += 64;
    }
    while j < d {
        pv_block::<R, 1>(vp.add(j), ap.add(j), d, &scores, n);
        j += 16;
    }
}

/// `acc[r][i] = fma(v[c][i], p[r][c], acc[r][i])` for cells `c < n` in order, on `W`
/// vectors from `ap` (rows `d` apart) and `vp` (cells `d` apart).
#[inline(always)]
unsafe fn pv_block<const R: usize, const W: usize>(
    vp: *const f32,
    ap: *mut f32,
    d: usize,
    p: &[[f32; KV_TILE]; R],
    n: usize,
) {
    let mut a = [[_mm512_setzero_ps(); W]; R];
    for (r, a) in a.iter_mut().enumerate() {
        for (i, x) in a.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(ap.add(r * d + 16 * i));
        }
    }
    for c in 0..n {
        let mut v = [_mm512_setzero_ps(); W];
        for (i, x) in v.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(vp.add(c * d + 16 * i));
        }
        for (a, p) in a.iter_mut().zip(p) {
            let pc = _mm512_set1_ps(p[c]);
            for (x, &v) in a.iter_mut().zip(&v) {
                *x = _mm512_fmadd_ps(v, pc, *x);
            }
        }
    }
    for (r, a) in a.iter().enumerate() {
        for (i, x) in a.iter().enumerate() {
            _mm512_storeu_ps(ap.add(r * d + 16 * i), *x);
        }
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
