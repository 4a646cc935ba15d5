//! One attention op for a whole engine step, the FlashAttention-varlen / vLLM shape:
//! the step's tokens are flattened (`[T, heads, head_dim]`), `query_start` marks where
//! each sequence's queries begin, `seq_lens` how many keys each has in the cache after
//! this step, and a block table per sequence says where those keys live. Decodes and
//! prefill chunks go through the same call; each query attends to the keys at or
//! before its own position (causality from positions, no mask tensor), read in place
//! from the paged cache `[num_blocks, block_size, kv_heads, head_dim]`: no gather of
//! the history, no padding to the longest sequence. Online softmax, f32 accumulation
//! whatever the cache dtype.
//!
//! CPU: work items are (sequence, kv-head, tile of ≤ 16 queries), spread over candle's
//! barrier pool, the costliest (latest queries) first; the query heads of a GQA group
//! share each key and value row they load. Items of ≥ 8 query rows (prefill) run
//! tiled.rs's packed kernel (64-key tiles, scores with rows in SIMD lanes, half caches
//! widened per tile with F16C; AVX-512 where the CPU has it, else AVX2); decodes stream
//! keys through kernel.rs.
//! CUDA (feature `cuda`): hearth's own kernels (kernels/paged_attention.cu): prefill
//! rows one thread block per (token, kv head, up to 8 heads of its GQA group); decode
//! rows split-key (partitions of [`DECODE_PARTITION_KEYS`] keys, the last block of a
//! row merging them); head
//! dims [`HEAD_DIMS`], with this CPU op as their reference; launched as launch.rs
//! describes, which the CPU emulator (crate::cuda_emulator, `paged_attention_emulated`)
//! shares, so `cargo test` runs the kernels' source without a GPU. The fused RoPE +
//! cache write (rope_cache.rs, kernels/rope_cache.cu) is planned the same way.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

use crate::threads;

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(hearth_cuda_emulator)]
pub(crate) mod emulated;
mod kernel;
#[cfg(target_arch = "x86_64")]
mod lanes;
mod llama_f32;
mod llama_flash;
#[cfg(target_arch = "x86_64")]
mod llama_flash_simd;
#[cfg(test)]
mod llama_flash_tests;
mod llama_flash_tiled;
// The launch plans and shape checks are read by the CUDA path and the emulator only;
// a plain CPU build (e.g. a lone `-p hearth-server` build) compiles them unused.
#[cfg_attr(not(any(feature = "cuda", hearth_cuda_emulator)), allow(dead_code))]
pub(crate) mod launch;
#[cfg_attr(not(any(feature = "cuda", hearth_cuda_emulator)), allow(dead_code))]
mod rope_cache;
#[cfg(all(test, target_arch = "x86_64"))]
mod stream_tests;
#[cfg(all(test, target_arch = "x86_64"))]
mod test_support;
#[cfg(target_arch = "x86_64")]
mod tiled;
#[cfg(all(test, target_arch = "x86_64"))]
mod tiled_tests;
pub(crate) use cpu::Element;
use cpu::*;
#[cfg(feature = "cuda")]
pub(crate) use cuda::preset as preset_device_metadata;
#[cfg(hearth_cuda_emulator)]
pub use emulated::{
    paged_attention_emulated, paged_attention_emulated_layers, rope_cache_emulated,
};
use kernel::BlockMath;
pub use launch::{
    LaunchLimits, DECODE_PARTITION_KEYS, HEAD_DIMS, MIN_DECODE_PARTITION_KEYS, SM90_LIMITS,
};
#[cfg(feature = "cuda")]
pub use rope_cache::rope_cache;
pub use rope_cache::RopeCacheInputs;

/// Queries per CPU work item: with GQA 3 that is 48 rows of scores and accumulators,
/// which stay in L1 next to one block of keys and values.
const QUERY_TILE: usize = 16;

/// Items with at least this many query rows (prefill chunks) take tiled.rs's packed
/// kernel; fewer (decodes: one token × its GQA group) stream keys through kernel.rs's.
#[cfg(target_arch = "x86_64")]
const TILED_MIN_ROWS: usize = 8;

