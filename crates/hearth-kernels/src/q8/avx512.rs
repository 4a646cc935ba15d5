//! AVX-512 kernels (F, BW, VL, VNNI) for every weight type: sixteen weight rows at a time.
//! Each weight block of the sixteen rows is transposed on the fly so that 32-bit lane `r` of
//! a 512-bit register holds four consecutive values of row `r`; one `vpdpbusd` against four
//! activation bytes broadcast to every lane then advances all sixteen rows' sums, the lanes
//! come out as the sixteen rows' block sums (no horizontal sums), and the rows' scales are a
//! vector too. Per block and activation row the integer and float work is a handful of
//! instructions for sixteen rows, where the row-at-a-time kernels (`avx2`) spend about that
//! per row; the decode and transpose are paid once per block for up to eight activation
//! rows. The GGUF bytes are read in place: llama.cpp reaches the same lane layout by
//! repacking Q4_0/Q4_K weights at load, which this does per tile instead, for every type.
//!
//! `vpdpbusd` takes one side as unsigned bytes: the K-quants' weights are (Q6_K's offset of
//! 32 comes back as `32·Σx` from the activations' sums); the blocks of 32 with signed values
//! (Q4_0, Q5_0, Q8_0) take the activations + 128 instead and subtract `128·Σv`, a sum of
//! the weights (`tile_32`). Every integer sum is exact and equal to `reference`'s.
//!
//! The float sums keep the row kernels' order (llama.cpp's AVX2 one): eight per row, one
//! per four-value group of every 32 values, added at the end in `hsum`'s order, so a tile's
//! result equals the row kernel's to the bit and greedy output keeps llama.cpp's agreement
//! (from 8 activation rows the K-quants take llama.cpp's tiled order instead, `SumOrder`).
//! That costs the K-quants one `vpdpwssd` per group and sub-block to apply the sub-block's
//! scale (after `vpmaddubsw`, as the row kernel), where one `vpmulld` per sub-block would
//! do for a single sum per row.

use std::arch::x86_64::*;

use super::acts::QuantizedActs;
use super::avx2::TYPES_32;
use super::avx512_q4k::{self, k_header, KHeader};
use super::{SumOrder, WeightType};

/// Weight rows per tile: the sixteen 32-bit lanes of a register.
pub(crate) const ROWS: usize = 16;
/// The most activation rows a tile takes (its accumulators live in registers).
pub(crate) const MAX_ACTS: usize = 8;

/// A tile's products: `[activation row][weight row]`.
pub(crate) type TileOut = [[f32; ROWS]; MAX_ACTS];

/// 16 bytes at offset `o` of each of the sixteen rows, transposed: register `c` holds bytes
/// `4c..4c + 4` of row `r` in lane `r`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn load16x4(rp: &[*const u8; ROWS], o: usize) -> [__m512i; 4] {
    // z[s] holds rows s, s + 4, s + 8, s + 12 in its four 128-bit lanes, so the 4×4
    // transpose inside each 128-bit lane lands row 4L + s in lane 4L + s.
    let mut z = [_mm512_setzero_si512(); 4];
    for (s, z) in z.iter_mut().enumerate() {
        let v = _mm512_castsi128_si512(load16(rp[s].add(o)));
        let v = _mm512_inserti32x4::<1>(v, load16(rp[s + 4].add(o)));
        let v = _mm512_inserti32x4::<2>(v, load16(rp[s + 8].add(o)));
        *z = _mm512_inserti32x4::<3>(v, load16(rp[s + 12].add(o)));
    }
    let t0 = _mm512_unpacklo_epi32(z[0], z[1]);
    let t1 = _mm512_unpackhi_epi32(z[0], z[1]);
    let t2 = _mm512_unpacklo_epi32(z[2], z[3]);
    let t3 = _mm512_unpackhi_epi32(z[2], z[3]);
    [
        _mm512_unpacklo_epi64(t0, t2),
        _mm512_unpackhi_epi64(t0, t2),
        _mm512_unpacklo_epi64(t1, t3),
        _mm512_unpackhi_epi64(t1, t3),
    ]
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn load16(p: *const u8) -> __m128i {
    _mm_loadu_si128(p as *const __m128i)
}

