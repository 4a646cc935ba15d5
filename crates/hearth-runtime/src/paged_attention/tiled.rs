//! Prefill attention on the CPU (AVX2 + FMA + F16C): one work item's query rows (a tile
//! of tokens × the heads of one GQA group) against tiles of [`KEY_TILE`] keys gathered
//! across cache blocks, each step a small GEMM:
//! - the queries are packed once per item, transposed (`qt[c][r]`, scaled by
//!   `scale · log2 e`), so a key tile's scores come out with the rows in SIMD lanes
//!   (`s[j][r]`) from a 6 keys × 16 rows register tile;
//! - the online softmax then runs 8 rows per instruction, in base 2, on scores that never
//!   leave L1;
//! - P·V accumulates 2 rows × 32 lanes in registers across the whole key tile.
//!
//! Half-precision caches are widened to f32 once per tile as it is packed (F16C for f16,
//! a shift for bf16), never the whole cache; f32 caches are read in place. Decode rows
//! (fewer than 8 per item) keep kernel.rs's path, which streams keys without packing.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::{AttentionMetadata, Dims, Element, Item, MAX_HEAD_DIM};

/// Keys per tile: a 48-row item's packed keys, values, scores and accumulators (~60 KB
/// at head_dim 64) stay in L1/L2 while the tile is used three times.
pub(super) const KEY_TILE: usize = 64;

/// Whether this kernel can run here (checked once).
pub(super) fn available() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// `dst[..d] = src[..d]` widened from f16; `d % 8 == 0`.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn widen_f16(src: *const u16, dst: *mut f32, d: usize) {
    let mut c = 0;
    while c < d {
        let h = _mm_loadu_si128(src.add(c).cast());
        _mm256_storeu_ps(dst.add(c), _mm256_cvtph_ps(h));
        c += 8;
    }
}

/// `dst[..d] = src[..d]` widened from bf16 (its bits are an f32's top half); `d % 8 == 0`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn widen_bf16(src: *const u16, dst: *mut f32, d: usize) {
    let mut c = 0;
    while c < d {
        let h = _mm_loadu_si128(src.add(c).cast());
        let w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
        _mm256_storeu_ps(dst.add(c), _mm256_castsi256_ps(w));
        c += 8;
    }
}

