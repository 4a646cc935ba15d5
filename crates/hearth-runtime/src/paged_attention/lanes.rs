//! The vector operations tiled.rs's prefill kernel is written in, for two register
//! widths: AVX2 (8 f32 lanes, 16 registers) and AVX-512 (16 lanes, 32 registers). The
//! kernel is one generic body; each width picks its own register tiles. Every lane does
//! the same IEEE operations in the same order on both widths (the same FMA chains, the
//! same exp2 polynomial), so the two kernels' outputs are equal to the bit: the wider
//! one only does more rows per instruction.
//!
//! The methods are `#[inline(always)]` without target features of their own: they are
//! only called from tiled.rs's entry points, which enable the features they need.

use std::arch::x86_64::*;

/// One register width.
pub(super) trait Lanes {
    /// f32 lanes per register.
    const W: usize;
    /// The most row vectors a score tile holds (rows are in lanes).
    const MAX_VECS: usize;
    /// Rows the P·V step keeps in registers at once.
    const PV_ROWS: usize;
    type V: Copy;

    /// Keys per score tile of `vecs` row vectors: two accumulator chains per
    /// (key, vector) must fit the register file next to the loads.
    fn keys_per_tile(vecs: usize) -> usize;

    unsafe fn zero() -> Self::V;
    unsafe fn set1(x: f32) -> Self::V;
    /// `*p` in every lane.
    unsafe fn splat(p: *const f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// The first `n` lanes (`n < W`, `n % 8 == 0`); the others read as 0.
    unsafe fn load_part(p: *const f32, n: usize) -> Self::V;
    /// Writes the first `n` lanes only.
    unsafe fn store_part(p: *mut f32, v: Self::V, n: usize);
    /// `a · b + c`, one rounding.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// 2^x for x ≤ 0 (−∞ included): x = n + f, |f| ≤ ½, 2^f by its degree-6 Taylor
    /// polynomial (relative error ~1e-7); n ≤ −127 gives exactly 0.
    unsafe fn exp2(x: Self::V) -> Self::V;
}

/// 2^f's Taylor coefficients, highest first (after 1.540353e-4).
const EXP2_COEFFS: [f32; 6] = [
    1.333_355_8e-3,
    9.618_129e-3,
    5.550_411e-2,
    0.240_226_5,
    std::f32::consts::LN_2,
    1.0,
];
const EXP2_TOP: f32 = 1.540_353e-4;

/// AVX2 + FMA: 16 registers.
pub(super) struct Avx2;

impl Lanes for Avx2 {
    const W: usize = 8;
    const MAX_VECS: usize = 2;
    const PV_ROWS: usize = 2;
    type V = __m256;

    #[inline(always)]
    fn keys_per_tile(vecs: usize) -> usize {
        // 3 × 2 × 2 or 6 × 1 × 2 accumulators: 12 of the 16 registers.
        if vecs >= 2 {
            3
        } else {
            6
        }
    }
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn set1(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn splat(p: *const f32) -> __m256 {
        _mm256_broadcast_ss(&*p)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        _mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn load_part(_p: *const f32, _n: usize) -> __m256 {
        // Head dims are multiples of 8: a partial 8-lane vector never occurs.
        unreachable!("AVX2 tiles have no partial vectors")
    }
    #[inline(always)]
    unsafe fn store_part(_p: *mut f32, _v: __m256, _n: usize) {
        unreachable!("AVX2 tiles have no partial vectors")
    }
    #[inline(always)]
    unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: __m256, b: __m256) -> __m256 {
        _mm256_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: __m256, b: __m256) -> __m256 {
        _mm256_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn exp2(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-127.0));
        let n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        let f = _mm256_sub_ps(x, n);
        let mut p = _mm256_set1_ps(EXP2_TOP);
        for c in EXP2_COEFFS {
            p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
        }
        let two_n = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(p, _mm256_castsi256_ps(two_n))
    }
}

/// AVX-512F: 32 registers, so a score tile covers a 48-row item (16 tokens × a GQA group
/// of 3) against 4 keys at once, and P·V keeps 4 rows × 64 lanes in registers.
pub(super) struct Avx512;

impl Lanes for Avx512 {
    const W: usize = 16;
    const MAX_VECS: usize = 3;
    const PV_ROWS: usize = 4;
    type V = __m512;

    #[inline(always)]
    fn keys_per_tile(vecs: usize) -> usize {
        // 4 × 3 × 2, 6 × 2 × 2 or 8 × 1 × 2 accumulators: at most 24 of the 32.
        match vecs {
            3.. => 4,
            2 => 6,
            _ => 8,
        }
    }
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn set1(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn splat(p: *const f32) -> __m512 {
        _mm512_set1_ps(*p)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn load_part(p: *const f32, n: usize) -> __m512 {
        _mm512_maskz_loadu_ps(part_mask(n), p)
    }
    #[inline(always)]
    unsafe fn store_part(p: *mut f32, v: __m512, n: usize) {
        _mm512_mask_storeu_ps(p, part_mask(n), v)
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: __m512, b: __m512) -> __m512 {
        _mm512_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        _mm512_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn exp2(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-127.0));
        // Round to nearest (imm 0) without exceptions (8): AVX2's _mm256_round_ps mode.
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
        let f = _mm512_sub_ps(x, n);
        let mut p = _mm512_set1_ps(EXP2_TOP);
        for c in EXP2_COEFFS {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
        }
        let two_n = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        _mm512_mul_ps(p, _mm512_castsi512_ps(two_n))
    }
}

#[inline(always)]
fn part_mask(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}