/// Q6_K's value: the low four bits `lo` joined with bits 4 and 5 of `hi` (the two high bits
/// already moved there): ternary logic A | (B & C).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn join6(lo: __m512i, hi: __m512i) -> __m512i {
    _mm512_ternarylogic_epi32::<0xF8>(lo, hi, _mm512_set1_epi8(0x30))
}

/// Prefetches block `i` of the next tile's sixteen rows (they follow this tile's in
/// memory): the sixteen row streams of a tile are more than the hardware prefetcher
/// follows, and on a matrix that does not fit in cache the loads would wait on memory.
/// Past the last row the addresses are never read (a prefetch does not fault).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn prefetch_next(rp: &[*const u8; ROWS], nb: usize, bb: usize, i: usize) {
    let base = rp[0].wrapping_add(ROWS * nb * bb + i * ROWS * bb);
    for line in (0..ROWS * bb).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(line) as *const i8);
    }
}

/// A `vpshufb` control that rebuilds every dword from its own bytes: byte `b` becomes byte
/// `sel[b]` of the same dword, or zero where `sel[b]` is negative.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn within_dwords(sel: [i8; 4]) -> __m512i {
    let mut v = 0u32;
    for (b, &s) in sel.iter().enumerate() {
        let byte = if s < 0 { 0x80 } else { s as u32 };
        v |= byte << (8 * b);
    }
    // Dword s of each 128-bit lane reads bytes 4s.. of that lane (0x80 stays negative).
    let lane = _mm512_setr_epi32(
        0,
        0x0404_0404,
        0x0808_0808,
        0x0c0c_0c0c,
        0,
        0x0404_0404,
        0x0808_0808,
        0x0c0c_0c0c,
        0,
        0x0404_0404,
        0x0808_0808,
        0x0c0c_0c0c,
        0,
        0x0404_0404,
        0x0808_0808,
        0x0c0c_0c0c,
    );
    _mm512_add_epi8(_mm512_set1_epi32(v as i32), lane)
}

/// Sixteen f16 values, one in the low half of each lane, as f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn f16_lanes(v: __m512i) -> __m512 {
    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v))
}

/// Four activation bytes at `p`, in every lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn bcast(p: *const i8) -> __m512i {
    _mm512_set1_epi32((p as *const i32).read_unaligned())
}

/// A row's eight group sums (lane `c` of the row kernels' 256-bit accumulator: values
/// `4c..4c + 4` of every 32) added in `hsum`'s order, ((0 + 4) + (2 + 6)) + ((1 + 5) +
/// (3 + 7)), so the tile's result equals the row kernel's (and llama.cpp's AVX2) to the bit.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn group_sums_in_hsum_order(v: &[__m512; 8]) -> __m512 {
    let even = _mm512_add_ps(_mm512_add_ps(v[0], v[4]), _mm512_add_ps(v[2], v[6]));
    let odd = _mm512_add_ps(_mm512_add_ps(v[1], v[5]), _mm512_add_ps(v[3], v[7]));
    _mm512_add_ps(even, odd)
}

