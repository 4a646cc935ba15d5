//! How hearth's paged-attention kernels are launched, described once for the two places
//! that launch them: the CUDA path (cuda.rs) and the CPU emulator (emulated.rs), so the
//! emulator's tests exercise the grid, block, shared memory and argument order the GPU
//! gets. Shape checks and the launch limits live here too.
//!
//! A step's rows split in two: rows of sequences with one query (decodes) go through
//! the split-key kernel, a block per (row, kv head, partition of at most
//! [`DECODE_PARTITION_KEYS`] keys), whose last block per row and head group merges the
//! partitions (no combine kernel); the others (prefill chunks)
//! through the per-token kernel. Each kernel is launched only when it has rows.

use candle_core::{DType, Layout, Result};

use super::AttentionMetadata;

/// Warps per block.
pub(crate) const WARPS: u32 = 4;
/// Keys per partition of a decode row, at most (vLLM's PagedAttention v2 uses 512,
/// flash-decoding 256-ish); the merge reads one accumulator per partition.
pub const DECODE_PARTITION_KEYS: usize = 256;
/// The fewest: a step whose decode blocks would not make two per SM of an H100 (132)
/// halves its partitions down to this. At batch 1 with 8 kv heads and a 2k context,
/// 256-key partitions give 64 blocks (most SMs idle, the KV read limited by the bytes
/// 64 blocks keep in flight); 64-key ones give 256.
pub const MIN_DECODE_PARTITION_KEYS: usize = 64;
const DECODE_TARGET_BLOCKS: usize = 2 * 132;

/// Keys per partition for `decode_rows` rows of at most `max_keys` keys, each row's
/// partitions spread over `grid_y` blocks of heads.
pub(crate) fn decode_partition_keys(decode_rows: usize, grid_y: usize, max_keys: usize) -> usize {
    let mut p = DECODE_PARTITION_KEYS;
    while p > MIN_DECODE_PARTITION_KEYS
        && decode_rows * grid_y * max_keys.div_ceil(p) < DECODE_TARGET_BLOCKS
    {
        p /= 2;
    }
    p
}
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
    /// Tokens of single-query sequences (the split-key kernel's rows).
    DecodeRows,
    /// The other tokens (the per-token kernel's rows).
    PrefillRows,
    /// The split-key kernel's partial results, f32 scratch for one call.
    PartAcc,
    PartMax,
    PartSum,
    /// The split-key kernel's finished-block counters, u32 per (decode row, block
    /// row of grid y): zero before the first launch, left zero by every launch.
    Counters,
    // The fused RoPE + cache write's (rope_cache.rs).
    K,
    V,
    QOut,
    Cos,
    Sin,
    QNorm,
    KNorm,
    Positions,
    Slots,
    // The rest of a step's packed metadata (step_metadata.rs; read by candle's
    // embedding and index_select on CUDA).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    TokenIds,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    LogitsRows,
    // The fused layer ops' (layer_kernels.rs).
    Residual,
    Delta,
    NormWeight,
    SumOut,
    NormOut,
    GateUp,
    ActOut,
    // The small-batch GEMV's (gemv.rs): the weight, its bias, the input of the plain
    // kernel, the SiLU·mul prologue's two halves, the output.
    Weight,
    Bias,
    GemvIn,
    Gate,
    Up,
    GemvOut,
}

