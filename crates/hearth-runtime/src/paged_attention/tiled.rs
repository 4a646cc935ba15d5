//! Prefill attention on the CPU (AVX2 + FMA + F16C, or AVX-512F where the CPU has it,
//! chosen at run time): one work item's query rows (a tile of tokens × the heads of one
//! GQA group) against tiles of [`KEY_TILE`] keys gathered across cache blocks, each step
//! a small GEMM:
//! - the queries are packed once per item, transposed (`qt[c][r]`, scaled by
//!   `scale · log2 e`), so a key tile's scores come out with the rows in SIMD lanes
//!   (`s[j][r]`) from a register tile of keys × row vectors (lanes.rs picks its size
//!   per register width: 3 keys × 16 rows on AVX2, 4 keys × 48 rows on AVX-512);
//! - the online softmax then runs a vector of rows per instruction, in base 2, on scores
//!   that never leave L1;
//! - P·V accumulates a few rows × 32 (AVX2) or 64 (AVX-512) lanes in registers across
//!   the whole key tile.
//!
//! Both widths run one generic body and give bit-identical results (lanes.rs). Half
//! precision caches are widened to f32 once per tile as it is packed (F16C for f16, a
//! shift for bf16), never the whole cache; f32 caches are read in place. Decode rows
//! (fewer than 8 per item) keep kernel.rs's path, which streams keys without packing.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::lanes::{Avx2, Avx512, Lanes};
use super::{AttentionMetadata, Dims, Element, Item, ItemRows, MAX_HEAD_DIM};

/// Keys per tile: a 48-row item's packed keys, values, scores and accumulators (~60 KB
/// at head_dim 64) stay in L1/L2 while the tile is used three times.
pub(super) const KEY_TILE: usize = 64;

/// Whether the AVX2 kernel can run here (checked once).
pub(super) fn available() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// Whether the AVX-512 kernel can run here (checked once).
pub(super) fn available_avx512() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| available() && is_x86_feature_detected!("avx512f"))
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

/// One item's attention on AVX2. Needs [`available`] and `d % 8 == 0` (the caller
/// checks).
///
/// # Safety
/// The metadata was validated against the caches; `out` has room for every (token,
/// head) row and no other thread writes this item's rows.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn item_kernel_avx2<Q: Element, T: Element>(
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
    item::<Avx2, Q, T>(q, k, v, meta, dims, scale, it, out, scratch)
}

/// [`item_kernel_avx2`] on AVX-512: needs [`available_avx512`] and `d % 8 == 0`.
///
/// # Safety
/// As [`item_kernel_avx2`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn item_kernel_avx512<Q: Element, T: Element>(
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
    item::<Avx512, Q, T>(q, k, v, meta, dims, scale, it, out, scratch)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn item<L: Lanes, Q: Element, T: Element>(
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
    let Dims { kvh, d, bs, .. } = dims;
    let item = ItemRows::new(meta, dims, it);
    let ItemRows {
        kv_head,
        rows,
        kv_end,
        table,
        ..
    } = item;
    // Rows padded to whole vectors; padded rows have zero queries and are never output.
    let rp = rows.next_multiple_of(L::W);
    let pos = |r: usize| item.pos(r);

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
        Q::load(&q[item.offset(r, dims)..][..d], row);
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
        scores::<L>(qt.as_ptr(), rp, d, &kp[..nk], st.as_mut_ptr());
        // Causality: only the tile on the diagonal has keys past some row's position.
        if k0 + nk > pos(0) + 1 {
            for r in 0..rows {
                let visible = (pos(r) + 1).saturating_sub(k0).min(nk);
                for j in visible..nk {
                    st[j * rp + r] = f32::NEG_INFINITY;
                }
            }
        }
        softmax::<L>(st.as_mut_ptr(), rp, nk, mstat, lstat, corr);
        for (r, &c) in corr.iter().enumerate().take(rows) {
            if c != 1.0 {
                scale_row::<L>(acc.as_mut_ptr().add(r * d), d, c);
            }
        }
        pv::<L>(acc.as_mut_ptr(), st.as_ptr(), rp, rows, &vp[..nk], d);
        k0 += nk;
    }
    item.store(dims, acc, lstat, row, out);
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
/// rows, in the register tiles [`Lanes::keys_per_tile`] sizes.
#[inline(always)]
unsafe fn scores<L: Lanes>(qt: *const f32, rp: usize, d: usize, kp: &[*const f32], st: *mut f32) {
    let mut r0 = 0;
    while r0 < rp {
        let vecs = ((rp - r0) / L::W).min(L::MAX_VECS);
        let keys = L::keys_per_tile(vecs);
        let mut j0 = 0;
        while j0 < kp.len() {
            let n = (kp.len() - j0).min(keys);
            let (qa, sa, ks) = (qt.add(r0), st.add(j0 * rp + r0), &kp[j0..j0 + n]);
            macro_rules! tile {
                ($(($v:literal, $n:literal))*) => {
                    match (vecs, n) {
                        $(($v, $n) => scores_tile::<L, $n, $v>(qa, rp, d, ks, sa),)*
                        _ => unreachable!("no {n} keys × {vecs} vectors tile"),
                    }
                };
            }
            tile!(
                (1, 1)(1, 2)(1, 3)(1, 4)(1, 5)(1, 6)(1, 7)(1, 8)(2, 1)(2, 2)(2, 3)(2, 4)(2, 5)(
                    2, 6
                )(3, 1)(3, 2)(3, 3)(3, 4)
            );
            j0 += n;
        }
        r0 += vecs * L::W;
    }
}

