//! The arithmetic of one CPU work item, a block of keys at a time: scores of every
//! query row against the block's keys, the softmax weights, and their weighted sum of
//! values. Two implementations of the same three steps: SIMD (register tiles: up to 3
//! query rows × 4 or 8 keys for scores, up to 4 rows × 16 or 64 lanes of the
//! accumulator for values, a polynomial `exp` on 8 lanes), one generic body over
//! lanes.rs's register widths, AVX2 + FMA + F16C or AVX-512F, chosen at run time by the
//! caller; and plain Rust for other CPUs and head sizes. Keys and values are read in
//! place in the cache's type; half-precision
//! ones are widened to f32 in registers as they are loaded (exact: every f16 and bf16 is
//! an f32), so the results equal those of the same math over an f32 copy of the cache.

use super::Element;

/// The three block steps. `k`/`v` hold pointers to the block's key/value rows (`d`
/// values each, in the cache's type); scores and weights are `rows × bs`, row-major.
pub(super) trait BlockMath {
    /// `s[r·bs + j] = q_r · k_j`, for every row and all `k.len()` keys.
    unsafe fn scores<T: Element>(
        q: &[f32],
        rows: usize,
        d: usize,
        k: &[*const T],
        s: &mut [f32],
        bs: usize,
    );
    /// `x[i] = e^(x[i] − m)`; returns their sum.
    unsafe fn exp_sum(x: &mut [f32], m: f32) -> f32;
    /// `acc_r += Σ_j p[r·bs + j] · v_j`.
    unsafe fn pv<T: Element>(
        acc: &mut [f32],
        p: &[f32],
        rows: usize,
        bs: usize,
        v: &[*const T],
        d: usize,
    );
}

pub(super) struct Scalar;

impl BlockMath for Scalar {
    unsafe fn scores<T: Element>(
        q: &[f32],
        rows: usize,
        d: usize,
        k: &[*const T],
        s: &mut [f32],
        bs: usize,
    ) {
        for r in 0..rows {
            let qr = &q[r * d..(r + 1) * d];
            for (j, &kp) in k.iter().enumerate() {
                let kr = std::slice::from_raw_parts(kp, d);
                s[r * bs + j] = qr.iter().zip(kr).map(|(a, b)| a * b.widen()).sum();
            }
        }
    }

    unsafe fn exp_sum(x: &mut [f32], m: f32) -> f32 {
        let mut sum = 0.0;
        for v in x.iter_mut() {
            *v = crate::cpu_ops::exp(*v - m);
            sum += *v;
        }
        sum
    }

