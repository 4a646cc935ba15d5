//! The op's CUDA path: hearth's own kernels (kernels/paged_attention.cu, compiled to PTX
//! by build.rs) launched through candle's custom-op API, as launch.rs plans them
//! (per-token kernel for prefill rows, split-key with its merge folded in for decode
//! rows). The step's
//! metadata comes in the model's one packed upload per step (step_metadata.rs), read
//! by every layer's call.

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

use super::launch::{self, Arg, Buffer, HostMeta};
use super::rope_cache::{self, RopeCacheInputs, RopeCacheShapes};
use super::AttentionMetadata;
use crate::step_metadata::{self, PackedLayout};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));

/// The metadata on the device, made once per step: the parts of the step's packed
/// buffer (step_metadata.rs; the model uploads it with one copy and hands it over with
/// [`preset`]). It also keeps the step's launch plans, so that the check of the
/// metadata against the cache and the planning (kernel names included) run once per
/// step, not once per layer.
pub(crate) struct DeviceMeta {
    /// U32, one dimension: the whole packed buffer.
    packed: Tensor,
    parts: Vec<(Buffer, std::ops::Range<usize>)>,
    plans: std::sync::Mutex<Vec<(PlanKey, Arc<launch::Plan>)>>,
    /// The split-key kernel's counters, zeroed once per step (a memset, no kernel) and
    /// left zero by every launch, so every layer of the step reuses them.
    counters: std::sync::Mutex<Option<CudaSlice<u32>>>,
}

/// What a plan depends on besides the step's metadata.
type PlanKey = ([usize; 6], DType, u32);

impl DeviceMeta {
    /// The validated plan for these shapes, made by the first layer that asks.
    fn plan(
        &self,
        meta: &AttentionMetadata,
        s: &launch::Shapes,
        dtype: DType,
        scale: f32,
    ) -> Result<Arc<launch::Plan>> {
        let key: PlanKey = (
            [
                s.tokens,
                s.heads,
                s.kv_heads,
                s.head_dim,
                s.num_blocks,
                s.block_size,
            ],
            dtype,
            scale.to_bits(),
        );
        let mut plans = self
            .plans
            .lock()
            .map_err(|_| candle_core::Error::Msg("paged attention: plan cache poisoned".into()))?;
        if let Some((_, p)) = plans.iter().find(|(k, _)| *k == key) {
            return Ok(p.clone());
        }
        meta.validate(s.tokens, s.num_blocks, s.block_size)?;
        let p = Arc::new(launch::plan(meta, s, dtype, scale)?);
        plans.push((key, p.clone()));
        Ok(p)
    }

    /// Each attention part as a kernel argument, read from the packed buffer.
    fn views<'a>(&self, all: &'a CudaSlice<u32>) -> Vec<(Buffer, CudaView<'a, u32>)> {
        self.parts
            .iter()
            .map(|(b, r)| (*b, all.slice(r.clone())))
            .collect()
    }
}

/// A lazily filled per-step cache of the device copy (a fresh one when cloned).
#[derive(Default)]
pub struct DeviceCache(OnceLock<Arc<DeviceMeta>>);

impl Clone for DeviceCache {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for DeviceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceCache")
    }
}

/// Hands the step's uploaded buffer to the attention calls: `packed` (U32, the whole
/// buffer on the device) laid out as `layout`, which holds the attention parts.
pub(crate) fn preset(
    meta: &AttentionMetadata,
    packed: &Tensor,
    layout: &PackedLayout,
) -> Result<()> {
    let dm = Arc::new(device_meta_from(packed, layout)?);
    // A second call in one step keeps the first buffer: the same data.
    let _ = meta.device.0.set(dm);
    Ok(())
}

