//! AVX2 kernels: one weight row against a tile of activation rows, each weight block
//! decoded once per tile into bytes and multiplied with `vpmaddubsw` (unsigned weight
//! bytes × signed activation bytes, exact in 16 bits for every type here), the block's
//! integer sum scaled once in f32 — the same arithmetic as ggml's AVX2 `vec_dot`s. The
//! blocks of 32 also come in an AVX512-VNNI build (`vpdpbusd` on 256-bit registers: one
//! instruction for `vpmaddubsw` + `vpmaddwd`); the K-quants' per-16 scales ride on
//! `vpmaddwd`, which VNNI would not save.

use std::arch::x86_64::*;

use super::acts::QuantizedActs;
use super::reference::k4_scales;
use super::{SumOrder, WeightType, TILE};
// The 16-bit kernel's helpers: the same f16 read and horizontal sum.
use crate::quant_matmul::avx2::{f16, hsum};

/// Unsigned bytes × signed bytes, summed in fours into eight i32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_us(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// 16 bytes of nibble pairs as 32 bytes: low nibbles first, then high ones.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles_32(p: *const u8) -> __m256i {
    let t = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_inserti128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// Byte `i` is 0xFF where bit `i` of the 32-bit word at `p` is set.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bits_32(p: *const u8) -> __m256i {
    let x = (p as *const i32).read_unaligned();
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// Q6_K's two high bits (the low two of each byte of `v`) moved above the nibble.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn high2(v: __m256i) -> __m256i {
    _mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi8(3)), 4)
}

/// Dot products of weight row `w` (`nb` blocks) with activation rows `t0..t0 + tn`, their
/// float terms added in `order`; with `vnni`, the blocks of 32 take `vpdpbusd`.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C (and AVX512-VNNI with AVX512VL when `vnni`); `w` holds
/// `nb` blocks of `wt`; the rows exist in `a`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn row_tile(
    vnni: bool,
    order: SumOrder,
    wt: WeightType,
    w: &[u8],
    a: &QuantizedActs,
    t0: usize,
    tn: usize,
    out: &mut [f32; TILE],
) {
    // `$i` is the type's position in TYPES_32.
    macro_rules! t32 {
        ($i:literal) => {
            if vnni {
                tile_32_vnni::<$i>(w, a, t0, tn, out)
            } else {
                tile_32::<$i>(w, a, t0, tn, out)
            }
        };
    }
    match wt {
        WeightType::Q4_0 => t32!(0),
        WeightType::Q4_1 => t32!(1),
        WeightType::Q5_0 => t32!(2),
        WeightType::Q5_1 => t32!(3),
        WeightType::Q8_0 => t32!(4),
        WeightType::Q4K if matches!(order, SumOrder::Block | SumOrder::Pair) => {
            tile_q4k_repacked(order == SumOrder::Pair, w, a, t0, tn, out)
        }
        WeightType::Q4K | WeightType::Q5K => {
            tile_q45k(order == SumOrder::Tiled, wt, w, a, t0, tn, out)
        }
        WeightType::Q6K => tile_q6k(order == SumOrder::Tiled, w, a, t0, tn, out),
    }
}

