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

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(hearth_cuda_emulator)]
pub(crate) mod emulated;
mod kernel;
#[cfg(target_arch = "x86_64")]
mod lanes;
// The launch plans and shape checks are read by the CUDA path and the emulator only;
// a plain CPU build (e.g. a lone `-p hearth-server` build) compiles them unused.
#[cfg_attr(not(any(feature = "cuda", hearth_cuda_emulator)), allow(dead_code))]
pub(crate) mod launch;
#[cfg_attr(not(any(feature = "cuda", hearth_cuda_emulator)), allow(dead_code))]
mod rope_cache;
#[cfg(target_arch = "x86_64")]
mod tiled;
#[cfg(all(test, target_arch = "x86_64"))]
mod tiled_tests;
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

/// The step's layout, shared by every layer's attention call.
#[derive(Debug, Clone, Default)]
pub struct AttentionMetadata {
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
        cuda::forward(self.meta, self.scale, qs, ql, ks, kl, vs, vl)
    }
}

#[derive(Clone, Copy)]
struct Dims {
    h: usize,
    kvh: usize,
    d: usize,
    bs: usize,
}

/// The element types the cache may hold, read as f32.
pub(crate) trait Element: Copy + Send + Sync + 'static {
    fn load(src: &[Self], dst: &mut [f32]);
    fn store(src: &[f32], dst: &mut [Self]);
    /// f32 rows can be used in place, without a copy.
    fn as_f32(_src: &[Self]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_src: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    /// `load` for `src.len() % 8 == 0` on a CPU with AVX2 and F16C (the caller checks).
    ///
    /// # Safety
    /// `dst` has room for `src.len()` values.
    unsafe fn widen_avx2(src: &[Self], dst: *mut f32) {
        Self::load(src, std::slice::from_raw_parts_mut(dst, src.len()))
    }
}

impl Element for f32 {
    fn load(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    fn store(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    fn as_f32(src: &[f32]) -> Option<&[f32]> {
        Some(src)
    }
    fn as_f32_mut(src: &mut [f32]) -> Option<&mut [f32]> {
        Some(src)
    }
}

impl Element for f16 {
    fn load(src: &[f16], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst)
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn widen_avx2(src: &[f16], dst: *mut f32) {
        tiled::widen_f16(src.as_ptr().cast(), dst, src.len())
    }
    fn store(src: &[f32], dst: &mut [f16]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src)
    }
}

impl Element for bf16 {
    fn load(src: &[bf16], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst)
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn widen_avx2(src: &[bf16], dst: *mut f32) {
        tiled::widen_bf16(src.as_ptr().cast(), dst, src.len())
    }
    fn store(src: &[f32], dst: &mut [bf16]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src)
    }
}

#[derive(Clone, Copy)]
struct OutPtr<T>(*mut T);
unsafe impl<T> Send for OutPtr<T> {}
unsafe impl<T> Sync for OutPtr<T> {}

/// One unit of CPU work: a tile of one sequence's queries against one kv head.
#[derive(Clone, Copy)]
struct Item {
    seq: u32,
    kv_head: u32,
    q_begin: u32,
    q_end: u32,
}

/// Which CPU kernel runs the items: the fastest this CPU has for each (`Auto`), or one
/// forced for every item, so tests compare each SIMD path with the scalar one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CpuKernel {
    Auto,
    #[cfg_attr(not(test), allow(dead_code))]
    Scalar,
    #[cfg(target_arch = "x86_64")]
    #[cfg_attr(not(test), allow(dead_code))]
    TiledAvx2,
    #[cfg(target_arch = "x86_64")]
    #[cfg_attr(not(test), allow(dead_code))]
    TiledAvx512,
}

