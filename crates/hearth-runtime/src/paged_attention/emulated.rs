//! The op's CUDA path run on the CPU emulator (crate::cuda_emulator): the same kernel
//! source, the same launch (launch.rs) as cuda.rs, on CPU tensors. For tests: it is
//! how the CUDA kernel is checked against the CPU op where no GPU is.

use candle_core::{DType, Device, Result, Tensor};

use super::launch::{self, Arg, Buffer, HostMeta, SM90_LIMITS};
use super::AttentionMetadata;
use crate::cuda_emulator::{DeviceBuffer, Emulator, KernelArg, LaunchGeometry};

fn to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_ne_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_ne_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_ne_bytes())
            .collect(),
        d => candle_core::bail!("paged attention: {d:?} is not f32, f16 or bf16"),
    })
}

fn from_bytes(b: &[u8], dtype: DType, shape: (usize, usize, usize)) -> Result<Tensor> {
    let dev = Device::Cpu;
    match dtype {
        DType::F32 => {
            let v: Vec<f32> = b
                .chunks_exact(4)
                .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Tensor::from_vec(v, shape, &dev)
        }
        DType::F16 => {
            let v: Vec<half::f16> = b
                .chunks_exact(2)
                .map(|c| half::f16::from_ne_bytes([c[0], c[1]]))
                .collect();
            Tensor::from_vec(v, shape, &dev)
        }
        _ => {
            let v: Vec<half::bf16> = b
                .chunks_exact(2)
                .map(|c| half::bf16::from_ne_bytes([c[0], c[1]]))
                .collect();
            Tensor::from_vec(v, shape, &dev)
        }
    }
}

/// [`super::paged_attention`] as the CUDA kernel computes it, run by `emu` on the CPU.
pub fn paged_attention_emulated(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &AttentionMetadata,
    scale: f32,
    emu: &Emulator,
) -> Result<Tensor> {
    let q = q.contiguous()?;
    let s = launch::shapes(q.layout(), k_cache.layout(), v_cache.layout())?;
    if k_cache.dtype() != q.dtype() || v_cache.dtype() != q.dtype() {
        candle_core::bail!("paged attention: q and caches must share one dtype");
    }
    meta.validate(s.tokens, s.num_blocks, s.block_size)?;
    let dtype = q.dtype();
    let shape = (s.tokens, s.heads, s.head_dim);
    if s.tokens == 0 {
        return Tensor::zeros(shape, dtype, &Device::Cpu);
    }
    let plan = launch::plan(meta, &s, dtype, scale)?;
    let host = HostMeta::new(meta);
    let code = Buffer::Q.elem_code(dtype);
    let mut qb = DeviceBuffer::from_bytes(&to_bytes(&q)?, code);
    let mut kb = DeviceBuffer::from_bytes(&to_bytes(k_cache)?, code);
    let mut vb = DeviceBuffer::from_bytes(&to_bytes(v_cache)?, code);
    let mut ob = DeviceBuffer::uninit(
        s.tokens * s.heads * s.head_dim * dtype.size_in_bytes(),
        code,
    );
    let u32_bytes = |v: &[u32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_ne_bytes()).collect() };
    let mut metas: Vec<(Buffer, DeviceBuffer)> = [
        Buffer::TokenSeq,
        Buffer::QueryStart,
        Buffer::SeqLens,
        Buffer::BlockTables,
    ]
    .into_iter()
    .filter_map(|b| {
        host.get(b)
            .map(|v| (b, DeviceBuffer::from_bytes(&u32_bytes(v), "u32")))
    })
    .collect();
    {
        let (mut qr, mut kr, mut vr, mut or) =
            (Some(&mut qb), Some(&mut kb), Some(&mut vb), Some(&mut ob));
        let mut mr: Vec<(Buffer, Option<&mut DeviceBuffer>)> =
            metas.iter_mut().map(|(b, d)| (*b, Some(d))).collect();
        let mut args = Vec::with_capacity(plan.args.len());
        for a in &plan.args {
            let taken = match a {
                Arg::Buffer(Buffer::Q) => qr.take(),
                Arg::Buffer(Buffer::KCache) => kr.take(),
                Arg::Buffer(Buffer::VCache) => vr.take(),
                Arg::Buffer(Buffer::Out) => or.take(),
                Arg::Buffer(m) => mr
                    .iter_mut()
                    .find(|(b, _)| b == m)
                    .and_then(|(_, d)| d.take()),
                Arg::I32(x) => {
                    args.push(KernelArg::I32(*x));
                    continue;
                }
                Arg::F32(x) => {
                    args.push(KernelArg::F32(*x));
                    continue;
                }
            };
            match taken {
                Some(b) => args.push(KernelArg::Buffer(b)),
                None => candle_core::bail!("{}: buffer {a:?} passed twice or missing", plan.kernel),
            }
        }
        let geometry = LaunchGeometry {
            kernel: &plan.kernel,
            grid: plan.grid,
            block: plan.block,
            dynamic_shared_bytes: plan.dynamic_shared_bytes,
            shared_limit_bytes: plan.shared_limit(&SM90_LIMITS),
        };
        emu.launch(&geometry, &mut args)?;
    }
    from_bytes(ob.bytes(), dtype, shape)
}
