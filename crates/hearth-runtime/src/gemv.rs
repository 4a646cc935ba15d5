//! hearth's small-batch GEMV on CUDA (kernels/gemv.cu): the projections of a step with
//! at most [`MAX_ROWS`] rows, in place of cuBLAS, with the element-wise op before each
//! projection folded into it as a prologue (residual add + RMSNorm before Q/K/V, gate/up
//! and the LM head; SiLU·mul before down_proj), so a decode layer is four GEMV
//! launches besides RoPE + cache and attention, where it was four cuBLAS calls and three
//! fused element-wise kernels. Fused weights (Q/K/V, gate/up) write each part as its own
//! contiguous matrix. Described here once for the CUDA path and the CPU emulator, whose
//! tests check it against the CPU ops.
#![cfg_attr(not(any(feature = "cuda", hearth_cuda_emulator)), allow(dead_code))]

use candle_core::{DType, Result, Tensor};

use crate::paged_attention::launch::{Arg, Buffer, Launch, SM90_LIMITS};

/// The most activation rows the kernel takes (kernels/gemv.cu's MAX_ROWS); larger steps
/// use cuBLAS and the separate element-wise kernels.
pub const MAX_ROWS: usize = 8;
/// kernels/gemv.cu's WARPS and ROWS_PER_WARP: a block's threads and weight rows.
const WARPS: u32 = 8;
const ROWS_PER_WARP: usize = 4;
/// The f32 tile of the input a block stages in shared memory, at most (within the 48 KiB
/// a launch gets without the opt-in, with room for the kernel's static arrays).
const TILE_BYTES: usize = 32 * 1024;

/// What the kernel computes its input from.
pub enum GemvInput<'a> {
    /// The rows themselves, `[rows, K]`.
    Plain(&'a Tensor),
    /// `rms_norm(residual + delta) · norm_weight` (both `[rows, K]`, weight `[K]`); the
    /// sum comes back as the new residual.
    AddNorm {
        residual: &'a Tensor,
        delta: &'a Tensor,
        norm_weight: &'a Tensor,
        eps: f64,
    },
    /// `silu(gate) · up`, both `[rows, K]`.
    Silu { gate: &'a Tensor, up: &'a Tensor },
}

impl GemvInput<'_> {
    fn first(&self) -> &Tensor {
        match self {
            GemvInput::Plain(x) => x,
            GemvInput::AddNorm { residual, .. } => residual,
            GemvInput::Silu { gate, .. } => gate,
        }
    }

    fn kernel_prefix(&self) -> &'static str {
        match self {
            GemvInput::Plain(_) => "hearth_gemv",
            GemvInput::AddNorm { .. } => "hearth_gemv_add_norm",
            GemvInput::Silu { .. } => "hearth_gemv_silu",
        }
    }

    /// Every input tensor with its role.
    fn tensors(&self) -> Vec<(Buffer, &Tensor)> {
        match self {
            GemvInput::Plain(x) => vec![(Buffer::GemvIn, *x)],
            GemvInput::AddNorm {
                residual,
                delta,
                norm_weight,
                ..
            } => vec![
                (Buffer::Residual, *residual),
                (Buffer::Delta, *delta),
                (Buffer::NormWeight, *norm_weight),
            ],
            GemvInput::Silu { gate, up } => vec![(Buffer::Gate, *gate), (Buffer::Up, *up)],
        }
    }
}

/// A projection's weight `[N, K]`, its bias `[N]` if any, and the widths of the parts
/// its output is split in (summing to N; at most three).
pub struct GemvWeights<'a> {
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub parts: &'a [usize],
}

/// The projection's parts, each `[rows, width]` and contiguous, and for
/// [`GemvInput::AddNorm`] the new residual.
pub struct GemvOutput {
    pub parts: Vec<Tensor>,
    pub residual: Option<Tensor>,
}

fn bad(what: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("gemv: {what}"))
}

fn type_name(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("f32"),
        DType::F16 => Some("f16"),
        DType::BF16 => Some("bf16"),
        _ => None,
    }
}

/// Whether a `[N, K]` weight in `dtype` at `rows` activation rows can run here: rows in
/// 1..=MAX_ROWS, f32/f16/bf16, K a multiple of one 16-byte load, the weight contiguous
/// and 16-byte aligned (the model falls back to cuBLAS otherwise).
pub fn takes(weight: &Tensor, rows: usize) -> bool {
    let Ok((n, k)) = weight.dims2() else {
        return false;
    };
    let size = weight.dtype().size_in_bytes();
    type_name(weight.dtype()).is_some()
        && (1..=MAX_ROWS).contains(&rows)
        && k > 0
        && n > 0
        && (k * size).is_multiple_of(16)
        && n <= i32::MAX as usize
        && rows * k.max(n) <= i32::MAX as usize
        && weight.is_contiguous()
        && (weight.layout().start_offset() * size).is_multiple_of(16)
}

