//! Micro-benchmark ratios for the packed dense product (hearth_kernels::dense) against
//! the gemm crate as hearth called it before (unpacked W read as a column-major rhs,
//! `Parallelism::None`, so it packs W on every call and runs its AVX2 microkernel), on
//! `dummy:bench-small`'s projection shapes, one thread. All variants run in one
//! process, alternated round by round (so a loaded machine slows them alike); each
//! one's best time per product over the rounds is printed with its speed relative to
//! gemm. W is reused across calls here, so it sits in cache where the model streams it
//! from memory: small row counts flatter every variant alike.
//!
//!   cargo build --release -p hearth-kernels --example dense_ratio
//!   RAYON_NUM_THREADS=1 nice ./target/release/examples/dense_ratio [ROUNDS]

use std::time::Instant;

use hearth_kernels::dense::{Isa, PackedWeight, WeightDtype};

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

/// `x [m, k] · w [n, k]ᵀ` through gemm exactly as cpu_matmul::gemm_xwt calls it.
fn gemm_xwt(x: &[f32], w: &[f32], out: &mut [f32], m: usize, n: usize, k: usize) {
    // SAFETY: the slices hold m×k, n×k and m×n values; strides describe them.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(9);
    let one = |n: usize, work: &(dyn Fn(std::ops::Range<usize>) + Sync)| work(0..n);
    println!(
        "f32: {:?}, bf16: {:?}; best of {rounds} rounds, 1 thread",
        Isa::detected(WeightDtype::F32),
        Isa::detected(WeightDtype::Bf16)
    );
    println!(
        "{:>5} {:>5} {:>4} | {:>9} {:>9} {:>9} {:>9} | {:>6} {:>6} {:>6} | {:>6}",
        "n",
        "k",
        "m",
        "gemm µs",
        "packed µs",
        "avx2 µs",
        "bf16 µs",
        "packed",
        "avx2",
        "bf16",
        "GF/s"
    );
    // Fused Q/K/V, o, fused gate/up, down, output layer of dummy:bench-small.
    let shapes = [
        (1280usize, 768usize),
        (768, 768),
        (4096, 768),
        (768, 2048),
        (32000, 768),
    ];
    for (s, &(n, k)) in shapes.iter().enumerate() {
        let w = noise(n * k, s as u64 + 1);
        let f32w = PackedWeight::pack(&w, n, k, WeightDtype::F32);
        let bf16w = PackedWeight::pack(&w, n, k, WeightDtype::Bf16);
        let ms: &[usize] = if n > 8192 {
            &[1, 32]
        } else {
            &[1, 8, 32, 128, 512]
        };
        for &m in ms {
            let x = noise(m * k, 100 + m as u64);
            // Enough calls per sample for ~2 ms of work.
            let reps = (200_000_000 / (m * n * k)).clamp(1, 200);
            let mut out = vec![0f32; m * n];
            let mut best = [f64::INFINITY; 4];
            for _ in 0..rounds {
                for (v, b) in best.iter_mut().enumerate() {
                    let t = Instant::now();
                    for _ in 0..reps {
                        match v {
                            0 => gemm_xwt(&x, &w, &mut out, m, n, k),
                            1 => out = f32w.matmul_on_isa(Isa::Avx512, &x, &one),
                            2 => out = f32w.matmul_on_isa(Isa::Avx2, &x, &one),
                            _ => out = bf16w.matmul(&x, &one),
                        }
                        std::hint::black_box(&out);
                    }
                    *b = b.min(t.elapsed().as_secs_f64() / reps as f64);
                }
            }
            println!(
                "{n:>5} {k:>5} {m:>4} | {:>9.1} {:>9.1} {:>9.1} {:>9.1} | {:>5.2}× {:>5.2}× {:>5.2}× | {:>6.1}",
                best[0] * 1e6,
                best[1] * 1e6,
                best[2] * 1e6,
                best[3] * 1e6,
                best[0] / best[1],
                best[0] / best[2],
                best[0] / best[3],
                2.0 * (m * n * k) as f64 / best[1] / 1e9,
            );
        }
    }
}
