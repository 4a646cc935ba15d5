//! Activations quantized to 8 bits once per row, exactly as llama.cpp's CPU backend does
//! for the weight type they meet (`vec_dot_type` in ggml-cpu): Q8_0 blocks of 32 for
//! Q4_0/Q5_0/Q8_0 weights, Q8_1 (Q8_0 plus the block sum) for Q4_1/Q5_1, Q8_K blocks of 256 with
//! 16-value sums for the K-quants. Matching llama.cpp here, to the bit, is what makes
//! greedy tokens agree with llama.cpp on the same file: the integer products that follow
//! are exact on both sides, only the order of the float sums differs.

use half::f16;

/// Which 8-bit activation format a weight type's dot product takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActFormat {
    /// Blocks of 32: `x ≈ d·q`, `d` rounded through f16 as ggml stores it.
    Q8_0,
    /// Q8_0 plus `s = d·Σq` (through f16) for the weight's offset term.
    Q8_1,
    /// Blocks of 256: `d` in f32 and the sum of every 16 `q`s.
    Q8K,
}

impl ActFormat {
    pub fn block(self) -> usize {
        match self {
            Self::Q8_0 | Self::Q8_1 => 32,
            Self::Q8K => 256,
        }
    }
}

/// `m` rows of `k` activations, quantized.
pub struct QuantizedActs {
    pub format: ActFormat,
    pub k: usize,
    /// `m·k` quantized values, row-major.
    pub qs: Vec<i8>,
    /// One scale per block.
    pub d: Vec<f32>,
    /// Q8_1: `d·Σq` per block of 32; empty otherwise.
    pub s: Vec<f32>,
    /// Q8_0/Q8_1: `Σq` per block of 32, exact (the AVX-512 kernels take the signed weight
    /// types' offsets from it); empty for Q8_K.
    pub sums: Vec<i16>,
    /// Q8_K: `Σq` per 16 values; empty otherwise.
    pub bsums: Vec<i16>,
}

impl QuantizedActs {
    pub fn blocks_per_row(&self) -> usize {
        self.k / self.format.block()
    }
}

fn f16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// ggml's `nearest_int`: round half to even through the float adder (|x| < 2^22).
#[inline]
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Quantizes `x` (`m` rows of `k`, `k` a multiple of the format's block).
pub fn quantize(format: ActFormat, x: &[f32], k: usize) -> QuantizedActs {
    assert!(k.is_multiple_of(format.block()) && x.len().is_multiple_of(k));
    let mut out = QuantizedActs {
        format,
        k,
        qs: vec![0; x.len()],
        d: Vec::with_capacity(x.len() / format.block()),
        s: Vec::new(),
        sums: Vec::new(),
        bsums: Vec::new(),
    };
    match format {
        ActFormat::Q8_0 | ActFormat::Q8_1 => {
            for (xb, qb) in x.chunks_exact(32).zip(out.qs.chunks_exact_mut(32)) {
                // quantize_row_q8_0/q8_1 in ggml-cpu/arch/x86/quants.c (AVX2): multiply by
                // 127/amax, round half to even, d = amax/127 stored as f16. The rounding
                // through the float adder (|v·id| <= 127), not `round_ties_even`: without
                // SSE4.1 in the build target that is a libm call per value.
                let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                let mut sum = 0i32;
                for (q, v) in qb.iter_mut().zip(xb) {
                    let r = nearest_int(v * id);
                    sum += r;
                    *q = r as i8;
                }
                out.d.push(f16_round(d));
                out.sums.push(sum as i16);
                if format == ActFormat::Q8_1 {
                    out.s.push(f16_round(d * sum as f32));
                }
            }
        }
        ActFormat::Q8K => {
            out.bsums.reserve(x.len() / 16);
            for (xb, qb) in x.chunks_exact(256).zip(out.qs.chunks_exact_mut(256)) {
                // quantize_row_q8_K_ref in ggml-quants.c (x86 uses the reference): the
                // largest magnitude keeps its sign, scale -127/max.
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in xb {
                    if v.abs() > amax {
                        amax = v.abs();
                        max = v;
                    }
                }
                if amax == 0.0 {
                    out.d.push(0.0);
                    out.bsums.extend([0i16; 16]);
                    continue;
                }
                let iscale = -127.0 / max;
                for (q, v) in qb.iter_mut().zip(xb) {
                    *q = nearest_int(iscale * v).min(127) as i8;
                }
                for g in qb.chunks_exact(16) {
                    out.bsums.push(g.iter().map(|&q| q as i16).sum());
                }
                out.d.push(1.0 / iscale);
            }
        }
    }
    out
}

/// The same activations with every quantized value + 128 as an unsigned byte (the sign
/// bit flipped), the other fields as they are: the AVX-512 tiles of the signed 32-value
/// types (Q4_0, Q5_0, Q8_0) take them so that the `vpdpbusd` correction is a sum of the
/// weights, once per block, rather than of the activations, once per row.
pub(crate) fn unsigned_copy(a: &QuantizedActs) -> QuantizedActs {
    QuantizedActs {
        format: a.format,
        k: a.k,
        qs: a.qs.iter().map(|&q| q ^ i8::MIN).collect(),
        d: a.d.clone(),
        s: a.s.clone(),
        sums: a.sums.clone(),
        bsums: a.bsums.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(3.5), 4);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-126.6), -127);
        // Every float step in [-128, 128] around the halves rounds as `round_ties_even`
        // (the Q8_0/Q8_1 quantizer's definition before it took `nearest_int`).
        for i in -128 * 1024..=128 * 1024 {
            let x = i as f32 / 1024.0;
            let around = [x.next_down(), x, x.next_up()];
            for x in around {
                assert_eq!(nearest_int(x), x.round_ties_even() as i32, "{x}");
            }
        }
    }

    #[test]
    fn every_format_reconstructs_its_input() {
        let x: Vec<f32> = (0..512)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        for format in [ActFormat::Q8_0, ActFormat::Q8_1, ActFormat::Q8K] {
            let q = quantize(format, &x, 256);
            let bs = format.block();
            for (i, v) in x.iter().enumerate() {
                let back = q.d[i / bs] * q.qs[i] as f32;
                assert!(
                    (back - v).abs() <= q.d[i / bs].abs() * 0.51 + 1e-3,
                    "{format:?} {i}"
                );
            }
            if format != ActFormat::Q8K {
                let sum: i32 = q.qs[32..64].iter().map(|&v| v as i32).sum();
                assert_eq!(q.sums[1] as i32, sum);
            }
            if format == ActFormat::Q8_1 {
                let sum: i32 = q.qs[..32].iter().map(|&v| v as i32).sum();
                assert!((q.s[0] - q.d[0] * sum as f32).abs() < 1e-2 * q.s[0].abs().max(1.0));
            }
            if format == ActFormat::Q8K {
                let sum: i16 = q.qs[16..32].iter().map(|&v| v as i16).sum();
                assert_eq!(q.bsums[1], sum);
                // The signed largest value maps to -127 (ggml's convention).
                assert!(q.qs.contains(&-127));
            }
        }
    }
}