/// One item's attention. Needs [`available`] and `d % 8 == 0` (the caller checks).
///
/// # Safety
/// The metadata was validated against the caches; `out` has room for every (token,
/// head) row and no other thread writes this item's rows.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn item_kernel<Q: Element, T: Element>(
    q: &[Q],
    k: &[T],
    v: &[T],
    meta: &AttentionMetadata,
    dims: Dims,
    scale: f32,
    it: Item,
    out: *mut Q,
    scratch: &mut Vec<f32>,
) {
    let Dims { h, kvh, d, bs } = dims;
    let g = h / kvh;
    let s = it.seq as usize;
    let kv_head = it.kv_head as usize;
    let (qs0, qs1) = (
        meta.query_start[s] as usize,
        meta.query_start[s + 1] as usize,
    );
    let first_pos = meta.seq_lens[s] as usize - (qs1 - qs0);
    let (t0, t1) = (it.q_begin as usize, it.q_end as usize);
    let rows = (t1 - t0) * g;
    // Rows padded to whole vectors; padded rows have zero queries and are never output.
    let rp = rows.next_multiple_of(8);
    // Row r is query token t0 + r / g, head kv_head · g + r % g.
    let pos = |r: usize| first_pos + (t0 - qs0) + r / g;
    let kv_end = pos(rows - 1) + 1;
    let table = &meta.block_tables[s * meta.max_blocks..(s + 1) * meta.max_blocks];

    let kt = KEY_TILE;
    let need = 2 * rp * d + kt * rp + 3 * rp + 2 * kt * d;
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    let (qt, rest) = scratch.split_at_mut(rp * d);
    let (acc, rest) = rest.split_at_mut(rp * d);
    let (st, rest) = rest.split_at_mut(kt * rp);
    let (mstat, rest) = rest.split_at_mut(rp);
    let (lstat, rest) = rest.split_at_mut(rp);
    let (corr, rest) = rest.split_at_mut(rp);
    let (kbuf, rest) = rest.split_at_mut(kt * d);
    let vbuf = &mut rest[..kt * d];

    let mut row = [0f32; MAX_HEAD_DIM];
    let row = &mut row[..d];
    let q_scale = scale * std::f32::consts::LOG2_E;
    qt.fill(0.0);
    for r in 0..rows {
        let (tok, head) = (t0 + r / g, kv_head * g + r % g);
        Q::load(&q[(tok * h + head) * d..][..d], row);
        for (c, x) in row.iter().enumerate() {
            qt[c * rp + r] = x * q_scale;
        }
    }
    acc.fill(0.0);
    mstat.fill(f32::NEG_INFINITY);
    lstat.fill(0.0);

    let row_stride = kvh * d;
    let mut kp = [std::ptr::null::<f32>(); KEY_TILE];
    let mut vp = [std::ptr::null::<f32>(); KEY_TILE];
    let mut k0 = 0;
    while k0 < kv_end {
        let nk = kt.min(kv_end - k0);
        for j in 0..nk {
            let key = k0 + j;
            let at = (table[key / bs] as usize * bs + key % bs) * row_stride + kv_head * d;
            kp[j] = row_f32(&k[at..at + d], kbuf.as_mut_ptr().add(j * d));
            vp[j] = row_f32(&v[at..at + d], vbuf.as_mut_ptr().add(j * d));
        }
        scores(qt.as_ptr(), rp, d, &kp[..nk], st.as_mut_ptr());
        // Causality: only the tile on the diagonal has keys past some row's position.
        if k0 + nk > pos(0) + 1 {
            for r in 0..rows {
                let visible = (pos(r) + 1).saturating_sub(k0).min(nk);
                for j in visible..nk {
                    st[j * rp + r] = f32::NEG_INFINITY;
                }
            }
        }
        softmax(st.as_mut_ptr(), rp, nk, mstat, lstat, corr);
        for (r, &c) in corr.iter().enumerate().take(rows) {
            if c != 1.0 {
                scale_row(acc.as_mut_ptr().add(r * d), d, c);
            }
        }
        pv(acc.as_mut_ptr(), st.as_ptr(), rp, rows, &vp[..nk], d);
        k0 += nk;
    }
    for r in 0..rows {
        let (tok, head) = (t0 + r / g, kv_head * g + r % g);
        let inv = 1.0 / lstat[r];
        for (x, a) in row.iter_mut().zip(&acc[r * d..(r + 1) * d]) {
            *x = a * inv;
        }
        let dst = std::slice::from_raw_parts_mut(out.add((tok * h + head) * d), d);
        Q::store(row, dst);
    }
}

/// A cache row as f32: in place for f32 caches, else widened into `buf`.
#[inline(always)]
unsafe fn row_f32<T: Element>(src: &[T], buf: *mut f32) -> *const f32 {
    match T::as_f32(src) {
        Some(f) => f.as_ptr(),
        None => {
            T::widen_avx2(src, buf);
            buf
        }
    }
}

