//! One weight row at a time on 512 bits, for the product with a single activation row
//! (decoding at one client). There every weight byte is used once, so the product runs
//! at the speed memory delivers the rows: read one after another, as here, the hardware
//! prefetcher streams them; the tiles' sixteen interleaved row streams left Q6_K (the
//! output layer of a Q4_K_M file) waiting on memory at 4–8 GB/s where llama.cpp's row
//! loop reads ~20. The integer lanes and float order are the row kernel's
//! (`avx2::tile_q6k`), so the results are its bits, and the tiles'.

use std::arch::x86_64::*;

use super::acts::QuantizedActs;
use super::avx512::join6;
use crate::quant_matmul::avx2::{f16, hsum};

/// How far ahead of the row being read the next rows are prefetched, in bytes: on
/// bench-small's Q6_K output layer streaming from DRAM (one thread, best of 6 under load)
/// 2 KiB read 27-29 GB/s, 8 KiB 34-37, 16 KiB 38-39, 32 KiB 17-34.
const PREFETCH_AHEAD: usize = 16 * 1024;

/// The dot product of one Q6_K weight row at `w` (`a.k / 256` blocks) with activation
/// row `t` of `a`: per block, 64 values per register (two of the row kernel's 32-value
/// groups, whose i32 lanes `c` and `c + 8` then add into its lane `c`), the +32 offset
/// per lane as ggml's, one FMA per block into eight lane sums, `hsum` at the end.
///
/// # Safety
/// The CPU has AVX512F/BW/VL, AVX2, FMA and F16C; `w` holds `a.k / 256` Q6_K blocks;
/// row `t` exists in `a`, quantized to Q8_K.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn dot_q6k(w: *const u8, a: &QuantizedActs, t: usize) -> f32 {
    let (k, nb) = (a.k, a.k / 256);
    let xq = a.qs.as_ptr().add(t * k);
    let low4 = _mm512_set1_epi8(0x0F);
    // The two high bits of values 0..32 (lower 256 bits) are bits 0-1 of qh, of 32..64
    // bits 2-3, of 64..96 bits 4-5, of 96..128 bits 6-7: moved to bits 4-5 per 16-bit lane
    // (what crosses into the other byte is masked off by `join6`).
    let halves = |lo: i16, hi: i16| {
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_set1_epi16(lo)),
            _mm256_set1_epi16(hi),
        )
    };
    let (shl_01, shr_23) = (halves(4, 2), halves(0, 2));
    // i16 lane L of the scales for values 64p..64p + 64 of the block: scale 4p + L/8.
    let idx: [__m512i; 4] = std::array::from_fn(|p| {
        let mut v = [0i16; 32];
        for (l, v) in v.iter_mut().enumerate() {
            *v = (4 * p + l / 8) as i16;
        }
        _mm512_loadu_si512(v.as_ptr() as *const _)
    });
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let b = w.add(i * 210);
        for line in (0..210).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH_AHEAD + line) as *const i8);
        }
        let x = xq.add(i * 256);
        let ab = t * nb + i;
        let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(192) as *const __m128i));
        let sc = _mm512_castsi256_si512(sc16);
        let mut sumi = _mm512_setzero_si512();
        for n in 0..2 {
            let ql = _mm512_loadu_si512(b.add(64 * n) as *const _);
            let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(b.add(128 + 32 * n) as *const _));
            let q01 = join6(_mm512_and_si512(ql, low4), _mm512_sllv_epi16(qh, shl_01));
            let q23 = join6(
                _mm512_and_si512(_mm512_srli_epi16::<4>(ql), low4),
                _mm512_srlv_epi16(qh, shr_23),
            );
            let p01 = _mm512_maddubs_epi16(q01, _mm512_loadu_si512(x.add(128 * n) as *const _));
            let p23 =
                _mm512_maddubs_epi16(q23, _mm512_loadu_si512(x.add(128 * n + 64) as *const _));
            let s01 = _mm512_permutexvar_epi16(idx[2 * n], sc);
            let s23 = _mm512_permutexvar_epi16(idx[2 * n + 1], sc);
            sumi = _mm512_add_epi32(
                sumi,
                _mm512_add_epi32(_mm512_madd_epi16(p01, s01), _mm512_madd_epi16(p23, s23)),
            );
        }
        let lanes = _mm256_add_epi32(
            _mm512_castsi512_si256(sumi),
            _mm512_extracti64x4_epi64::<1>(sumi),
        );
        // The weights are stored +32: subtract 32·scale·(sum of its 16 x), lane c paying
        // for sub-blocks 2c and 2c + 1 as in ggml_vec_dot_q6_K_q8_K.
        let bs = _mm256_loadu_si256(a.bsums.as_ptr().add(ab * 16) as *const _);
        let off = _mm256_madd_epi16(bs, sc16);
        let total = _mm256_sub_epi32(lanes, _mm256_slli_epi32::<5>(off));
        let d = f16(b.add(208)) * *a.d.get_unchecked(ab);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(total), acc);
    }
    hsum(acc)
}
