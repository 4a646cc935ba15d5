//! `x · Wᵀ` on the CPU for Q4_0, Q4_1 and Q8_0 with 16-bit activations. No longer routed
//! (q8/ takes these types with llama.cpp's 8-bit activations, as the issue-22 goldens
//! require): kept as the more accurate product the q8 kernels are measured against
//! (examples/q8_ratio.rs) and for its AVX2 helpers. Reads candle's blocks in place. candle 0.11's x86 kernels cover these only through a
//! scalar Q4_1 dot product (about 2 tok/s on SmolLM2-135M here) and quantize activations
//! to 8 bits, which is enough to turn SmolLM2's Q4_1 answer to "What is the capital of
//! France?" from Paris into a poem (llama.cpp's output on that file too).
//!
//! Here activations are quantized to 16 bits per block of 32 (error ~1/65536 of the
//! block's largest value, below f16's), so the result is the dequantized weights'
//! product to within f32 rounding, and the inner loop is integer: two `vpmaddwd` per
//! block of 32 weights. Work is split over weight rows on candle's persistent spin pool.

use candle_core::quantized::GgmlDType;

const QK: usize = 32;

/// Whether this machine and type take the kernel.
pub fn supported(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0) && has_avx2()
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2() -> bool {
    false
}

fn block_bytes(dtype: GgmlDType) -> usize {
    match dtype {
        GgmlDType::Q4_0 => 18,
        GgmlDType::Q4_1 => 20,
        _ => 34,
    }
}

/// Activations as 16-bit integers per block: `x ≈ d·q`, with the exact block sums `s`
/// (for the Q4_1/Q4_0 offset term).
pub(crate) struct QuantizedActs {
    q: Vec<i16>,
    d: Vec<f32>,
    s: Vec<f32>,
}

pub(crate) fn quantize_acts(x: &[f32], m: usize, k: usize) -> QuantizedActs {
    let nb = k / QK;
    let mut q = vec![0i16; m * k];
    let mut d = vec![0f32; m * nb];
    let mut s = vec![0f32; m * nb];
    for (bi, (xb, qb)) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).enumerate() {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 32767.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        // round_ties_even is one instruction (`round` is a libm call on baseline x86-64).
        for (o, v) in qb.iter_mut().zip(xb) {
            *o = (v * inv).round_ties_even() as i16;
        }
        d[bi] = scale;
        s[bi] = xb.iter().sum();
    }
    QuantizedActs { q, d, s }
}

/// `dst[m×n] = x[m×k] · Wᵀ` where `w` holds `n` rows of `k/32` blocks of `dtype`.
/// The caller checks `supported(dtype)`, `k % 32 == 0` and the slice lengths.
pub fn matmul(dtype: GgmlDType, w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    matmul_on(dtype, w, n, k, x, m, &|n, work| {
        candle_core::utils::barrier_pool().execute_chunked(n, work)
    })
}

/// Splits `0..n` over worker threads and runs `work` on every piece exactly once.
pub type Parallel<'a> = &'a dyn Fn(usize, &(dyn Fn(std::ops::Range<usize>) + Sync));

/// `matmul` with the weight rows split by the caller's thread pool, so a process that
/// keeps its own spinning workers does not also wake candle's.
pub fn matmul_on(
    dtype: GgmlDType,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
    parallel: Parallel<'_>,
) -> Vec<f32> {
    assert!(supported(dtype) && k.is_multiple_of(QK));
    let row_bytes = k / QK * block_bytes(dtype);
    assert_eq!(w.len(), n * row_bytes);
    assert_eq!(x.len(), m * k);
    let acts = quantize_acts(x, m, k);
    let mut dst = vec![0f32; m * n];
    let dst_ptr = dst.as_mut_ptr() as usize;
    let work = |rows: std::ops::Range<usize>| {
        // SAFETY: each weight row's outputs (column r of every dst row) are written by
        // exactly one work range; dst outlives the pool call.
        let dst = dst_ptr as *mut f32;
        for t0 in (0..m).step_by(TILE) {
            let tn = TILE.min(m - t0);
            for r in rows.clone() {
                let wr = &w[r * row_bytes..(r + 1) * row_bytes];
                let mut out = [0f32; TILE];
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    avx2::row_tile(dtype, wr, &acts, t0, tn, k, &mut out);
                }
                for (t, v) in out.iter().enumerate().take(tn) {
                    unsafe { *dst.add((t0 + t) * n + r) = *v };
                }
            }
        }
    };
    // Small products are not worth waking the pool.
    if n * k * m < 64 * 1024 {
        work(0..n);
    } else {
        parallel(n, &work);
    }
    dst
}

