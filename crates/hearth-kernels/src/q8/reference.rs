//! Scalar dot products of one weight row (ggml blocks as stored in the GGUF file) with one
//! row of 8-bit activations: the definition the SIMD kernels are tested against and the
//! fallback on CPUs without AVX2. Integer sums per block are exact; the float scale
//! arithmetic follows ggml's generic `ggml_vec_dot_*` functions.

use half::f16;

use super::acts::QuantizedActs;
use super::{SumOrder, WeightType};

#[inline]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Q4_K/Q5_K's eight 6-bit scales and eight 6-bit mins (ggml's `get_scale_min_k4`).
pub(crate) fn k4_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        if j < 4 {
            sc[j] = s[j] & 63;
            mn[j] = s[j + 4] & 63;
        } else {
            sc[j] = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
            mn[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
    }
    (sc, mn)
}

/// The 32 values of a Q4_0/Q4_1 block without offset (0..=15): low nibbles are values
/// 0..16, high nibbles 16..32.
fn q4_values(qs: &[u8]) -> [i32; 32] {
    std::array::from_fn(|j| {
        if j < 16 {
            (qs[j] & 0xF) as i32
        } else {
            (qs[j - 16] >> 4) as i32
        }
    })
}

/// The 32 values of a Q5_0/Q5_1 block without offset (0..=31): low nibbles are values
/// 0..16, high nibbles 16..32, bit `i` of `qh` is value `i`'s fifth bit.
fn q5_values(qh: u32, qs: &[u8]) -> [i32; 32] {
    let mut v = [0i32; 32];
    for j in 0..16 {
        v[j] = (qs[j] & 0xF) as i32 | ((((qh >> j) & 1) as i32) << 4);
        v[j + 16] = (qs[j] >> 4) as i32 | ((((qh >> (j + 16)) & 1) as i32) << 4);
    }
    v
}

/// `dot` with the float terms added in `order` where that is not `Lanes` (repacked
/// Q4_K: `dot_q4k_repacked`); `Lanes` is ggml's generic order, equal to the SIMD lane
/// order only up to float rounding.
pub fn dot_ordered(
    order: SumOrder,
    wt: WeightType,
    w: &[u8],
    a: &QuantizedActs,
    row: usize,
) -> f32 {
    match order {
        SumOrder::Lanes => dot(wt, w, a, row),
        SumOrder::Block | SumOrder::Pair => {
            assert_eq!(wt, WeightType::Q4K, "{order:?} is Q4_K's order");
            dot_q4k_repacked(w, a, row, order == SumOrder::Pair)
        }
        SumOrder::Tiled => dot_tiled(wt, w, a, row),
    }
}

