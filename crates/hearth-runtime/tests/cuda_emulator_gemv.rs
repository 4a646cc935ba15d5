//! The small-batch GEMV (kernels/gemv.cu) compiled for the CPU emulator and launched as
//! the CUDA path launches it (gemv.rs), against a reference computed here in f64 from
//! the same rounded inputs, with the roundings the unfused CUDA path makes (the sum
//! rounded to the dtype, the normed rows rounded, silu rounded before the product):
//! each prologue (plain, residual add + RMSNorm, SiLU·mul), f32/f16/bf16, 1..8 rows,
//! widths of the supported families (hidden 896..5120, Llama's 14336 intermediate)
//! and ragged ones (K not a multiple of the staged tile, N not a multiple of a block's
//! rows), with and without bias, outputs split in one to three parts, adversarial
//! schedules. Broken copies of the source (no barriers; the last partial tile
//! skipped) must fail the same comparison.
#![cfg(hearth_cuda_emulator)]

use candle_core::{DType, Device, Tensor};
use hearth_runtime::cuda_emulator::{Emulator, Schedule, Source};
use hearth_runtime::gemv::{gemv_emulated, takes, GemvInput, GemvWeights};
use rand::{rngs::StdRng, Rng, SeedableRng};

const EPS: f64 = 1e-5;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Plain,
    AddNorm,
    Silu,
}

/// (rows, N, K, part widths' count): decode batches 1..8 at model widths and ragged ones.
const SHAPES: [(usize, usize, usize, usize); 9] = [
    (1, 64, 64, 3),
    (3, 40, 72, 2),
    (8, 100, 896, 1),
    (2, 33, 4096, 3),
    (5, 70, 2048, 2),
    (8, 24, 14336, 1),
    (1, 300, 1536, 2),
    (7, 130, 3584, 3),
    (1, 48, 14336, 1),
];

fn round(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F16 => half::f16::from_f32(x).to_f32(),
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// Values already representable in `dtype`, and the tensor holding them.
fn rounded(rng: &mut StdRng, n: usize, scale: f32, dtype: DType) -> Vec<f32> {
    (0..n)
        .map(|_| round(dtype, rng.random_range(-scale..scale)))
        .collect()
}

fn tensor(v: &[f32], shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("tensor")
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("values")
}

fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 4e-3,
        _ => 3e-2,
    }
}