/// Activation rows per pass over a weight row: each expanded weight block is reused this
/// many times.
const TILE: usize = 4;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{QuantizedActs, QK, TILE};
    use candle_core::quantized::GgmlDType;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn f16(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Dot products of one weight row with activation rows `t0..t0+tn`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn row_tile(
        dtype: GgmlDType,
        w: &[u8],
        a: &QuantizedActs,
        t0: usize,
        tn: usize,
        k: usize,
        out: &mut [f32; TILE],
    ) {
        let nb = k / QK;
        let mut acc = [_mm256_setzero_ps(); TILE];
        let mut offs = [0f32; TILE];
        let low = _mm_set1_epi8(0x0F);
        let wp = w.as_ptr();
        for b in 0..nb {
            // The block's 32 weights as 16-bit integers, and its scale and offset.
            let (wlo, whi, dw, mw) = match dtype {
                GgmlDType::Q8_0 => {
                    let p = wp.add(b * 34);
                    let lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(2) as *const __m128i));
                    let hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(18) as *const __m128i));
                    (lo, hi, f16(p), 0.0)
                }
                GgmlDType::Q4_1 => {
                    let p = wp.add(b * 20);
                    let qs = _mm_loadu_si128(p.add(4) as *const __m128i);
                    let lo = _mm256_cvtepu8_epi16(_mm_and_si128(qs, low));
                    let hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(qs, 4), low));
                    // d and m are adjacent: one load and one conversion for both.
                    let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
                    (
                        lo,
                        hi,
                        _mm_cvtss_f32(dm),
                        _mm_cvtss_f32(_mm_movehdup_ps(dm)),
                    )
                }
                _ => {
                    // Q4_0: d·(q - 8) = d·q + (-8d).
                    let p = wp.add(b * 18);
                    let qs = _mm_loadu_si128(p.add(2) as *const __m128i);
                    let lo = _mm256_cvtepu8_epi16(_mm_and_si128(qs, low));
                    let hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(qs, 4), low));
                    let d = f16(p);
                    (lo, hi, d, -8.0 * d)
                }
            };
            for t in 0..tn {
                let row = t0 + t;
                let xp = a.q.as_ptr().add(row * k + b * QK);
                let xlo = _mm256_loadu_si256(xp as *const __m256i);
                let xhi = _mm256_loadu_si256(xp.add(16) as *const __m256i);
                let p = _mm256_add_epi32(_mm256_madd_epi16(wlo, xlo), _mm256_madd_epi16(whi, xhi));
                let ab = row * nb + b;
                let scale = _mm256_set1_ps(dw * *a.d.get_unchecked(ab));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[t]);
                offs[t] += mw * *a.s.get_unchecked(ab);
            }
        }
        for t in 0..tn {
            out[t] = hsum(acc[t]) + offs[t];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    fn check(dtype: GgmlDType, m: usize) {
        if !supported(dtype) {
            return;
        }
        let (n, k) = (24, 96);
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let want = x
            .matmul(&q.dequantize(&dev).unwrap().t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got = matmul(
            dtype,
            &q.data().unwrap(),
            n,
            k,
            &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            m,
        );
        // Dot products here are ~10 in size; 16-bit activations keep them within ~2e-3
        // of the dequantized weights' product, where 8-bit ones would be ~0.3 off.
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-2, "{dtype:?} m={m}: {g} vs {w}");
        }
    }

    #[test]
    fn matches_dequantized_weights() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for m in [1, 3, 4, 9] {
                check(dtype, m);
            }
        }
    }
}
