//! hearth's CUDA kernels, compiled from their .cu source for the CPU emulator and
//! launched exactly as the CUDA path launches them, against the CPU op and a float64
//! reference on random ragged batches (GQA ratios, head dims, block sizes, contexts
//! crossing blocks, f32/f16/bf16), under adversarial schedules; and the emulator shown
//! to catch broken copies of the same source (build.rs's MUTANTS).
#![cfg(hearth_cuda_emulator)]

use candle_core::DType;
use hearth_runtime::cuda_emulator::{kernel_names, Emulator, Schedule, Source};
use hearth_runtime::paged_attention::{
    paged_attention, paged_attention_emulated, paged_attention_emulated_layers,
    DECODE_PARTITION_KEYS, HEAD_DIMS,
};

mod attention_cases;
use attention_cases::{build, cpu_tensors, max_diff, random_seqs, reference, seeded, values, Case};

/// Tolerances against the float64 reference: q, k, v are in [-3, 3] and [-1, 1]; half
/// types keep 11 (f16) and 8 (bf16) bits of mantissa.
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 1e-2,
        _ => 5e-2,
    }
}

fn emulate(
    c: &Case,
    b: &attention_cases::Built,
    dtype: DType,
    emu: &Emulator,
) -> candle_core::Result<Vec<f32>> {
    let (q, k, v) = cpu_tensors(c, b, dtype);
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    let o = paged_attention_emulated(&q, &k, &v, &b.meta, scale, emu)?;
    assert_eq!(o.dims(), &[b.meta.num_tokens(), c.heads, c.head_dim]);
    assert_eq!(o.dtype(), dtype);
    Ok(values(&o))
}

fn cpu_op(c: &Case, b: &attention_cases::Built, dtype: DType) -> Vec<f32> {
    let (q, k, v) = cpu_tensors(c, b, dtype);
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    values(&paged_attention(&q, &k, &v, &b.meta, scale).expect("the CPU op"))
}

fn describe(c: &Case) -> String {
    format!(
        "heads {}/{} d {} bs {} seqs {:?}",
        c.heads, c.kv_heads, c.head_dim, c.block_size, c.seqs
    )
}

/// The cases: every head dim the kernel takes, each with two of the GQA ratios (1, 3, 4,
/// 8, 16: a block holds at most 8 heads of a group, so 16 takes two blocks) and a block
/// size of 16 or 32, in ragged batches with contexts up to 80 keys (so crossing blocks).
fn cases() -> Vec<Case> {
    let mut rng = seeded(19);
    let ratios = [(4, 4), (9, 3), (8, 2), (16, 2), (16, 1)];
    let mut out = Vec::new();
    for (i, &head_dim) in HEAD_DIMS.iter().enumerate() {
        for j in 0..2 {
            let (heads, kv_heads) = ratios[(2 * i + j) % ratios.len()];
            let block_size = [16, 32][(i + j) % 2];
            out.push(Case {
                heads,
                kv_heads,
                head_dim,
                block_size,
                seqs: random_seqs(&mut rng, block_size, 80),
            });
        }
    }
    out
}

#[test]
fn the_emulated_cuda_kernel_matches_the_cpu_op_and_the_reference() {
    let dtypes = [DType::F32, DType::F16, DType::BF16];
    for (n, c) in cases().iter().enumerate() {
        let b = build(c, &mut seeded(2000 + n as u64));
        let want = reference(c, &b);
        let dtype = dtypes[n % 3];
        let schedule = Schedule::ADVERSARIAL[n % Schedule::ADVERSARIAL.len()];
        let emu = Emulator {
            source: Source::Original,
            schedule,
        };
        let got = emulate(c, &b, dtype, &emu).unwrap_or_else(|e| panic!("{}: {e}", describe(c)));
        let tol = tolerance(dtype);
        let diff = max_diff(&got, &want);
        assert!(
            diff < tol,
            "{dtype:?} {schedule:?} {}: max diff {diff} from the reference",
            describe(c)
        );
        let diff = max_diff(&got, &cpu_op(c, &b, dtype));
        assert!(
            diff < tol,
            "{dtype:?} {schedule:?} {}: max diff {diff} from the CPU op",
            describe(c)
        );
    }
}

