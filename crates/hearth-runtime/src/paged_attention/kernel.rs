//! The arithmetic of one CPU work item, a block of keys at a time: scores of every
//! query row against the block's keys, the softmax weights, and their weighted sum of
//! values. Two implementations of the same three steps: AVX2 + FMA (register tiles:
//! 2 query rows × 4 keys for scores, 2 rows × 32 lanes of the accumulator for values,
//! a polynomial `exp` on 8 lanes) and plain Rust for other CPUs and head sizes.

/// The three block steps. `k`/`v` hold pointers to the block's key/value rows (f32,
/// `d` each); scores and weights are `rows × bs`, row-major.
pub(super) trait BlockMath {
    /// `s[r·bs + j] = q_r · k_j`, for every row and all `k.len()` keys.
    unsafe fn scores(q: &[f32], rows: usize, d: usize, k: &[*const f32], s: &mut [f32], bs: usize);
    /// `x[i] = e^(x[i] − m)`; returns their sum.
    unsafe fn exp_sum(x: &mut [f32], m: f32) -> f32;
    /// `acc_r += Σ_j p[r·bs + j] · v_j`.
    unsafe fn pv(acc: &mut [f32], p: &[f32], rows: usize, bs: usize, v: &[*const f32], d: usize);
}

pub(super) struct Scalar;

impl BlockMath for Scalar {
    unsafe fn scores(q: &[f32], rows: usize, d: usize, k: &[*const f32], s: &mut [f32], bs: usize) {
        for r in 0..rows {
            let qr = &q[r * d..(r + 1) * d];
            for (j, &kp) in k.iter().enumerate() {
                let kr = std::slice::from_raw_parts(kp, d);
                s[r * bs + j] = qr.iter().zip(kr).map(|(a, b)| a * b).sum();
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

    unsafe fn pv(acc: &mut [f32], p: &[f32], rows: usize, bs: usize, v: &[*const f32], d: usize) {
        for r in 0..rows {
            let ar = &mut acc[r * d..(r + 1) * d];
            for (j, &vp) in v.iter().enumerate() {
                let w = p[r * bs + j];
                let vr = std::slice::from_raw_parts(vp, d);
                for (a, x) in ar.iter_mut().zip(vr) {
                    *a += w * x;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use avx2::Avx2;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Needs AVX2 + FMA and `d % 8 == 0` (checked by the caller).
    pub(in crate::paged_attention) struct Avx2;

    /// Four 8-lane accumulators to their four sums.
    #[inline(always)]
    unsafe fn hsum4(a: [__m256; 4]) -> __m128 {
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

    /// Scores of R (1 or 2) rows against 4 keys.
    #[inline(always)]
    unsafe fn tile4<const R: usize>(
        q: *const f32,
        d: usize,
        k: &[*const f32],
        s: *mut f32,
        bs: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        let mut c = 0;
        while c < d {
            let kv = [
                _mm256_loadu_ps(k[0].add(c)),
                _mm256_loadu_ps(k[1].add(c)),
                _mm256_loadu_ps(k[2].add(c)),
                _mm256_loadu_ps(k[3].add(c)),
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

    #[inline(always)]
    unsafe fn tile1<const R: usize>(
        q: *const f32,
        d: usize,
        k: *const f32,
        s: *mut f32,
        bs: usize,
    ) {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut c = 0;
        while c < d {
            let kv = _mm256_loadu_ps(k.add(c));
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
    unsafe fn scores_rows<const R: usize>(
        q: *const f32,
        d: usize,
        k: &[*const f32],
        s: *mut f32,
        bs: usize,
    ) {
        let mut j = 0;
        while j + 4 <= k.len() {
            tile4::<R>(q, d, &k[j..j + 4], s.add(j), bs);
            j += 4;
        }
        while j < k.len() {
            tile1::<R>(q, d, k[j], s.add(j), bs);
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
        #[target_feature(enable = "avx2,fma")]
        unsafe fn scores(
            q: &[f32],
            rows: usize,
            d: usize,
            k: &[*const f32],
            s: &mut [f32],
            bs: usize,
        ) {
            let (qp, sp) = (q.as_ptr(), s.as_mut_ptr());
            let mut r = 0;
            while r + 2 <= rows {
                scores_rows::<2>(qp.add(r * d), d, k, sp.add(r * bs), bs);
                r += 2;
            }
            if r < rows {
                scores_rows::<1>(qp.add(r * d), d, k, sp.add(r * bs), bs);
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

        #[target_feature(enable = "avx2,fma")]
        unsafe fn pv(
            acc: &mut [f32],
            p: &[f32],
            rows: usize,
            bs: usize,
            v: &[*const f32],
            d: usize,
        ) {
            let (ap, pp) = (acc.as_mut_ptr(), p.as_ptr());
            let mut r = 0;
            while r < rows {
                if r + 2 <= rows {
                    pv_rows::<2>(ap.add(r * d), pp.add(r * bs), bs, v, d);
                    r += 2;
                } else {
                    pv_rows::<1>(ap.add(r * d), pp.add(r * bs), bs, v, d);
                    r += 1;
                }
            }
        }
    }

    /// R rows' accumulators, 32 lanes (or 8 at the tail) in registers across all keys.
    #[inline(always)]
    unsafe fn pv_rows<const R: usize>(
        acc: *mut f32,
        p: *const f32,
        bs: usize,
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
                    *x = _mm256_fmadd_ps(_mm256_set1_ps(*p.add(r * bs + j)), vv, *x);
                }
            }
            for (r, x) in a.iter().enumerate() {
                _mm256_storeu_ps(acc.add(r * d + c), *x);
            }
            c += 8;
        }
    }
}
