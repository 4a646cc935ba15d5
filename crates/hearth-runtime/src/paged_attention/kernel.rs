//! The arithmetic of one CPU work item, a block of keys at a time: scores of every
//! query row against the block's keys, the softmax weights, and their weighted sum of
//! values. Two implementations of the same three steps: AVX2 + FMA + F16C (register
//! tiles: up to 3 query rows × 4 keys for scores, up to 4 rows × 16 lanes of the
//! accumulator for values, a polynomial `exp` on 8 lanes) and plain Rust for other CPUs
//! and head sizes. Keys and values are read in place in the cache's type; half-precision
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
pub(super) use avx2::Avx2;
#[cfg(target_arch = "x86_64")]
pub(super) use avx512::Avx512;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Element;

    /// Needs AVX2 + FMA + F16C and `d % 8 == 0` (checked by the caller).
    pub(in crate::paged_attention) struct Avx2;

    /// Four 8-lane accumulators to their four sums.
    #[inline(always)]
    pub(super) unsafe fn hsum4(a: [__m256; 4]) -> __m128 {
        let t0 = _mm256_hadd_ps(a[0], a[1]);
        let t1 = _mm256_hadd_ps(a[2], a[3]);
        let t2 = _mm256_hadd_ps(t0, t1);
        _mm_add_ps(_mm256_castps256_ps128(t2), _mm256_extractf128_ps(t2, 1))
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// Scores of R (1 to 3) rows against 4 keys: each key's 8 values are loaded (and
    /// widened) once for all R rows. Every score is one 8-lane FMA chain over the head
    /// and `hsum4`'s sum of its lanes, whatever R is.
    #[inline(always)]
    unsafe fn tile4<const R: usize, T: Element>(
        q: *const f32,
        d: usize,
        k: &[*const T],
        s: *mut f32,
        bs: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        let mut c = 0;
        while c < d {
            let kv = [
                T::load8(k[0].add(c)),
                T::load8(k[1].add(c)),
                T::load8(k[2].add(c)),
                T::load8(k[3].add(c)),
            ];
            for (r, a) in acc.iter_mut().enumerate() {
                let qv = _mm256_loadu_ps(q.add(r * d + c));
                for t in 0..4 {
                    a[t] = _mm256_fmadd_ps(qv, kv[t], a[t]);
                }
            }
            c += 8;
        }
        for (r, a) in acc.iter().enumerate() {
            _mm_storeu_ps(s.add(r * bs), hsum4(*a));
        }
    }

    /// The keys after the last whole 4: one chain per row, summed by `hsum`.
    #[inline(always)]
    pub(super) unsafe fn tile1<const R: usize, T: Element>(
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
    unsafe fn scores_rows<const R: usize, T: Element>(
        q: *const f32,
        d: usize,
        k: &[*const T],
        s: *mut f32,
        bs: usize,
    ) {
        let mut j = 0;
        while j + 4 <= k.len() {
            tile4::<R, T>(q, d, &k[j..j + 4], s.add(j), bs);
            j += 4;
        }
        while j < k.len() {
            tile1::<R, T>(q, d, k[j], s.add(j), bs);
            j += 1;
        }
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

    impl super::BlockMath for Avx2 {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn scores<T: Element>(
            q: &[f32],
            rows: usize,
            d: usize,
            k: &[*const T],
            s: &mut [f32],
            bs: usize,
        ) {
            let (qp, sp) = (q.as_ptr(), s.as_mut_ptr());
            let mut r = 0;
            // A decode's GQA group of 3 in one pass: 12 accumulators and 4 keys fill
            // the 16 registers (queries are FMA memory operands).
            while r + 3 <= rows {
                scores_rows::<3, T>(qp.add(r * d), d, k, sp.add(r * bs), bs);
                r += 3;
            }
            match rows - r {
                2 => scores_rows::<2, T>(qp.add(r * d), d, k, sp.add(r * bs), bs),
                1 => scores_rows::<1, T>(qp.add(r * d), d, k, sp.add(r * bs), bs),
                _ => {}
            }
        }

        #[target_feature(enable = "avx2,fma")]
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

        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn pv<T: Element>(
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
                    1 => pv_rows::<1, T>(ap.add(r * d), pp.add(r * bs), bs, v, d),
                    2 => pv_rows::<2, T>(ap.add(r * d), pp.add(r * bs), bs, v, d),
                    3 => pv_rows::<3, T>(ap.add(r * d), pp.add(r * bs), bs, v, d),
                    _ => pv_rows::<4, T>(ap.add(r * d), pp.add(r * bs), bs, v, d),
                }
                r += (rows - r).min(4);
            }
        }
    }

    /// R (1 to 4) rows' accumulators, 16 lanes (or 8 at the tail) in registers across
    /// all keys: each value vector is loaded (and widened) once for all R rows. Every
    /// lane is its own chain of FMAs in key order, so the tiling does not change a bit.
    #[inline(always)]
    unsafe fn pv_rows<const R: usize, T: Element>(
        acc: *mut f32,
        p: *const f32,
        bs: usize,
        v: &[*const T],
        d: usize,
    ) {
        let mut c = 0;
        while c + 16 <= d {
            let mut a = [[_mm256_setzero_ps(); 2]; R];
            for (r, ar) in a.iter_mut().enumerate() {
                for (u, x) in ar.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(acc.add(r * d + c + 8 * u));
                }
            }
            for (j, &vp) in v.iter().enumerate() {
                let vv = [T::load8(vp.add(c)), T::load8(vp.add(c + 8))];
                for (r, ar) in a.iter_mut().enumerate() {
                    let w = _mm256_set1_ps(*p.add(r * bs + j));
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
            c += 16;
        }
        if c < d {
            let mut a = [_mm256_setzero_ps(); R];
            for (r, x) in a.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(acc.add(r * d + c));
            }
            for (j, &vp) in v.iter().enumerate() {
                let vv = T::load8(vp.add(c));
                for (r, x) in a.iter_mut().enumerate() {
                    *x = _mm256_fmadd_ps(_mm256_set1_ps(*p.add(r * bs + j)), vv, *x);
                }
            }
            for (r, x) in a.iter().enumerate() {
                _mm256_storeu_ps(acc.add(r * d + c), *x);
            }
        }
    }
}