#[test]
fn every_schedule_gives_the_same_bits() {
    // A race between warps or lanes would make the result depend on who runs first.
    let c = Case {
        heads: 8,
        kv_heads: 2,
        head_dim: 64,
        block_size: 16,
        seqs: vec![(1, 70), (5, 33), (17, 17)],
    };
    let b = build(&c, &mut seeded(5));
    let runs: Vec<Vec<f32>> = Schedule::ADVERSARIAL
        .iter()
        .map(|&schedule| {
            emulate(
                &c,
                &b,
                DType::BF16,
                &Emulator {
                    source: Source::Original,
                    schedule,
                },
            )
            .expect("emulated launch")
        })
        .collect();
    for (r, s) in runs.iter().zip(Schedule::ADVERSARIAL).skip(1) {
        let same = r
            .iter()
            .zip(&runs[0])
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{s:?} differs from in-order");
    }
}

/// A case whose contexts cross block boundaries, and whose block-table rows all have
/// a padding entry after the last block (so the off-by-one mutant reads block 0, a
/// valid block with the wrong keys, rather than past the table).
fn crossing_case() -> Case {
    Case {
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
        block_size: 16,
        seqs: vec![(1, 60), (20, 37), (1, 63)],
    }
}

#[test]
fn an_off_by_one_in_the_block_table_index_is_caught() {
    let c = crossing_case();
    let b = build(&c, &mut seeded(11));
    let want = reference(&c, &b);
    let emu = Emulator {
        source: Source::Original,
        schedule: Schedule::InOrder,
    };
    assert!(max_diff(&emulate(&c, &b, DType::F32, &emu).expect("original"), &want) < 1e-4);
    for schedule in Schedule::ADVERSARIAL {
        let emu = Emulator {
            source: Source::BlockTableOffByOne,
            schedule,
        };
        let got = emulate(&c, &b, DType::F32, &emu).expect("the mutant runs");
        let diff = max_diff(&got, &want);
        assert!(
            diff > 1e-2,
            "{schedule:?}: the off-by-one mutant passed (max diff {diff})"
        );
    }
}

#[test]
fn a_missing_syncthreads_is_caught_under_every_schedule() {
    // The crossing case has both kinds of rows; the second, decode rows alone (the
    // split-key kernel, whose merge has barriers of its own).
    for (n, c) in [crossing_case(), long_decode_case(64, 8, 2)]
        .iter()
        .enumerate()
    {
        missing_syncthreads_caught(c, 12 + n as u64);
    }
}

fn missing_syncthreads_caught(c: &Case, seed: u64) {
    let b = build(c, &mut seeded(seed));
    let want = reference(c, &b);
    for schedule in Schedule::ADVERSARIAL {
        let emu = Emulator {
            source: Source::NoSyncthreads,
            schedule,
        };
        let got = emulate(c, &b, DType::F32, &emu).expect("the mutant runs");
        let diff = max_diff(&got, &want);
        // NaN (poisoned shared memory read before it was written) compares as no
        // difference in max_diff's fold, so count it separately.
        let nans = got.iter().filter(|x| x.is_nan()).count();
        assert!(
            nans > 0 || diff > 1e-2,
            "{schedule:?}: the mutant without __syncthreads passed (max diff {diff})"
        );
    }
}

/// Decode rows (one query each) with contexts on both sides of the largest partition
/// size and across several partitions (this few rows run 64-key partitions: launch.rs
/// halves them to fill the GPU), beside a prefill chunk, so both kernels run in one call.
fn long_decode_case(head_dim: usize, heads: usize, kv_heads: usize) -> Case {
    let p = DECODE_PARTITION_KEYS;
    Case {
        heads,
        kv_heads,
        head_dim,
        block_size: 32,
        seqs: vec![
            (1, 1),
            (1, p),
            (1, p + 1),
            (1, 2 * p + 37),
            (5, 40),
            (1, p - 3),
        ],
    }
}