/// Whose arithmetic the attention op follows (`--attention-numerics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AttentionNumerics {
    /// hearth's kernels: f32 scores, softmax and sums whatever the cache dtype.
    #[default]
    Hearth,
    /// llama.cpp's CPU attention to the bit, f32 activations on the CPU only: over an f16
    /// cache its flash attention (llama_flash.rs: f16 Q, an f16 running P·V sum, what
    /// an unmodified llama-server runs), over an f32 cache its attention without flash
    /// attention (llama_f32.rs: `llama-server -fa off -ctk f32 -ctv f32`). For agreeing
    /// with llama.cpp to the token, not for speed.
    LlamaCpp,
}

impl AttentionNumerics {
    /// `--attention-numerics`: `hearth` or `llama-cpp`.
    pub fn parse(name: &str) -> std::result::Result<Self, String> {
        match name {
            "hearth" => Ok(Self::Hearth),
            "llama-cpp" => Ok(Self::LlamaCpp),
            other => Err(format!(
                "attention_numerics {other:?} is not one of hearth, llama-cpp"
            )),
        }
    }

    /// Whether an engine computing in `compute` over a `cache` KV cache on `device` can
    /// follow these numerics: checked at start-up, so a wrong combination fails to load
    /// rather than failing every step.
    pub fn check(
        self,
        compute: candle_core::DType,
        cache: candle_core::DType,
        device: &Device,
    ) -> std::result::Result<(), String> {
        use candle_core::DType;
        if self == Self::LlamaCpp
            && (!device.is_cpu()
                || compute != DType::F32
                || !matches!(cache, DType::F16 | DType::F32))
        {
            return Err(format!(
                "attention_numerics llama-cpp needs the CPU, f32 activations and an f16 or f32 KV cache (got {}, {compute:?}, kv_cache_dtype {cache:?})",
                device_name(device)
            ));
        }
        Ok(())
    }
}

/// The step's layout, shared by every layer's attention call.
#[derive(Debug, Clone, Default)]
pub struct AttentionMetadata {
    /// Whose arithmetic the CPU kernels follow (the same for every step of an engine).
    pub numerics: AttentionNumerics,
    /// `S + 1` offsets into the flattened tokens: sequence `s` owns queries
    /// `query_start[s]..query_start[s + 1]`.
    pub query_start: Vec<u32>,
    /// Keys of each sequence in the cache once this step's are written; its queries
    /// are the last positions: query `i` of `q` sits at `seq_len - q + i`.
    pub seq_lens: Vec<u32>,
    /// Block ids, `max_blocks` per sequence (unused entries are 0).
    pub block_tables: Vec<u32>,
    pub max_blocks: usize,
    pub block_size: usize,
    /// Cache slot (`block * block_size + offset`) of each new token.
    pub slots: Vec<u32>,
    /// The same metadata on the GPU, uploaded by the first layer that needs it.
    #[cfg(feature = "cuda")]
    pub(crate) device: cuda::DeviceCache,
}

impl AttentionMetadata {
    pub fn new(block_size: usize) -> Self {
        Self {
            query_start: vec![0],
            block_size,
            ..Default::default()
        }
    }

    /// Appends a sequence with `query_len` new tokens and `seq_len` keys in total.
    /// `blocks` must cover `seq_len` keys.
    pub fn push(&mut self, query_len: usize, seq_len: usize, blocks: &[u32]) {
        let last = *self.query_start.last().unwrap_or(&0);
        self.query_start.push(last + query_len as u32);
        self.seq_lens.push(seq_len as u32);
        let bs = self.block_size;
        for p in seq_len - query_len..seq_len {
            self.slots
                .push(blocks[p / bs] * bs as u32 + (p % bs) as u32);
        }
        let need = seq_len.div_ceil(bs);
        if need > self.max_blocks {
            // Re-pad the rows already there to the new width.
            let old = self.max_blocks;
            let n = self.seq_lens.len() - 1;
            let mut t = Vec::with_capacity((n + 1) * need);
            for s in 0..n {
                t.extend_from_slice(&self.block_tables[s * old..(s + 1) * old]);
                t.extend(std::iter::repeat_n(0, need - old));
            }
            self.block_tables = t;
            self.max_blocks = need;
        }
        self.block_tables.extend_from_slice(&blocks[..need]);
        self.block_tables
            .extend(std::iter::repeat_n(0, self.max_blocks - need));
    }