/// A dense projection's weight and bias when the kernel takes it at `rows` rows of
/// `dtype` on a CUDA device (quantized weights, other devices, a weight or bias of
/// another dtype than the activations: None, the Linear's own forward runs).
pub(crate) fn dense(
    lin: &crate::linear::Linear,
    rows: usize,
    dtype: DType,
) -> Option<(&Tensor, Option<&Tensor>)> {
    match lin {
        crate::linear::Linear::Dense(l)
            if l.weight().device().is_cuda()
                && l.weight().dtype() == dtype
                && l.bias().is_none_or(|b| b.dtype() == dtype)
                && takes(l.weight(), rows) =>
        {
            Some((l.weight(), l.bias()))
        }
        _ => None,
    }
}

/// The checked sizes of one call: (rows, N, K, part boundaries).
#[derive(Debug, Clone, Copy)]
pub(crate) struct GemvShapes {
    pub rows: usize,
    pub n: usize,
    pub k: usize,
    pub split1: usize,
    pub split2: usize,
}

pub(crate) fn shapes(w: &GemvWeights<'_>, input: &GemvInput<'_>) -> Result<GemvShapes> {
    let (n, k) = w.weight.dims2()?;
    let rows = input.first().dim(0).unwrap_or(0);
    if !takes(w.weight, rows) {
        return Err(bad(format_args!(
            "weight {:?} ({:?}) at {rows} rows: needs 1..={MAX_ROWS} rows, f32/f16/bf16, \
             K a multiple of 16 bytes, a contiguous aligned weight",
            w.weight.dims(),
            w.weight.dtype()
        )));
    }
    let dtype = w.weight.dtype();
    for (b, t) in input.tensors() {
        let want: &[usize] = if b == Buffer::NormWeight {
            &[k]
        } else {
            &[rows, k]
        };
        if t.dims() != want || t.dtype() != dtype {
            return Err(bad(format_args!(
                "{b:?} is {:?} {:?}, the weight {:?} {dtype:?} wants {want:?}",
                t.dims(),
                t.dtype(),
                w.weight.dims()
            )));
        }
    }
    if let Some(b) = w.bias {
        if b.dims() != [n] || b.dtype() != dtype {
            return Err(bad(format_args!(
                "bias {:?} {:?} for weight {:?}",
                b.dims(),
                b.dtype(),
                w.weight.dims()
            )));
        }
    }
    let (split1, split2) = match *w.parts {
        [a] if a == n => (n, n),
        [a, b] if a + b == n => (a, n),
        [a, b, c] if a + b + c == n => (a, a + b),
        _ => {
            return Err(bad(format_args!(
                "parts {:?} of a weight with {n} rows",
                w.parts
            )))
        }
    };
    Ok(GemvShapes {
        rows,
        n,
        k,
        split1,
        split2,
    })
}

/// Columns of the input per staged tile: as many as TILE_BYTES of f32 hold for `rows`
/// rows, whole warp-wide loads (32 × 8 elements), no more than K needs.
pub(crate) fn tile_k(rows: usize, k: usize) -> usize {
    const STEP: usize = 256;
    let fit = (TILE_BYTES / 4 / rows.max(1)) / STEP * STEP;
    fit.clamp(STEP, k.next_multiple_of(STEP))
}

/// The launch: a block per WARPS × ROWS_PER_WARP weight rows.
pub(crate) fn plan(
    s: &GemvShapes,
    input: &GemvInput<'_>,
    dtype: DType,
    has_bias: bool,
) -> Result<Launch> {
    let name = type_name(dtype).ok_or_else(|| bad(format_args!("{dtype:?}")))?;
    let tile = tile_k(s.rows, s.k);
    let blocks = s.n.div_ceil(WARPS as usize * ROWS_PER_WARP);
    let mut args = vec![Arg::Buffer(Buffer::Weight), Arg::Buffer(Buffer::Bias)];
    args.extend(input.tensors().iter().map(|(b, _)| Arg::Buffer(*b)));
    if matches!(input, GemvInput::AddNorm { .. }) {
        args.push(Arg::Buffer(Buffer::SumOut));
    }
    args.push(Arg::Buffer(Buffer::GemvOut));
    args.extend(
        [
            s.n,
            s.k,
            s.rows,
            tile,
            s.split1,
            s.split2,
            usize::from(has_bias),
        ]
        .map(|x| Arg::I32(x as i32)),
    );
    if let GemvInput::AddNorm { eps, .. } = input {
        args.push(Arg::F32(*eps as f32));
    }
    let launch = Launch {
        kernel: format!("{}_{name}", input.kernel_prefix()),
        grid: [blocks as u32, 1, 1],
        block: [WARPS * 32, 1, 1],
        dynamic_shared_bytes: (s.rows * tile * 4) as u32,
        shared_opt_in: false,
        args,
    };
    launch.check(&SM90_LIMITS)?;
    Ok(launch)
}