#[test]
fn split_key_decode_matches_the_reference_across_partitions() {
    let dtypes = [DType::F32, DType::F16, DType::BF16];
    // Every head dim, GQA ratios up to 16 (two head groups per kv head).
    let shapes = [(8, 2), (16, 1), (4, 4), (12, 4)];
    for (n, &head_dim) in HEAD_DIMS.iter().enumerate() {
        let (heads, kv_heads) = shapes[n % shapes.len()];
        let c = long_decode_case(head_dim, heads, kv_heads);
        let b = build(&c, &mut seeded(300 + n as u64));
        let want = reference(&c, &b);
        let dtype = dtypes[n % 3];
        let schedule = Schedule::ADVERSARIAL[n % Schedule::ADVERSARIAL.len()];
        let emu = Emulator {
            source: Source::Original,
            schedule,
        };
        let got = emulate(&c, &b, dtype, &emu).unwrap_or_else(|e| panic!("{}: {e}", describe(&c)));
        let tol = tolerance(dtype);
        let diff = max_diff(&got, &want);
        assert!(
            diff < tol,
            "{dtype:?} {schedule:?} {}: max diff {diff} from the reference",
            describe(&c)
        );
        let diff = max_diff(&got, &cpu_op(&c, &b, dtype));
        assert!(
            diff < tol,
            "{dtype:?} {schedule:?} {}: max diff {diff} from the CPU op",
            describe(&c)
        );
    }
}

/// Enough decode rows that the step keeps the largest partitions (launch.rs halves
/// them only while a step's blocks would not make two per SM), ragged lengths.
#[test]
fn a_large_decode_batch_matches_the_reference_with_full_partitions() {
    let c = Case {
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
        block_size: 32,
        seqs: (0..66).map(|i| (1, 200 + (i * 37) % 400)).collect(),
    };
    let b = build(&c, &mut seeded(41));
    let want = reference(&c, &b);
    let emu = Emulator {
        source: Source::Original,
        schedule: Schedule::Shuffled(7),
    };
    let got = emulate(&c, &b, DType::F32, &emu).unwrap_or_else(|e| panic!("{}: {e}", describe(&c)));
    let diff = max_diff(&got, &want);
    assert!(diff < 1e-4, "max diff {diff} from the reference");
}

#[test]
fn a_combine_that_drops_a_partition_is_caught() {
    let c = long_decode_case(64, 4, 2);
    let b = build(&c, &mut seeded(13));
    let want = reference(&c, &b);
    for schedule in Schedule::ADVERSARIAL {
        let emu = Emulator {
            source: Source::CombineDropsPartition,
            schedule,
        };
        let got = emulate(&c, &b, DType::F32, &emu).expect("the mutant runs");
        let diff = max_diff(&got, &want);
        // A row merged too early reads partitions not written yet (NaN), one with
        // fewer keys than a partition is never merged (its output stays NaN).
        let nans = got.iter().filter(|x| x.is_nan()).count();
        assert!(
            nans > 0 || diff > 1e-2,
            "{schedule:?}: the combine dropping a partition passed (max diff {diff})"
        );
    }
}