/// Sixteen weight rows (`rp[r]` is row `r`'s first block; rows may repeat) against
/// activation rows `t0..t0 + tn` (`tn` is 1, 2, 4 or 8), into `out[t][r]`, the float terms
/// added in `order`.
///
/// # Safety
/// The CPU has AVX512F/BW/VL/VNNI, AVX2, FMA and F16C; each `rp[r]` points at `a.k /
/// wt.block()` blocks of `wt`; the activation rows exist in `a`, quantized for `wt`, and
/// for Q4_0/Q5_0/Q8_0 as `acts::unsigned_copy` gives them.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn tile(
    wt: WeightType,
    order: SumOrder,
    rp: &[*const u8; ROWS],
    a: &QuantizedActs,
    t0: usize,
    tn: usize,
    out: &mut TileOut,
) {
    match tn {
        8 => tile_n::<8>(wt, order, rp, a, t0, out),
        4 => tile_n::<4>(wt, order, rp, a, t0, out),
        2 => tile_n::<2>(wt, order, rp, a, t0, out),
        _ => tile_n::<1>(wt, order, rp, a, t0, out),
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_n<const N: usize>(
    wt: WeightType,
    order: SumOrder,
    rp: &[*const u8; ROWS],
    a: &QuantizedActs,
    t0: usize,
    out: &mut TileOut,
) {
    match (wt, order) {
        (WeightType::Q4K, SumOrder::Block) => {
            avx512_q4k::tile_q4k_repacked::<false, N>(rp, a, t0, out)
        }
        (WeightType::Q4K, SumOrder::Pair) => {
            avx512_q4k::tile_q4k_repacked::<true, N>(rp, a, t0, out)
        }
        (WeightType::Q4_0, _) => tile_32::<0, N>(rp, a, t0, out),
        (WeightType::Q4_1, _) => tile_32::<1, N>(rp, a, t0, out),
        (WeightType::Q5_0, _) => tile_32::<2, N>(rp, a, t0, out),
        (WeightType::Q5_1, _) => tile_32::<3, N>(rp, a, t0, out),
        (WeightType::Q8_0, _) => tile_32::<4, N>(rp, a, t0, out),
        (WeightType::Q4K, SumOrder::Tiled) => tile_q45k::<false, true, N>(rp, a, t0, out),
        (WeightType::Q4K, SumOrder::Lanes) => tile_q45k::<false, false, N>(rp, a, t0, out),
        (WeightType::Q5K, SumOrder::Tiled) => tile_q45k::<true, true, N>(rp, a, t0, out),
        (WeightType::Q5K, _) => tile_q45k::<true, false, N>(rp, a, t0, out),
        (WeightType::Q6K, SumOrder::Tiled) => tile_q6k::<true, N>(rp, a, t0, out),
        (WeightType::Q6K, _) => tile_q6k::<false, N>(rp, a, t0, out),
    }
}

/// The blocks of 32, by position in `avx2::TYPES_32` (`T`), each its own loop.
///
/// The signed types (Q4_0, Q5_0, Q8_0: `offset` ≠ 0) take their activations as unsigned
/// bytes, `x + 128` (`super::acts::unsigned_copy`), and their weights as signed values, so
/// `Σ v·x = Σ v·(x + 128) − 128·Σ v`: the correction depends on the weights only and is
/// paid once per block for all `N` activation rows, where `offset·Σx` cost two more
/// instructions per group and activation row. The integer sums are the same, exactly.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_32<const T: usize, const N: usize>(
    rp: &[*const u8; ROWS],
    a: &QuantizedActs,
    t0: usize,
    out: &mut TileOut,
) {
    let nb = a.k / 32;
    // Eight float sums per row, one per four-value group of a block (`q[c]`), and the
    // offsets' sum apart: the row kernels' (and llama.cpp's) order of float additions,
    // so results equal theirs to the bit.
    let mut acc = [[_mm512_setzero_ps(); 8]; N];
    let mut offs = [_mm512_setzero_ps(); N];
    for i in 0..nb {
        prefetch_next(rp, nb, TYPES_32[T].block_bytes(), i);
        let b = decode_32::<T>(rp, i);
        for t in 0..N {
            block_32::<T>(&b, a, t0 + t, i, &mut acc[t], &mut offs[t]);
        }
    }
    for t in 0..N {
        let sum = _mm512_add_ps(group_sums_in_hsum_order(&acc[t]), offs[t]);
        _mm512_storeu_ps(out[t].as_mut_ptr(), sum);
    }
}

/// Block `i` of sixteen rows of a 32-value type, decoded and transposed for `vpdpbusd`.
#[derive(Clone, Copy)]
pub(crate) struct Block32 {
    /// Values `4c..4c + 4` of every row: signed for Q4_0/Q5_0/Q8_0, unsigned otherwise.
    q: [__m512i; 8],
    /// The signed types' `−128·Σ` of each `q[c]` (the integer sums' starting point).
    corr: [__m512i; 8],
    d: __m512,
    /// Q4_1/Q5_1's offset `m`; zero otherwise.
    m: __m512,
}

/// The unsigned weight is the value plus `offset`; where the quants start; whether the
/// block has Q4_1/Q5_1's offset `m`; whether it has Q5's fifth bits.
const fn layout_32(wt: WeightType) -> (i32, usize, bool, bool) {
    match wt {
        WeightType::Q4_0 => (8, 2, false, false),
        WeightType::Q4_1 => (0, 4, true, false),
        WeightType::Q5_0 => (16, 6, false, true),
        WeightType::Q5_1 => (0, 8, true, true),
        _ => (128, 2, false, false),
    }
}

/// Decodes block `i` of the sixteen rows of `TYPES_32[T]`.
///
/// # Safety
/// As `tile`'s; `i` is a block of the rows.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn decode_32<const T: usize>(rp: &[*const u8; ROWS], i: usize) -> Block32 {
    let wt = TYPES_32[T];
    let (offset, qs_at, has_m, five) = layout_32(wt);
    let low4 = _mm512_set1_epi8(0x0F);
    let sixteen = _mm512_set1_epi8(16);
    let zero = _mm512_setzero_si512();
    let o = i * wt.block_bytes();
    let hdr = load16x4(rp, o);
    let d = f16_lanes(hdr[0]);
    let m = if has_m {
        f16_lanes(_mm512_srli_epi32::<16>(hdr[0]))
    } else {
        _mm512_setzero_ps()
    };
    let mut q = [zero; 8];
    if wt == WeightType::Q8_0 {
        // Signed values as they are (see the correction below).
        let lo = load16x4(rp, o + 2);
        let hi = load16x4(rp, o + 18);
        q[..4].copy_from_slice(&lo);
        q[4..].copy_from_slice(&hi);
    } else {
        let raw = load16x4(rp, o + qs_at);
        for c in 0..4 {
            q[c] = _mm512_and_si512(raw[c], low4);
            q[c + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw[c]), low4);
        }
        if five {
            // Value 4c + b's fifth bit is bit 4c + b of qh: byte c/2, bit 4(c%2) + b.
            let rep = [
                within_dwords([0; 4]),
                within_dwords([1; 4]),
                within_dwords([2; 4]),
                within_dwords([3; 4]),
            ];
            let bit = [
                _mm512_set1_epi32(0x0804_0201),
                _mm512_set1_epi32(0x8040_2010u32 as i32),
            ];
            let qh = if wt == WeightType::Q5_0 {
                // d | qh[0..2], qh[2..4] | qs[0..2]
                _mm512_or_si512(
                    _mm512_srli_epi32::<16>(hdr[0]),
                    _mm512_slli_epi32::<16>(hdr[1]),
                )
            } else {
                hdr[1]
            };
            for c in 0..8 {
                let bits = _mm512_shuffle_epi8(qh, rep[c / 2]);
                let set = _mm512_test_epi8_mask(bits, bit[c % 2]);
                q[c] = _mm512_mask_add_epi8(q[c], set, q[c], sixteen);
            }
        }
    }
    // The signed types: q[c] becomes the signed value, corr[c] its −128·Σ.
    let mut corr = [zero; 8];
    if offset != 0 {
        let k128 = _mm512_set1_epi8(-128);
        for c in 0..8 {
            if wt != WeightType::Q8_0 {
                q[c] = _mm512_sub_epi8(q[c], _mm512_set1_epi8(offset as i8));
            }
            corr[c] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, k128, q[c]));
        }
    }
    Block32 { q, corr, d, m }
}