/// N keys × V vectors of rows: per element of the head, V query loads and N key
/// broadcasts feed N·V FMAs. Even and odd elements go to two sets of accumulators, added
/// at the end: half as long a chain of roundings per score (a single chain over the head
/// dim was measurably less exact than kernel.rs's lane-wise sums, enough to flip greedy
/// near-ties), and two independent FMA chains per register.
#[inline(always)]
unsafe fn scores_tile<L: Lanes, const N: usize, const V: usize>(
    qt: *const f32,
    rp: usize,
    d: usize,
    kp: &[*const f32],
    st: *mut f32,
) {
    let mut acc = [[[L::zero(); V]; N]; 2];
    let mut keys = [std::ptr::null::<f32>(); N];
    keys.copy_from_slice(&kp[..N]);
    let kp = keys;
    // d is a multiple of 8, so even.
    for c2 in 0..d / 2 {
        for (e, chain) in acc.iter_mut().enumerate() {
            let c = 2 * c2 + e;
            let mut qv = [L::zero(); V];
            for (u, x) in qv.iter_mut().enumerate() {
                *x = L::load(qt.add(c * rp + L::W * u));
            }
            for i in 0..N {
                let b = L::splat(kp[i].add(c));
                for u in 0..V {
                    chain[i][u] = L::fma(b, qv[u], chain[i][u]);
                }
            }
        }
    }
    let [even, odd] = acc;
    for (i, (e, o)) in even.iter().zip(&odd).enumerate() {
        for (u, (x, y)) in e.iter().zip(o).enumerate() {
            L::store(st.add(i * rp + L::W * u), L::add(*x, *y));
        }
    }
}

/// The online softmax over one tile's scores, a vector of rows at a time: new running
/// maxima, the scores turned into weights in place, the running sums, and each row's
/// factor for its accumulator (`corr`). Every real row sees key 0 in the first tile, and
/// padded rows score 0, so the running maximum is finite from the first tile on.
#[inline(always)]
unsafe fn softmax<L: Lanes>(
    st: *mut f32,
    rp: usize,
    nk: usize,
    mstat: &mut [f32],
    lstat: &mut [f32],
    corr: &mut [f32],
) {
    for rv in (0..rp).step_by(L::W) {
        let m_old = L::load(mstat.as_ptr().add(rv));
        let mut m_new = m_old;
        for j in 0..nk {
            m_new = L::max(m_new, L::load(st.add(j * rp + rv)));
        }
        let c = L::exp2(L::sub(m_old, m_new));
        let mut sum = L::zero();
        for j in 0..nk {
            let at = st.add(j * rp + rv);
            let p = L::exp2(L::sub(L::load(at), m_new));
            L::store(at, p);
            sum = L::add(sum, p);
        }
        let l = L::load(lstat.as_ptr().add(rv));
        L::store(lstat.as_mut_ptr().add(rv), L::fma(l, c, sum));
        L::store(mstat.as_mut_ptr().add(rv), m_new);
        L::store(corr.as_mut_ptr().add(rv), c);
    }
}