/// The block of 32 at `b` as bytes, with its scale and offset: signed types (Q4_0, Q5_0,
/// Q8_0) come back with `signed` set and offset 0; Q4_1/Q5_1 as unsigned values plus
/// the offset `m` that multiplies the activations' block sum.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_32(wt: WeightType, b: *const u8) -> (__m256i, bool, f32, f32) {
    match wt {
        WeightType::Q8_0 => (load(b.add(2)), true, f16(b), 0.0),
        WeightType::Q4_0 => {
            let v = _mm256_sub_epi8(nibbles_32(b.add(2)), _mm256_set1_epi8(8));
            (v, true, f16(b), 0.0)
        }
        WeightType::Q4_1 => (nibbles_32(b.add(4)), false, f16(b), f16(b.add(2))),
        WeightType::Q5_0 => {
            // Fifth bit clear: the nibble minus 16 is the nibble with 0xF0 set.
            let hi = _mm256_andnot_si256(bits_32(b.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
            (_mm256_or_si256(nibbles_32(b.add(6)), hi), true, f16(b), 0.0)
        }
        _ => {
            let hi = _mm256_and_si256(bits_32(b.add(4)), _mm256_set1_epi8(0x10));
            (
                _mm256_or_si256(nibbles_32(b.add(8)), hi),
                false,
                f16(b),
                f16(b.add(2)),
            )
        }
    }
}

/// The types with blocks of 32, by index, so each gets its own monomorphized loop (no
/// per-block branch on the type).
pub(crate) const TYPES_32: [WeightType; 5] = [
    WeightType::Q4_0,
    WeightType::Q4_1,
    WeightType::Q5_0,
    WeightType::Q5_1,
    WeightType::Q8_0,
];

/// A tile loop over blocks of 32, once per instruction set: the integer dot product of a
/// block (`$dot`, unsigned weight bytes × signed activation bytes into eight i32) is all
/// that differs.
macro_rules! tile_32 {
    ($name:ident, $features:literal, $dot:ident) => {
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name<const T: usize>(
            w: &[u8],
            a: &QuantizedActs,
            t0: usize,
            tn: usize,
            out: &mut [f32; TILE],
        ) {
            let wt = TYPES_32[T];
            let k = a.k;
            let nb = k / 32;
            let bb = wt.block_bytes();
            let mut acc = [_mm256_setzero_ps(); TILE];
            let mut offs = [0f32; TILE];
            let (xq, xd) = (a.qs.as_ptr() as *const u8, a.d.as_ptr());
            for i in 0..nb {
                // Signed weights become |w| with w's sign moved onto x.
                let (wv, signed, dw, mw) = block_32(wt, w.as_ptr().add(i * bb));
                let uw = if signed { _mm256_sign_epi8(wv, wv) } else { wv };
                for t in 0..tn {
                    let row = t0 + t;
                    let x = load(xq.add(row * k + i * 32));
                    let sx = if signed { _mm256_sign_epi8(x, wv) } else { x };
                    let p = $dot(uw, sx);
                    let ab = row * nb + i;
                    let scale = _mm256_set1_ps(dw * *xd.add(ab));
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[t]);
                    if !signed {
                        offs[t] += mw * *a.s.get_unchecked(ab);
                    }
                }
            }
            for t in 0..tn {
                out[t] = hsum(acc[t]) + offs[t];
            }
        }
    };
}

tile_32!(tile_32, "avx2,fma,f16c", dot_us);
tile_32!(
    tile_32_vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    dot_us_vnni
);

/// `dot_us` in one instruction (`vpdpbusd`), without `vpmaddubsw`'s 16-bit saturation
/// (which no type here reaches either).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn dot_us_vnni(u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
}