/// Block `i` of activation row `row` against a decoded block, into that row's eight group
/// sums `acc` and offset sum `offs`.
///
/// # Safety
/// As `tile`'s; `b` is block `i` of `TYPES_32[T]`. Only for callers with `tile`'s target
/// features: without its own (`#[inline(always)]` cannot have them) it is inlined into
/// theirs, where a call would pass the sums through memory.
#[inline(always)]
pub(crate) unsafe fn block_32<const T: usize>(
    b: &Block32,
    a: &QuantizedActs,
    row: usize,
    i: usize,
    acc: &mut [__m512; 8],
    offs: &mut __m512,
) {
    let (offset, _, has_m, _) = layout_32(TYPES_32[T]);
    let nb = a.k / 32;
    let ab = row * nb + i;
    let x = a.qs.as_ptr().add(row * a.k + i * 32);
    let scale = _mm512_mul_ps(b.d, _mm512_set1_ps(*a.d.get_unchecked(ab)));
    for c in 0..8 {
        let xc = bcast(x.add(4 * c));
        // Signed types: Σ v·(x + 128) − 128·Σv; the others: Σ q·x.
        let s = if offset != 0 {
            _mm512_dpbusd_epi32(b.corr[c], xc, b.q[c])
        } else {
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), b.q[c], xc)
        };
        acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[c]);
    }
    if has_m {
        let ms = _mm512_mul_ps(b.m, _mm512_set1_ps(*a.s.get_unchecked(ab)));
        *offs = _mm512_add_ps(*offs, ms);
    }
}

