//! The op's CUDA path: hearth's own kernel (kernels/paged_attention.cu, compiled to PTX
//! by build.rs) launched through candle's custom-op API. The step's metadata is
//! uploaded once, on the first layer's call, and reused by the others.

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape};
use half::{bf16, f16};

use super::AttentionMetadata;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));
const MAX_GROUP: usize = 8;
const WARPS: u32 = 4;

/// The metadata on the device, made once per step.
pub(super) struct DeviceMeta {
    token_seq: CudaSlice<u32>,
    query_start: CudaSlice<u32>,
    seq_lens: CudaSlice<u32>,
    block_tables: CudaSlice<u32>,
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
    let mut token_seq = Vec::with_capacity(meta.num_tokens());
    for s in 0..meta.num_seqs() {
        let n = (meta.query_start[s + 1] - meta.query_start[s]) as usize;
        token_seq.extend(std::iter::repeat_n(s as u32, n));
    }
    // Never an empty upload: a zero-length allocation is not a valid kernel argument.
    let nonempty = |v: &[u32]| if v.is_empty() { vec![0] } else { v.to_vec() };
    let m = Arc::new(DeviceMeta {
        token_seq: dev.clone_htod(&nonempty(&token_seq))?,
        query_start: dev.clone_htod(&nonempty(&meta.query_start))?,
        seq_lens: dev.clone_htod(&nonempty(&meta.seq_lens))?,
        block_tables: dev.clone_htod(&nonempty(&meta.block_tables))?,
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
    let (t, h, d) = ql.shape().dims3()?;
    let (nb, bs, kvh, d2) = kl.shape().dims4()?;
    if vl.shape() != kl.shape() || d2 != d || kvh == 0 || h % kvh != 0 {
        candle_core::bail!(
            "paged attention: q {:?}, caches {:?}",
            ql.shape(),
            kl.shape()
        );
    }
    if !ql.is_contiguous() || !kl.is_contiguous() || !vl.is_contiguous() {
        candle_core::bail!("paged attention: q and the caches must be contiguous");
    }
    let g = h / kvh;
    let epl = d / 32;
    if d % 32 != 0 || !matches!(epl, 2 | 4 | 8) || g > MAX_GROUP {
        candle_core::bail!(
            "paged attention on CUDA takes head_dim 64, 128 or 256 and at most {MAX_GROUP} query heads per kv head (got {d}, {g})"
        );
    }
    meta.validate(t, nb, bs)?;
    let dev = qs.device().clone();
    let shape = Shape::from((t, h, d));
    if t == 0 {
        return Ok((qs.try_clone(ql)?, shape));
    }
    let dm = device_meta(meta, &dev)?;
    macro_rules! launch {
        ($ty:ty, $name:literal) => {{
            let q = qs.as_cuda_slice::<$ty>()?.slice(ql.start_offset()..);
            let k = ks.as_cuda_slice::<$ty>()?.slice(kl.start_offset()..);
            let v = vs.as_cuda_slice::<$ty>()?.slice(vl.start_offset()..);
            // SAFETY: every element is written by the kernel.
            let out: CudaSlice<$ty> = unsafe { dev.alloc::<$ty>(t * h * d)? };
            let func = dev.get_or_load_custom_func(
                &format!("hearth_paged_attention_{}_{epl}", $name),
                "hearth_paged_attention",
                PTX,
            )?;
            let cfg = LaunchConfig {
                grid_dim: (t as u32, kvh as u32, 1),
                block_dim: (WARPS * 32, 1, 1),
                shared_mem_bytes: WARPS * (g * (d + 2) * 4) as u32,
            };
            let (max_blocks, heads, kv_heads, block_size) =
                (meta.max_blocks as i32, h as i32, kvh as i32, bs as i32);
            let mut b = func.builder();
            b.arg(&q);
            b.arg(&k);
            b.arg(&v);
            b.arg(&out);
            b.arg(&dm.token_seq);
            b.arg(&dm.query_start);
            b.arg(&dm.seq_lens);
            b.arg(&dm.block_tables);
            b.arg(&max_blocks);
            b.arg(&heads);
            b.arg(&kv_heads);
            b.arg(&block_size);
            b.arg(&scale);
            // SAFETY: argument types and order match the kernel's signature; the
            // metadata was validated against the shapes above.
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
        }};
    }
    match &qs.slice {
        CudaStorageSlice::F32(_) => launch!(f32, "f32"),
        CudaStorageSlice::F16(_) => launch!(f16, "f16"),
        CudaStorageSlice::BF16(_) => launch!(bf16, "bf16"),
        _ => candle_core::bail!("paged attention: q and caches must be f32, f16 or bf16"),
    }
}
