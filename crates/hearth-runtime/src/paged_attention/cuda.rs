//! The op's CUDA path: hearth's own kernel (kernels/paged_attention.cu, compiled to PTX
//! by build.rs) launched through candle's custom-op API, as launch.rs describes it. The
//! step's metadata is uploaded once, on the first layer's call, and reused by the
//! others.

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape};
use half::{bf16, f16};

use super::launch::{self, Arg, Buffer, HostMeta};
use super::AttentionMetadata;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));

/// The metadata on the device, made once per step.
pub(super) struct DeviceMeta {
    token_seq: CudaSlice<u32>,
    query_start: CudaSlice<u32>,
    seq_lens: CudaSlice<u32>,
    block_tables: CudaSlice<u32>,
}

impl DeviceMeta {
    fn get(&self, b: Buffer) -> Option<&CudaSlice<u32>> {
        match b {
            Buffer::TokenSeq => Some(&self.token_seq),
            Buffer::QueryStart => Some(&self.query_start),
            Buffer::SeqLens => Some(&self.seq_lens),
            Buffer::BlockTables => Some(&self.block_tables),
            _ => None,
        }
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

fn device_meta(meta: &AttentionMetadata, dev: &CudaDevice) -> Result<Arc<DeviceMeta>> {
    if let Some(m) = meta.device.0.get() {
        return Ok(m.clone());
    }
    let host = HostMeta::new(meta);
    let m = Arc::new(DeviceMeta {
        token_seq: dev.clone_htod(&host.token_seq)?,
        query_start: dev.clone_htod(&host.query_start)?,
        seq_lens: dev.clone_htod(&host.seq_lens)?,
        block_tables: dev.clone_htod(&host.block_tables)?,
    });
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
    meta.validate(s.tokens, s.num_blocks, s.block_size)?;
    let dev = qs.device().clone();
    let shape = Shape::from((s.tokens, s.heads, s.head_dim));
    if s.tokens == 0 {
        return Ok((qs.try_clone(ql)?, shape));
    }
    let dtype = qs.dtype();
    let plan = launch::plan(meta, &s, dtype, scale)?;
    let dm = device_meta(meta, &dev)?;
    macro_rules! launch {
        ($ty:ty) => {{
            let q: CudaView<$ty> = qs.as_cuda_slice::<$ty>()?.slice(ql.start_offset()..);
            let k: CudaView<$ty> = ks.as_cuda_slice::<$ty>()?.slice(kl.start_offset()..);
            let v: CudaView<$ty> = vs.as_cuda_slice::<$ty>()?.slice(vl.start_offset()..);
            // SAFETY: every element is written by the kernel.
            let out: CudaSlice<$ty> = unsafe { dev.alloc::<$ty>(s.tokens * s.heads * s.head_dim)? };
            let func = dev.get_or_load_custom_func(&plan.kernel, "hearth_paged_attention", PTX)?;
            let cfg = LaunchConfig {
                grid_dim: (plan.grid[0], plan.grid[1], plan.grid[2]),
                block_dim: (plan.block[0], plan.block[1], plan.block[2]),
                shared_mem_bytes: plan.dynamic_shared_bytes,
            };
            if plan.shared_opt_in {
                candle_core::bail!("{}: shared-memory opt-in is not wired up", plan.kernel);
            }
            let mut b = func.builder();
            for a in &plan.args {
                match a {
                    Arg::Buffer(Buffer::Q) => b.arg(&q),
                    Arg::Buffer(Buffer::KCache) => b.arg(&k),
                    Arg::Buffer(Buffer::VCache) => b.arg(&v),
                    Arg::Buffer(Buffer::Out) => b.arg(&out),
                    Arg::Buffer(m) => match dm.get(*m) {
                        Some(slice) => b.arg(slice),
                        None => candle_core::bail!("{}: no device buffer for {m:?}", plan.kernel),
                    },
                    Arg::I32(x) => b.arg(x),
                    Arg::F32(x) => b.arg(x),
                };
            }
            // SAFETY: launch.rs's argument list is the kernel's signature (the emulator's
            // tests check it against the compiled source); the metadata was validated
            // against the shapes above.
            unsafe { b.launch(cfg) }.w()?;
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
