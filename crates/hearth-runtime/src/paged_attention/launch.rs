//! How hearth's paged-attention kernel is launched, described once for the two places
//! that launch it: the CUDA path (cuda.rs) and the CPU emulator (emulated.rs), so the
//! emulator's tests exercise the grid, block, shared memory and argument order the GPU
//! gets. Shape checks and the launch limits live here too.

use candle_core::{DType, Layout, Result};

use super::AttentionMetadata;

/// Warps per block.
const WARPS: u32 = 4;
/// Query heads of a GQA group one block holds in registers (kernels/paged_attention.cu's
/// MAX_GROUP).
pub(crate) const MAX_GROUP: usize = 8;

/// What a launch may ask of the device; checked before every launch on both paths.
#[derive(Debug, Clone, Copy)]
pub struct LaunchLimits {
    pub max_threads_per_block: u32,
    pub max_block: [u32; 3],
    pub max_grid: [u32; 3],
    /// Dynamic shared memory a kernel gets without asking.
    pub default_shared_bytes: u32,
    /// With `cudaFuncAttributeMaxDynamicSharedMemorySize` set (the opt-in).
    pub opt_in_shared_bytes: u32,
}

/// Hopper (sm_90, H100/H200): 1,024 threads per block, 48 KiB of shared memory by
/// default and 227 KiB with the opt-in (CUDA C++ Programming Guide, "Compute
/// Capabilities", table 21).
pub const SM90_LIMITS: LaunchLimits = LaunchLimits {
    max_threads_per_block: 1024,
    max_block: [1024, 1024, 64],
    max_grid: [i32::MAX as u32, 65535, 65535],
    default_shared_bytes: 48 * 1024,
    opt_in_shared_bytes: 227 * 1024,
};

/// The buffers a launch passes, by role; each path maps them to its own memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Buffer {
    Q,
    KCache,
    VCache,
    Out,
    TokenSeq,
    QueryStart,
    SeqLens,
    BlockTables,
}

impl Buffer {
    /// The element type of the buffer's pointer in the kernel's signature, for a
    /// launch in `dtype`.
    pub(crate) fn elem_code(self, dtype: DType) -> &'static str {
        match self {
            Buffer::Q | Buffer::KCache | Buffer::VCache | Buffer::Out => match dtype {
                DType::F16 => "f16",
                DType::BF16 => "bf16",
                _ => "f32",
            },
            _ => "u32",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    Buffer(Buffer),
    I32(i32),
    F32(f32),
}

/// One kernel launch: which entry point, its geometry, and its arguments in order.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub kernel: String,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dynamic_shared_bytes: u32,
    /// Whether the launcher raises the kernel's dynamic shared-memory limit to the
    /// opt-in maximum first.
    pub shared_opt_in: bool,
    pub args: Vec<Arg>,
}

impl Launch {
    /// The shared memory this launch may use, under `limits`.
    pub(crate) fn shared_limit(&self, limits: &LaunchLimits) -> u32 {
        if self.shared_opt_in {
            limits.opt_in_shared_bytes
        } else {
            limits.default_shared_bytes
        }
    }

    pub(crate) fn check(&self, limits: &LaunchLimits) -> Result<()> {
        let threads: u64 = self.block.iter().map(|&b| b as u64).product();
        if threads == 0 || threads > limits.max_threads_per_block as u64 {
            candle_core::bail!(
                "{}: {threads} threads per block (the device takes 1..={})",
                self.kernel,
                limits.max_threads_per_block
            );
        }
        for i in 0..3 {
            if self.block[i] > limits.max_block[i]
                || self.grid[i] == 0
                || self.grid[i] > limits.max_grid[i]
            {
                candle_core::bail!(
                    "{}: block {:?} / grid {:?} outside the device's limits {:?} / {:?}",
                    self.kernel,
                    self.block,
                    self.grid,
                    limits.max_block,
                    limits.max_grid
                );
            }
        }
        let limit = self.shared_limit(limits);
        if self.dynamic_shared_bytes > limit {
            candle_core::bail!(
                "{}: {} bytes of dynamic shared memory, over the {limit} the launch may use",
                self.kernel,
                self.dynamic_shared_bytes
            );
        }
        Ok(())
    }
}

/// The op's sizes, read off the layouts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shapes {
    pub tokens: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub num_blocks: usize,
    pub block_size: usize,
}

