//! Micro-benchmark ratios for the Q4_0/Q4_1/Q8_0 kernels on SmolLM2-135M's projection
//! shapes, one thread, all variants in one process and alternated round by round (so a
//! loaded machine slows them alike): q8 on 8-bit activations (AVX512-VNNI where present,
//! and AVX2), the 16-bit-activation kernel it replaces (quant_matmul), and f32 through
//! candle's gemm on the dequantized weights. Prints each variant's best time per product
//! over the rounds (on a shared machine the least disturbed one; the median is mostly
//! other processes) and its speed relative to the 16-bit kernel and to f32. The q8 times
//! include quantizing the activations.
//!
//!   RAYON_NUM_THREADS=1 cargo run --release -p hearth-kernels --example q8_ratio [ROUNDS]

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use hearth_kernels::q8::{self, Isa, WeightType};
use hearth_kernels::quant_matmul;

fn noise(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn main() -> candle_core::Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(25);
    let dev = Device::Cpu;
    let one = |n: usize, work: &(dyn Fn(std::ops::Range<usize>) + Sync)| work(0..n);
    println!("detected: {:?}; best of {rounds} rounds", Isa::detected());
    println!(
        "{:<5} {:>5} {:>5} {:>3} | {:>9} {:>9} {:>9} {:>9} | {:>7} {:>7} {:>7}",
        "type",
        "n",
        "k",
        "m",
        "q8 µs",
        "avx2 µs",
        "16bit µs",
        "f32 µs",
        "q8/16b",
        "avx2/16b",
        "q8/f32"
    );
    // gate/up, down and the tied output projection of SmolLM2-135M.
    let shapes = [(1536, 576), (576, 1536), (49152, 576)];
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let wt = WeightType::from_ggml(dtype).expect("a q8 type");
        for &(n, k) in &shapes {
            let w = Tensor::from_vec(noise(n * k, 1), (n, k), &dev)?;
            let q = QTensor::quantize(&w, dtype)?;
            let bytes = q.data()?.into_owned();
            let dense_t = q.dequantize(&dev)?.t()?;
            for m in [1usize, 16] {
                let x = noise(m * k, 2);
                let xt = Tensor::from_vec(x.clone(), (m, k), &dev)?;
                // Enough repetitions for ~20 ms a sample at the 16-bit kernel's speed.
                let reps = (20_000_000 / (n * k * m / 8).max(1)).clamp(1, 2000);
                let mut t = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
                for _ in 0..rounds {
                    for (v, times) in t.iter_mut().enumerate() {
                        let start = Instant::now();
                        for _ in 0..reps {
                            let y = match v {
                                0 => q8::matmul_on_isa(Isa::detected(), wt, &bytes, n, k, &x, &one),
                                1 => q8::matmul_on_isa(Isa::Avx2, wt, &bytes, n, k, &x, &one),
                                2 => quant_matmul::matmul_on(dtype, &bytes, n, k, &x, m, &one),
                                _ => xt.matmul(&dense_t)?.flatten_all()?.to_vec1::<f32>()?,
                            };
                            std::hint::black_box(y);
                        }
                        times.push(start.elapsed().as_secs_f64() * 1e6 / reps as f64);
                    }
                }
                let [a, b, c, d] = t.map(|v| best(&v));
                println!(
                    "{:<5} {n:>5} {k:>5} {m:>3} | {a:>9.1} {b:>9.1} {c:>9.1} {d:>9.1} | {:>6.2}× {:>6.2}× {:>6.2}×",
                    format!("{dtype:?}"),
                    c / a,
                    c / b,
                    d / a
                );
            }
        }
    }
    Ok(())
}
