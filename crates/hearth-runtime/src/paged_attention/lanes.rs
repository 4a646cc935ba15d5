//! The vector operations the CPU attention kernels are written in (tiled.rs's prefill
//! kernel and kernel.rs's streaming decode kernel), for two register widths: AVX2 (8
//! f32 lanes, 16 registers) and AVX-512 (16 lanes, 32 registers). Each kernel is one
//! generic body; each width picks its own register tiles. Every lane does the same IEEE
//! operations in the same order on both widths (the same FMA chains, the same exp2
//! polynomial, the same 8-lane score sums), so the two widths' outputs are equal to the
//! bit: the wider one only does more rows or keys per instruction.
//!
//! The methods are `#[inline(always)]` without target features of their own: they are
//! only called from the kernels' entry points, which enable the features they need.

use std::arch::x86_64::*;

use super::Element;

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

    // The streaming decode kernel's (kernel.rs) operations. A decode score is one 8-lane
    // FMA chain over the head, its lanes summed by `hsum4` on either width: AVX-512
    // holds two keys' chains in a register (one per half) rather than longer chains.

    /// Groups of 4 keys per decode score tile (1 or 2): 3 rows' accumulators and the
    /// keys' registers must fit the register file.
    const SCORE_QUADS: usize;
    /// Registers per row of a decode P·V chunk (2 or 4), up to 4 rows at once.
    const PV_VECS: usize;
    /// Four keys' 8-lane chains (or their values at one 8-element step).
    type Quad: Copy;

    /// `W` cache values from `p`, widened to f32 (exact).
    unsafe fn widen<T: Element>(p: *const T) -> Self::V;
    /// The 8 values at `p` in every 8-lane half.
    unsafe fn load8_each_half(p: *const f32) -> Self::V;
    unsafe fn quad_zero() -> Self::Quad;
    /// Keys `k[0..4]`'s elements `c..c + 8`, widened.
    unsafe fn quad_load<T: Element>(k: &[*const T], c: usize) -> Self::Quad;
    /// `acc + q · k` per key, `q` from [`Lanes::load8_each_half`].
    unsafe fn quad_fma(q: Self::V, k: Self::Quad, acc: Self::Quad) -> Self::Quad;
    /// Each key's chain summed over its 8 lanes, keys in order.
    unsafe fn quad_sums(acc: Self::Quad) -> __m128;
}

/// Four 8-lane accumulators to their four sums.
#[inline(always)]
unsafe fn hsum4(a: [__m256; 4]) -> __m128 {
    let t0 = _mm256_hadd_ps(a[0], a[1]);
    let t1 = _mm256_hadd_ps(a[2], a[3]);
    let t2 = _mm256_hadd_ps(t0, t1);
    _mm_add_ps(_mm256_castps256_ps128(t2), _mm256_extractf128_ps(t2, 1))
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

    // 3 rows × 4 keys: 12 accumulators and the 4 keys fill the 16 registers (queries
    // are FMA memory operands); P·V: 4 rows × 2 vectors.
    const SCORE_QUADS: usize = 1;
    const PV_VECS: usize = 2;
    type Quad = [__m256; 4];

    #[inline(always)]
    unsafe fn widen<T: Element>(p: *const T) -> __m256 {
        T::load8(p)
    }
    #[inline(always)]
    unsafe fn load8_each_half(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn quad_zero() -> [__m256; 4] {
        [_mm256_setzero_ps(); 4]
    }
    #[inline(always)]
    unsafe fn quad_load<T: Element>(k: &[*const T], c: usize) -> [__m256; 4] {
        [
            T::load8(k[0].add(c)),
            T::load8(k[1].add(c)),
            T::load8(k[2].add(c)),
            T::load8(k[3].add(c)),
        ]
    }
    #[inline(always)]
    unsafe fn quad_fma(q: __m256, k: [__m256; 4], acc: [__m256; 4]) -> [__m256; 4] {
        [
            _mm256_fmadd_ps(q, k[0], acc[0]),
            _mm256_fmadd_ps(q, k[1], acc[1]),
            _mm256_fmadd_ps(q, k[2], acc[2]),
            _mm256_fmadd_ps(q, k[3], acc[3]),
        ]
    }
    #[inline(always)]
    unsafe fn quad_sums(acc: [__m256; 4]) -> __m128 {
        hsum4(acc)
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

    // Keys paired in registers: 3 rows × 2 quads × 2 = 12 accumulators and 4 key
    // registers; P·V: 4 rows × 64 lanes.
    const SCORE_QUADS: usize = 2;
    const PV_VECS: usize = 4;
    type Quad = [__m512; 2];

    #[inline(always)]
    unsafe fn widen<T: Element>(p: *const T) -> __m512 {
        T::load16(p)
    }
    #[inline(always)]
    unsafe fn load8_each_half(p: *const f32) -> __m512 {
        let q8 = _mm256_castps_pd(_mm256_loadu_ps(p));
        _mm512_castpd_ps(_mm512_broadcast_f64x4(q8))
    }
    #[inline(always)]
    unsafe fn quad_zero() -> [__m512; 2] {
        [_mm512_setzero_ps(); 2]
    }
    #[inline(always)]
    unsafe fn quad_load<T: Element>(k: &[*const T], c: usize) -> [__m512; 2] {
        [
            T::load8x2(k[0].add(c), k[1].add(c)),
            T::load8x2(k[2].add(c), k[3].add(c)),
        ]
    }
    #[inline(always)]
    unsafe fn quad_fma(q: __m512, k: [__m512; 2], acc: [__m512; 2]) -> [__m512; 2] {
        [
            _mm512_fmadd_ps(q, k[0], acc[0]),
            _mm512_fmadd_ps(q, k[1], acc[1]),
        ]
    }
    #[inline(always)]
    unsafe fn quad_sums(acc: [__m512; 2]) -> __m128 {
        let [a, b] = acc;
        hsum4([low(a), high(a), low(b), high(b)])
    }
}

#[inline(always)]
unsafe fn low(x: __m512) -> __m256 {
    _mm512_castps512_ps256(x)
}

#[inline(always)]
unsafe fn high(x: __m512) -> __m256 {
    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)))
}

#[inline(always)]
fn part_mask(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}
