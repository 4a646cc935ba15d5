//! hearth's CUDA kernels run on the CPU, for tests on machines without a GPU: build.rs
//! compiles the very `.cu` sources nvcc compiles with the host C++ compiler, through
//! kernels/emu/cuda_emu.h, and kernels/emu/runtime.cpp runs a launch one block at a
//! time, every thread a coroutine, with warps scheduled one at a time between barriers
//! in a chosen order (see there). Launches come from the same descriptions the CUDA
//! path uses (e.g. paged_attention/launch.rs); the emulator checks them against the
//! device's launch limits and the argument types against the kernel's own signature.
//!
//! Device memory is stood in for by [`DeviceBuffer`]: 256-byte aligned like
//! `cudaMalloc`, with poisoned guard zones on both sides that are checked after every
//! launch (a write past either end is an error; a read there yields NaN or
//! 0xffffffff).

use std::ffi::{c_char, c_void, CStr};

use candle_core::Result;

/// Which compiled copy of a kernel source to run: the source itself, or a deliberately
/// broken copy (build.rs's MUTANTS) that the tests show the emulator rejects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Original,
    /// `table[j / block_size]` read as `table[(j + 1) / block_size]`.
    BlockTableOffByOne,
    /// Every `__syncthreads()` removed.
    NoSyncthreads,
    /// The split-key combine drops a decode row's last, partial partition.
    CombineDropsPartition,
    /// The split-key kernel's merging block leaves its counter set: the next launch
    /// with the same counters (the next layer's) never merges.
    CounterNotReset,
    /// The sampling kernel with every `__syncthreads()` removed.
    SampleNoSyncthreads,
    /// The sampling kernel skipping tokens whose Gumbel noise could still win.
    SampleGumbelBoundTooLow,
    /// The sampling kernel leaving the penalty table as it found it (no count added).
    SampleTableNotUpdated,
    /// Top-p's bisection over the head counting its mass twice.
    SampleHeadMassDoubled,
    /// Top-p's bisection over the whole row (a head too large) counting half the mass.
    SampleRowBisectionHalfMass,
    /// The fused layer ops (kernels/layer_ops.cu) with every `__syncthreads()` removed.
    LayerOpsNoSyncthreads,
    /// SiLU·mul reading `up` one column early (the gate/up split off by one).
    LayerOpsUpOffByOne,
    /// The small-batch GEMV (kernels/gemv.cu) with every `__syncthreads()` removed.
    GemvNoSyncthreads,
    /// The GEMV skipping the input's last tile when K is not a multiple of the tile.
    GemvTailTileDropped,
}

/// The order in which blocks, the warps of a block (between two barriers) and the lanes
/// of a warp (between two warp collectives) run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    InOrder,
    Reversed,
    /// A permutation drawn from the seed, fresh for every block, phase and warp.
    Shuffled(u64),
}

impl Schedule {
    /// The schedules a kernel is checked under: the two extremes and two shuffles.
    pub const ADVERSARIAL: [Schedule; 4] = [
        Schedule::InOrder,
        Schedule::Reversed,
        Schedule::Shuffled(0x9e37_79b9),
        Schedule::Shuffled(0x7f4a_7c15),
    ];
}

/// How to run emulated launches.
#[derive(Debug, Clone, Copy)]
pub struct Emulator {
    pub source: Source,
    pub schedule: Schedule,
}

impl Default for Emulator {
    fn default() -> Self {
        Self {
            source: Source::Original,
            schedule: Schedule::InOrder,
        }
    }
}

#[repr(C)]
struct KernelEntry {
    _private: [u8; 0],
}

#[repr(C)]
struct LaunchDesc {
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_shared_bytes: u64,
    shared_limit_bytes: u64,
    policy: u32,
    seed: u64,
}