/// Q4_K/Q5_K in ggml's lane order, or with `tiled` in llama.cpp's tiled one
/// (`SumOrder::Tiled`): the same exact integers, the lanes added up per block first.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q45k(
    tiled: bool,
    wt: WeightType,
    w: &[u8],
    a: &QuantizedActs,
    t0: usize,
    tn: usize,
    out: &mut [f32; TILE],
) {
    let k = a.k;
    let nb = k / 256;
    let bb = wt.block_bytes();
    let five = wt == WeightType::Q5K;
    let m4 = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    let mut acc = [_mm256_setzero_ps(); TILE];
    let mut offs = [0f32; TILE];
    let xq = a.qs.as_ptr() as *const u8;
    for i in 0..nb {
        let b = w.as_ptr().add(i * bb);
        let (d, dmin) = (f16(b), f16(b.add(2)));
        let (sc, mn) = k4_scales(std::slice::from_raw_parts(b.add(4), 12));
        let qs = if five { b.add(48) } else { b.add(16) };
        let qh = if five {
            load(b.add(16))
        } else {
            _mm256_setzero_si256()
        };
        let mut sumi = [_mm256_setzero_si256(); TILE];
        for j in 0..4 {
            let q = load(qs.add(32 * j));
            let mut lo = _mm256_and_si256(q, m4);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            if five {
                let sh_lo = _mm_cvtsi32_si128(2 * j as i32);
                let sh_hi = _mm_cvtsi32_si128(2 * j as i32 + 1);
                let b_lo = _mm256_and_si256(_mm256_srl_epi16(qh, sh_lo), one);
                let b_hi = _mm256_and_si256(_mm256_srl_epi16(qh, sh_hi), one);
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(b_lo, 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(b_hi, 4));
            }
            let s_lo = _mm256_set1_epi16(sc[2 * j] as i16);
            let s_hi = _mm256_set1_epi16(sc[2 * j + 1] as i16);
            for t in 0..tn {
                let x = xq.add((t0 + t) * k + i * 256 + 64 * j);
                let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load(x)), s_lo);
                let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load(x.add(32))), s_hi);
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(p_lo, p_hi));
            }
        }
        for t in 0..tn {
            let ab = (t0 + t) * nb + i;
            let d8 = *a.d.get_unchecked(ab);
            let bs = a.bsums.get_unchecked(ab * 16..ab * 16 + 16);
            let summ: i32 = (0..8)
                .map(|j| mn[j] as i32 * (bs[2 * j] as i32 + bs[2 * j + 1] as i32))
                .sum();
            if tiled {
                let r = (-dmin).mul_add(summ as f32, hsum_i32(sumi[t]) as f32 * d);
                offs[t] = r.mul_add(d8, offs[t]);
                continue;
            }
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * d8), _mm256_cvtepi32_ps(sumi[t]), acc[t]);
            offs[t] -= dmin * d8 * summ as f32;
        }
    }
    for t in 0..tn {
        // Tiled: the one running sum is `offs` (`acc` stayed zero).
        out[t] = if tiled {
            offs[t]
        } else {
            hsum(acc[t]) + offs[t]
        };
    }
}

/// The eight i32 lanes' sum.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<1>(s)))
}

/// Q4_K in llama.cpp's repacked order (`SumOrder::Block`, or `Pair` when `pairs`; see
/// `reference::dot_q4k_repacked`): `tile_q45k`'s exact integer sums, added across the
/// lanes per block (per 64 values) before their one FMA.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q4k_repacked(
    pairs: bool,
    w: &[u8],
    a: &QuantizedActs,
    t0: usize,
    tn: usize,
    out: &mut [f32; TILE],
) {
    let k = a.k;
    let nb = k / 256;
    let m4 = _mm256_set1_epi8(0x0F);
    let (mut acc, mut acc_min) = ([0f32; TILE], [0f32; TILE]);
    let xq = a.qs.as_ptr() as *const u8;
    for i in 0..nb {
        let b = w.as_ptr().add(i * 144);
        let (d, dmin) = (f16(b), f16(b.add(2)));
        let (sc, mn) = k4_scales(std::slice::from_raw_parts(b.add(4), 12));
        let (mut isum, mut imin) = ([0i32; TILE], [0i32; TILE]);
        for p in 0..4 {
            let q = load(b.add(16 + 32 * p));
            let lo = _mm256_and_si256(q, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            let s_lo = _mm256_set1_epi16(sc[2 * p] as i16);
            let s_hi = _mm256_set1_epi16(sc[2 * p + 1] as i16);
            for t in 0..tn {
                let ab = (t0 + t) * nb + i;
                let x = xq.add((t0 + t) * k + i * 256 + 64 * p);
                let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load(x)), s_lo);
                let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load(x.add(32))), s_hi);
                isum[t] += hsum_i32(_mm256_add_epi32(p_lo, p_hi));
                let bs = a.bsums.get_unchecked(ab * 16 + 4 * p..ab * 16 + 4 * p + 4);
                imin[t] += mn[2 * p] as i32 * (bs[0] as i32 + bs[1] as i32)
                    + mn[2 * p + 1] as i32 * (bs[2] as i32 + bs[3] as i32);
                if pairs {
                    let dx = *a.d.get_unchecked(ab);
                    acc[t] = (isum[t] as f32).mul_add(d * dx, acc[t]);
                    acc_min[t] = (imin[t] as f32).mul_add(dmin * dx, acc_min[t]);
                    (isum[t], imin[t]) = (0, 0);
                }
            }
        }
        if !pairs {
            for t in 0..tn {
                let dx = *a.d.get_unchecked((t0 + t) * nb + i);
                acc[t] = (isum[t] as f32).mul_add(d * dx, acc[t]);
                acc_min[t] = (imin[t] as f32).mul_add(dmin * dx, acc_min[t]);
            }
        }
    }
    for t in 0..tn {
        out[t] = acc[t] - acc_min[t];
    }
}

