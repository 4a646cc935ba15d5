//! Times hearth's CPU kernels against candle's generic paths on the shapes of a
//! small Llama (SmolLM2-135M by default): `cargo run --release --example kernels`.
//! Reports GFLOP/s and GB/s of weights read; compare within one run only.

use std::time::Instant;

use candle_core::{Device, Tensor};
use hearth_runtime::{cpu_matmul, threads};

fn time<F: FnMut()>(mut f: F) -> f64 {
    f();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let reps = 20;
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    best
}

fn main() -> candle_core::Result<()> {
    let n_threads = threads::init();
    println!("threads: {n_threads}");
    let dev = Device::Cpu;
    for &(n, k) in &[(576usize, 576usize), (1536, 576), (576, 1536), (49152, 576)] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let wt = w.t()?;
        for &m in &[1usize, 2, 4, 8, 16, 32, 64] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let t_gemm = time(|| {
                let _ = x.matmul(&wt).unwrap();
            });
            let t_ours = time(|| {
                let _ = cpu_matmul::linear(&x, &w, None).unwrap();
            });
            let flops = 2.0 * (m * n * k) as f64;
            let bytes = (n * k * 4) as f64;
            println!(
                "n={n:5} k={k:4} m={m:2}: gemm {:7.1} us ({:5.1} GFLOP/s {:5.1} GB/s) | hearth {:7.1} us ({:5.1} GFLOP/s {:5.1} GB/s) | x{:.2}",
                t_gemm * 1e6,
                flops / t_gemm / 1e9,
                bytes / t_gemm / 1e9,
                t_ours * 1e6,
                flops / t_ours / 1e9,
                bytes / t_ours / 1e9,
                t_gemm / t_ours
            );
        }
    }
    Ok(())
}