extern "C" {
    fn hearth_emu_kernel_name(k: *const KernelEntry) -> *const c_char;
    fn hearth_emu_kernel_signature(k: *const KernelEntry) -> *const c_char;
    fn hearth_emu_launch(
        k: *const KernelEntry,
        d: *const LaunchDesc,
        args: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn hearth_emu_kernels_paged_attention_original(i: usize) -> *const KernelEntry;
    fn hearth_emu_kernels_paged_attention_block_table_off_by_one(i: usize) -> *const KernelEntry;
    fn hearth_emu_kernels_paged_attention_no_syncthreads(i: usize) -> *const KernelEntry;
    fn hearth_emu_kernels_paged_attention_combine_drops_partition(i: usize) -> *const KernelEntry;
    fn hearth_emu_kernels_paged_attention_counter_not_reset(i: usize) -> *const KernelEntry;
    fn hearth_emu_kernels_rope_cache_original(i: usize) -> *const KernelEntry;
    fn hearth_emu_kernels_sample_original(i: usize) -> *const KernelEntry;
    fn hearth_emu_kernels_sample_no_syncthreads(i: usize) -> *const KernelEntry;
    fn hearth_emu_kernels_sample_gumbel_bound_too_low(i: usize) -> *const KernelEntry;
    fn hearth_emu_kernels_sample_table_not_updated(i: usize) -> *const KernelEntry;
    fn hearth_emu_kernels_sample_head_mass_doubled(i: usize) -> *const KernelEntry;
    fn hearth_emu_kernels_sample_row_bisection_half_mass(i: usize) -> *const KernelEntry;
    fn hearth_emu_kernels_selftest_original(i: usize) -> *const KernelEntry;
    fn hearth_emu_kernels_layer_ops_original(i: usize) -> *const KernelEntry;
    fn hearth_emu_kernels_layer_ops_no_syncthreads(i: usize) -> *const KernelEntry;
    fn hearth_emu_kernels_layer_ops_up_off_by_one(i: usize) -> *const KernelEntry;
    fn hearth_emu_kernels_gemv_original(i: usize) -> *const KernelEntry;
    fn hearth_emu_kernels_gemv_no_syncthreads(i: usize) -> *const KernelEntry;
    fn hearth_emu_kernels_gemv_tail_tile_dropped(i: usize) -> *const KernelEntry;
}

type Table = unsafe extern "C" fn(usize) -> *const KernelEntry;

/// The kernel tables of a source variant: the originals hold every kernel source and
/// the emulator's self-tests (kernels/emu/selftest.cu); a mutant, its own source only.
fn tables(source: Source) -> &'static [Table] {
    match source {
        Source::Original => &[
            hearth_emu_kernels_paged_attention_original,
            hearth_emu_kernels_rope_cache_original,
            hearth_emu_kernels_sample_original,
            hearth_emu_kernels_layer_ops_original,
            hearth_emu_kernels_gemv_original,
            hearth_emu_kernels_selftest_original,
        ],
        Source::BlockTableOffByOne => &[hearth_emu_kernels_paged_attention_block_table_off_by_one],
        Source::NoSyncthreads => &[hearth_emu_kernels_paged_attention_no_syncthreads],
        Source::CombineDropsPartition => {
            &[hearth_emu_kernels_paged_attention_combine_drops_partition]
        }
        Source::CounterNotReset => &[hearth_emu_kernels_paged_attention_counter_not_reset],
        Source::SampleNoSyncthreads => &[hearth_emu_kernels_sample_no_syncthreads],
        Source::SampleGumbelBoundTooLow => &[hearth_emu_kernels_sample_gumbel_bound_too_low],
        Source::SampleTableNotUpdated => &[hearth_emu_kernels_sample_table_not_updated],
        Source::SampleHeadMassDoubled => &[hearth_emu_kernels_sample_head_mass_doubled],
        Source::SampleRowBisectionHalfMass => &[hearth_emu_kernels_sample_row_bisection_half_mass],
        Source::LayerOpsNoSyncthreads => &[hearth_emu_kernels_layer_ops_no_syncthreads],
        Source::LayerOpsUpOffByOne => &[hearth_emu_kernels_layer_ops_up_off_by_one],
        Source::GemvNoSyncthreads => &[hearth_emu_kernels_gemv_no_syncthreads],
        Source::GemvTailTileDropped => &[hearth_emu_kernels_gemv_tail_tile_dropped],
    }
}