impl Buffer {
    /// The element type of the buffer's pointer in the kernel's signature, for a
    /// launch in `dtype` (the emulator's check; the CUDA path has typed slices).
    #[cfg_attr(not(hearth_cuda_emulator), allow(dead_code))]
    pub(crate) fn elem_code(self, dtype: DType) -> &'static str {
        match self {
            Buffer::Q
            | Buffer::KCache
            | Buffer::VCache
            | Buffer::Out
            | Buffer::K
            | Buffer::V
            | Buffer::QOut
            | Buffer::Cos
            | Buffer::Sin
            | Buffer::QNorm
            | Buffer::KNorm
            | Buffer::Residual
            | Buffer::Delta
            | Buffer::NormWeight
            | Buffer::SumOut
            | Buffer::NormOut
            | Buffer::GateUp
            | Buffer::ActOut
            | Buffer::Weight
            | Buffer::Bias
            | Buffer::GemvIn
            | Buffer::Gate
            | Buffer::Up
            | Buffer::GemvOut => match dtype {
                DType::F16 => "f16",
                DType::BF16 => "bf16",
                _ => "f32",
            },
            Buffer::PartAcc | Buffer::PartMax | Buffer::PartSum => "f32",
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

/// How the step's rows divide between the kernels: single-query sequences' tokens are
/// decode rows, the rest prefill rows.
pub(crate) struct RowSplit {
    pub decode: usize,
    pub prefill: usize,
    /// Keys of the longest decode row.
    pub max_keys: usize,
}

impl RowSplit {
    pub(crate) fn new(meta: &AttentionMetadata) -> Self {
        let (mut decode, mut max_keys) = (0, 0);
        for s in 0..meta.num_seqs() {
            if meta.query_start[s + 1] - meta.query_start[s] == 1 {
                decode += 1;
                max_keys = max_keys.max(meta.seq_lens[s] as usize);
            }
        }
        Self {
            decode,
            prefill: meta.num_tokens() - decode,
            max_keys,
        }
    }
}

/// The step's metadata as the kernels read it (never empty: a zero-length allocation
/// is not a valid kernel argument).
pub(crate) struct HostMeta {
    pub token_seq: Vec<u32>,
    pub query_start: Vec<u32>,
    pub seq_lens: Vec<u32>,
    pub block_tables: Vec<u32>,
    pub decode_rows: Vec<u32>,
    pub prefill_rows: Vec<u32>,
}

impl HostMeta {
    pub(crate) fn new(meta: &AttentionMetadata) -> Self {
        let mut token_seq = Vec::with_capacity(meta.num_tokens());
        let (mut decode_rows, mut prefill_rows) = (Vec::new(), Vec::new());
        for s in 0..meta.num_seqs() {
            let (a, b) = (meta.query_start[s], meta.query_start[s + 1]);
            token_seq.extend(std::iter::repeat_n(s as u32, (b - a) as usize));
            if b - a == 1 {
                decode_rows.push(a);
            } else {
                prefill_rows.extend(a..b);
            }
        }
        let nonempty = |v: &[u32]| if v.is_empty() { vec![0] } else { v.to_vec() };
        Self {
            token_seq: nonempty(&token_seq),
            query_start: nonempty(&meta.query_start),
            seq_lens: nonempty(&meta.seq_lens),
            block_tables: nonempty(&meta.block_tables),
            decode_rows: nonempty(&decode_rows),
            prefill_rows: nonempty(&prefill_rows),
        }
    }
}

/// One call's launches, in order, the f32 scratch buffers they share (elements), and
/// the u32 counters the split-key kernel needs zeroed before its first launch (the
/// kernel leaves them zero, so one zeroed buffer serves every layer of a step).
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub launches: Vec<Launch>,
    pub scratch: Vec<(Buffer, usize)>,
    pub counters: usize,
}

/// The launches for one call (shapes already checked, `s.tokens > 0`).
pub(crate) fn plan(meta: &AttentionMetadata, s: &Shapes, dtype: DType, scale: f32) -> Result<Plan> {
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
    let d = s.head_dim;
    let rows = RowSplit::new(meta);
    let mut plan = Plan {
        launches: Vec::with_capacity(2),
        scratch: Vec::new(),
        counters: 0,
    };
    // Each warp's (accumulator, max, sum) per head it holds, in f32.
    let warp_partials = WARPS * (per_block * (d + 2) * 4) as u32;
    let [max_blocks, heads, kv_heads, block_size] =
        [meta.max_blocks, s.heads, s.kv_heads, s.block_size].map(|x| Arg::I32(x as i32));
    if rows.prefill > 0 {
        plan.launches.push(Launch {
            kernel: format!("hearth_paged_attention_{name}_d{d}"),
            grid: [rows.prefill as u32, (s.kv_heads * groups) as u32, 1],
            block: [WARPS * 32, 1, 1],
            dynamic_shared_bytes: warp_partials,
            shared_opt_in: false,
            args: vec![
                Arg::Buffer(Buffer::Q),
                Arg::Buffer(Buffer::KCache),
                Arg::Buffer(Buffer::VCache),
                Arg::Buffer(Buffer::Out),
                Arg::Buffer(Buffer::PrefillRows),
                Arg::Buffer(Buffer::TokenSeq),
                Arg::Buffer(Buffer::QueryStart),
                Arg::Buffer(Buffer::SeqLens),
                Arg::Buffer(Buffer::BlockTables),
                max_blocks,
                heads,
                kv_heads,
                block_size,
                Arg::F32(scale),
            ],
        });
    }
    if rows.decode > 0 {
        let keys = decode_partition_keys(rows.decode, s.kv_heads * groups, rows.max_keys);
        let parts = rows.max_keys.div_ceil(keys);
        let partition = Arg::I32(keys as i32);
        let slots = rows.decode * s.heads * parts;
        plan.scratch = vec![
            (Buffer::PartAcc, slots * d),
            (Buffer::PartMax, slots),
            (Buffer::PartSum, slots),
        ];
        plan.counters = rows.decode * s.kv_heads * groups;
        plan.launches.push(Launch {
            kernel: format!("hearth_paged_attention_split_{name}_d{d}"),
            grid: [
                rows.decode as u32,
                (s.kv_heads * groups) as u32,
                parts as u32,
            ],
            block: [WARPS * 32, 1, 1],
            dynamic_shared_bytes: warp_partials,
            shared_opt_in: false,
            args: vec![
                Arg::Buffer(Buffer::Q),
                Arg::Buffer(Buffer::KCache),
                Arg::Buffer(Buffer::VCache),
                Arg::Buffer(Buffer::Out),
                Arg::Buffer(Buffer::PartAcc),
                Arg::Buffer(Buffer::PartMax),
                Arg::Buffer(Buffer::PartSum),
                Arg::Buffer(Buffer::Counters),
                Arg::Buffer(Buffer::DecodeRows),
                Arg::Buffer(Buffer::TokenSeq),
                Arg::Buffer(Buffer::QueryStart),
                Arg::Buffer(Buffer::SeqLens),
                Arg::Buffer(Buffer::BlockTables),
                max_blocks,
                heads,
                kv_heads,
                block_size,
                partition,
                Arg::I32(parts as i32),
                Arg::F32(scale),
            ],
        });
    }
    for l in &plan.launches {
        l.check(&SM90_LIMITS)?;
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::decode_partition_keys;

    /// Partitions shrink only while a step's decode blocks would not make two per SM.
    #[test]
    fn decode_partitions_shrink_to_fill_the_gpu() {
        // Batch 1, Llama-3-8B's 8 kv heads, 2k context: 64 blocks at 256 keys, 256 at 64.
        assert_eq!(decode_partition_keys(1, 8, 2048), 64);
        // 8k context: 128-key partitions make 512 blocks already.
        assert_eq!(decode_partition_keys(1, 8, 8192), 128);
        // A large batch keeps 256 (tests/cuda_emulator.rs's 66-row case: 396 blocks).
        assert_eq!(decode_partition_keys(66, 2, 599), 256);
        assert_eq!(decode_partition_keys(64, 8, 2048), 256);
        // Never below 64, however few the blocks.
        assert_eq!(decode_partition_keys(1, 1, 1), 64);
    }
}
