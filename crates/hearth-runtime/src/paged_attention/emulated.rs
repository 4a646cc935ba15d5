//! The op's CUDA path run on the CPU emulator (crate::cuda_emulator): the same kernel
//! source, the same launch (launch.rs) as cuda.rs, on CPU tensors. For tests: it is
//! how the CUDA kernel is checked against the CPU op where no GPU is.

use candle_core::{DType, Device, Result, Tensor};

use super::launch::{self, Arg, Buffer, HostMeta, Launch, SM90_LIMITS};
use super::rope_cache::{self, RopeCacheInputs};
use super::AttentionMetadata;
use crate::cuda_emulator::{DeviceBuffer, Emulator, KernelArg, LaunchGeometry};
use crate::step_metadata::{self, PackedLayout};

pub(crate) fn to_bytes(t: &Tensor) -> Result<Vec<u8>> {
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

pub(crate) fn from_bytes(
    b: &[u8],
    dtype: DType,
    shape: impl Into<candle_core::Shape>,
) -> Result<Tensor> {
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

/// The device buffers of one emulated call, by role: each launch takes the ones it
/// names (a buffer named twice in one launch is an error, as aliasing `&mut` would be)
/// and gives them back.
pub(crate) struct Pool(Vec<(Buffer, DeviceBuffer)>);

impl Pool {
    pub(crate) fn new() -> Self {
        Self(Vec::new())
    }

    pub(crate) fn add(&mut self, b: Buffer, d: DeviceBuffer) {
        self.0.push((b, d));
    }

    pub(crate) fn take(&mut self, b: Buffer) -> Option<DeviceBuffer> {
        let i = self.0.iter().position(|(x, _)| *x == b)?;
        Some(self.0.swap_remove(i).1)
    }

    /// Runs `launches` in order, as the CUDA path would on one stream.
    pub(crate) fn run(&mut self, launches: &[Launch], emu: &Emulator) -> Result<()> {
        for l in launches {
            let mut taken: Vec<(Buffer, DeviceBuffer)> = Vec::new();
            let mut missing = None;
            for a in &l.args {
                if let Arg::Buffer(b) = a {
                    match self.take(*b) {
                        Some(d) => taken.push((*b, d)),
                        None => missing = Some(*b),
                    }
                }
            }
            let result = match missing {
                Some(b) => Err(candle_core::Error::Msg(format!(
                    "{}: buffer {b:?} passed twice or missing",
                    l.kernel
                ))),
                None => launch_one(l, &mut taken, emu),
            };
            self.0.extend(taken);
            result?;
        }
        Ok(())
    }
}

fn launch_one(l: &Launch, taken: &mut [(Buffer, DeviceBuffer)], emu: &Emulator) -> Result<()> {
    let mut bufs = taken.iter_mut();
    let mut args = Vec::with_capacity(l.args.len());
    for a in &l.args {
        args.push(match a {
            Arg::Buffer(_) => match bufs.next() {
                Some((_, d)) => KernelArg::Buffer(d),
                None => candle_core::bail!("{}: fewer buffers than arguments", l.kernel),
            },
            Arg::I32(x) => KernelArg::I32(*x),
            Arg::F32(x) => KernelArg::F32(*x),
        });
    }
    let geometry = LaunchGeometry {
        kernel: &l.kernel,
        grid: l.grid,
        block: l.block,
        dynamic_shared_bytes: l.dynamic_shared_bytes,
        shared_limit_bytes: l.shared_limit(&SM90_LIMITS),
    };
    emu.launch(&geometry, &mut args)
}

/// Each part of a packed step buffer as the kernel gets it: the words at its offset.
fn add_packed(pool: &mut Pool, layout: &PackedLayout, packed: &[u32]) -> Result<()> {
    for b in layout.parts() {
        let r = layout
            .kernel_range(b)
            .ok_or_else(|| candle_core::Error::Msg(format!("packed metadata: no {b:?}")))?;
        let words = packed.get(r.clone()).ok_or_else(|| {
            candle_core::Error::Msg(format!("packed metadata: {b:?} at {r:?} past the buffer"))
        })?;
        pool.add(b, DeviceBuffer::from_bytes(&u32_bytes(words), "u32"));
    }
    Ok(())
}

pub(crate) fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

/// [`super::paged_attention`] as the CUDA kernels compute it, run by `emu` on the CPU.
pub fn paged_attention_emulated(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &AttentionMetadata,
    scale: f32,
    emu: &Emulator,
) -> Result<Tensor> {
    paged_attention_emulated_layers(q, k_cache, v_cache, meta, scale, emu, 1)?
        .pop()
        .ok_or_else(|| candle_core::Error::Msg("paged attention: no output".into()))
}

/// The call made `layers` times in a row on one step's buffers, as the layers of a
/// step make it on CUDA: the split-key kernel's counters zeroed once and shared (each
/// launch must leave them zero for the next), a fresh output buffer per call. Each
/// call's output, in order.
pub fn paged_attention_emulated_layers(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &AttentionMetadata,
    scale: f32,
    emu: &Emulator,
    layers: usize,
) -> Result<Vec<Tensor>> {
    let q = q.contiguous()?;
    let s = launch::shapes(q.layout(), k_cache.layout(), v_cache.layout())?;
    if k_cache.dtype() != q.dtype() || v_cache.dtype() != q.dtype() {
        candle_core::bail!("paged attention: q and caches must share one dtype");
    }
    meta.validate(s.tokens, s.num_blocks, s.block_size)?;
    let dtype = q.dtype();
    let shape = (s.tokens, s.heads, s.head_dim);
    if s.tokens == 0 {
        return (0..layers)
            .map(|_| Tensor::zeros(shape, dtype, &Device::Cpu))
            .collect();
    }
    let plan = launch::plan(meta, &s, dtype, scale)?;
    let host = HostMeta::new(meta);
    let code = Buffer::Q.elem_code(dtype);
    let mut pool = Pool::new();
    pool.add(Buffer::Q, DeviceBuffer::from_bytes(&to_bytes(&q)?, code));
    pool.add(
        Buffer::KCache,
        DeviceBuffer::from_bytes(&to_bytes(k_cache)?, code),
    );
    pool.add(
        Buffer::VCache,
        DeviceBuffer::from_bytes(&to_bytes(v_cache)?, code),
    );
    let out_bytes = s.tokens * s.heads * s.head_dim * dtype.size_in_bytes();
    // The metadata as the CUDA path uploads it: packed (step_metadata.rs), each kernel
    // reading its part at the layout's offset.
    let (layout, packed) = step_metadata::pack(&step_metadata::attention_parts(&host))?;
    add_packed(&mut pool, &layout, &packed)?;
    for &(b, n) in &plan.scratch {
        pool.add(b, DeviceBuffer::uninit(n * 4, "f32"));
    }
    if plan.counters > 0 {
        pool.add(
            Buffer::Counters,
            DeviceBuffer::from_bytes(&vec![0u8; plan.counters * 4], "u32"),
        );
    }
    let mut outs = Vec::with_capacity(layers);
    for _ in 0..layers {
        pool.add(Buffer::Out, DeviceBuffer::uninit(out_bytes, code));
        pool.run(&plan.launches, emu)?;
        let out = pool
            .take(Buffer::Out)
            .ok_or_else(|| candle_core::Error::Msg("paged attention: output buffer lost".into()))?;
        outs.push(from_bytes(out.bytes(), dtype, shape)?);
    }
    Ok(outs)
}

/// The fused RoPE + cache write (kernels/rope_cache.cu) as the CUDA path launches it,
/// run by `emu` on the CPU: returns the rotated q and the caches after the write (the
/// inputs are left alone).
pub fn rope_cache_emulated(
    x: &RopeCacheInputs<'_>,
    k_cache: &Tensor,
    v_cache: &Tensor,
    emu: &Emulator,
) -> Result<(Tensor, Tensor, Tensor)> {
    let contiguous = |t: &Tensor| t.contiguous();
    let (q, k, v, cos, sin) = (
        contiguous(x.q)?,
        contiguous(x.k)?,
        contiguous(x.v)?,
        contiguous(x.cos)?,
        contiguous(x.sin)?,
    );
    let norms = match x.norms {
        Some((qn, kn, eps)) => Some((contiguous(qn)?, contiguous(kn)?, eps)),
        None => None,
    };
    let inputs = RopeCacheInputs {
        q: &q,
        k: &k,
        v: &v,
        cos: &cos,
        sin: &sin,
        norms: norms.as_ref().map(|(a, b, e)| (a, b, *e)),
        positions: x.positions,
        slots: x.slots,
    };
    let s = inputs.check(k_cache, v_cache)?;
    let dtype = q.dtype();
    if s.tokens == 0 {
        return Ok((q, k_cache.clone(), v_cache.clone()));
    }
    let plan = rope_cache::plan(&s, dtype, norms.as_ref().map(|n| n.2))?;
    let code = Buffer::Q.elem_code(dtype);
    let mut pool = Pool::new();
    let mut add = |b: Buffer, t: &Tensor| -> Result<()> {
        pool.add(b, DeviceBuffer::from_bytes(&to_bytes(t)?, code));
        Ok(())
    };
    add(Buffer::Q, &q)?;
    add(Buffer::K, &k)?;
    add(Buffer::V, &v)?;
    add(Buffer::KCache, k_cache)?;
    add(Buffer::VCache, v_cache)?;
    add(Buffer::Cos, &cos)?;
    add(Buffer::Sin, &sin)?;
    if let Some((qn, kn, _)) = &norms {
        add(Buffer::QNorm, qn)?;
        add(Buffer::KNorm, kn)?;
    }
    pool.add(
        Buffer::QOut,
        DeviceBuffer::uninit(q.elem_count() * dtype.size_in_bytes(), code),
    );
    let (layout, packed) =
        step_metadata::pack(&[(Buffer::Positions, x.positions), (Buffer::Slots, x.slots)])?;
    add_packed(&mut pool, &layout, &packed)?;
    pool.run(std::slice::from_ref(&plan), emu)?;
    let mut get = |b: Buffer, shape: &[usize]| -> Result<Tensor> {
        let d = pool
            .take(b)
            .ok_or_else(|| candle_core::Error::Msg(format!("rope + cache write: {b:?} lost")))?;
        from_bytes(d.bytes(), dtype, shape)
    };
    Ok((
        get(Buffer::QOut, q.dims())?,
        get(Buffer::KCache, k_cache.dims())?,
        get(Buffer::VCache, v_cache.dims())?,
    ))
}