/// The names of the entry points compiled from `source`.
pub fn kernel_names(source: Source) -> Vec<String> {
    let mut names = Vec::new();
    for &t in tables(source) {
        names.extend(table_names(t));
    }
    names
}

fn table_names(t: Table) -> Vec<String> {
    let mut names = Vec::new();
    for i in 0.. {
        // SAFETY: the table returns valid entries for 0..len, then null.
        let k = unsafe { t(i) };
        if k.is_null() {
            break;
        }
        // SAFETY: names are static NUL-terminated strings.
        names.push(
            unsafe { CStr::from_ptr(hearth_emu_kernel_name(k)) }
                .to_string_lossy()
                .into_owned(),
        );
    }
    names
}

fn find(source: Source, name: &str) -> Option<*const KernelEntry> {
    for &t in tables(source) {
        for i in 0.. {
            // SAFETY: as in table_names.
            let k = unsafe { t(i) };
            if k.is_null() {
                break;
            }
            // SAFETY: as in table_names.
            if unsafe { CStr::from_ptr(hearth_emu_kernel_name(k)) }.to_bytes() == name.as_bytes() {
                return Some(k);
            }
        }
    }
    None
}

const GUARD: usize = 256;

#[repr(C, align(256))]
#[derive(Clone, Copy)]
struct Chunk([u8; GUARD]);

/// A stand-in for a device allocation: `len` bytes between two guard zones of 0xff.
pub struct DeviceBuffer {
    chunks: Vec<Chunk>,
    len: usize,
    /// The element type, as kernel signatures name it (`f32`, `u32`, ...).
    elem: &'static str,
}

impl DeviceBuffer {
    /// A buffer holding `bytes`.
    pub fn from_bytes(bytes: &[u8], elem: &'static str) -> Self {
        let mut b = Self::uninit(bytes.len(), elem);
        b.bytes_mut().copy_from_slice(bytes);
        b
    }

    /// A buffer of `len` bytes the kernel is to write, filled with 0xff so that an
    /// element it leaves unwritten shows (NaN).
    pub fn uninit(len: usize, elem: &'static str) -> Self {
        let n = len.div_ceil(GUARD) + 2;
        Self {
            chunks: vec![Chunk([0xff; GUARD]); n],
            len,
            elem,
        }
    }

    fn all(&self) -> &[u8] {
        // SAFETY: Chunk is plain bytes.
        unsafe {
            std::slice::from_raw_parts(self.chunks.as_ptr().cast::<u8>(), self.chunks.len() * GUARD)
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.all()[GUARD..GUARD + self.len]
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        // SAFETY: Chunk is plain bytes.
        let all = unsafe {
            std::slice::from_raw_parts_mut(
                self.chunks.as_mut_ptr().cast::<u8>(),
                self.chunks.len() * GUARD,
            )
        };
        &mut all[GUARD..GUARD + len]
    }

    fn ptr(&mut self) -> *mut c_void {
        // SAFETY: GUARD is inside the allocation.
        unsafe { self.chunks.as_mut_ptr().cast::<u8>().add(GUARD).cast() }
    }

    /// Whether the guard zones are intact.
    fn guards_intact(&self) -> bool {
        let all = self.all();
        all[..GUARD]
            .iter()
            .chain(&all[GUARD + self.len..])
            .all(|&b| b == 0xff)
    }
}

/// A kernel argument: a buffer or a scalar passed by value.
pub enum KernelArg<'a> {
    Buffer(&'a mut DeviceBuffer),
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
}

/// One launch's geometry, as the CUDA launcher would pass it.
#[derive(Debug, Clone)]
pub struct LaunchGeometry<'a> {
    pub kernel: &'a str,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dynamic_shared_bytes: u32,
    /// What the block's static and dynamic shared memory together may come to.
    pub shared_limit_bytes: u32,
}

