//! Times hearth's CPU kernels on the shapes of SmolLM2-135M (hidden 576, 9 heads / 3 kv
//! heads of 64, MLP 1536, vocabulary 49,152): `cargo run --release --example kernels`.
//! Reports wall time and the calling thread's CPU time per call (the latter holds up
//! on a machine shared with other work), against candle's generic ops where they exist.
//! Compare figures within one run only.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use hearth_runtime::paged_attention::{paged_attention, AttentionMetadata};
use hearth_runtime::{cpu_matmul, threads};

fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Best wall and CPU seconds per call over 5 batches of `reps`.
fn time<F: FnMut()>(reps: usize, mut f: F) -> (f64, f64) {
    f();
    let (mut wall, mut cpu) = (f64::MAX, f64::MAX);
    for _ in 0..5 {
        let (t, c) = (Instant::now(), thread_cpu_s());
        for _ in 0..reps {
            f();
        }
        wall = wall.min(t.elapsed().as_secs_f64() / reps as f64);
        cpu = cpu.min((thread_cpu_s() - c) / reps as f64);
    }
    (wall, cpu)
}

fn main() -> candle_core::Result<()> {
    let n_threads = threads::init();
    println!("threads: {n_threads}");
    let dev = Device::Cpu;
    let which: Vec<String> = std::env::args().skip(1).collect();
    let want = |s: &str| which.is_empty() || which.iter().any(|w| w == s);
    if want("matmul") {
        for &(n, k) in &[(576usize, 576usize), (1536, 576), (576, 1536), (49152, 576)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let wt = w.t()?;
            for &m in &[1usize, 4, 16, 64, 512] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                let reps = (2_000_000_000 / (m * n * k).max(1)).clamp(1, 50);
                let (g, _) = time(reps, || {
                    let _ = x.matmul(&wt).unwrap();
                });
                let (h, hc) = time(reps, || {
                    let _ = cpu_matmul::linear(&x, &w, None).unwrap();
                });
                let flops = 2.0 * (m * n * k) as f64;
                println!(
                    "matmul n={n:5} k={k:4} m={m:3}: candle/gemm {:8.1} us | hearth {:8.1} us ({:5.1} GFLOP/s, {:5.1} GB/s of W; caller CPU {:8.1} us) | x{:.2}",
                    g * 1e6,
                    h * 1e6,
                    flops / h / 1e9,
                    (n * k * 4) as f64 / h / 1e9,
                    hc * 1e6,
                    g / h
                );
            }
        }
    }
    if want("attention") {
        // One layer's attention for 8 decoding sequences at short and long contexts,
        // and a 512-token prefill chunk: the cost TPOT grows by with context.
        let (d, bs) = (64usize, 16usize);
        for &(seqs, ctx, q, h, kvh) in &[
            (8usize, 128usize, 1usize, 9usize, 3usize),
            (8, 1900, 1, 9, 3),
            (24, 1900, 1, 3, 1),
            (1, 1900, 1, 9, 3),
            (1, 512, 512, 9, 3),
        ] {
            let blocks_per = ctx.div_ceil(bs);
            let nb = seqs * blocks_per;
            let k = Tensor::randn(0f32, 1.0, (nb, bs, kvh, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (nb, bs, kvh, d), &dev)?;
            let mut meta = AttentionMetadata::new(bs);
            for s in 0..seqs {
                let table: Vec<u32> = (0..blocks_per).map(|b| (b * seqs + s) as u32).collect();
                meta.push(q, ctx, &table);
            }
            let qt = Tensor::randn(0f32, 1.0, (seqs * q, h, d), &dev)?;
            let (wall, cpu) = time(20, || {
                let _ = paged_attention(&qt, &k, &v, &meta, 0.125).unwrap();
            });
            let flops =
                4.0 * (seqs * h * d) as f64 * (q * ctx) as f64 / if q > 1 { 2.0 } else { 1.0 };
            println!(
                "attention {seqs} seq x {q} queries, context {ctx}, heads {h}/{kvh}: {:8.1} us ({:5.1} GFLOP/s; caller CPU {:8.1} us)",
                wall * 1e6,
                flops / wall / 1e9,
                cpu * 1e6
            );
            let _ = DType::F32;
        }
    }
    Ok(())
}
