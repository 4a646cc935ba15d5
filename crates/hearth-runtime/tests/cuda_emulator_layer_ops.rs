//! The fused layer ops (kernels/layer_ops.cu: residual add + RMSNorm, SiLU(gate)·up on
//! the fused gate/up output), compiled for the CPU emulator and launched as the CUDA
//! path launches them (layer_kernels.rs), against the CPU path's ops (cpu_ops) in f32 on
//! the same rounded inputs: f32/f16/bf16, ragged widths (not multiples of a warp or a
//! block), one row and many, adversarial schedules; and broken copies of the source
//! (no barrier before the block's sum is read; `up` read one column early) must fail
//! the same comparison.
#![cfg(hearth_cuda_emulator)]

use candle_core::{DType, Device, Tensor};
use hearth_runtime::cpu_ops;
use hearth_runtime::cuda_emulator::{Emulator, Schedule, Source};
use hearth_runtime::layer_kernels::{add_rms_norm_emulated, silu_mul_emulated};
use rand::{Rng, SeedableRng};

const EPS: f64 = 1e-5;

fn rounded(rng: &mut rand::rngs::StdRng, shape: &[usize], scale: f32, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("tensor")
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("values")
}

/// Largest difference relative to max(1, |reference|); NaN (an unwritten element) is
/// infinitely far.
fn max_rel_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            if g.is_nan() || w.is_nan() {
                f32::INFINITY
            } else {
                (g - w).abs() / w.abs().max(1.0)
            }
        })
        .fold(0.0, f32::max)
}

fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 4e-3,
        _ => 3e-2,
    }
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
/// (rows, width): one row (a decode), several, widths off every power of two.
const SHAPES: [(usize, usize); 7] = [
    (1, 64),
    (1, 4096),
    (3, 100),
    (5, 33),
    (17, 257),
    (2, 1000),
    (9, 4100),
];

fn add_norm_case(
    emu: &Emulator,
    rows: usize,
    hidden: usize,
    dtype: DType,
    seed: u64,
) -> Result<(), String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let x = rounded(&mut rng, &[rows, hidden], 2.0, dtype);
    let delta = rounded(&mut rng, &[rows, hidden], 2.0, dtype);
    let w = rounded(&mut rng, &[hidden], 1.5, dtype);
    let (sum, normed) =
        add_rms_norm_emulated(&x, &delta, &w, EPS, emu).map_err(|e| e.to_string())?;
    // The reference: candle's unfused order (the add rounded to the dtype, then the
    // norm in f32 of the rounded sum).
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32).expect("f32");
    let sum_ref = (&x + &delta).expect("add");
    let normed_ref = cpu_ops::rms_norm(&f32_of(&sum_ref), &f32_of(&w), EPS).expect("reference");
    let what = format!("{dtype:?} {rows}x{hidden} {:?}", emu.schedule);
    // The sum is one rounding of the same add: exact.
    let d = max_rel_diff(&values(&sum), &values(&sum_ref));
    if d != 0.0 {
        return Err(format!("{what}: residual sum off by {d}"));
    }
    let d = max_rel_diff(&values(&normed), &values(&normed_ref));
    if d >= tolerance(dtype) {
        return Err(format!("{what}: normed rows off by {d}"));
    }
    Ok(())
}

fn silu_case(
    emu: &Emulator,
    rows: usize,
    width: usize,
    dtype: DType,
    seed: u64,
) -> Result<(), String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let gate_up = rounded(&mut rng, &[rows, 2 * width], 6.0, dtype);
    let got = silu_mul_emulated(&gate_up, width, emu).map_err(|e| e.to_string())?;
    let f = gate_up.to_dtype(DType::F32).expect("f32");
    let gate = f.narrow(1, 0, width).expect("gate");
    let up = f.narrow(1, width, width).expect("up");
    let want = cpu_ops::silu_mul(&gate, &up).expect("reference");
    let d = max_rel_diff(&values(&got), &values(&want));
    let what = format!("{dtype:?} {rows}x{width} {:?}", emu.schedule);
    if got.dims() != [rows, width] {
        return Err(format!("{what}: output {:?}", got.dims()));
    }
    if d >= tolerance(dtype) {
        return Err(format!("{what}: off by {d}"));
    }
    Ok(())
}

#[test]
fn add_rms_norm_matches_the_cpu_op() {
    let mut n = 0u64;
    for &(rows, hidden) in &SHAPES {
        for dtype in DTYPES {
            let emu = Emulator {
                source: Source::Original,
                schedule: Schedule::ADVERSARIAL[n as usize % Schedule::ADVERSARIAL.len()],
            };
            add_norm_case(&emu, rows, hidden, dtype, 100 + n).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
}

#[test]
fn silu_mul_matches_the_cpu_op() {
    let mut n = 0u64;
    for &(rows, width) in &SHAPES {
        for dtype in DTYPES {
            let emu = Emulator {
                source: Source::Original,
                schedule: Schedule::ADVERSARIAL[n as usize % Schedule::ADVERSARIAL.len()],
            };
            silu_case(&emu, rows, width, dtype, 300 + n).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
}

#[test]
fn bad_shapes_are_refused_with_the_shapes_named() {
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).expect("zeros");
    let emu = Emulator::default();
    let err = add_rms_norm_emulated(&z(&[2, 8]), &z(&[2, 9]), &z(&[8]), EPS, &emu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[2, 8]") && err.contains("[2, 9]"), "{err}");
    let err = add_rms_norm_emulated(&z(&[2, 8]), &z(&[2, 8]), &z(&[4]), EPS, &emu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("weight [4]"), "{err}");
    let err = silu_mul_emulated(&z(&[2, 9]), 4, &emu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[2, 9]"), "{err}");
}

#[test]
fn broken_copies_of_the_kernels_are_caught() {
    let run = |source: Source| -> Vec<String> {
        let mut failures = Vec::new();
        for schedule in Schedule::ADVERSARIAL {
            let emu = Emulator { source, schedule };
            for (i, &(rows, width)) in SHAPES.iter().enumerate() {
                let r = match source {
                    Source::LayerOpsUpOffByOne => {
                        silu_case(&emu, rows, width, DType::F32, 500 + i as u64)
                    }
                    _ => add_norm_case(&emu, rows, width, DType::F32, 500 + i as u64),
                };
                if let Err(e) = r {
                    failures.push(e);
                }
            }
        }
        failures
    };
    // Without the barrier, a warp reads the other warps' partial sums before they are
    // written: every multi-warp shape fails under every schedule.
    let f = run(Source::LayerOpsNoSyncthreads);
    assert!(!f.is_empty(), "LayerOpsNoSyncthreads passed the comparison");
    assert!(
        f.iter().any(|e| e.contains("1x4096")),
        "the no-barrier copy passed at Llama's width: {f:?}"
    );
    let f = run(Source::LayerOpsUpOffByOne);
    assert_eq!(
        f.len(),
        SHAPES.len() * Schedule::ADVERSARIAL.len(),
        "the off-by-one gate/up split passed some cases: {f:?}"
    );
}