#[inline(always)]
unsafe fn scale_row<L: Lanes>(a: *mut f32, d: usize, c: f32) {
    let cv = L::set1(c);
    let mut i = 0;
    while i + L::W <= d {
        L::store(a.add(i), L::mul(L::load(a.add(i)), cv));
        i += L::W;
    }
    if i < d {
        let n = d - i;
        L::store_part(a.add(i), L::mul(L::load_part(a.add(i), n), cv), n);
    }
}

/// `acc_r += Σ_j st[j·rp + r] · v_j` for the `rows` real rows.
#[inline(always)]
unsafe fn pv<L: Lanes>(
    acc: *mut f32,
    st: *const f32,
    rp: usize,
    rows: usize,
    v: &[*const f32],
    d: usize,
) {
    let mut r = 0;
    if L::PV_ROWS >= 4 {
        while r + 4 <= rows {
            pv_rows::<L, 4>(acc.add(r * d), st.add(r), rp, v, d);
            r += 4;
        }
    }
    while r + 2 <= rows {
        pv_rows::<L, 2>(acc.add(r * d), st.add(r), rp, v, d);
        r += 2;
    }
    if r < rows {
        pv_rows::<L, 1>(acc.add(r * d), st.add(r), rp, v, d);
    }
}

/// R rows' accumulators, 4 vectors of lanes (then 1, then a partial one) in registers
/// across the tile's keys.
#[inline(always)]
unsafe fn pv_rows<L: Lanes, const R: usize>(
    acc: *mut f32,
    p: *const f32,
    rp: usize,
    v: &[*const f32],
    d: usize,
) {
    let w = L::W;
    let mut c = 0;
    while c + 4 * w <= d {
        let mut a = [[L::zero(); 4]; R];
        for (r, ar) in a.iter_mut().enumerate() {
            for (u, x) in ar.iter_mut().enumerate() {
                *x = L::load(acc.add(r * d + c + w * u));
            }
        }
        for (j, &vp) in v.iter().enumerate() {
            let vv = [
                L::load(vp.add(c)),
                L::load(vp.add(c + w)),
                L::load(vp.add(c + 2 * w)),
                L::load(vp.add(c + 3 * w)),
            ];
            for (r, ar) in a.iter_mut().enumerate() {
                let wt = L::splat(p.add(j * rp + r));
                for (u, x) in ar.iter_mut().enumerate() {
                    *x = L::fma(wt, vv[u], *x);
                }
            }
        }
        for (r, ar) in a.iter().enumerate() {
            for (u, x) in ar.iter().enumerate() {
                L::store(acc.add(r * d + c + w * u), *x);
            }
        }
        c += 4 * w;
    }
    while c < d {
        // A whole vector, or the last d − c < W lanes (AVX-512 at d % 16 == 8).
        let n = (d - c).min(w);
        let mut a = [L::zero(); R];
        for (r, x) in a.iter_mut().enumerate() {
            *x = load_n::<L>(acc.add(r * d + c), n);
        }
        for (j, &vp) in v.iter().enumerate() {
            let vv = load_n::<L>(vp.add(c), n);
            for (r, x) in a.iter_mut().enumerate() {
                *x = L::fma(L::splat(p.add(j * rp + r)), vv, *x);
            }
        }
        for (r, x) in a.iter().enumerate() {
            if n == w {
                L::store(acc.add(r * d + c), *x);
            } else {
                L::store_part(acc.add(r * d + c), *x, n);
            }
        }
        c += n;
    }
}

/// `n ≤ W` lanes from `p`.
#[inline(always)]
unsafe fn load_n<L: Lanes>(p: *const f32, n: usize) -> L::V {
    if n == L::W {
        L::load(p)
    } else {
        L::load_part(p, n)
    }
}