    pub fn num_seqs(&self) -> usize {
        self.seq_lens.len()
    }

    pub fn num_tokens(&self) -> usize {
        *self.query_start.last().unwrap_or(&0) as usize
    }

    /// Sequence `s`'s queries: their tokens in the step and the first one's position
    /// (its queries are the sequence's last positions).
    pub(crate) fn queries(&self, s: usize) -> (std::ops::Range<usize>, usize) {
        let (a, b) = (
            self.query_start[s] as usize,
            self.query_start[s + 1] as usize,
        );
        (a..b, self.seq_lens[s] as usize - (b - a))
    }

    /// Checks the metadata against the cache before any kernel trusts it.
    fn validate(&self, t: usize, num_blocks: usize, block_size: usize) -> Result<()> {
        if block_size != self.block_size {
            candle_core::bail!(
                "paged attention: cache block size {block_size}, metadata {}",
                self.block_size
            );
        }
        if self.num_tokens() != t {
            candle_core::bail!(
                "paged attention: {t} query tokens but metadata covers {}",
                self.num_tokens()
            );
        }
        for s in 0..self.num_seqs() {
            let q = (self.query_start[s + 1] - self.query_start[s]) as usize;
            let l = self.seq_lens[s] as usize;
            if q > l || l.div_ceil(block_size) > self.max_blocks {
                candle_core::bail!("paged attention: sequence {s} has {q} queries, {l} keys");
            }
            let row = &self.block_tables[s * self.max_blocks..][..l.div_ceil(block_size)];
            if let Some(b) = row.iter().find(|&&b| b as usize >= num_blocks) {
                candle_core::bail!("paged attention: block {b} outside a cache of {num_blocks}");
            }
        }
        Ok(())
    }
}

/// `softmax(q·kᵀ·scale) · v` over the paged cache; `q` is `[T, heads, head_dim]`,
/// the caches `[num_blocks, block_size, kv_heads, head_dim]`, all of one dtype.
/// Returns `[T, heads, head_dim]`.
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &AttentionMetadata,
    scale: f32,
) -> Result<Tensor> {
    let q = q.contiguous()?;
    q.apply_op3_no_bwd(k_cache, v_cache, &PagedAttention { meta, scale })
}

struct PagedAttention<'a> {
    meta: &'a AttentionMetadata,
    scale: f32,
}