fn device_meta_from(packed: &Tensor, layout: &PackedLayout) -> Result<DeviceMeta> {
    // The parts are read from the raw storage: a view starting elsewhere would shift them.
    if packed.layout().start_offset() != 0 {
        candle_core::bail!("paged attention: the packed metadata is a view, not the buffer");
    }
    let host_parts = [
        Buffer::TokenSeq,
        Buffer::QueryStart,
        Buffer::SeqLens,
        Buffer::BlockTables,
        Buffer::DecodeRows,
        Buffer::PrefillRows,
    ];
    let mut parts = Vec::with_capacity(host_parts.len());
    for b in host_parts {
        let r = layout
            .kernel_range(b)
            .ok_or_else(|| candle_core::Error::Msg(format!("paged attention: no {b:?} packed")))?;
        if packed.dtype() != DType::U32 || packed.rank() != 1 || r.end > packed.dim(0)? {
            candle_core::bail!("paged attention: {b:?} at {r:?} outside the packed metadata");
        }
        parts.push((b, r));
    }
    Ok(DeviceMeta {
        packed: packed.clone(),
        parts,
        plans: std::sync::Mutex::new(Vec::new()),
        counters: std::sync::Mutex::new(None),
    })
}

/// The step's device metadata: the model's packed upload ([`preset`]), or (a call
/// outside a model step) the attention parts packed and uploaded here, once per step.
fn device_meta(meta: &AttentionMetadata, dev: &CudaDevice) -> Result<Arc<DeviceMeta>> {
    if let Some(m) = meta.device.0.get() {
        return Ok(m.clone());
    }
    let host = HostMeta::new(meta);
    let (layout, packed) = step_metadata::pack(&step_metadata::attention_parts(&host))?;
    let n = packed.len();
    let packed = Tensor::from_storage(
        candle_core::Storage::Cuda(CudaStorage::wrap_cuda_slice(
            dev.clone_htod(&packed)?,
            dev.clone(),
        )),
        n,
        candle_core::op::BackpropOp::none(),
        false,
    );
    let m = Arc::new(device_meta_from(&packed, &layout)?);
    Ok(meta.device.0.get_or_init(|| m).clone())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    meta: &AttentionMetadata,
    scale: f32,
    qs: &CudaStorage,
    ql: &Layout,
    ks: &CudaStorage,
    kl: &Layout,
    vs: &CudaStorage,
    vl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let s = launch::shapes(ql, kl, vl)?;
    let dev = qs.device().clone();
    let shape = Shape::from((s.tokens, s.heads, s.head_dim));
    if s.tokens == 0 {
        meta.validate(s.tokens, s.num_blocks, s.block_size)?;
        return Ok((qs.try_clone(ql)?, shape));
    }
    let dtype = qs.dtype();
    let dm = device_meta(meta, &dev)?;
    let plan = dm.plan(meta, &s, dtype, scale)?;
    // The split-key kernel reads key and value rows with 16-byte loads.
    for (what, l) in [("k", kl), ("v", vl)] {
        if !(l.start_offset() * dtype.size_in_bytes()).is_multiple_of(16) {
            candle_core::bail!("paged attention: the {what} cache is not 16-byte aligned");
        }
    }
    // f32 scratch of the split-key kernel.
    let mut scratch: Vec<(Buffer, CudaSlice<f32>)> = Vec::with_capacity(plan.scratch.len());
    for &(b, n) in &plan.scratch {
        // SAFETY: the merging block reads only partitions the other blocks wrote (and
        // counted after writing).
        scratch.push((b, unsafe { dev.alloc::<f32>(n)? }));
    }
    let mut counters = dm
        .counters
        .lock()
        .map_err(|_| candle_core::Error::Msg("paged attention: counters poisoned".into()))?;
    if plan.counters > 0 && counters.as_ref().is_none_or(|c| c.len() < plan.counters) {
        *counters = Some(dev.alloc_zeros::<u32>(plan.counters)?);
    }
    macro_rules! launch {
        ($ty:ty) => {{
            let q: CudaView<$ty> = qs.as_cuda_slice::<$ty>()?.slice(ql.start_offset()..);
            let k: CudaView<$ty> = ks.as_cuda_slice::<$ty>()?.slice(kl.start_offset()..);
            let v: CudaView<$ty> = vs.as_cuda_slice::<$ty>()?.slice(vl.start_offset()..);
            // SAFETY: every row is written by one of the kernels (prefill rows by the
            // per-token kernel, decode rows by the split-key kernel's merging blocks).
            let out: CudaSlice<$ty> = unsafe { dev.alloc::<$ty>(s.tokens * s.heads * s.head_dim)? };
            let (packed, _) = dm.packed.storage_and_layout();
            let candle_core::Storage::Cuda(packed) = &*packed else {
                candle_core::bail!("paged attention: the packed metadata is not on the GPU")
            };
            let meta_views = dm.views(packed.as_cuda_slice::<u32>()?);
            for l in &plan.launches {
                let func = dev.get_or_load_custom_func(&l.kernel, "hearth_paged_attention", PTX)?;
                let cfg = LaunchConfig {
                    grid_dim: (l.grid[0], l.grid[1], l.grid[2]),
                    block_dim: (l.block[0], l.block[1], l.block[2]),
                    shared_mem_bytes: l.dynamic_shared_bytes,
                };
                if l.shared_opt_in {
                    candle_core::bail!("{}: shared-memory opt-in is not wired up", l.kernel);
                }
                let mut b = func.builder();
                for a in &l.args {
                    match a {
                        Arg::Buffer(Buffer::Q) => b.arg(&q),
                        Arg::Buffer(Buffer::KCache) => b.arg(&k),
                        Arg::Buffer(Buffer::VCache) => b.arg(&v),
                        Arg::Buffer(Buffer::Out) => b.arg(&out),
                        Arg::Buffer(Buffer::Counters) => match counters.as_ref() {
                            Some(c) => b.arg(c),
                            None => candle_core::bail!("{}: no counters", l.kernel),
                        },
                        Arg::Buffer(m) => {
                            if let Some((_, view)) = meta_views.iter().find(|(x, _)| x == m) {
                                b.arg(view)
                            } else if let Some((_, slice)) = scratch.iter().find(|(x, _)| x == m) {
                                b.arg(slice)
                            } else {
                                candle_core::bail!("{}: no device buffer for {m:?}", l.kernel)
                            }
                        }
                        Arg::I32(x) => b.arg(x),
                        Arg::F32(x) => b.arg(x),
                    };
                }
                // SAFETY: launch.rs's argument lists are the kernels' signatures (the
                // emulator's tests check them against the compiled source); the metadata
                // was validated against the shapes above.
                unsafe { b.launch(cfg) }.w()?;
                crate::launch_count::note(1);
            }
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
        }};
    }
    match dtype {
        DType::F32 => launch!(f32),
        DType::F16 => launch!(f16),
        DType::BF16 => launch!(bf16),
        _ => candle_core::bail!("paged attention: q and caches must be f32, f16 or bf16"),
    }
}