pub(crate) fn shapes(ql: &Layout, kl: &Layout, vl: &Layout) -> Result<Shapes> {
    let (t, h, d) = ql.shape().dims3()?;
    let (nb, bs, kvh, d2) = kl.shape().dims4()?;
    if vl.shape() != kl.shape() || d2 != d || kvh == 0 || h % kvh != 0 {
        candle_core::bail!(
            "paged attention: q {:?}, caches {:?} and {:?}",
            ql.shape(),
            kl.shape(),
            vl.shape()
        );
    }
    if !ql.is_contiguous() || !kl.is_contiguous() || !vl.is_contiguous() {
        candle_core::bail!("paged attention: q and the caches must be contiguous");
    }
    Ok(Shapes {
        tokens: t,
        heads: h,
        kv_heads: kvh,
        head_dim: d,
        num_blocks: nb,
        block_size: bs,
    })
}

/// The head sizes the kernel is compiled for (kernels/paged_attention.cu's HEAD_DIMS):
/// every one of the supported families (16 and 32 in the test fixtures, 64/128 for
/// Llama, Mistral, Qwen, 80 and 96 for Phi-style models, 256 for Gemma).
pub const HEAD_DIMS: [usize; 7] = [16, 32, 64, 80, 96, 128, 256];

/// Whether the kernel takes this head size and GQA group (query heads per kv head).
/// Any group size is taken: a block holds up to MAX_GROUP heads of one group, and
/// larger groups get more blocks (grid y = kv_heads × ceil(group / MAX_GROUP)).
pub(crate) fn supports(head_dim: usize, group: usize) -> Result<()> {
    if !HEAD_DIMS.contains(&head_dim) {
        candle_core::bail!("head_dim {head_dim} (the kernel takes {HEAD_DIMS:?})");
    }
    if group == 0 {
        candle_core::bail!("no query heads per kv head");
    }
    Ok(())
}

/// The step's metadata as the kernel reads it (never empty: a zero-length allocation is
/// not a valid kernel argument).
pub(crate) struct HostMeta {
    pub token_seq: Vec<u32>,
    pub query_start: Vec<u32>,
    pub seq_lens: Vec<u32>,
    pub block_tables: Vec<u32>,
}

impl HostMeta {
    pub(crate) fn new(meta: &AttentionMetadata) -> Self {
        let mut token_seq = Vec::with_capacity(meta.num_tokens());
        for s in 0..meta.num_seqs() {
            let n = (meta.query_start[s + 1] - meta.query_start[s]) as usize;
            token_seq.extend(std::iter::repeat_n(s as u32, n));
        }
        let nonempty = |v: &[u32]| if v.is_empty() { vec![0] } else { v.to_vec() };
        Self {
            token_seq: nonempty(&token_seq),
            query_start: nonempty(&meta.query_start),
            seq_lens: nonempty(&meta.seq_lens),
            block_tables: nonempty(&meta.block_tables),
        }
    }

    pub(crate) fn get(&self, b: Buffer) -> Option<&[u32]> {
        match b {
            Buffer::TokenSeq => Some(&self.token_seq),
            Buffer::QueryStart => Some(&self.query_start),
            Buffer::SeqLens => Some(&self.seq_lens),
            Buffer::BlockTables => Some(&self.block_tables),
            _ => None,
        }
    }
}

/// The launch for one call (shapes already checked, `s.tokens > 0`).
pub(crate) fn plan(
    meta: &AttentionMetadata,
    s: &Shapes,
    dtype: DType,
    scale: f32,
) -> Result<Launch> {
    let g = s.heads / s.kv_heads;
    supports(s.head_dim, g)
        .map_err(|e| candle_core::Error::Msg(format!("paged attention on CUDA: {e}")))?;
    let groups = g.div_ceil(MAX_GROUP);
    let per_block = g.min(MAX_GROUP);
    let name = match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => candle_core::bail!("paged attention: q and caches must be f32, f16 or bf16"),
    };
    let launch = Launch {
        kernel: format!("hearth_paged_attention_{name}_d{}", s.head_dim),
        grid: [s.tokens as u32, (s.kv_heads * groups) as u32, 1],
        block: [WARPS * 32, 1, 1],
        // Each warp's (accumulator, max, sum) per head it holds, in f32.
        dynamic_shared_bytes: WARPS * (per_block * (s.head_dim + 2) * 4) as u32,
        shared_opt_in: false,
        args: vec![
            Arg::Buffer(Buffer::Q),
            Arg::Buffer(Buffer::KCache),
            Arg::Buffer(Buffer::VCache),
            Arg::Buffer(Buffer::Out),
            Arg::Buffer(Buffer::TokenSeq),
            Arg::Buffer(Buffer::QueryStart),
            Arg::Buffer(Buffer::SeqLens),
            Arg::Buffer(Buffer::BlockTables),
            Arg::I32(meta.max_blocks as i32),
            Arg::I32(s.heads as i32),
            Arg::I32(s.kv_heads as i32),
            Arg::I32(s.block_size as i32),
            Arg::F32(scale),
        ],
    };
    launch.check(&SM90_LIMITS)?;
    Ok(launch)
}