impl CustomOp3 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "hearth-paged-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (t, h, d) = ql.shape().dims3()?;
        let (nb, bs, kvh, d2) = kl.shape().dims4()?;
        if vl.shape() != kl.shape() || d2 != d || kvh == 0 || h % kvh != 0 {
            candle_core::bail!(
                "paged attention: q {:?}, k cache {:?}, v cache {:?}",
                ql.shape(),
                kl.shape(),
                vl.shape()
            );
        }
        if !ql.is_contiguous() || !kl.is_contiguous() || !vl.is_contiguous() {
            candle_core::bail!("paged attention: q and the caches must be contiguous");
        }
        self.meta.validate(t, nb, bs)?;
        let shape = Shape::from((t, h, d));
        let dims = Dims { h, kvh, d, bs };
        let (qo, ko, vo) = (ql.start_offset(), kl.start_offset(), vl.start_offset());
        let cache_len = nb * bs * kvh * d;
        if self.meta.numerics == AttentionNumerics::LlamaCpp {
            let out = match (qs, ks, vs) {
                (CpuStorage::F32(q), CpuStorage::F16(k), CpuStorage::F16(v)) => llama_flash::attend(
                    &q[qo..qo + t * h * d],
                    &k[ko..ko + cache_len],
                    &v[vo..vo + cache_len],
                    self.meta,
                    dims,
                    self.scale,
                ),
                (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => llama_f32::attend(
                    &q[qo..qo + t * h * d],
                    &k[ko..ko + cache_len],
                    &v[vo..vo + cache_len],
                    self.meta,
                    dims,
                    self.scale,
                ),
                _ => candle_core::bail!(
                    "paged attention: attention_numerics llama-cpp needs f32 queries over an f16 or f32 cache"
                ),
            };
            return Ok((CpuStorage::F32(out), shape));
        }
        macro_rules! run {
            ($q:expr, $k:expr, $v:expr, $variant:ident) => {{
                let out = attend(
                    &$q[qo..qo + t * h * d],
                    &$k[ko..ko + cache_len],
                    &$v[vo..vo + cache_len],
                    self.meta,
                    dims,
                    self.scale,
                    CpuKernel::Auto,
                );
                Ok((CpuStorage::$variant(out), shape))
            }};
        }
        match (qs, ks, vs) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => run!(q, k, v, F32),
            // A half-precision cache under f32 activations (`--kv-cache-dtype`).
            (CpuStorage::F32(q), CpuStorage::F16(k), CpuStorage::F16(v)) => run!(q, k, v, F32),
            (CpuStorage::F32(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => run!(q, k, v, F32),
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => run!(q, k, v, F16),
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                run!(q, k, v, BF16)
            }
            _ => {
                candle_core::bail!(
                    "paged attention: q and caches must share one of f32, f16, bf16 (or f32 q with a half cache)"
                )
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if self.meta.numerics != AttentionNumerics::Hearth {
            candle_core::bail!("paged attention: attention_numerics llama-cpp is CPU-only");
        }
        cuda::forward(self.meta, self.scale, qs, ql, ks, kl, vs, vl)
    }
}

/// Largest head dimension and block size the CPU kernel takes (its stack buffers).
pub const MAX_HEAD_DIM: usize = 512;
pub const MAX_BLOCK_SIZE: usize = 64;

/// Checks a model/cache shape against what the op supports on the device it will run
/// on, once at start-up: a model the kernel cannot serve fails to load, naming the value
/// and the device, rather than failing every request.
pub fn check_supported(
    head_dim: usize,
    group: usize,
    block_size: usize,
    device: &Device,
) -> Result<()> {
    match device {
        Device::Cpu => {
            if head_dim > MAX_HEAD_DIM || block_size > MAX_BLOCK_SIZE {
                candle_core::bail!(
                    "paged attention on the CPU takes head_dim <= {MAX_HEAD_DIM} and block_size <= {MAX_BLOCK_SIZE} (got {head_dim}, {block_size})"
                );
            }
            Ok(())
        }
        Device::Cuda(_) => launch::supports(head_dim, group).map_err(|e| {
            candle_core::Error::Msg(format!(
                "paged attention on {}: the model's {e}",
                device_name(device)
            ))
        }),
        _ => candle_core::bail!("paged attention has no kernel for {}", device_name(device)),
    }
}

fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "the CPU".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("CUDA device {gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("Metal device {gpu_id}"),
    }
}

/// The kernels one layer's attention call launches on CUDA for this step's `meta`
/// (launch.rs's plan: the per-token kernel when there are prefill rows, the split-key
/// kernel when there are decode rows); what the launch counter sees per layer.
pub fn cuda_launches(
    meta: &AttentionMetadata,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    num_blocks: usize,
    dtype: candle_core::DType,
) -> Result<usize> {
    let s = launch::Shapes {
        tokens: meta.num_tokens(),
        heads,
        kv_heads,
        head_dim,
        num_blocks,
        block_size: meta.block_size,
    };
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        candle_core::bail!("paged attention: {heads} heads over {kv_heads} kv heads");
    }
    if s.tokens == 0 {
        return Ok(0);
    }
    meta.validate(s.tokens, num_blocks, meta.block_size)?;
    Ok(launch::plan(meta, &s, dtype, 1.0)?.launches.len())
}