const ROPE_CACHE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rope_cache.ptx"));

/// The fused RoPE + cache write on q's device: `rope_cache.rs` plans it, this launches
/// it as a custom op on q (whose output is the rotated q); the caches are written in
/// place through their device pointers, as candle's own in-place ops do.
pub(super) struct RopeCacheOp<'a> {
    pub x: &'a RopeCacheInputs<'a>,
    /// `x.positions` and `x.slots` on the device (U32), uploaded once per step.
    pub positions: &'a Tensor,
    pub slots: &'a Tensor,
    pub k_cache: &'a Tensor,
    pub v_cache: &'a Tensor,
    pub shapes: RopeCacheShapes,
}

impl candle_core::CustomOp1 for RopeCacheOp<'_> {
    fn name(&self) -> &'static str {
        "hearth-rope-cache"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("rope + cache write: the fused kernel is CUDA only")
    }

    fn cuda_fwd(&self, qs: &CudaStorage, ql: &Layout) -> Result<(CudaStorage, Shape)> {
        let s = &self.shapes;
        let dtype = qs.dtype();
        let dev = qs.device().clone();
        let plan = rope_cache::plan(s, dtype, self.x.norms.map(|n| n.2))?;
        for (what, t) in [("positions", self.positions), ("slots", self.slots)] {
            if t.dtype() != DType::U32 || t.dims() != [s.tokens] || !t.is_contiguous() {
                candle_core::bail!(
                    "rope + cache write: device {what} must be U32 [{}]",
                    s.tokens
                );
            }
        }
        let mut others: Vec<(Buffer, &Tensor)> = vec![
            (Buffer::K, self.x.k),
            (Buffer::V, self.x.v),
            (Buffer::KCache, self.k_cache),
            (Buffer::VCache, self.v_cache),
            (Buffer::Cos, self.x.cos),
            (Buffer::Sin, self.x.sin),
            (Buffer::Positions, self.positions),
            (Buffer::Slots, self.slots),
        ];
        if let Some((qn, kn, _)) = self.x.norms {
            others.extend([(Buffer::QNorm, qn), (Buffer::KNorm, kn)]);
        }
        // Read guards for the launch's duration (the caches' included: the kernel writes
        // them on the device, where no host reference reaches).
        let guards: Vec<(Buffer, _)> = others
            .iter()
            .map(|(b, t)| (*b, t.storage_and_layout()))
            .collect();
        let storage = |b: Buffer| -> Result<(&CudaStorage, usize)> {
            match guards.iter().find(|(x, _)| *x == b) {
                Some((_, (g, l))) => match &**g {
                    candle_core::Storage::Cuda(c) => Ok((c, l.start_offset())),
                    _ => candle_core::bail!("rope + cache write: {b:?} is not on the GPU"),
                },
                None => candle_core::bail!("rope + cache write: no tensor for {b:?}"),
            }
        };
        let (pos, pos_at) = storage(Buffer::Positions)?;
        let (slots, slots_at) = storage(Buffer::Slots)?;
        let pos = pos.as_cuda_slice::<u32>()?.slice(pos_at..);
        let slots = slots.as_cuda_slice::<u32>()?.slice(slots_at..);
        let cfg = LaunchConfig {
            grid_dim: (plan.grid[0], plan.grid[1], plan.grid[2]),
            block_dim: (plan.block[0], plan.block[1], plan.block[2]),
            shared_mem_bytes: plan.dynamic_shared_bytes,
        };
        macro_rules! launch {
            ($ty:ty) => {{
                let view = |b: Buffer| -> Result<CudaView<'_, $ty>> {
                    let (st, at) = storage(b)?;
                    Ok(st.as_cuda_slice::<$ty>()?.slice(at..))
                };
                let q: CudaView<$ty> = qs.as_cuda_slice::<$ty>()?.slice(ql.start_offset()..);
                // SAFETY: every element is written by the kernel.
                let out: CudaSlice<$ty> =
                    unsafe { dev.alloc::<$ty>(s.tokens * s.heads * s.head_dim)? };
                let mut views: Vec<(Buffer, CudaView<'_, $ty>)> = Vec::new();
                for a in &plan.args {
                    if let Arg::Buffer(b) = a {
                        if !matches!(
                            b,
                            Buffer::Q | Buffer::QOut | Buffer::Positions | Buffer::Slots
                        ) {
                            views.push((*b, view(*b)?));
                        }
                    }
                }
                let func =
                    dev.get_or_load_custom_func(&plan.kernel, "hearth_rope_cache", ROPE_CACHE_PTX)?;
                let mut b = func.builder();
                for a in &plan.args {
                    match a {
                        Arg::Buffer(Buffer::Q) => b.arg(&q),
                        Arg::Buffer(Buffer::QOut) => b.arg(&out),
                        Arg::Buffer(Buffer::Positions) => b.arg(&pos),
                        Arg::Buffer(Buffer::Slots) => b.arg(&slots),
                        Arg::Buffer(m) => match views.iter().find(|(x, _)| x == m) {
                            Some((_, v)) => b.arg(v),
                            None => {
                                candle_core::bail!("{}: no device buffer for {m:?}", plan.kernel)
                            }
                        },
                        Arg::I32(x) => b.arg(x),
                        Arg::F32(x) => b.arg(x),
                    };
                }
                // SAFETY: the argument list is the kernel's signature (checked against the
                // source by the emulator's tests); positions and slots were checked
                // against the tables and the cache on the host (rope_cache::check).
                unsafe { b.launch(cfg) }.w()?;
                crate::launch_count::note(1);
                Ok((
                    CudaStorage::wrap_cuda_slice(out, dev.clone()),
                    Shape::from((s.tokens, s.heads, s.head_dim)),
                ))
            }};
        }
        match dtype {
            DType::F32 => launch!(f32),
            DType::F16 => launch!(f16),
            DType::BF16 => launch!(bf16),
            _ => candle_core::bail!("rope + cache write: tensors must be f32, f16 or bf16"),
        }
    }
}