/// Q4_K and Q5_K (`FIVE`): eight sub-blocks of 32 with 6-bit scales and mins.
///
/// Float order, as the row kernel (`avx2::tile_q45k`, llama.cpp's AVX2 `vec_dot`): per
/// row eight sums, one per four-value group `c` (`wq[8j + c]` for every sub-block `j`),
/// each taking `d·dx·(its integer block sum)` by FMA per block; the mins' `dmin·dx·Σ`
/// subtracted from a ninth sum per block; at the end the eight in `hsum`'s order, then the
/// ninth. The group sums come from `vpmaddubsw` + `vpdpwssd` (scale in both 16-bit halves)
/// as the row kernel's `vpmaddubsw` + `vpmaddwd`: the same 16-bit pairs, the same integers.
/// With `TILED`, llama.cpp's tiled order (`SumOrder::Tiled`): the eight group sums added
/// as integers per block, `fma(−dmin, Σmins, f32(Σ)·d)` taken by one FMA with `dx` into
/// one running sum per row.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_q45k<const FIVE: bool, const TILED: bool, const N: usize>(
    rp: &[*const u8; ROWS],
    a: &QuantizedActs,
    t0: usize,
    out: &mut TileOut,
) {
    let (bb, qs_at) = if FIVE { (176, 48) } else { (144, 16) };
    let (k, nb) = (a.k, a.k / 256);
    let low4 = _mm512_set1_epi8(0x0F);
    let sixteen = _mm512_set1_epi8(16);
    // Byte j of each dword to both 16-bit halves, zero-extended.
    let dup: [__m512i; 4] = [
        within_dwords([0, -1, 0, -1]),
        within_dwords([1, -1, 1, -1]),
        within_dwords([2, -1, 2, -1]),
        within_dwords([3, -1, 3, -1]),
    ];
    let xq = a.qs.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); 8]; N];
    let mut offs = [_mm512_setzero_ps(); N];
    // The block's 256 values as 64 registers of four per row: sub-block j is 8j..8j + 8.
    let mut wq = [_mm512_setzero_si512(); 64];
    for i in 0..nb {
        prefetch_next(rp, nb, bb, i);
        let o = i * bb;
        let KHeader {
            d,
            dmin,
            scales: [sc_lo, sc_hi],
            mins: [mn_lo, mn_hi],
        } = k_header(rp, o);
        // Scales and mins in both 16-bit halves of each lane (`vpdpwssd`'s other operand).
        let mut sc = [_mm512_setzero_si512(); 8];
        let mut mn = [_mm512_setzero_si512(); 8];
        for j in 0..4 {
            sc[j] = _mm512_shuffle_epi8(sc_lo, dup[j]);
            sc[j + 4] = _mm512_shuffle_epi8(sc_hi, dup[j]);
            mn[j] = _mm512_shuffle_epi8(mn_lo, dup[j]);
            mn[j + 4] = _mm512_shuffle_epi8(mn_hi, dup[j]);
        }
        // Q5_K's fifth bits: bit 2p (2p + 1) of qh byte l for value l of sub-block 2p (2p + 1).
        let mut qh = [_mm512_setzero_si512(); 8];
        if FIVE {
            let (h0, h1) = (load16x4(rp, o + 16), load16x4(rp, o + 32));
            qh = [h0[0], h0[1], h0[2], h0[3], h1[0], h1[1], h1[2], h1[3]];
        }
        for p in 0..4 {
            let r0 = load16x4(rp, o + qs_at + 32 * p);
            let r1 = load16x4(rp, o + qs_at + 32 * p + 16);
            for c in 0..8 {
                let raw = if c < 4 { r0[c] } else { r1[c - 4] };
                let mut lo = _mm512_and_si512(raw, low4);
                let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low4);
                if FIVE {
                    let set_lo =
                        _mm512_test_epi8_mask(qh[c], _mm512_set1_epi8((1u8 << (2 * p)) as i8));
                    let set_hi =
                        _mm512_test_epi8_mask(qh[c], _mm512_set1_epi8((1u8 << (2 * p + 1)) as i8));
                    lo = _mm512_mask_add_epi8(lo, set_lo, lo, sixteen);
                    hi = _mm512_mask_add_epi8(hi, set_hi, hi, sixteen);
                }
                wq[16 * p + c] = lo;
                wq[16 * p + 8 + c] = hi;
            }
        }
        for t in 0..N {
            let x = xq.add((t0 + t) * k + i * 256);
            let mut isum = [_mm512_setzero_si512(); 8];
            for j in 0..8 {
                for c in 0..8 {
                    let p = _mm512_maddubs_epi16(wq[8 * j + c], bcast(x.add(32 * j + 4 * c)));
                    isum[c] = _mm512_dpwssd_epi32(isum[c], p, sc[j]);
                }
            }
            let ab = (t0 + t) * nb + i;
            // Σ mins·(sum of 32 x), the two 16-value sums of a sub-block in one dword.
            let bs = a.bsums.as_ptr().add(ab * 16) as *const i8;
            let mut summ = _mm512_setzero_si512();
            for (j, mn) in mn.iter().enumerate() {
                summ = _mm512_dpwssd_epi32(summ, *mn, bcast(bs.add(4 * j)));
            }
            let dx = _mm512_set1_ps(*a.d.get_unchecked(ab));
            if TILED {
                let s1 = sum8(&isum);
                let r = _mm512_mul_ps(_mm512_cvtepi32_ps(s1), d);
                let r = _mm512_fnmadd_ps(dmin, _mm512_cvtepi32_ps(summ), r);
                acc[t][0] = _mm512_fmadd_ps(r, dx, acc[t][0]);
                continue;
            }
            let scale = _mm512_mul_ps(d, dx);
            for c in 0..8 {
                acc[t][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[c]), scale, acc[t][c]);
            }
            let mins = _mm512_mul_ps(_mm512_mul_ps(dmin, dx), _mm512_cvtepi32_ps(summ));
            offs[t] = _mm512_sub_ps(offs[t], mins);
        }
    }
    for t in 0..N {
        let sum = if TILED {
            acc[t][0]
        } else {
            _mm512_add_ps(group_sums_in_hsum_order(&acc[t]), offs[t])
        };
        _mm512_storeu_ps(out[t].as_mut_ptr(), sum);
    }
}

