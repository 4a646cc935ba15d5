//! Micro-benchmark ratios for the 8-bit-activation kernels (q8) on every block type a
//! SmolLM2 Q4_K_M / Q4_1 file holds, at SmolLM2-135M's projection shapes and at
//! `dummy:bench-small`'s (widths multiples of 256, so the K-quants run there too); one
//! thread, all variants in one process and alternated round by round (so a loaded machine
//! slows them alike). Variants: `tile` = the AVX-512 kernel taking sixteen weight rows at a
//! time (`Isa::Avx512`), `row` = the row-at-a-time kernel it replaces (`Isa::Avx512Vnni`:
//! AVX2 with 256-bit `vpdpbusd` for the blocks of 32, plain AVX2 for the K-quants), `avx2` =
//! the row kernel forced to AVX2. Prints each variant's best time per product over the
//! rounds (on a shared machine the least disturbed one) and the ratios. Times include
//! quantizing the activations.
//!
//!   cargo build --release --workspace --examples
//!   RAYON_NUM_THREADS=1 ./target/release/examples/q8_ratio [ROUNDS] [TYPES]
//!
//! TYPES: a comma-separated subset by candle's names (e.g. `Q4K,Q5K,Q6K`); all by default.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use hearth_kernels::q8::{self, Isa, WeightType};

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
        .unwrap_or(15);
    let only: Option<Vec<String>> = std::env::args().nth(2).map(|a| {
        a.split(',')
            .map(|t| t.trim().to_ascii_uppercase())
            .collect()
    });
    let dev = Device::Cpu;
    let one = |n: usize, work: &(dyn Fn(std::ops::Range<usize>) + Sync)| work(0..n);
    println!("detected: {:?}; best of {rounds} rounds", Isa::detected());
    println!(
        "{:<5} {:>5} {:>5} {:>3} | {:>9} {:>9} {:>9} | {:>8} {:>9} | {:>8}",
        "type", "n", "k", "m", "tile µs", "row µs", "avx2 µs", "row/tile", "avx2/tile", "ns/blk·m"
    );
    // SmolLM2-135M: gate/up, down, the tied output layer; bench-small: gate/up, down, its
    // Q6_K output layer; then bench-small's gate/up and down with 4 rows fewer, where Q4_K
    // keeps ggml's lane order (`SumOrder::Lanes`) instead of llama.cpp's repacked one.
    let shapes: [(usize, usize); 8] = [
        (1536, 576),
        (576, 1536),
        (49152, 576),
        (2048, 768),
        (768, 2048),
        (49152, 768),
        (2044, 768),
        (764, 2048),
    ];
    let types = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];
    for dtype in types {
        let name = format!("{dtype:?}");
        if only
            .as_ref()
            .is_some_and(|o| !o.contains(&name.to_ascii_uppercase()))
        {
            continue;
        }
        let wt = WeightType::from_ggml(dtype).expect("a q8 type");
        for &(n, k) in &shapes {
            // The output layer only in the types SmolLM2's files store it in.
            let output_layer = match k {
                576 => matches!(wt, WeightType::Q8_0 | WeightType::Q4_1),
                _ => wt == WeightType::Q6K,
            };
            if !k.is_multiple_of(wt.block())
                || (n == 49152 && !output_layer)
                || (n % 8 == 4 && wt != WeightType::Q4K)
            {
                continue;
            }
            let w = Tensor::from_vec(noise(n * k, 1), (n, k), &dev)?;
            let bytes = QTensor::quantize(&w, dtype)?.data()?.into_owned();
            for m in [1usize, 4, 16] {
                let x = noise(m * k, 2);
                // Enough repetitions for ~10 ms a sample at the row kernel's speed.
                let reps = (10_000_000 / (n * k * m / 8).max(1)).clamp(1, 2000);
                let mut t = [Vec::new(), Vec::new(), Vec::new()];
                for _ in 0..rounds {
                    for (v, times) in t.iter_mut().enumerate() {
                        let isa = [Isa::Avx512, Isa::Avx512Vnni, Isa::Avx2][v];
                        let start = Instant::now();
                        for _ in 0..reps {
                            let y = q8::matmul_on_isa(isa, wt, &bytes, n, k, &x, &one);
                            std::hint::black_box(y);
                        }
                        times.push(start.elapsed().as_secs_f64() * 1e6 / reps as f64);
                    }
                }
                let [a, b, c] = t.map(|v| best(&v));
                let blocks = (n * k / wt.block() * m) as f64;
                println!(
                    "{:<5} {n:>5} {k:>5} {m:>3} | {a:>9.1} {b:>9.1} {c:>9.1} | {:>7.2}× {:>8.2}× | {:>8.2}",
                    name,
                    b / a,
                    c / a,
                    a * 1e3 / blocks
                );
            }
        }
    }
    Ok(())
}
