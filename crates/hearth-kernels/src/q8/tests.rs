use super::*;
use acts::ActFormat;
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::Device;
use half::f16;

const TYPES: [WeightType; 8] = [
    WeightType::Q4_0,
    WeightType::Q4_1,
    WeightType::Q5_0,
    WeightType::Q5_1,
    WeightType::Q8_0,
    WeightType::Q4K,
    WeightType::Q5K,
    WeightType::Q6K,
];

fn ggml(wt: WeightType) -> GgmlDType {
    match wt {
        WeightType::Q4_0 => GgmlDType::Q4_0,
        WeightType::Q4_1 => GgmlDType::Q4_1,
        WeightType::Q5_0 => GgmlDType::Q5_0,
        WeightType::Q5_1 => GgmlDType::Q5_1,
        WeightType::Q8_0 => GgmlDType::Q8_0,
        WeightType::Q4K => GgmlDType::Q4K,
        WeightType::Q5K => GgmlDType::Q5K,
        WeightType::Q6K => GgmlDType::Q6K,
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        (self.next() % (1 << 24)) as f32 / (1 << 23) as f32 - 1.0
    }
}

/// `n` rows of random blocks: every bit of the quants and scales random, the f16 scales
/// finite and small.
fn random_blocks(wt: WeightType, n: usize, k: usize, rng: &mut Rng) -> Vec<u8> {
    let bb = wt.block_bytes();
    let mut w: Vec<u8> = (0..n * k / wt.block() * bb)
        .map(|_| rng.next() as u8)
        .collect();
    let f16_fields: &[usize] = match wt {
        WeightType::Q4_0 | WeightType::Q5_0 | WeightType::Q8_0 => &[0],
        WeightType::Q4_1 | WeightType::Q5_1 | WeightType::Q4K | WeightType::Q5K => &[0, 2],
        WeightType::Q6K => &[208],
    };
    for b in w.chunks_exact_mut(bb) {
        for &at in f16_fields {
            let v = f16::from_f32(rng.f() * 0.05).to_bits().to_le_bytes();
            b[at..at + 2].copy_from_slice(&v);
        }
    }
    w
}