/// Queries and output in `Q`, the caches in `T`.
fn attend<Q: Element, T: Element>(
    q: &[Q],
    k: &[T],
    v: &[T],
    meta: &AttentionMetadata,
    dims: Dims,
    scale: f32,
    choice: CpuKernel,
) -> Vec<Q> {
    let t = meta.num_tokens();
    let mut out: Vec<Q> = Vec::with_capacity(t * dims.h * dims.d);
    let mut items = Vec::new();
    for s in 0..meta.num_seqs() {
        let (a, b) = (meta.query_start[s], meta.query_start[s + 1]);
        let mut q0 = a;
        while q0 < b {
            let q1 = (q0 + QUERY_TILE as u32).min(b);
            for kv_head in 0..dims.kvh as u32 {
                items.push(Item {
                    seq: s as u32,
                    kv_head,
                    q_begin: q0,
                    q_end: q1,
                });
            }
            q0 = q1;
        }
    }
    // Costliest first (most keys: a prompt's last query tiles see the most), so the
    // dynamic split ends evenly.
    items.sort_by_key(|it| {
        let s = it.seq as usize;
        let after_last = meta.seq_lens[s] - (meta.query_start[s + 1] - it.q_end);
        std::cmp::Reverse(after_last)
    });
    let ptr = OutPtr(out.as_mut_ptr());
    threads::parallel_chunks(items.len(), 0, |range| {
        let p = ptr;
        for it in &items[range] {
            // SAFETY: each item writes the rows of its own (query, head) pairs, which no
            // other item writes; `out` has capacity for all of them.
            unsafe { run_item(q, k, v, meta, dims, scale, *it, p.0, choice) };
        }
    });
    // SAFETY: the items cover every (token, head) row exactly once.
    unsafe { out.set_len(t * dims.h * dims.d) };
    out
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[allow(clippy::too_many_arguments)]
unsafe fn run_item<Q: Element, T: Element>(
    q: &[Q],
    k: &[T],
    v: &[T],
    meta: &AttentionMetadata,
    dims: Dims,
    scale: f32,
    it: Item,
    out: *mut Q,
    choice: CpuKernel,
) {
    SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        let s: &mut Vec<f32> = &mut scratch;
        match choice {
            CpuKernel::Auto => {}
            CpuKernel::Scalar => {
                return item_kernel::<Q, T, kernel::Scalar>(q, k, v, meta, dims, scale, it, out, s)
            }
            #[cfg(target_arch = "x86_64")]
            CpuKernel::TiledAvx2 => {
                return tiled::item_kernel_avx2::<Q, T>(q, k, v, meta, dims, scale, it, out, s)
            }
            #[cfg(target_arch = "x86_64")]
            CpuKernel::TiledAvx512 => {
                return tiled::item_kernel_avx512::<Q, T>(q, k, v, meta, dims, scale, it, out, s)
            }
        }
        #[cfg(target_arch = "x86_64")]
        if (it.q_end - it.q_begin) as usize * (dims.h / dims.kvh) >= TILED_MIN_ROWS
            && dims.d.is_multiple_of(8)
            && tiled::available()
        {
            return if tiled::available_avx512() {
                tiled::item_kernel_avx512::<Q, T>(q, k, v, meta, dims, scale, it, out, s)
            } else {
                tiled::item_kernel_avx2::<Q, T>(q, k, v, meta, dims, scale, it, out, s)
            };
        }
        #[cfg(target_arch = "x86_64")]
        if threads::has_avx2_fma() && dims.d.is_multiple_of(8) {
            return item_kernel::<Q, T, kernel::Avx2>(q, k, v, meta, dims, scale, it, out, s);
        }
        item_kernel::<Q, T, kernel::Scalar>(q, k, v, meta, dims, scale, it, out, s)
    })
}