    unsafe fn pv<T: Element>(
        acc: &mut [f32],
        p: &[f32],
        rows: usize,
        bs: usize,
        v: &[*const T],
        d: usize,
    ) {
        for r in 0..rows {
            let ar = &mut acc[r * d..(r + 1) * d];
            for (j, &vp) in v.iter().enumerate() {
                let w = p[r * bs + j];
                let vr = std::slice::from_raw_parts(vp, d);
                for (a, x) in ar.iter_mut().zip(vr) {
                    *a += w * x.widen();
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use super::lanes::{Avx2, Avx512};

/// The SIMD kernel: AVX2 and AVX-512 run the same per-lane arithmetic to the bit. A
/// score is one 8-lane FMA chain over the head summed by `hsum4` on either width (an
/// AVX-512 register holds two keys' chains, the query chunk broadcast to both halves);
/// every value lane is its own chain of FMAs in key order, whatever the tiling; `exp`
/// runs on 8 lanes for both. So a CPU with AVX-512 decodes exactly as one without, with
/// half the instructions.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::super::lanes::{Avx2, Avx512, Lanes};
    use super::{BlockMath, Element};

    /// Each width's entry points enable its features (and need `d % 8 == 0`, checked by
    /// the caller, like the CPU's features); the generic bodies are inlined into them.
    macro_rules! entry_points {
        ($isa:ty, $features:literal) => {
            impl BlockMath for $isa {
                #[target_feature(enable = $features)]
                unsafe fn scores<T: Element>(
                    q: &[f32],
                    rows: usize,
                    d: usize,
                    k: &[*const T],
                    s: &mut [f32],
                    bs: usize,
                ) {
                    scores::<$isa, T>(q, rows, d, k, s, bs)
                }

                #[target_feature(enable = $features)]
                unsafe fn exp_sum(x: &mut [f32], m: f32) -> f32 {
                    exp_sum(x, m)
                }

                #[target_feature(enable = $features)]
                unsafe fn pv<T: Element>(
                    acc: &mut [f32],
                    p: &[f32],
                    rows: usize,
                    bs: usize,
                    v: &[*const T],
                    d: usize,
                ) {
                    pv::<$isa, T>(acc, p, rows, bs, v, d)
                }
            }
        };
    }
    entry_points!(Avx2, "avx2,fma,f16c");
    entry_points!(Avx512, "avx512f,avx2,fma,f16c");

    #[inline(always)]
    unsafe fn scores<L: Lanes, T: Element>(
        q: &[f32],
        rows: usize,
        d: usize,
        k: &[*const T],
        s: &mut [f32],
        bs: usize,
    ) {
        let (qp, sp) = (q.as_ptr(), s.as_mut_ptr());
        let mut r = 0;
        // A decode's GQA group of 3 in one pass.
        while r + 3 <= rows {
            scores_rows::<L, 3, T>(qp.add(r * d), d, k, sp.add(r * bs), bs);
            r += 3;
        }
        match rows - r {
            2 => scores_rows::<L, 2, T>(qp.add(r * d), d, k, sp.add(r * bs), bs),
            1 => scores_rows::<L, 1, T>(qp.add(r * d), d, k, sp.add(r * bs), bs),
            _ => {}
        }
    }

    #[inline(always)]
    unsafe fn scores_rows<L: Lanes, const R: usize, T: Element>(
        q: *const f32,
        d: usize,
        k: &[*const T],
        s: *mut f32,
        bs: usize,
    ) {
        let mut j = 0;
        if L::SCORE_QUADS == 2 {
            while j + 8 <= k.len() {
                tile::<L, R, 2, T>(q, d, &k[j..j + 8], s.add(j), bs);
                j += 8;
            }
        }
        while j + 4 <= k.len() {
            tile::<L, R, 1, T>(q, d, &k[j..j + 4], s.add(j), bs);
            j += 4;
        }
        while j < k.len() {
            tile1::<R, T>(q, d, k[j], s.add(j), bs);
            j += 1;
        }
    }

    /// Scores of R (1 to 3) rows against G groups of 4 keys: each key's 8 values are
    /// loaded (and widened) once for all R rows.
    #[inline(always)]
    unsafe fn tile<L: Lanes, const R: usize, const G: usize, T: Element>(
        q: *const f32,
        d: usize,
        k: &[*const T],
        s: *mut f32,
        bs: usize,
    ) {
        let mut acc = [[L::quad_zero(); G]; R];
        let mut c = 0;
        while c < d {
            let mut kv = [L::quad_zero(); G];
            for (g, quad) in kv.iter_mut().enumerate() {
                *quad = L::quad_load(&k[4 * g..], c);
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let qv = L::load8_each_half(q.add(r * d + c));
                for g in 0..G {
                    a[g] = L::quad_fma(qv, kv[g], a[g]);
                }
            }
            c += 8;
        }
        for (r, a) in acc.iter().enumerate() {
            for (g, quad) in a.iter().enumerate() {
                _mm_storeu_ps(s.add(r * bs + 4 * g), L::quad_sums(*quad));
            }
        }
    }

    /// The keys after the last whole 4: one 8-lane chain per row, summed by `hsum`.
    #[inline(always)]
    unsafe fn tile1<const R: usize, T: Element>(
        q: *const f32,
        d: usize,
        k: *const T,
        s: *mut f32,
        bs: usize,
    ) {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut c = 0;
        while c < d {
            let kv = T::load8(k.add(c));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(r * d + c)), kv, *a);
            }
            c += 8;
        }
        for (r, a) in acc.iter().enumerate() {
            *s.add(r * bs) = hsum(*a);
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// 8 lanes on either width: the sum's order (lane-wise, then `hsum`) is part of
    /// the bits.
    #[inline(always)]
    unsafe fn exp_sum(x: &mut [f32], m: f32) -> f32 {
        let mv = _mm256_set1_ps(m);
        let mut sum = _mm256_setzero_ps();
        let n8 = x.len() & !7;
        let p = x.as_mut_ptr();
        let mut i = 0;
        while i < n8 {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv));
            _mm256_storeu_ps(p.add(i), e);
            sum = _mm256_add_ps(sum, e);
            i += 8;
        }
        let mut total = hsum(sum);
        for v in &mut x[n8..] {
            *v = crate::cpu_ops::exp(*v - m);
            total += *v;
        }
        total
    }

    /// e^x on 8 lanes: x = n·ln 2 + r, e^r by its degree-6 Taylor polynomial.
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_max_ps(
            _mm256_min_ps(x, _mm256_set1_ps(88.7)),
            _mm256_set1_ps(-87.3),
        );
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(0.001_388_888_9);
        for c in [0.008_333_334, 0.041_666_668, 0.166_666_67, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let bits = _mm256_add_epi32(
            _mm256_castps_si256(p),
            _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23),
        );
        _mm256_castsi256_ps(bits)
    }

