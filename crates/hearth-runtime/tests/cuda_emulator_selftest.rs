//! The emulator itself (kernels/emu/selftest.cu): static shared memory and barriers,
//! shuffles and votes with CUDA's results, and the faults it must report rather than
//! run through: a race on shared memory (different results under different schedules),
//! a shuffle only part of a warp reaches, a write past a buffer's end.
#![cfg(hearth_cuda_emulator)]

use hearth_runtime::cuda_emulator::{
    DeviceBuffer, Emulator, KernelArg, LaunchGeometry, Schedule, Source,
};

fn f32_buffer(v: &[f32]) -> DeviceBuffer {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_ne_bytes()).collect();
    DeviceBuffer::from_bytes(&bytes, "f32")
}

fn f32s(b: &DeviceBuffer) -> Vec<f32> {
    b.bytes()
        .chunks_exact(4)
        .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn geometry(kernel: &str, blocks: u32, threads: u32) -> LaunchGeometry<'_> {
    LaunchGeometry {
        kernel,
        grid: [blocks, 1, 1],
        block: [threads, 1, 1],
        dynamic_shared_bytes: 0,
        shared_limit_bytes: 48 * 1024,
    }
}

fn emulator(schedule: Schedule) -> Emulator {
    Emulator {
        source: Source::Original,
        schedule,
    }
}

/// Block sums of 3 blocks of 256 threads; small integers, so every order sums exactly.
fn block_sums(kernel: &str, schedule: Schedule) -> (Vec<f32>, Vec<f32>) {
    let input: Vec<f32> = (0..3 * 256).map(|i| (i % 7) as f32).collect();
    let want: Vec<f32> = input.chunks(256).map(|c| c.iter().sum()).collect();
    let mut inb = f32_buffer(&input);
    let mut out = DeviceBuffer::uninit(3 * 4, "f32");
    emulator(schedule)
        .launch(
            &geometry(kernel, 3, 256),
            &mut [KernelArg::Buffer(&mut inb), KernelArg::Buffer(&mut out)],
        )
        .expect("launch");
    (f32s(&out), want)
}

#[test]
fn static_shared_memory_barriers_and_shuffles_sum_a_block() {
    for schedule in Schedule::ADVERSARIAL {
        let (got, want) = block_sums("selftest_block_sum", schedule);
        assert_eq!(got, want, "{schedule:?}");
    }
}

#[test]
fn a_shared_memory_race_gives_a_wrong_result_under_some_schedule_every_time() {
    let mut wrong = Vec::new();
    for schedule in Schedule::ADVERSARIAL {
        let (got, want) = block_sums("selftest_block_sum_racy", schedule);
        if got
            .iter()
            .zip(&want)
            .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            wrong.push(schedule);
        }
    }
    // In order, warp 0 runs first and reads the other warps' slots before they are
    // written (poisoned: NaN); reversed, it runs last and happens to be right.
    assert!(wrong.contains(&Schedule::InOrder), "{wrong:?}");
    assert!(!wrong.contains(&Schedule::Reversed), "{wrong:?}");
}

#[test]
fn votes_give_cudas_results() {
    let mut out = DeviceBuffer::uninit(3 * 4, "u32");
    emulator(Schedule::Shuffled(3))
        .launch(
            &geometry("selftest_votes", 1, 64),
            &mut [KernelArg::Buffer(&mut out)],
        )
        .expect("launch");
    let v: Vec<u32> = out
        .bytes()
        .chunks_exact(4)
        .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let ballot = (0..32).filter(|l| l % 3 == 0).fold(0u32, |b, l| b | 1 << l);
    assert_eq!(v, vec![ballot, 1, 0]);
}

#[test]
fn a_shuffle_half_a_warp_reaches_is_reported_as_divergence() {
    let mut out = DeviceBuffer::uninit(64 * 4, "f32");
    let err = emulator(Schedule::InOrder)
        .launch(
            &geometry("selftest_divergent_shuffle", 1, 64),
            &mut [KernelArg::Buffer(&mut out)],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("warp divergence"), "{err}");
}

#[test]
fn a_write_past_a_buffer_is_reported() {
    let mut out = DeviceBuffer::uninit(16 * 4, "f32");
    let err = emulator(Schedule::InOrder)
        .launch(
            &geometry("selftest_out_of_bounds", 1, 32),
            &mut [KernelArg::Buffer(&mut out), KernelArg::I32(16)],
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("wrote outside the buffer passed as argument 0"),
        "{err}"
    );
}

#[test]
fn an_invalid_memory_access_fails_the_launch_not_the_process() {
    let mut p = f32_buffer(&[1.0; 32]);
    let mut out = DeviceBuffer::uninit(32 * 4, "f32");
    let err = emulator(Schedule::InOrder)
        .launch(
            &geometry("selftest_wild_read", 1, 32),
            &mut [
                KernelArg::Buffer(&mut p),
                KernelArg::Buffer(&mut out),
                KernelArg::I64(1 << 42),
            ],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid memory access"), "{err}");
    // The emulator still works on this thread afterwards.
    let (got, want) = block_sums("selftest_block_sum", Schedule::Reversed);
    assert_eq!(got, want);
}