/// [`Avx2`]'s arithmetic on 16-lane registers, to the bit: value vectors are 16 lanes of
/// the same per-lane FMA chains, and a score register holds two keys' 8-lane chains (one
/// per half) against the query chunk broadcast to both, reduced by the same `hsum4`. So
/// a CPU with AVX-512 decodes exactly as one without, with half the instructions.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::avx2::{hsum4, tile1};
    use super::{Avx2, BlockMath, Element};

    /// Needs AVX-512F, AVX2, FMA, F16C and `d % 8 == 0` (checked by the caller).
    pub(in crate::paged_attention) struct Avx512;

    #[inline(always)]
    unsafe fn low(x: __m512) -> __m256 {
        _mm512_castps512_ps256(x)
    }

    #[inline(always)]
    unsafe fn high(x: __m512) -> __m256 {
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)))
    }

    /// Scores of R (1 to 3) rows against G groups of 4 keys, keys paired in registers.
    #[inline(always)]
    unsafe fn tile<const R: usize, const G: usize, T: Element>(
        q: *const f32,
        d: usize,
        k: &[*const T],
        s: *mut f32,
        bs: usize,
    ) {
        let mut acc = [[[_mm512_setzero_ps(); 2]; G]; R];
        let mut c = 0;
        while c < d {
            let mut kv = [[_mm512_setzero_ps(); 2]; G];
            for (g, pair) in kv.iter_mut().enumerate() {
                pair[0] = T::load8x2(k[4 * g].add(c), k[4 * g + 1].add(c));
                pair[1] = T::load8x2(k[4 * g + 2].add(c), k[4 * g + 3].add(c));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let q8 = _mm256_castps_pd(_mm256_loadu_ps(q.add(r * d + c)));
                let qv = _mm512_castpd_ps(_mm512_broadcast_f64x4(q8));
                for g in 0..G {
                    a[g][0] = _mm512_fmadd_ps(qv, kv[g][0], a[g][0]);
                    a[g][1] = _mm512_fmadd_ps(qv, kv[g][1], a[g][1]);
                }
            }
            c += 8;
        }
        for (r, a) in acc.iter().enumerate() {
            for (g, p) in a.iter().enumerate() {
                let sums = hsum4([low(p[0]), high(p[0]), low(p[1]), high(p[1])]);
                _mm_storeu_ps(s.add(r * bs + 4 * g), sums);
            }
        }
    }

    #[inline(always)]
    unsafe fn scores_rows<const R: usize, T: Element>(
        q: *const f32,
        d: usize,
        k: &[*const T],
        s: *mut f32,
        bs: usize,
    ) {
        let mut j = 0;
        while j + 8 <= k.len() {
            tile::<R, 2, T>(q, d, &k[j..j + 8], s.add(j), bs);
            j += 8;
        }
        if j + 4 <= k.len() {
            tile::<R, 1, T>(q, d, &k[j..j + 4], s.add(j), bs);
            j += 4;
        }
        while j < k.len() {
            tile1::<R, T>(q, d, k[j], s.add(j), bs);
            j += 1;
        }
    }

    impl BlockMath for Avx512 {
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn scores<T: Element>(
            q: &[f32],
            rows: usize,
            d: usize,
            k: &[*const T],
            s: &mut [f32],
            bs: usize,
        ) {
            let (qp, sp) = (q.as_ptr(), s.as_mut_ptr());
            let mut r = 0;
            while r + 3 <= rows {
                scores_rows::<3, T>(qp.add(r * d), d, k, sp.add(r * bs), bs);
                r += 3;
            }
            match rows - r {
                2 => scores_rows::<2, T>(qp.add(r * d), d, k, sp.add(r * bs), bs),
                1 => scores_rows::<1, T>(qp.add(r * d), d, k, sp.add(r * bs), bs),
                _ => {}
            }
        }

        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn exp_sum(x: &mut [f32], m: f32) -> f32 {
            Avx2::exp_sum(x, m)
        }

        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn pv<T: Element>(
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
                    1 => pv_rows::<1, T>(ap.add(r * d), pp.add(r * bs), bs, v, d),
                    2 => pv_rows::<2, T>(ap.add(r * d), pp.add(r * bs), bs, v, d),
                    3 => pv_rows::<3, T>(ap.add(r * d), pp.add(r * bs), bs, v, d),
                    _ => pv_rows::<4, T>(ap.add(r * d), pp.add(r * bs), bs, v, d),
                }
                r += (rows - r).min(4);
            }
        }
    }

    /// R (1 to 4) rows × 64 lanes in registers across all keys, then 16-lane vectors,
    /// then an 8-lane tail.
    #[inline(always)]
    unsafe fn pv_rows<const R: usize, T: Element>(
        acc: *mut f32,
        p: *const f32,
        bs: usize,
        v: &[*const T],
        d: usize,
    ) {
        let mut c = 0;
        while c + 64 <= d {
            pv_chunk::<R, 4, T>(acc.add(c), p, bs, v, c, d);
            c += 64;
        }
        while c + 16 <= d {
            pv_chunk::<R, 1, T>(acc.add(c), p, bs, v, c, d);
            c += 16;
        }
        if c < d {
            let mut a = [_mm256_setzero_ps(); R];
            for (r, x) in a.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(acc.add(r * d + c));
            }
            for (j, &vp) in v.iter().enumerate() {
                let vv = T::load8(vp.add(c));
                for (r, x) in a.iter_mut().enumerate() {
                    *x = _mm256_fmadd_ps(_mm256_set1_ps(*p.add(r * bs + j)), vv, *x);
                }
            }
            for (r, x) in a.iter().enumerate() {
                _mm256_storeu_ps(acc.add(r * d + c), *x);
            }
        }
    }

    /// `U` 16-lane vectors of R rows' accumulators at `acc` (row r at `acc + r·d`),
    /// against the values' lanes from `c`.
    #[inline(always)]
    unsafe fn pv_chunk<const R: usize, const U: usize, T: Element>(
        acc: *mut f32,
        p: *const f32,
        bs: usize,
        v: &[*const T],
        c: usize,
        d: usize,
    ) {
        let mut a = [[_mm512_setzero_ps(); U]; R];
        for (r, ar) in a.iter_mut().enumerate() {
            for (u, x) in ar.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(acc.add(r * d + 16 * u));
            }
        }
        for (j, &vp) in v.iter().enumerate() {
            let mut vv = [_mm512_setzero_ps(); U];
            for (u, x) in vv.iter_mut().enumerate() {
                *x = T::load16(vp.add(c + 16 * u));
            }
            for (r, ar) in a.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*p.add(r * bs + j));
                for (u, x) in ar.iter_mut().enumerate() {
                    *x = _mm512_fmadd_ps(w, vv[u], *x);
                }
            }
        }
        for (r, ar) in a.iter().enumerate() {
            for (u, x) in ar.iter().enumerate() {
                _mm512_storeu_ps(acc.add(r * d + 16 * u), *x);
            }
        }
    }
}