    #[inline(always)]
    unsafe fn pv<L: Lanes, T: Element>(
        acc: &mut [f32],
        p: &[f32],
        rows: usize,
        bs: usize,
        v: &[*const T],
        d: usize,
    ) {
        let (ap, pp) = (acc.as_mut_ptr(), p.as_ptr());
        let mut r = 0;
        while r < rows {
            match rows - r {
                1 => pv_rows::<L, 1, T>(ap.add(r * d), pp.add(r * bs), bs, v, d),
                2 => pv_rows::<L, 2, T>(ap.add(r * d), pp.add(r * bs), bs, v, d),
                3 => pv_rows::<L, 3, T>(ap.add(r * d), pp.add(r * bs), bs, v, d),
                _ => pv_rows::<L, 4, T>(ap.add(r * d), pp.add(r * bs), bs, v, d),
            }
            r += (rows - r).min(4);
        }
    }

    /// R (1 to 4) rows' accumulators in registers across all keys, `PV_VECS` registers
    /// a row at a time, then single registers, then (AVX-512) an 8-lane tail: each
    /// value vector is loaded (and widened) once for all R rows.
    #[inline(always)]
    unsafe fn pv_rows<L: Lanes, const R: usize, T: Element>(
        acc: *mut f32,
        p: *const f32,
        bs: usize,
        v: &[*const T],
        d: usize,
    ) {
        let mut c = 0;
        if L::PV_VECS == 4 {
            pv_chunks::<L, R, 4, T>(&mut c, acc, p, bs, v, d);
        } else {
            pv_chunks::<L, R, 2, T>(&mut c, acc, p, bs, v, d);
        }
        pv_chunks::<L, R, 1, T>(&mut c, acc, p, bs, v, d);
        pv_chunks::<Avx2, R, 1, T>(&mut c, acc, p, bs, v, d);
    }

    /// Chunks of `U` registers of R rows' accumulators (row r at `acc + r·d`) from lane
    /// `*c` on, while whole ones fit the head; advances `*c` past them.
    #[inline(always)]
    unsafe fn pv_chunks<L: Lanes, const R: usize, const U: usize, T: Element>(
        c: &mut usize,
        acc: *mut f32,
        p: *const f32,
        bs: usize,
        v: &[*const T],
        d: usize,
    ) {
        while *c + U * L::W <= d {
            let acc = acc.add(*c);
            let mut a = [[L::zero(); U]; R];
            for (r, ar) in a.iter_mut().enumerate() {
                for (u, x) in ar.iter_mut().enumerate() {
                    *x = L::load(acc.add(r * d + L::W * u));
                }
            }
            for (j, &vp) in v.iter().enumerate() {
                let mut vv = [L::zero(); U];
                for (u, x) in vv.iter_mut().enumerate() {
                    *x = L::widen(vp.add(*c + L::W * u));
                }
                for (r, ar) in a.iter_mut().enumerate() {
                    let w = L::splat(p.add(r * bs + j));
                    for (u, x) in ar.iter_mut().enumerate() {
                        *x = L::fma(w, vv[u], *x);
                    }
                }
            }
            for (r, ar) in a.iter().enumerate() {
                for (u, x) in ar.iter().enumerate() {
                    L::store(acc.add(r * d + L::W * u), *x);
                }
            }
            *c += U * L::W;
        }
    }
}