/// A K-quant row in llama.cpp's tiled order (`SumOrder::Tiled`, ggml-cpu/tiled's
/// microtiles): per block the exact integer `s1 = Σ scale·Σ q·x` (Q6_K: the values
/// stored +32, so `Σ scale·(Σ q·x − 32·bsum)` per 16) and for Q4_K/Q5_K `s2 = Σ min·(sum
/// of its 32 x)`; then `r = f32(s1)·d`, Q4_K/Q5_K `r = fma(−dmin, f32(s2), r)`, and
/// `acc = fma(r, dx, acc)` from 0, block by block. Exactly what the SIMD kernels give.
pub fn dot_tiled(wt: WeightType, w: &[u8], a: &QuantizedActs, row: usize) -> f32 {
    let nb = a.k / 256;
    let bb = wt.block_bytes();
    let xq = &a.qs[row * a.k..(row + 1) * a.k];
    let mut acc = 0f32;
    for i in 0..nb {
        let b = &w[i * bb..(i + 1) * bb];
        let x = &xq[i * 256..(i + 1) * 256];
        let ab = row * nb + i;
        let bs = &a.bsums[ab * 16..ab * 16 + 16];
        let r = match wt {
            WeightType::Q6K => {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                // Value e of the block: its nibble and two high bits, as ggml's dequantize.
                let q = |e: usize| -> i32 {
                    let (n, e) = (e / 128, e % 128);
                    let (g, l) = (e / 32, e % 32);
                    let lo = (ql[64 * n + l + 32 * (g % 2)] >> (4 * (g / 2))) & 0xF;
                    let hi = (qh[32 * n + l] >> (2 * g)) & 3;
                    (lo | (hi << 4)) as i32
                };
                let s1: i32 = (0..16)
                    .map(|s| {
                        let raw: i32 = (16 * s..16 * s + 16).map(|e| q(e) * x[e] as i32).sum();
                        sc[s] as i8 as i32 * (raw - 32 * bs[s] as i32)
                    })
                    .sum();
                s1 as f32 * f16_at(b, 208)
            }
            WeightType::Q4K | WeightType::Q5K => {
                let (sc, mn) = k4_scales(&b[4..16]);
                let (qh, qs) = if wt == WeightType::Q5K {
                    (Some(&b[16..48]), &b[48..176])
                } else {
                    (None, &b[16..144])
                };
                let (mut s1, mut s2) = (0i32, 0i32);
                for j in 0..8 {
                    // Sub-block j: the low (even j) or high nibbles of qs[32(j/2)..], the
                    // fifth bit j of qh[l].
                    let raw: i32 = (0..32)
                        .map(|l| {
                            let mut v = ((qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0xF) as i32;
                            if let Some(qh) = qh {
                                v |= (((qh[l] >> j) & 1) as i32) << 4;
                            }
                            v * x[32 * j + l] as i32
                        })
                        .sum();
                    s1 += sc[j] as i32 * raw;
                    s2 += mn[j] as i32 * (bs[2 * j] as i32 + bs[2 * j + 1] as i32);
                }
                (-f16_at(b, 2)).mul_add(s2 as f32, s1 as f32 * f16_at(b, 0))
            }
            _ => panic!("{wt:?} has no tiled order"),
        };
        acc = r.mul_add(a.d[ab], acc);
    }
    acc
}

/// Q4_K in llama.cpp's repacked order (`SumOrder::Block`, or `Pair` when `pairs`): per
/// block (per 64 values) the integer `Σ scale·Σ q·x` taken by one FMA with `d·dx` into a
/// running sum, the mins' `Σ min·(sum of 32 x)` by one FMA with `dmin·dx` into a second,
/// the second subtracted at the end. Exactly what the SIMD kernels give, to the bit.
pub fn dot_q4k_repacked(w: &[u8], a: &QuantizedActs, row: usize, pairs: bool) -> f32 {
    let nb = a.k / 256;
    let xq = &a.qs[row * a.k..(row + 1) * a.k];
    let (mut acc, mut acc_min) = (0f32, 0f32);
    for i in 0..nb {
        let b = &w[i * 144..(i + 1) * 144];
        let x = &xq[i * 256..(i + 1) * 256];
        let ab = row * nb + i;
        let bs = &a.bsums[ab * 16..ab * 16 + 16];
        let (sc, mn) = k4_scales(&b[4..16]);
        let d = f16_at(b, 0) * a.d[ab];
        let dmin = f16_at(b, 2) * a.d[ab];
        let (mut isum, mut imin) = (0i32, 0i32);
        for p in 0..4 {
            // Sub-block 2p is the low nibbles of qs[32p..32p + 32], 2p + 1 the high ones.
            for h in 0..2 {
                let j = 2 * p + h;
                let s: i32 = (0..32)
                    .map(|l| {
                        let q = b[16 + 32 * p + l];
                        let v = if h == 0 { q & 0xF } else { q >> 4 };
                        v as i32 * x[32 * j + l] as i32
                    })
                    .sum();
                isum += sc[j] as i32 * s;
                imin += mn[j] as i32 * (bs[2 * j] as i32 + bs[2 * j + 1] as i32);
            }
            if pairs {
                acc = (isum as f32).mul_add(d, acc);
                acc_min = (imin as f32).mul_add(dmin, acc_min);
                (isum, imin) = (0, 0);
            }
        }
        if !pairs {
            acc = (isum as f32).mul_add(d, acc);
            acc_min = (imin as f32).mul_add(dmin, acc_min);
        }
    }
    acc - acc_min
}

/// The dot product of weight row `w` (`a.k` values) with activation row `row` of `a`.
pub fn dot(wt: WeightType, w: &[u8], a: &QuantizedActs, row: usize) -> f32 {
    let nb = a.k / wt.block();
    let bb = wt.block_bytes();
    let xq = &a.qs[row * a.k..(row + 1) * a.k];
    let ab = a.blocks_per_row();
    let xd = &a.d[row * ab..(row + 1) * ab];
    let mut sumf = 0f32;
    for i in 0..nb {
        let b = &w[i * bb..(i + 1) * bb];
        match wt {
            WeightType::Q4_0
            | WeightType::Q4_1
            | WeightType::Q8_0
            | WeightType::Q5_0
            | WeightType::Q5_1 => {
                let x = &xq[i * 32..(i + 1) * 32];
                let vals: [i32; 32] = match wt {
                    WeightType::Q8_0 => std::array::from_fn(|j| b[2 + j] as i8 as i32),
                    WeightType::Q4_0 => q4_values(&b[2..18]).map(|v| v - 8),
                    WeightType::Q4_1 => q4_values(&b[4..20]),
                    WeightType::Q5_0 => {
                        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                        q5_values(qh, &b[6..22]).map(|v| v - 16)
                    }
                    _ => {
                        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                        q5_values(qh, &b[8..24])
                    }
                };
                let sumi: i32 = vals.iter().zip(x).map(|(v, &q)| v * q as i32).sum();
                sumf += f16_at(b, 0) * xd[i] * sumi as f32;
                if matches!(wt, WeightType::Q4_1 | WeightType::Q5_1) {
                    sumf += f16_at(b, 2) * a.s[row * ab + i];
                }
            }
            WeightType::Q4K | WeightType::Q5K => {
                let x = &xq[i * 256..(i + 1) * 256];
                let bsums = &a.bsums[(row * ab + i) * 16..(row * ab + i + 1) * 16];
                let (sc, mn) = k4_scales(&b[4..16]);
                let (qh, qs) = if wt == WeightType::Q5K {
                    (Some(&b[16..48]), &b[48..176])
                } else {
                    (None, &b[16..144])
                };
                let mut sumi = 0i32;
                for j in 0..4 {
                    for l in 0..32 {
                        let mut lo = (qs[32 * j + l] & 0xF) as i32;
                        let mut hi = (qs[32 * j + l] >> 4) as i32;
                        if let Some(qh) = qh {
                            lo |= (((qh[l] >> (2 * j)) & 1) as i32) << 4;
                            hi |= (((qh[l] >> (2 * j + 1)) & 1) as i32) << 4;
                        }
                        sumi += sc[2 * j] as i32 * lo * x[64 * j + l] as i32;
                        sumi += sc[2 * j + 1] as i32 * hi * x[64 * j + 32 + l] as i32;
                    }
                }
                let summ: i32 = (0..8)
                    .map(|j| mn[j] as i32 * (bsums[2 * j] as i32 + bsums[2 * j + 1] as i32))
                    .sum();
                let d = f16_at(b, 0) * xd[i];
                let dmin = f16_at(b, 2) * xd[i];
                sumf += d * sumi as f32 - dmin * summ as f32;
            }
            WeightType::Q6K => {
                let x = &xq[i * 256..(i + 1) * 256];
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let mut sumi = 0i32;
                for n in 0..2 {
                    let (ql, qh, sc, x) =
                        (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..], &x[128 * n..]);
                    for l in 0..32 {
                        let is = l / 16;
                        let q = [
                            (ql[l] & 0xF) as i32 | (((qh[l] & 3) as i32) << 4),
                            (ql[l + 32] & 0xF) as i32 | ((((qh[l] >> 2) & 3) as i32) << 4),
                            (ql[l] >> 4) as i32 | ((((qh[l] >> 4) & 3) as i32) << 4),
                            (ql[l + 32] >> 4) as i32 | ((((qh[l] >> 6) & 3) as i32) << 4),
                        ];
                        for (g, q) in q.iter().enumerate() {
                            sumi += sc[is + 2 * g] as i8 as i32 * (q - 32) * x[l + 32 * g] as i32;
                        }
                    }
                }
                sumf += f16_at(b, 208) * xd[i] * sumi as f32;
            }
        }
    }
    sumf
}