impl Emulator {
    /// Runs one launch to completion. Errors: an unknown kernel, arguments that do not
    /// match its signature, launch limits, divergence at barriers or warp collectives,
    /// writes past a buffer's end, invalid memory accesses (the process survives them).
    pub fn launch(&self, g: &LaunchGeometry<'_>, args: &mut [KernelArg<'_>]) -> Result<()> {
        let k = find(self.source, g.kernel).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "emulator: no kernel {} in {:?}",
                g.kernel, self.source
            ))
        })?;
        let mut codes = Vec::with_capacity(args.len());
        for a in args.iter() {
            codes.push(match a {
                KernelArg::Buffer(b) => format!("{}*", b.elem),
                KernelArg::I32(_) => "i32".into(),
                KernelArg::U32(_) => "u32".into(),
                KernelArg::I64(_) => "i64".into(),
                KernelArg::F32(_) => "f32".into(),
            });
        }
        let passed = codes.join(",");
        // SAFETY: a static NUL-terminated string.
        let want = unsafe { CStr::from_ptr(hearth_emu_kernel_signature(k)) }.to_string_lossy();
        if passed != want {
            candle_core::bail!(
                "{}: launched with ({passed}) but the kernel takes ({want})",
                g.kernel
            );
        }
        // Each argument's value, then CUDA's `void** kernelParams` pointing at them.
        let mut values: Vec<[u8; 8]> = Vec::with_capacity(args.len());
        for a in args.iter_mut() {
            let mut v = [0u8; 8];
            match a {
                KernelArg::Buffer(b) => v = (b.ptr() as usize as u64).to_ne_bytes(),
                KernelArg::I32(x) => v[..4].copy_from_slice(&x.to_ne_bytes()),
                KernelArg::U32(x) => v[..4].copy_from_slice(&x.to_ne_bytes()),
                KernelArg::I64(x) => v = x.to_ne_bytes(),
                KernelArg::F32(x) => v[..4].copy_from_slice(&x.to_ne_bytes()),
            }
            values.push(v);
        }
        let mut ptrs: Vec<*mut c_void> = values.iter_mut().map(|v| v.as_mut_ptr().cast()).collect();
        let (policy, seed) = match self.schedule {
            Schedule::InOrder => (0, 0),
            Schedule::Reversed => (1, 0),
            Schedule::Shuffled(s) => (2, s),
        };
        let desc = LaunchDesc {
            grid: g.grid,
            block: g.block,
            dynamic_shared_bytes: g.dynamic_shared_bytes as u64,
            shared_limit_bytes: g.shared_limit_bytes as u64,
            policy,
            seed,
        };
        let mut err = vec![0 as c_char; 1024];
        // SAFETY: the argument values match the kernel's signature (checked above) and
        // every buffer outlives the launch, which is synchronous.
        let rc =
            unsafe { hearth_emu_launch(k, &desc, ptrs.as_mut_ptr(), err.as_mut_ptr(), err.len()) };
        if rc != 0 {
            // SAFETY: the runtime wrote a NUL-terminated message.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
                .to_string_lossy()
                .into_owned();
            candle_core::bail!("{}: {msg}", g.kernel);
        }
        crate::launch_count::note(1);
        for (i, a) in args.iter().enumerate() {
            if let KernelArg::Buffer(b) = a {
                if !b.guards_intact() {
                    candle_core::bail!(
                        "{}: wrote outside the buffer passed as argument {i}",
                        g.kernel
                    );
                }
            }
        }
        Ok(())
    }
}