/// Q6_K in ggml's lane order, or with `tiled` in llama.cpp's tiled one
/// (`SumOrder::Tiled`): the same exact integers, the lanes added up per block first.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q6k(
    tiled: bool,
    w: &[u8],
    a: &QuantizedActs,
    t0: usize,
    tn: usize,
    out: &mut [f32; TILE],
) {
    let k = a.k;
    let nb = k / 256;
    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); TILE];
    let mut one = [0f32; TILE];
    let xq = a.qs.as_ptr() as *const u8;
    for i in 0..nb {
        let b = w.as_ptr().add(i * 210);
        let d = f16(b.add(208));
        let sc = std::slice::from_raw_parts(b.add(192) as *const i8, 16);
        let mut sumi = [_mm256_setzero_si256(); TILE];
        for n in 0..2 {
            let ql0 = load(b.add(64 * n));
            let ql1 = load(b.add(64 * n + 32));
            let qh = load(b.add(128 + 32 * n));
            let q = [
                _mm256_or_si256(_mm256_and_si256(ql0, m4), high2(qh)),
                _mm256_or_si256(_mm256_and_si256(ql1, m4), high2(_mm256_srli_epi16(qh, 2))),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                    high2(_mm256_srli_epi16(qh, 4)),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                    high2(_mm256_srli_epi16(qh, 6)),
                ),
            ];
            // Values 0..16 of each 32 take one scale, 16..32 the next.
            let mut s = [_mm256_setzero_si256(); 4];
            for (g, s) in s.iter_mut().enumerate() {
                *s = _mm256_inserti128_si256(
                    _mm256_set1_epi16(sc[8 * n + 2 * g] as i16),
                    _mm_set1_epi16(sc[8 * n + 2 * g + 1] as i16),
                    1,
                );
            }
            for t in 0..tn {
                let x = xq.add((t0 + t) * k + i * 256 + 128 * n);
                for g in 0..4 {
                    let p = _mm256_maddubs_epi16(q[g], load(x.add(32 * g)));
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(p, s[g]));
                }
            }
        }
        for t in 0..tn {
            let ab = (t0 + t) * nb + i;
            let d8 = *a.d.get_unchecked(ab);
            let bs = a.bsums.get_unchecked(ab * 16..ab * 16 + 16);
            // The weights are stored +32: subtract 32·scale·(sum of x) per 16 values, lane c
            // paying for sub-blocks 2c and 2c + 1 as in ggml_vec_dot_q6_K_q8_K.
            let off: [i32; 8] = std::array::from_fn(|c| {
                32 * (sc[2 * c] as i32 * bs[2 * c] as i32
                    + sc[2 * c + 1] as i32 * bs[2 * c + 1] as i32)
            });
            let total =
                _mm256_sub_epi32(sumi[t], _mm256_loadu_si256(off.as_ptr() as *const __m256i));
            if tiled {
                one[t] = (hsum_i32(total) as f32 * d).mul_add(d8, one[t]);
            } else {
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * d8), _mm256_cvtepi32_ps(total), acc[t]);
            }
        }
    }
    for t in 0..tn {
        out[t] = if tiled { one[t] } else { hsum(acc[t]) };
    }
}