/// The output buffer `[rows × N]` (then `[rows × K]`, the residual, for AddNorm) cut
/// into the parts and the residual.
fn split_output(
    out: &Tensor,
    s: &GemvShapes,
    widths: &[usize],
    add_norm: bool,
) -> Result<GemvOutput> {
    let mut parts = Vec::with_capacity(widths.len());
    let mut start = 0;
    for &w in widths {
        parts.push(
            out.narrow(0, s.rows * start, s.rows * w)?
                .reshape((s.rows, w))?,
        );
        start += w;
    }
    let residual = if add_norm {
        Some(
            out.narrow(0, s.rows * s.n, s.rows * s.k)?
                .reshape((s.rows, s.k))?,
        )
    } else {
        None
    };
    Ok(GemvOutput { parts, residual })
}

/// The projection of `input`'s rows by `w` on CUDA, its prologue fused in (the caller
/// checks [`takes`] first: other devices and shapes are refused).
pub fn gemv(w: &GemvWeights<'_>, input: &GemvInput<'_>) -> Result<GemvOutput> {
    let s = shapes(w, input)?;
    #[cfg(feature = "cuda")]
    if w.weight.device().is_cuda() {
        let add_norm = matches!(input, GemvInput::AddNorm { .. });
        let out = w.weight.apply_op1_no_bwd(&cuda::GemvOp { w, input, s })?;
        return split_output(&out, &s, w.parts, add_norm);
    }
    Err(bad(format_args!(
        "no kernel for {:?} ({} rows)",
        w.weight.device(),
        s.rows
    )))
}

#[cfg(hearth_cuda_emulator)]
pub use emulated::gemv_emulated;

#[cfg(hearth_cuda_emulator)]
mod emulated {
    use candle_core::{Device, Result, Tensor};

    use super::{GemvInput, GemvOutput, GemvWeights};
    use crate::cuda_emulator::{DeviceBuffer, Emulator};
    use crate::paged_attention::emulated::{from_bytes, to_bytes, Pool};
    use crate::paged_attention::launch::Buffer;

    /// [`super::gemv`] as the CUDA kernel computes it, run by `emu` on the CPU.
    pub fn gemv_emulated(
        w: &GemvWeights<'_>,
        input: &GemvInput<'_>,
        emu: &Emulator,
    ) -> Result<GemvOutput> {
        let s = super::shapes(w, input)?;
        let dtype = w.weight.dtype();
        let plan = super::plan(&s, input, dtype, w.bias.is_some())?;
        let code = Buffer::Weight.elem_code(dtype);
        let mut pool = Pool::new();
        let mut add = |b: Buffer, t: &Tensor| -> Result<()> {
            pool.add(
                b,
                DeviceBuffer::from_bytes(&to_bytes(&t.contiguous()?)?, code),
            );
            Ok(())
        };
        add(Buffer::Weight, w.weight)?;
        match w.bias {
            Some(b) => add(Buffer::Bias, b)?,
            // Not read (has_bias 0): any buffer of the type.
            None => add(Buffer::Bias, &Tensor::zeros(1, dtype, &Device::Cpu)?)?,
        }
        for (b, t) in input.tensors() {
            add(b, t)?;
        }
        let size = dtype.size_in_bytes();
        let add_norm = matches!(input, GemvInput::AddNorm { .. });
        if add_norm {
            pool.add(
                Buffer::SumOut,
                DeviceBuffer::uninit(s.rows * s.k * size, code),
            );
        }
        pool.add(
            Buffer::GemvOut,
            DeviceBuffer::uninit(s.rows * s.n * size, code),
        );
        pool.run(std::slice::from_ref(&plan), emu)?;
        let mut take = |b: Buffer| -> Result<Vec<u8>> {
            pool.take(b)
                .map(|d| d.bytes().to_vec())
                .ok_or_else(|| candle_core::Error::Msg(format!("gemv: {b:?} lost")))
        };
        let mut bytes = take(Buffer::GemvOut)?;
        if add_norm {
            bytes.extend(take(Buffer::SumOut)?);
        }
        let n = bytes.len() / size;
        let out = from_bytes(&bytes, dtype, n)?;
        super::split_output(&out, &s, w.parts, add_norm)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CpuStorage, CudaStorage, DType, Layout, Result, Shape};
    use half::{bf16, f16};