/// Prefetches `n` key and value rows of `d` elements, `stride` apart from `base`.
#[inline(always)]
fn prefetch_rows<T>(k: &[T], v: &[T], base: usize, stride: usize, d: usize, n: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = d * std::mem::size_of::<T>();
        for j in 0..n {
            let at = base + j * stride;
            if at + d > k.len() || at + d > v.len() {
                return;
            }
            for off in (0..bytes).step_by(64) {
                // SAFETY: prefetching is a hint; the addresses are inside the caches.
                unsafe {
                    _mm_prefetch(k.as_ptr().add(at).cast::<i8>().add(off), _MM_HINT_T0);
                    _mm_prefetch(v.as_ptr().add(at).cast::<i8>().add(off), _MM_HINT_T0);
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (k, v, base, stride, d, n);
}

#[allow(clippy::too_many_arguments)]
unsafe fn item_kernel<Q: Element, T: Element, M: BlockMath>(
    q: &[Q],
    k: &[T],
    v: &[T],
    meta: &AttentionMetadata,
    dims: Dims,
    scale: f32,
    it: Item,
    out: *mut Q,
    scratch: &mut Vec<f32>,
) {
    let Dims { h, kvh, d, bs } = dims;
    let g = h / kvh;
    let s = it.seq as usize;
    let kv_head = it.kv_head as usize;
    let (qs0, qs1) = (
        meta.query_start[s] as usize,
        meta.query_start[s + 1] as usize,
    );
    let seq_len = meta.seq_lens[s] as usize;
    let first_pos = seq_len - (qs1 - qs0);
    let (t0, t1) = (it.q_begin as usize, it.q_end as usize);
    let rows = (t1 - t0) * g;
    // Row r is query token t0 + r / g, head kv_head * g + r % g; its position decides
    // which keys it sees.
    let pos = |r: usize| first_pos + (t0 - qs0) + r / g;
    let kv_end = pos(rows - 1) + 1;
    let table = &meta.block_tables[s * meta.max_blocks..(s + 1) * meta.max_blocks];

    let need = rows * d * 2 + rows * bs + rows * 2 + bs * d * 2 + d;
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    let (qbuf, rest) = scratch.split_at_mut(rows * d);
    let (acc, rest) = rest.split_at_mut(rows * d);
    let (scores, rest) = rest.split_at_mut(rows * bs);
    let (mstat, rest) = rest.split_at_mut(rows);
    let (lstat, rest) = rest.split_at_mut(rows);
    let (kbuf, rest) = rest.split_at_mut(bs * d);
    let (vbuf, rest) = rest.split_at_mut(bs * d);
    let tmp = &mut rest[..d];

    for r in 0..rows {
        let tok = t0 + r / g;
        let head = kv_head * g + r % g;
        let dst = &mut qbuf[r * d..(r + 1) * d];
        Q::load(&q[(tok * h + head) * d..][..d], dst);
        dst.iter_mut().for_each(|x| *x *= scale);
    }
    acc.fill(0.0);
    mstat.fill(f32::NEG_INFINITY);
    lstat.fill(0.0);

    let row_stride = kvh * d;
    let mut kp = [std::ptr::null::<f32>(); MAX_BLOCK_SIZE];
    let mut vp = [std::ptr::null::<f32>(); MAX_BLOCK_SIZE];
    let n_blocks = kv_end.div_ceil(bs);
    for (b, &block) in table.iter().enumerate().take(n_blocks) {
        let key0 = b * bs;
        let nk = bs.min(kv_end - key0);
        // Blocks are scattered through the cache, so the hardware prefetcher cannot see
        // the next one coming: ask for it (two ahead) while this one is computed.
        if let Some(&ahead) = table[..n_blocks].get(b + 2) {
            let base = (ahead as usize * bs * kvh + kv_head) * d;
            prefetch_rows(k, v, base, row_stride, d, bs.min(kv_end - (b + 2) * bs));
        }
        // This kv head's rows of the block, kv_heads · head_dim apart; f32 caches are
        // read in place, half-precision ones converted once per block.
        let base = (block as usize * bs * kvh + kv_head) * d;
        for j in 0..nk {
            let (kr, vr) = (
                &k[base + j * row_stride..][..d],
                &v[base + j * row_stride..][..d],
            );
            kp[j] = match T::as_f32(kr) {
                Some(f) => f.as_ptr(),
                None => {
                    T::load(kr, &mut kbuf[j * d..(j + 1) * d]);
                    kbuf[j * d..].as_ptr()
                }
            };
            vp[j] = match T::as_f32(vr) {
                Some(f) => f.as_ptr(),
                None => {
                    T::load(vr, &mut vbuf[j * d..(j + 1) * d]);
                    vbuf[j * d..].as_ptr()
                }
            };
        }
        M::scores(qbuf, rows, d, &kp[..nk], scores, bs);
        for r in 0..rows {
            let sr = &mut scores[r * bs..r * bs + nk];
            let visible = (pos(r) + 1).saturating_sub(key0).min(nk);
            let block_max = sr[..visible]
                .iter()
                .cloned()
                .fold(f32::NEG_INFINITY, f32::max);
            let m_old = mstat[r];
            let m_new = m_old.max(block_max);
            if m_new > m_old && m_old != f32::NEG_INFINITY {
                let c = crate::cpu_ops::exp(m_old - m_new);
                lstat[r] *= c;
                acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= c);
            }
            mstat[r] = m_new;
            if visible > 0 {
                lstat[r] += M::exp_sum(&mut sr[..visible], m_new);
            }
            // Keys past this row's position weigh nothing.
            sr[visible..].fill(0.0);
        }
        M::pv(acc, scores, rows, bs, &vp[..nk], d);
    }
    for r in 0..rows {
        let tok = t0 + r / g;
        let head = kv_head * g + r % g;
        let inv = 1.0 / lstat[r];
        for (x, a) in tmp.iter_mut().zip(&acc[r * d..(r + 1) * d]) {
            *x = a * inv;
        }
        let dst = std::slice::from_raw_parts_mut(out.add((tok * h + head) * d), d);
        Q::store(tmp, dst);
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