/// Part widths summing to n: one part, or two/three of unequal widths (Q then K and V).
fn parts(n: usize, count: usize) -> Vec<usize> {
    match count {
        1 => vec![n],
        2 => vec![n / 2, n - n / 2],
        _ => {
            let kv = n / 5;
            vec![n - 2 * kv, kv, kv]
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn case(
    emu: &Emulator,
    mode: Mode,
    rows: usize,
    n: usize,
    k: usize,
    nparts: usize,
    bias: bool,
    dtype: DType,
    seed: u64,
) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let w = rounded(&mut rng, n * k, 1.0 / (k as f32).sqrt(), dtype);
    let b = rounded(&mut rng, n, 0.5, dtype);
    let a = rounded(&mut rng, rows * k, 2.0, dtype);
    let c = rounded(&mut rng, rows * k, 2.0, dtype);
    let nw = rounded(&mut rng, k, 1.5, dtype);
    // The input x' the projection sees, as the unfused path rounds it.
    let mut x = vec![0f32; rows * k];
    let mut sum = vec![0f32; rows * k];
    for r in 0..rows {
        let row = r * k..(r + 1) * k;
        match mode {
            Mode::Plain => x[row.clone()].copy_from_slice(&a[row]),
            Mode::AddNorm => {
                for i in row.clone() {
                    sum[i] = round(dtype, a[i] + c[i]);
                }
                let ss: f64 = sum[row.clone()]
                    .iter()
                    .map(|&s| (s as f64) * (s as f64))
                    .sum();
                let inv = 1.0 / (ss / k as f64 + EPS).sqrt();
                for i in row {
                    x[i] = round(dtype, (sum[i] as f64 * inv) as f32 * nw[i - r * k]);
                }
            }
            Mode::Silu => {
                for i in row {
                    let g = a[i];
                    let act = round(dtype, g / (1.0 + (-g).exp()));
                    x[i] = round(dtype, act * c[i]);
                }
            }
        }
    }
    let mut want = vec![0f32; rows * n];
    for r in 0..rows {
        for j in 0..n {
            let dot: f64 = (0..k)
                .map(|i| w[j * k + i] as f64 * x[r * k + i] as f64)
                .sum();
            want[r * n + j] = (dot + if bias { b[j] as f64 } else { 0.0 }) as f32;
        }
    }
    let (wt, bt) = (tensor(&w, &[n, k], dtype), tensor(&b, &[n], dtype));
    let (at, ct) = (tensor(&a, &[rows, k], dtype), tensor(&c, &[rows, k], dtype));
    let nwt = tensor(&nw, &[k], dtype);
    let widths = parts(n, nparts);
    let weights = GemvWeights {
        weight: &wt,
        bias: bias.then_some(&bt),
        parts: &widths,
    };
    let input = match mode {
        Mode::Plain => GemvInput::Plain(&at),
        Mode::AddNorm => GemvInput::AddNorm {
            residual: &at,
            delta: &ct,
            norm_weight: &nwt,
            eps: EPS,
        },
        Mode::Silu => GemvInput::Silu { gate: &at, up: &ct },
    };
    let what = format!(
        "{mode:?} {dtype:?} {rows}x{n}x{k} parts {widths:?} bias {bias} {:?}",
        emu.schedule
    );
    let out = gemv_emulated(&weights, &input, emu).map_err(|e| format!("{what}: {e}"))?;
    if out.parts.len() != widths.len() {
        return Err(format!("{what}: {} parts", out.parts.len()));
    }
    let mut start = 0;
    for (p, &width) in out.parts.iter().zip(&widths) {
        if p.dims() != [rows, width] || !p.is_contiguous() {
            return Err(format!("{what}: part {:?}", p.dims()));
        }
        let got = values(p);
        for r in 0..rows {
            for j in 0..width {
                let (g, wv) = (got[r * width + j], want[r * n + start + j]);
                let d = if g.is_nan() {
                    f32::INFINITY
                } else {
                    (g - wv).abs() / wv.abs().max(1.0)
                };
                if d.is_nan() || d >= tolerance(dtype) {
                    return Err(format!(
                        "{what}: row {r} column {} is {g}, want {wv}",
                        start + j
                    ));
                }
            }
        }
        start += width;
    }
    match (mode, &out.residual) {
        (Mode::AddNorm, Some(res)) if values(res) != sum => {
            Err(format!("{what}: the residual differs from x + delta"))
        }
        (Mode::AddNorm, None) => Err(format!("{what}: no residual")),
        (Mode::Plain | Mode::Silu, Some(_)) => Err(format!("{what}: a residual without an add")),
        _ => Ok(()),
    }
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
const MODES: [Mode; 3] = [Mode::Plain, Mode::AddNorm, Mode::Silu];

#[test]
fn gemv_matches_the_reference_for_every_prologue() {
    let mut n = 0u64;
    for &(rows, out, k, nparts) in &SHAPES {
        for mode in MODES {
            let dtype = DTYPES[n as usize % 3];
            let emu = Emulator {
                source: Source::Original,
                schedule: Schedule::ADVERSARIAL[n as usize % Schedule::ADVERSARIAL.len()],
            };
            let bias = n.is_multiple_of(2);
            case(&emu, mode, rows, out, k, nparts, bias, dtype, 700 + n)
                .unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
}

#[test]
fn every_dtype_and_batch_size_at_a_model_width() {
    // Every row count 1..=8 in every dtype, at Qwen2-0.5B's hidden size (896).
    let mut n = 0u64;
    for rows in 1..=8 {
        for dtype in DTYPES {
            let emu = Emulator {
                source: Source::Original,
                schedule: Schedule::ADVERSARIAL[n as usize % Schedule::ADVERSARIAL.len()],
            };
            let mode = MODES[n as usize % 3];
            case(
                &emu,
                mode,
                rows,
                37,
                896,
                1 + n as usize % 3,
                n.is_multiple_of(3),
                dtype,
                900 + n,
            )
            .unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
}

#[test]
fn shapes_the_kernel_cannot_take_are_refused() {
    let z = |s: &[usize], dtype: DType| Tensor::zeros(s, dtype, &Device::Cpu).expect("zeros");
    let w = z(&[16, 64], DType::BF16);
    assert!(takes(&w, 1) && takes(&w, 8));
    assert!(!takes(&w, 0) && !takes(&w, 9), "rows outside 1..=8");
    assert!(!takes(&z(&[16, 60], DType::BF16), 1), "K of 120 bytes");
    assert!(!takes(&z(&[16, 64], DType::U32), 1), "u32 weights");
    let emu = Emulator::default();
    let x = z(&[9, 64], DType::BF16);
    let parts = [16];
    let weights = GemvWeights {
        weight: &w,
        bias: None,
        parts: &parts,
    };
    let err = gemv_emulated(&weights, &GemvInput::Plain(&x), &emu)
        .err()
        .expect("9 rows refused")
        .to_string();
    assert!(err.contains("9 rows"), "{err}");
    let x = z(&[2, 32], DType::BF16);
    let err = gemv_emulated(&weights, &GemvInput::Plain(&x), &emu)
        .err()
        .expect("a K mismatch refused")
        .to_string();
    assert!(err.contains("[2, 32]") && err.contains("[16, 64]"), "{err}");
    let bad_parts = [10, 10];
    let weights = GemvWeights {
        weight: &w,
        bias: None,
        parts: &bad_parts,
    };
    let err = gemv_emulated(&weights, &GemvInput::Plain(&z(&[2, 64], DType::BF16)), &emu)
        .err()
        .expect("parts not summing to N refused")
        .to_string();
    assert!(err.contains("[10, 10]"), "{err}");
}

#[test]
fn broken_copies_of_the_kernel_are_caught() {
    let run = |source: Source| -> Vec<String> {
        let mut failures = Vec::new();
        for (s, schedule) in Schedule::ADVERSARIAL.into_iter().enumerate() {
            let emu = Emulator { source, schedule };
            for (i, &(rows, n, k, nparts)) in SHAPES.iter().enumerate() {
                let mode = MODES[(i + s) % 3];
                let seed = 1100 + (s * SHAPES.len() + i) as u64;
                if let Err(e) = case(&emu, mode, rows, n, k, nparts, true, DType::F32, seed) {
                    failures.push(e);
                }
            }
        }
        failures
    };
    // Without barriers a warp reads the tile before the other warps have staged their
    // share of it (poisoned shared memory): every case fails under every schedule.
    let f = run(Source::GemvNoSyncthreads);
    assert_eq!(
        f.len(),
        SHAPES.len() * Schedule::ADVERSARIAL.len(),
        "the no-barrier copy passed some cases: {f:?}"
    );
    // Skipping the last partial tile: every K that is not a multiple of the tile (here
    // all but none: 64..14336 at 1..8 rows) loses columns.
    let f = run(Source::GemvTailTileDropped);
    assert!(
        f.iter().any(|e| e.contains("1x48x14336")) && f.iter().any(|e| e.contains("7x130x3584")),
        "the dropped tail tile passed: {f:?}"
    );
}