    use super::{GemvInput, GemvShapes, GemvWeights};
    use crate::paged_attention::launch::{Arg, Buffer};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/gemv.ptx"));

    /// Applied to the weight; the input tensors are read through their storage.
    pub(super) struct GemvOp<'a> {
        pub w: &'a GemvWeights<'a>,
        pub input: &'a GemvInput<'a>,
        pub s: GemvShapes,
    }

    impl candle_core::CustomOp1 for GemvOp<'_> {
        fn name(&self) -> &'static str {
            "hearth-gemv"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("gemv: the kernel is CUDA only")
        }

        fn cuda_fwd(&self, ws: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
            let s = &self.s;
            let dtype = ws.dtype();
            let dev = ws.device().clone();
            let plan = super::plan(s, self.input, dtype, self.w.bias.is_some())?;
            let add_norm = matches!(self.input, GemvInput::AddNorm { .. });
            let len = s.rows * s.n + if add_norm { s.rows * s.k } else { 0 };
            let mut others = self.input.tensors();
            if let Some(b) = self.w.bias {
                others.push((Buffer::Bias, b));
            }
            for (b, t) in &others {
                if !t.is_contiguous() {
                    candle_core::bail!("gemv: {b:?} must be contiguous");
                }
            }
            let guards: Vec<(Buffer, _)> = others
                .iter()
                .map(|(b, t)| (*b, t.storage_and_layout()))
                .collect();
            let storage = |b: Buffer| -> Result<(&CudaStorage, usize)> {
                match guards.iter().find(|(x, _)| *x == b) {
                    Some((_, (g, l))) => match &**g {
                        candle_core::Storage::Cuda(c) => Ok((c, l.start_offset())),
                        _ => candle_core::bail!("gemv: {b:?} is not on the GPU"),
                    },
                    None => candle_core::bail!("gemv: no tensor for {b:?}"),
                }
            };
            let cfg = LaunchConfig {
                grid_dim: (plan.grid[0], plan.grid[1], plan.grid[2]),
                block_dim: (plan.block[0], plan.block[1], plan.block[2]),
                shared_mem_bytes: plan.dynamic_shared_bytes,
            };
            macro_rules! launch {
                ($ty:ty) => {{
                    let weight: CudaView<$ty> =
                        ws.as_cuda_slice::<$ty>()?.slice(wl.start_offset()..);
                    // SAFETY: every element is written by the kernel: each output column
                    // by its warp, the residual by block 0.
                    let out: CudaSlice<$ty> = unsafe { dev.alloc::<$ty>(len)? };
                    let y = out.slice(..s.rows * s.n);
                    let sum = out.slice(s.rows * s.n..);
                    let mut views: Vec<(Buffer, CudaView<'_, $ty>)> = Vec::new();
                    for (b, _) in &others {
                        let (st, at) = storage(*b)?;
                        views.push((*b, st.as_cuda_slice::<$ty>()?.slice(at..)));
                    }
                    let func = dev.get_or_load_custom_func(&plan.kernel, "hearth_gemv", PTX)?;
                    let mut b = func.builder();
                    for a in &plan.args {
                        match a {
                            Arg::Buffer(Buffer::Weight) => b.arg(&weight),
                            Arg::Buffer(Buffer::GemvOut) => b.arg(&y),
                            Arg::Buffer(Buffer::SumOut) => b.arg(&sum),
                            Arg::Buffer(m) => match views.iter().find(|(x, _)| x == m) {
                                Some((_, v)) => b.arg(v),
                                // No bias: the kernel never reads it (has_bias 0).
                                None if *m == Buffer::Bias => b.arg(&weight),
                                None => candle_core::bail!("{}: no buffer for {m:?}", plan.kernel),
                            },
                            Arg::I32(x) => b.arg(x),
                            Arg::F32(x) => b.arg(x),
                        };
                    }
                    // SAFETY: the argument list is the kernel's signature (the emulator's
                    // tests launch the same plan against the source); shapes, dtypes,
                    // contiguity and the weight's alignment were checked (super::shapes).
                    unsafe { b.launch(cfg) }.w()?;
                    crate::launch_count::note(1);
                    Ok((
                        CudaStorage::wrap_cuda_slice(out, dev.clone()),
                        Shape::from(len),
                    ))
                }};
            }
            match dtype {
                DType::F32 => launch!(f32),
                DType::F16 => launch!(f16),
                DType::BF16 => launch!(bf16),
                d => candle_core::bail!("gemv: {d:?} is not f32, f16 or bf16"),
            }
        }
    }
}