/// The eight group sums of a block added as integers (exact): llama.cpp's tiled order
/// takes a block's sum whole.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn sum8(v: &[__m512i; 8]) -> __m512i {
    let a = _mm512_add_epi32(_mm512_add_epi32(v[0], v[1]), _mm512_add_epi32(v[2], v[3]));
    let b = _mm512_add_epi32(_mm512_add_epi32(v[4], v[5]), _mm512_add_epi32(v[6], v[7]));
    _mm512_add_epi32(a, b)
}

/// Q6_K: sixteen signed 8-bit scales per 256, values stored +32.
///
/// Float order, as the row kernel (`avx2::tile_q6k`): eight group sums per row as in
/// `tile_q45k`, the +32 offset's `32·scale·(sum of 16 x)` of sub-blocks 2c and 2c + 1
/// taken from group c's integer sum (ggml_vec_dot_q6_K_q8_K's lanes), no ninth sum.
/// With `TILED`, llama.cpp's tiled order (`SumOrder::Tiled`): the group sums added as
/// integers per block, `f32(Σ)·d` taken by one FMA with `dx` into one running sum per row.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_q6k<const TILED: bool, const N: usize>(
    rp: &[*const u8; ROWS],
    a: &QuantizedActs,
    t0: usize,
    out: &mut TileOut,
) {
    let (k, nb) = (a.k, a.k / 256);
    let low4 = _mm512_set1_epi8(0x0F);
    // Byte j of a dword to the top of both 16-bit halves (then shifted down with its
    // sign); bytes 2h, 2h + 1 to the tops of the two halves.
    let top: [__m512i; 4] = [
        within_dwords([-1, 0, -1, 0]),
        within_dwords([-1, 1, -1, 1]),
        within_dwords([-1, 2, -1, 2]),
        within_dwords([-1, 3, -1, 3]),
    ];
    let pair_top: [__m512i; 2] = [within_dwords([-1, 0, -1, 1]), within_dwords([-1, 2, -1, 3])];
    let xq = a.qs.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); 8]; N];
    let mut wq = [_mm512_setzero_si512(); 64];
    for i in 0..nb {
        prefetch_next(rp, nb, 210, i);
        let o = i * 210;
        let scales = load16x4(rp, o + 192);
        // Bytes 206..210: the last two scales, then d.
        let d = f16_lanes(_mm512_srli_epi32::<16>(load16x4(rp, o + 194)[3]));
        // Scale g of the sixteen, sign-extended into both 16-bit halves of each lane.
        let mut sc = [_mm512_setzero_si512(); 16];
        let mut sc_pairs = [_mm512_setzero_si512(); 8];
        for g in 0..16 {
            sc[g] = _mm512_srai_epi16::<8>(_mm512_shuffle_epi8(scales[g / 4], top[g % 4]));
        }
        for h in 0..8 {
            let v = _mm512_shuffle_epi8(scales[h / 2], pair_top[h % 2]);
            sc_pairs[h] = _mm512_srai_epi16::<8>(v);
        }
        for n in 0..2 {
            let (l0a, l0b) = (load16x4(rp, o + 64 * n), load16x4(rp, o + 64 * n + 16));
            let (l1a, l1b) = (load16x4(rp, o + 64 * n + 32), load16x4(rp, o + 64 * n + 48));
            let (ha, hb) = (
                load16x4(rp, o + 128 + 32 * n),
                load16x4(rp, o + 128 + 32 * n + 16),
            );
            for c in 0..8 {
                let (ql0, ql1, qh) = if c < 4 {
                    (l0a[c], l1a[c], ha[c])
                } else {
                    (l0b[c - 4], l1b[c - 4], hb[c - 4])
                };
                let g = 32 * n;
                wq[g + c] = join6(_mm512_and_si512(ql0, low4), _mm512_slli_epi32::<4>(qh));
                wq[g + 8 + c] = join6(_mm512_and_si512(ql1, low4), _mm512_slli_epi32::<2>(qh));
                wq[g + 16 + c] = join6(_mm512_and_si512(_mm512_srli_epi16::<4>(ql0), low4), qh);
                wq[g + 24 + c] = join6(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(ql1), low4),
                    _mm512_srli_epi32::<2>(qh),
                );
            }
        }
        for t in 0..N {
            let x = xq.add((t0 + t) * k + i * 256);
            let mut isum = [_mm512_setzero_si512(); 8];
            for j in 0..8 {
                for c in 0..8 {
                    let p = _mm512_maddubs_epi16(wq[8 * j + c], bcast(x.add(32 * j + 4 * c)));
                    isum[c] = _mm512_dpwssd_epi32(isum[c], p, sc[2 * j + c / 4]);
                }
            }
            let ab = (t0 + t) * nb + i;
            // The weights are stored +32: subtract 32·Σ scale·(sum of its 16 x).
            let bs = a.bsums.as_ptr().add(ab * 16) as *const i8;
            // Group c pays for sub-blocks 2c and 2c + 1, as ggml_vec_dot_q6_K_q8_K's lanes.
            for (h, pair) in sc_pairs.iter().enumerate() {
                let off = _mm512_dpwssd_epi32(_mm512_setzero_si512(), *pair, bcast(bs.add(4 * h)));
                isum[h] = _mm512_sub_epi32(isum[h], _mm512_slli_epi32::<5>(off));
            }
            let dx = _mm512_set1_ps(*a.d.get_unchecked(ab));
            if TILED {
                let r = _mm512_mul_ps(_mm512_cvtepi32_ps(sum8(&isum)), d);
                acc[t][0] = _mm512_fmadd_ps(r, dx, acc[t][0]);
                continue;
            }
            let scale = _mm512_mul_ps(d, dx);
            for c in 0..8 {
                acc[t][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[c]), scale, acc[t][c]);
            }
        }
    }
    for t in 0..N {
        let sum = if TILED {
            acc[t][0]
        } else {
            group_sums_in_hsum_order(&acc[t])
        };
        _mm512_storeu_ps(out[t].as_mut_ptr(), sum);
    }
}