/// `st[j·rp + r] = Σ_c k_j[c] · qt[c·rp + r]` for every key of the tile and all `rp`
/// rows, in register tiles of 3 keys × 16 rows or 6 keys × 8 rows.
#[inline(always)]
unsafe fn scores(qt: *const f32, rp: usize, d: usize, kp: &[*const f32], st: *mut f32) {
    let mut r0 = 0;
    while r0 < rp {
        let wide = rp - r0 >= 16;
        let mut j0 = 0;
        while j0 < kp.len() {
            let n = (kp.len() - j0).min(if wide { 3 } else { 6 });
            let (qa, sa, ks) = (qt.add(r0), st.add(j0 * rp + r0), &kp[j0..j0 + n]);
            macro_rules! tile {
                ($($n:literal)*) => {
                    match (n, wide) {
                        $(($n, true) => scores_tile::<$n, 2>(qa, rp, d, ks, sa),
                          ($n, false) => scores_tile::<$n, 1>(qa, rp, d, ks, sa),)*
                        _ => unreachable!(),
                    }
                };
            }
            tile!(1 2 3 4 5 6);
            j0 += n;
        }
        r0 += if wide { 16 } else { 8 };
    }
}

/// N keys × V vectors of 8 rows: per element of the head, V query loads and N key
/// broadcasts feed N·V FMAs. Even and odd elements go to two sets of accumulators, added
/// at the end: half as long a chain of roundings per score (a single chain over the head
/// dim was measurably less exact than kernel.rs's lane-wise sums, enough to flip greedy
/// near-ties), and two independent FMA chains per register.
#[inline(always)]
unsafe fn scores_tile<const N: usize, const V: usize>(
    qt: *const f32,
    rp: usize,
    d: usize,
    kp: &[*const f32],
    st: *mut f32,
) {
    let mut acc = [[[_mm256_setzero_ps(); V]; N]; 2];
    let mut keys = [std::ptr::null::<f32>(); N];
    keys.copy_from_slice(&kp[..N]);
    let kp = keys;
    // d is a multiple of 8, so even.
    for c2 in 0..d / 2 {
        for (e, chain) in acc.iter_mut().enumerate() {
            let c = 2 * c2 + e;
            let mut qv = [_mm256_setzero_ps(); V];
            for (u, x) in qv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(qt.add(c * rp + 8 * u));
            }
            for i in 0..N {
                let b = _mm256_broadcast_ss(&*kp[i].add(c));
                for u in 0..V {
                    chain[i][u] = _mm256_fmadd_ps(b, qv[u], chain[i][u]);
                }
            }
        }
    }
    let [even, odd] = acc;
    for (i, (e, o)) in even.iter().zip(&odd).enumerate() {
        for (u, (x, y)) in e.iter().zip(o).enumerate() {
            _mm256_storeu_ps(st.add(i * rp + 8 * u), _mm256_add_ps(*x, *y));
        }
    }
}

/// 2^x on 8 lanes for x ≤ 0 (−∞ included): x = n + f, |f| ≤ ½, 2^f by its degree-6
/// Taylor polynomial (relative error ~1e-7); n ≤ −127 gives exactly 0.
#[inline(always)]
unsafe fn exp2_8(x: __m256) -> __m256 {
    let x = _mm256_max_ps(x, _mm256_set1_ps(-127.0));
    let n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    let f = _mm256_sub_ps(x, n);
    let mut p = _mm256_set1_ps(1.540_353e-4);
    for c in [
        1.333_355_8e-3,
        9.618_129e-3,
        5.550_411e-2,
        0.240_226_5,
        std::f32::consts::LN_2,
        1.0,
    ] {
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
    }
    let two_n = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_mul_ps(p, _mm256_castsi256_ps(two_n))
}