/// Two layers of one step share the split-key kernel's counters (zeroed once per step
/// on CUDA): each launch must leave them zero, or the next layer's rows are never
/// merged.
#[test]
fn the_merge_counters_are_left_zero_for_the_next_layer() {
    let c = long_decode_case(128, 8, 2);
    let b = build(&c, &mut seeded(17));
    let want = reference(&c, &b);
    let (q, k, v) = cpu_tensors(&c, &b, DType::F32);
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    for schedule in Schedule::ADVERSARIAL {
        let run = |source: Source| {
            let emu = Emulator { source, schedule };
            paged_attention_emulated_layers(&q, &k, &v, &b.meta, scale, &emu, 3)
                .expect("three layers")
                .iter()
                .map(values)
                .collect::<Vec<_>>()
        };
        for (layer, got) in run(Source::Original).iter().enumerate() {
            let diff = max_diff(got, &want);
            let nans = got.iter().filter(|x| x.is_nan()).count();
            assert!(
                nans == 0 && diff < 1e-4,
                "{schedule:?} layer {layer}: {nans} NaN, max diff {diff}"
            );
        }
        let mutant = run(Source::CounterNotReset);
        // The first layer is right (the counters start at zero); the next find them
        // already at the row's partition count and never merge.
        assert!(max_diff(&mutant[0], &want) < 1e-4, "{schedule:?}");
        for (layer, got) in mutant.iter().enumerate().skip(1) {
            let nans = got.iter().filter(|x| x.is_nan()).count();
            assert!(
                nans > 0,
                "{schedule:?} layer {layer}: the counters left set went unnoticed"
            );
        }
    }
}

#[test]
fn every_entry_point_of_the_source_is_compiled() {
    let names = kernel_names(Source::Original);
    for dtype in ["f32", "f16", "bf16"] {
        for d in HEAD_DIMS {
            for kind in ["", "split_"] {
                let want = format!("hearth_paged_attention_{kind}{dtype}_d{d}");
                assert!(names.contains(&want), "{want} missing from {names:?}");
            }
        }
    }
}

#[test]
fn a_head_dim_without_a_kernel_is_refused_naming_the_value() {
    // Through the emulated launch, which plans exactly as the CUDA path does (and as
    // check_supported asks at load time for a CUDA device).
    let c = Case {
        heads: 2,
        kv_heads: 1,
        head_dim: 72,
        block_size: 16,
        seqs: vec![(1, 3)],
    };
    let b = build(&c, &mut seeded(1));
    let err = emulate(&c, &b, DType::F32, &Emulator::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("head_dim 72") && err.contains("CUDA"), "{err}");
}

#[test]
fn launches_outside_the_device_limits_or_the_signature_are_refused() {
    use hearth_runtime::cuda_emulator::{DeviceBuffer, KernelArg, LaunchGeometry};
    let emu = Emulator::default();
    let mut bufs: Vec<DeviceBuffer> = (0..4)
        .map(|_| DeviceBuffer::from_bytes(&[0; 256], "f32"))
        .collect();
    let mut metas: Vec<DeviceBuffer> = (0..5)
        .map(|_| DeviceBuffer::from_bytes(&[0; 64], "u32"))
        .collect();
    let geometry = |threads: u32, shared: u32| LaunchGeometry {
        kernel: "hearth_paged_attention_f32_d64",
        grid: [1, 1, 1],
        block: [threads, 1, 1],
        dynamic_shared_bytes: shared,
        shared_limit_bytes: 48 * 1024,
    };
    let mut run = |g: LaunchGeometry<'_>, scale_as_int: bool| {
        let mut args: Vec<KernelArg<'_>> = bufs
            .iter_mut()
            .chain(metas.iter_mut())
            .map(KernelArg::Buffer)
            .collect();
        args.extend([
            KernelArg::I32(1),
            KernelArg::I32(1),
            KernelArg::I32(1),
            KernelArg::I32(16),
        ]);
        args.push(if scale_as_int {
            KernelArg::I32(1)
        } else {
            KernelArg::F32(1.0)
        });
        emu.launch(&g, &mut args).map_err(|e| e.to_string())
    };
    let err = run(geometry(1056, 1024), false).unwrap_err();
    assert!(err.contains("1056 threads per block"), "{err}");
    let err = run(geometry(128, 48 * 1024 + 4), false).unwrap_err();
    assert!(err.contains("dynamic shared memory"), "{err}");
    let err = run(geometry(128, 1024), true).unwrap_err();
    assert!(
        err.contains("but the kernel takes") && err.contains("i32,i32,i32,i32,f32"),
        "{err}"
    );
}
