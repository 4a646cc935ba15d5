//! The AVX-512 tile for Q4_K in llama.cpp's repacked order (`SumOrder::Block`/`Pair`):
//! sixteen weight rows at a time as `avx512`'s tiles (the same transposed loads), with
//! one float sum per row, so the integer work takes `vpdpbusd` straight.

use std::arch::x86_64::*;

use super::acts::QuantizedActs;
use super::avx512::{bcast, f16_lanes, load16x4, prefetch_next, within_dwords, TileOut, ROWS};

/// Q4_K in llama.cpp's repacked order (`SumOrder::Block`, or `Pair` when `PAIRS`; see
/// `reference::dot_q4k_repacked`): one float sum per row (and one for the mins), so the
/// integer work is free of the lane order the others keep: `vpdpbusd` straight from the
/// unsigned nibbles into one sum per sub-block and row, one `vpmulld` by the sub-block's
/// scale, where `tile_q45k` spends `vpmaddubsw` + `vpdpwssd` per four values. The block is
/// decoded 64 values at a time and used at once by every activation row (sixteen
/// registers live, not 64 through the stack).
///
/// # Safety
/// As `avx512::tile`, for Q4_K weights.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn tile_q4k_repacked<const PAIRS: bool, const N: usize>(
    rp: &[*const u8; ROWS],
    a: &QuantizedActs,
    t0: usize,
    out: &mut TileOut,
) {
    let (k, nb) = (a.k, a.k / 256);
    let low4 = _mm512_set1_epi8(0x0F);
    // Byte j of each dword, zero-extended to the dword (`vpmulld`'s operand).
    let byte: [__m512i; 4] = [
        within_dwords([0, -1, -1, -1]),
        within_dwords([1, -1, -1, -1]),
        within_dwords([2, -1, -1, -1]),
        within_dwords([3, -1, -1, -1]),
    ];
    // Byte j of each dword to both 16-bit halves, zero-extended (`vpdpwssd`'s operand).
    let dup: [__m512i; 4] = [
        within_dwords([0, -1, 0, -1]),
        within_dwords([1, -1, 1, -1]),
        within_dwords([2, -1, 2, -1]),
        within_dwords([3, -1, 3, -1]),
    ];
    let xq = a.qs.as_ptr();
    let mut acc = [_mm512_setzero_ps(); N];
    let mut acc_min = [_mm512_setzero_ps(); N];
    for i in 0..nb {
        prefetch_next(rp, nb, 144, i);
        let o = i * 144;
        let KHeader {
            d,
            dmin,
            scales: [sc_lo, sc_hi],
            mins: [mn_lo, mn_hi],
        } = k_header(rp, o);
        let mut isum = [_mm512_setzero_si512(); N];
        let mut imin = [_mm512_setzero_si512(); N];
        for p in 0..4 {
            // Sub-blocks 2p (low nibbles) and 2p + 1 (high), four values per register.
            let r0 = load16x4(rp, o + 16 + 32 * p);
            let r1 = load16x4(rp, o + 32 + 32 * p);
            let mut wq = [_mm512_setzero_si512(); 16];
            for c in 0..8 {
                let raw = if c < 4 { r0[c] } else { r1[c - 4] };
                wq[c] = _mm512_and_si512(raw, low4);
                wq[8 + c] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low4);
            }
            let (scales, mins) = if p < 2 {
                (sc_lo, mn_lo)
            } else {
                (sc_hi, mn_hi)
            };
            let sc = [
                _mm512_shuffle_epi8(scales, byte[2 * (p % 2)]),
                _mm512_shuffle_epi8(scales, byte[2 * (p % 2) + 1]),
            ];
            let mn = [
                _mm512_shuffle_epi8(mins, dup[2 * (p % 2)]),
                _mm512_shuffle_epi8(mins, dup[2 * (p % 2) + 1]),
            ];
            for t in 0..N {
                let ab = (t0 + t) * nb + i;
                let x = xq.add((t0 + t) * k + i * 256 + 64 * p);
                let bs = a.bsums.as_ptr().add(ab * 16 + 4 * p) as *const i8;
                for h in 0..2 {
                    let mut s = _mm512_setzero_si512();
                    for c in 0..8 {
                        s = _mm512_dpbusd_epi32(s, wq[8 * h + c], bcast(x.add(32 * h + 4 * c)));
                    }
                    isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(s, sc[h]));
                    // Σ min·(sum of its 32 x): the sub-block's two 16-value sums in a dword.
                    imin[t] = _mm512_dpwssd_epi32(imin[t], mn[h], bcast(bs.add(4 * h)));
                }
                if PAIRS {
                    let dx = _mm512_set1_ps(*a.d.get_unchecked(ab));
                    let (dd, dm) = (_mm512_mul_ps(d, dx), _mm512_mul_ps(dmin, dx));
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), dd, acc[t]);
                    acc_min[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(imin[t]), dm, acc_min[t]);
                    isum[t] = _mm512_setzero_si512();
                    imin[t] = _mm512_setzero_si512();
                }
            }
        }
        if !PAIRS {
            for t in 0..N {
                let dx = _mm512_set1_ps(*a.d.get_unchecked((t0 + t) * nb + i));
                let (dd, dm) = (_mm512_mul_ps(d, dx), _mm512_mul_ps(dmin, dx));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), dd, acc[t]);
                acc_min[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(imin[t]), dm, acc_min[t]);
            }
        }
    }
    for t in 0..N {
        _mm512_storeu_ps(out[t].as_mut_ptr(), _mm512_sub_ps(acc[t], acc_min[t]));
    }
}

/// A Q4_K/Q5_K block's 16-byte header for sixteen rows (this tile's and
/// `avx512::tile_q45k`'s): `d` and `dmin` as f32 lanes, and
/// the eight 6-bit scales and mins unpacked as ggml's get_scale_min_k4, one byte each:
/// `scales[0]`/`mins[0]` hold sub-blocks 0..4 and `[1]` 4..8, four bytes per dword.
pub(super) struct KHeader {
    pub(super) d: __m512,
    pub(super) dmin: __m512,
    pub(super) scales: [__m512i; 2],
    pub(super) mins: [__m512i; 2],
}

/// The header of the block at byte `o` of each row.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn k_header(rp: &[*const u8; ROWS], o: usize) -> KHeader {
    let low4 = _mm512_set1_epi8(0x0F);
    let low6 = _mm512_set1_epi8(0x3F);
    let bits45 = _mm512_set1_epi8(0x30);
    let hdr = load16x4(rp, o);
    let (s0, s1, s2) = (hdr[1], hdr[2], hdr[3]);
    let sc_hi = _mm512_or_si512(
        _mm512_and_si512(s2, low4),
        _mm512_and_si512(_mm512_srli_epi32::<2>(s0), bits45),
    );
    let mn_hi = _mm512_or_si512(
        _mm512_and_si512(_mm512_srli_epi32::<4>(s2), low4),
        _mm512_and_si512(_mm512_srli_epi32::<2>(s1), bits45),
    );
    KHeader {
        d: f16_lanes(hdr[0]),
        dmin: f16_lanes(_mm512_srli_epi32::<16>(hdr[0])),
        scales: [_mm512_and_si512(s0, low6), sc_hi],
        mins: [_mm512_and_si512(s1, low6), mn_hi],
    }
}