fn dequantize(wt: WeightType, w: &[u8], n: usize, k: usize) -> Vec<f32> {
    qtensor_from_ggml(ggml(wt), w, vec![n, k], &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// The reference dot product is the product of candle's dequantized weights (an
/// independent reading of each block layout) with the dequantized 8-bit activations.
#[test]
fn reference_matches_dequantized_blocks() {
    let mut rng = Rng(7);
    let (n, k, m) = (5, 512, 3);
    for wt in TYPES {
        let w = random_blocks(wt, n, k, &mut rng);
        let x: Vec<f32> = (0..m * k).map(|_| rng.f()).collect();
        let a = acts::quantize(wt.act_format(), &x, k);
        let dense = dequantize(wt, &w, n, k);
        let bs = wt.act_format().block();
        let row_bytes = w.len() / n;
        for t in 0..m {
            for r in 0..n {
                let (mut want, mut size) = (0f64, 0f64);
                for i in 0..k {
                    let xv = a.d[(t * k + i) / bs] as f64 * a.qs[t * k + i] as f64;
                    want += dense[r * k + i] as f64 * xv;
                    size += (dense[r * k + i] as f64 * xv).abs();
                }
                let got = reference::dot(wt, &w[r * row_bytes..(r + 1) * row_bytes], &a, t) as f64;
                // Q4_1/Q5_1's offset uses the f16-rounded block sum (as ggml): ~1e-3 of it.
                let tol = if wt.act_format() == ActFormat::Q8_1 {
                    2e-3
                } else {
                    1e-5
                };
                assert!(
                    (got - want).abs() <= tol * size + 1e-6,
                    "{wt:?} row {r} act {t}: {got} vs {want} (size {size})"
                );
            }
        }
    }
}

/// The blocks of 32 on random shapes — any number of blocks per row (odd ones, a single
/// one), any number of activation rows — against dequantize-then-f32 on the unquantized
/// activations, within the bound 8-bit activations allow: each activation is off by at
/// most 0.5 of its block's step `amax/127` plus the f16 rounding of the stored step
/// (127·2⁻¹¹ steps), so a product is off by at most `Σ|w|·0.57·amax/127` per block, plus
/// Q8_1's f16-rounded block sum (2⁻¹¹ of it) times the weight's offset, plus f32 sums.
#[test]
fn blocks_of_32_stay_within_the_activation_bound_on_random_shapes() {
    let mut rng = Rng(29);
    for wt in [WeightType::Q4_0, WeightType::Q4_1, WeightType::Q8_0] {
        for _ in 0..12 {
            let n = 1 + rng.next() as usize % 13;
            let k = 32 * (1 + rng.next() as usize % 23);
            let m = 1 + rng.next() as usize % 10;
            let w = random_blocks(wt, n, k, &mut rng);
            let dense = dequantize(wt, &w, n, k);
            let x: Vec<f32> = (0..m * k).map(|_| rng.f() * 4.0).collect();
            let a = acts::quantize(wt.act_format(), &x, k);
            for isa in Isa::available() {
                let got = matmul_on_isa(isa, wt, &w, n, k, &x, &|n, work| work(0..n));
                for t in 0..m {
                    for r in 0..n {
                        let (mut want, mut bound) = (0f64, 0f64);
                        for (b, xb) in x[t * k..(t + 1) * k].chunks_exact(32).enumerate() {
                            let wb = &dense[r * k + 32 * b..r * k + 32 * (b + 1)];
                            let amax = xb.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
                            let mut wabs = 0f64;
                            for (wv, xv) in wb.iter().zip(xb) {
                                want += *wv as f64 * *xv as f64;
                                wabs += wv.abs() as f64;
                            }
                            bound += wabs * 0.57 * amax / 127.0;
                            if wt == WeightType::Q4_1 {
                                // The block's offset m, times the rounding of d·Σq.
                                let at = r * (w.len() / n) + b * wt.block_bytes();
                                let m = reference::f16_at(&w, at + 2).abs() as f64;
                                let s = a.s[t * (k / 32) + b].abs() as f64;
                                bound += m * s * 2f64.powi(-10);
                            }
                            bound += (wabs * amax) * 1e-6;
                        }
                        let g = got[t * n + r] as f64;
                        assert!(
                            (g - want).abs() <= bound,
                            "{wt:?} {isa:?} n={n} k={k} m={m} row {r} act {t}: {g} vs {want} (bound {bound})"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn every_block_of_32_type_has_its_own_loop() {
    // avx2::row_tile picks a loop by a type's position in TYPES_32.
    #[cfg(target_arch = "x86_64")]
    assert_eq!(
        avx2::TYPES_32,
        [
            WeightType::Q4_0,
            WeightType::Q4_1,
            WeightType::Q5_0,
            WeightType::Q5_1,
            WeightType::Q8_0
        ]
    );
    assert!(Isa::available().contains(&Isa::Scalar));
}

/// Through candle's own quantizer and real-valued data: the product is close to the
/// dense one (8-bit activations cost about a percent).
#[test]
fn matmul_approximates_the_dense_product() {
    let mut rng = Rng(3);
    let (n, k, m) = (16, 512, 2);
    let wf: Vec<f32> = (0..n * k).map(|_| rng.f()).collect();
    let x: Vec<f32> = (0..m * k).map(|_| rng.f()).collect();
    let wt_dense = candle_core::Tensor::from_vec(wf, (n, k), &Device::Cpu).unwrap();
    for wt in TYPES {
        let q = candle_core::quantized::QTensor::quantize(&wt_dense, ggml(wt)).unwrap();
        let bytes = q.data().unwrap();
        let dense = dequantize(wt, &bytes, n, k);
        let got = matmul(wt, &bytes, n, k, &x, &|n, work| work(0..n));
        let (mut err, mut norm) = (0f64, 0f64);
        for t in 0..m {
            for r in 0..n {
                let want: f64 = (0..k)
                    .map(|i| dense[r * k + i] as f64 * x[t * k + i] as f64)
                    .sum();
                err += (got[t * n + r] as f64 - want).powi(2);
                norm += want.powi(2);
            }
        }
        let rel = (err / norm).sqrt();
        assert!(rel < 0.02, "{wt:?}: relative error {rel}");
    }
}

#[test]
fn bad_shapes_are_reported() {
    assert!(check(WeightType::Q4K, 144, 1, 576, 576).is_err());
    assert!(check(WeightType::Q5_0, 22 * 18, 1, 576, 576).is_ok());
    assert!(check(WeightType::Q5_0, 22 * 18, 2, 576, 576).is_err());
    assert!(check(WeightType::Q8_0, 34, 1, 32, 33).is_err());
}