/// The online softmax over one tile's scores, 8 rows at a time: new running maxima,
/// the scores turned into weights in place, the running sums, and each row's factor for
/// its accumulator (`corr`). Every real row sees key 0 in the first tile, and padded rows
/// score 0, so the running maximum is finite from the first tile on.
#[inline(always)]
unsafe fn softmax(
    st: *mut f32,
    rp: usize,
    nk: usize,
    mstat: &mut [f32],
    lstat: &mut [f32],
    corr: &mut [f32],
) {
    for rv in (0..rp).step_by(8) {
        let m_old = _mm256_loadu_ps(mstat.as_ptr().add(rv));
        let mut m_new = m_old;
        for j in 0..nk {
            m_new = _mm256_max_ps(m_new, _mm256_loadu_ps(st.add(j * rp + rv)));
        }
        let c = exp2_8(_mm256_sub_ps(m_old, m_new));
        let mut sum = _mm256_setzero_ps();
        for j in 0..nk {
            let at = st.add(j * rp + rv);
            let p = exp2_8(_mm256_sub_ps(_mm256_loadu_ps(at), m_new));
            _mm256_storeu_ps(at, p);
            sum = _mm256_add_ps(sum, p);
        }
        let l = _mm256_loadu_ps(lstat.as_ptr().add(rv));
        _mm256_storeu_ps(lstat.as_mut_ptr().add(rv), _mm256_fmadd_ps(l, c, sum));
        _mm256_storeu_ps(mstat.as_mut_ptr().add(rv), m_new);
        _mm256_storeu_ps(corr.as_mut_ptr().add(rv), c);
    }
}

#[inline(always)]
unsafe fn scale_row(a: *mut f32, d: usize, c: f32) {
    let cv = _mm256_set1_ps(c);
    let mut i = 0;
    while i < d {
        _mm256_storeu_ps(a.add(i), _mm256_mul_ps(_mm256_loadu_ps(a.add(i)), cv));
        i += 8;
    }
}

/// `acc_r += Σ_j st[j·rp + r] · v_j` for the `rows` real rows.
#[inline(always)]
unsafe fn pv(acc: *mut f32, st: *const f32, rp: usize, rows: usize, v: &[*const f32], d: usize) {
    let mut r = 0;
    while r + 2 <= rows {
        pv_rows::<2>(acc.add(r * d), st.add(r), rp, v, d);
        r += 2;
    }
    if r < rows {
        pv_rows::<1>(acc.add(r * d), st.add(r), rp, v, d);
    }
}

/// R rows' accumulators, 32 lanes (8 at the tail) in registers across the tile's keys.
#[inline(always)]
unsafe fn pv_rows<const R: usize>(
    acc: *mut f32,
    p: *const f32,
    rp: usize,
    v: &[*const f32],
    d: usize,
) {
    let mut c = 0;
    while c + 32 <= d {
        let mut a = [[_mm256_setzero_ps(); 4]; R];
        for (r, ar) in a.iter_mut().enumerate() {
            for (u, x) in ar.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(acc.add(r * d + c + 8 * u));
            }
        }
        for (j, &vp) in v.iter().enumerate() {
            let vv = [
                _mm256_loadu_ps(vp.add(c)),
                _mm256_loadu_ps(vp.add(c + 8)),
                _mm256_loadu_ps(vp.add(c + 16)),
                _mm256_loadu_ps(vp.add(c + 24)),
            ];
            for (r, ar) in a.iter_mut().enumerate() {
                let w = _mm256_broadcast_ss(&*p.add(j * rp + r));
                for (u, x) in ar.iter_mut().enumerate() {
                    *x = _mm256_fmadd_ps(w, vv[u], *x);
                }
            }
        }
        for (r, ar) in a.iter().enumerate() {
            for (u, x) in ar.iter().enumerate() {
                _mm256_storeu_ps(acc.add(r * d + c + 8 * u), *x);
            }
        }
        c += 32;
    }
    while c < d {
        let mut a = [_mm256_setzero_ps(); R];
        for (r, x) in a.iter_mut().enumerate() {
            *x = _mm256_loadu_ps(acc.add(r * d + c));
        }
        for (j, &vp) in v.iter().enumerate() {
            let vv = _mm256_loadu_ps(vp.add(c));
            for (r, x) in a.iter_mut().enumerate() {
                let w = _mm256_broadcast_ss(&*p.add(j * rp + r));
                *x = _mm256_fmadd_ps(w, vv, *x);
            }
        }
        for (r, x) in a.iter().enumerate() {
            _mm256_storeu_ps(acc.add(r * d + c), *x);
        }
        c += 8;
    }
}
