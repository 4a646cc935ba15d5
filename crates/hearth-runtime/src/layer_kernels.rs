//! The fused element-wise ops between a layer's matmuls on CUDA (kernels/layer_ops.cu):
//! residual add + RMSNorm, writing the new residual and the normed rows in one launch
//! (candle: an add and an rms_norm), and SiLU(gate)·up on the fused gate/up
//! projection's output (candle: a silu and a mul, each reading a strided half). Three
//! launches per layer where candle makes six. Described here once for the CUDA path and
//! the CPU emulator, whose tests check them against cpu_ops on the CPU.
#![cfg_attr(not(any(feature = "cuda", hearth_cuda_emulator)), allow(dead_code))]

use candle_core::{DType, Layout, Result};

use crate::paged_attention::launch::{Arg, Buffer, Launch, SM90_LIMITS};

/// hearth's launches per layer besides RoPE + cache and attention (model.rs on CUDA).
/// With `gemv` (a step of at most gemv::MAX_ROWS rows, dense fused weights): the four
/// projections as hearth's GEMV (gemv.rs) with the add + norms and SiLU·mul fused in,
/// no launch of these kernels. Otherwise the projections are candle's (not counted)
/// and these kernels run: the norm after attention, SiLU·mul (when gate and up are one
/// matmul), and the norm before the next layer (or the final norm).
pub fn launches_per_layer(gate_up_fused: bool, gemv: bool) -> usize {
    if gemv {
        4
    } else {
        2 + usize::from(gate_up_fused)
    }
}

/// hearth's launches after the layers: with `gemv`, the LM head's GEMV with the final
/// add + norm fused in (otherwise that norm is counted with the last layer's and the
/// LM head is candle's).
pub fn launches_after_layers(gemv: bool) -> usize {
    usize::from(gemv)
}

/// Threads of a SiLU·mul block; grid y covers a row's columns in chunks of this.
const SILU_THREADS: u32 = 256;
/// Grid y's limit on the device (columns past it are looped over).
const MAX_GRID_Y: usize = 65_535;

fn bad(what: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("fused layer op: {what}"))
}

fn type_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => return Err(bad(format_args!("{d:?} is not f32, f16 or bf16"))),
    })
}

/// Threads of a norm block for rows of `hidden`: about four elements a thread, whole
/// warps, at most the device's 1,024 (the kernel keeps one partial per warp, 32 at most).
pub(crate) fn norm_threads(hidden: usize) -> u32 {
    (hidden.div_ceil(4).next_multiple_of(32)).clamp(32, 1024) as u32
}

/// Rows and width of an add + norm call: x and delta `[.., hidden]` alike, w `[hidden]`,
/// all contiguous.
pub(crate) fn add_rms_norm_shape(x: &Layout, delta: &Layout, w: &Layout) -> Result<(usize, usize)> {
    let hidden = *x.dims().last().unwrap_or(&0);
    if hidden == 0 || x.shape() != delta.shape() || w.dims() != [hidden] {
        return Err(bad(format_args!(
            "add + rms_norm of {:?} and {:?} with weight {:?}",
            x.dims(),
            delta.dims(),
            w.dims()
        )));
    }
    if !x.is_contiguous() || !delta.is_contiguous() || !w.is_contiguous() {
        return Err(bad("add + rms_norm inputs must be contiguous"));
    }
    if hidden > i32::MAX as usize {
        return Err(bad(format_args!("rows of {hidden} elements")));
    }
    Ok((x.shape().elem_count() / hidden, hidden))
}

/// One block per row (`rows > 0`).
pub(crate) fn add_rms_norm_plan(
    rows: usize,
    hidden: usize,
    dtype: DType,
    eps: f64,
) -> Result<Launch> {
    let launch = Launch {
        kernel: format!("hearth_add_rms_norm_{}", type_name(dtype)?),
        grid: [rows as u32, 1, 1],
        block: [norm_threads(hidden), 1, 1],
        dynamic_shared_bytes: 0,
        shared_opt_in: false,
        args: vec![
            Arg::Buffer(Buffer::Residual),
            Arg::Buffer(Buffer::Delta),
            Arg::Buffer(Buffer::NormWeight),
            Arg::Buffer(Buffer::SumOut),
            Arg::Buffer(Buffer::NormOut),
            Arg::I32(hidden as i32),
            Arg::F32(eps as f32),
        ],
    };
    if rows > u32::MAX as usize {
        return Err(bad(format_args!("{rows} rows")));
    }
    launch.check(&SM90_LIMITS)?;
    Ok(launch)
}

/// Rows and width of a SiLU·mul call on `[.., 2 * width]` (gate then up), contiguous.
pub(crate) fn silu_mul_shape(gate_up: &Layout, width: usize) -> Result<(usize, usize)> {
    let cols = *gate_up.dims().last().unwrap_or(&0);
    if width == 0 || cols != 2 * width || !gate_up.is_contiguous() || cols > i32::MAX as usize {
        return Err(bad(format_args!(
            "silu·mul of {:?} (contiguous {}) as gate and up of {width} each",
            gate_up.dims(),
            gate_up.is_contiguous()
        )));
    }
    Ok((gate_up.shape().elem_count() / cols, width))
}

/// Grid x the rows, grid y the row's columns in blocks of [`SILU_THREADS`] (`rows > 0`).
pub(crate) fn silu_mul_plan(rows: usize, width: usize, dtype: DType) -> Result<Launch> {
    if rows > u32::MAX as usize {
        return Err(bad(format_args!("{rows} rows")));
    }
    let chunks = width.div_ceil(SILU_THREADS as usize).min(MAX_GRID_Y);
    let launch = Launch {
        kernel: format!("hearth_silu_mul_{}", type_name(dtype)?),
        grid: [rows as u32, chunks as u32, 1],
        block: [SILU_THREADS, 1, 1],
        dynamic_shared_bytes: 0,
        shared_opt_in: false,
        args: vec![
            Arg::Buffer(Buffer::GateUp),
            Arg::Buffer(Buffer::ActOut),
            Arg::I32(width as i32),
            Arg::I32((2 * width) as i32),
        ],
    };
    launch.check(&SM90_LIMITS)?;
    Ok(launch)
}

/// The residual add and the next norm, `(x + delta, rms_norm(x + delta) · w)`, in one
/// launch on CUDA (other devices: cpu_ops').
pub fn add_rms_norm(
    x: &candle_core::Tensor,
    delta: &candle_core::Tensor,
    w: &candle_core::Tensor,
    eps: f64,
) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        let both = x.contiguous()?.apply_op3_no_bwd(
            &delta.contiguous()?,
            &w.contiguous()?,
            &cuda::AddRmsNormOp { eps },
        )?;
        return Ok((both.get(0)?, both.get(1)?));
    }
    crate::cpu_ops::add_rms_norm(x, delta, w, eps)
}

/// `silu(gate) · up` for the fused gate/up output `[.., 2 * width]` (gate first), in
/// one launch on CUDA, in one pass over the halves in place on the CPU (cpu_ops).
pub fn silu_mul_joined(gate_up: &candle_core::Tensor, width: usize) -> Result<candle_core::Tensor> {
    #[cfg(feature = "cuda")]
    if gate_up.device().is_cuda() {
        return gate_up
            .contiguous()?
            .apply_op1_no_bwd(&cuda::SiluMulOp { width });
    }
    crate::cpu_ops::silu_mul_joined(gate_up, width)
}

#[cfg(hearth_cuda_emulator)]
pub use emulated::{add_rms_norm_emulated, silu_mul_emulated};

#[cfg(hearth_cuda_emulator)]
mod emulated {
    use candle_core::{Result, Tensor};

    use crate::cuda_emulator::{DeviceBuffer, Emulator};
    use crate::paged_attention::emulated::{from_bytes, to_bytes, Pool};
    use crate::paged_attention::launch::Buffer;

    /// [`super::add_rms_norm`] as the CUDA kernel computes it, run by `emu` on the CPU.
    pub fn add_rms_norm_emulated(
        x: &Tensor,
        delta: &Tensor,
        w: &Tensor,
        eps: f64,
        emu: &Emulator,
    ) -> Result<(Tensor, Tensor)> {
        let (x, delta, w) = (x.contiguous()?, delta.contiguous()?, w.contiguous()?);
        let dtype = x.dtype();
        if delta.dtype() != dtype || w.dtype() != dtype {
            candle_core::bail!("fused layer op: x, delta and w must share one dtype");
        }
        let (rows, hidden) = super::add_rms_norm_shape(x.layout(), delta.layout(), w.layout())?;
        if rows == 0 {
            return Ok((x.clone(), x));
        }
        let plan = super::add_rms_norm_plan(rows, hidden, dtype, eps)?;
        let code = Buffer::Residual.elem_code(dtype);
        let bytes = x.elem_count() * dtype.size_in_bytes();
        let mut pool = Pool::new();
        pool.add(
            Buffer::Residual,
            DeviceBuffer::from_bytes(&to_bytes(&x)?, code),
        );
        pool.add(
            Buffer::Delta,
            DeviceBuffer::from_bytes(&to_bytes(&delta)?, code),
        );
        pool.add(
            Buffer::NormWeight,
            DeviceBuffer::from_bytes(&to_bytes(&w)?, code),
        );
        pool.add(Buffer::SumOut, DeviceBuffer::uninit(bytes, code));
        pool.add(Buffer::NormOut, DeviceBuffer::uninit(bytes, code));
        pool.run(std::slice::from_ref(&plan), emu)?;
        let mut get = |b: Buffer| -> Result<Tensor> {
            let d = pool
                .take(b)
                .ok_or_else(|| candle_core::Error::Msg(format!("fused layer op: {b:?} lost")))?;
            from_bytes(d.bytes(), dtype, x.dims())
        };
        Ok((get(Buffer::SumOut)?, get(Buffer::NormOut)?))
    }

    /// [`super::silu_mul_joined`] as the CUDA kernel computes it, run by `emu` on the CPU.
    pub fn silu_mul_emulated(gate_up: &Tensor, width: usize, emu: &Emulator) -> Result<Tensor> {
        let gate_up = gate_up.contiguous()?;
        let dtype = gate_up.dtype();
        let (rows, width) = super::silu_mul_shape(gate_up.layout(), width)?;
        let mut dims = gate_up.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = width;
        }
        if rows == 0 {
            return Tensor::zeros(dims, dtype, gate_up.device());
        }
        let plan = super::silu_mul_plan(rows, width, dtype)?;
        let code = Buffer::GateUp.elem_code(dtype);
        let mut pool = Pool::new();
        pool.add(
            Buffer::GateUp,
            DeviceBuffer::from_bytes(&to_bytes(&gate_up)?, code),
        );
        pool.add(
            Buffer::ActOut,
            DeviceBuffer::uninit(rows * width * dtype.size_in_bytes(), code),
        );
        pool.run(std::slice::from_ref(&plan), emu)?;
        let out = pool
            .take(Buffer::ActOut)
            .ok_or_else(|| candle_core::Error::Msg("fused layer op: output lost".into()))?;
        from_bytes(out.bytes(), dtype, dims)
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

    use crate::paged_attention::launch::{Arg, Launch};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/layer_ops.ptx"));

    fn config(l: &Launch) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (l.grid[0], l.grid[1], l.grid[2]),
            block_dim: (l.block[0], l.block[1], l.block[2]),
            shared_mem_bytes: l.dynamic_shared_bytes,
        }
    }

    pub(super) struct AddRmsNormOp {
        pub eps: f64,
    }

    impl candle_core::CustomOp3 for AddRmsNormOp {
        fn name(&self) -> &'static str {
            "hearth-add-rms-norm-cuda"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("fused add + rms_norm: the kernel is CUDA only")
        }

        fn cuda_fwd(
            &self,
            xs: &CudaStorage,
            xl: &Layout,
            ds: &CudaStorage,
            dl: &Layout,
            ws: &CudaStorage,
            wl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (rows, hidden) = super::add_rms_norm_shape(xl, dl, wl)?;
            let dtype = xs.dtype();
            if ds.dtype() != dtype || ws.dtype() != dtype {
                candle_core::bail!("fused add + rms_norm: x, delta and w must share one dtype");
            }
            let mut dims = vec![2];
            dims.extend_from_slice(xl.dims());
            let n = rows * hidden;
            let dev = xs.device().clone();
            macro_rules! launch {
                ($ty:ty) => {{
                    // SAFETY: every element is written by the kernel (rows > 0) or none
                    // is read (rows == 0).
                    let out: CudaSlice<$ty> = unsafe { dev.alloc::<$ty>((2 * n).max(1))? };
                    if rows > 0 {
                        let plan = super::add_rms_norm_plan(rows, hidden, dtype, self.eps)?;
                        let x: CudaView<$ty> =
                            xs.as_cuda_slice::<$ty>()?.slice(xl.start_offset()..);
                        let d: CudaView<$ty> =
                            ds.as_cuda_slice::<$ty>()?.slice(dl.start_offset()..);
                        let w: CudaView<$ty> =
                            ws.as_cuda_slice::<$ty>()?.slice(wl.start_offset()..);
                        let sum = out.slice(..n);
                        let normed = out.slice(n..2 * n);
                        let func =
                            dev.get_or_load_custom_func(&plan.kernel, "hearth_layer_ops", PTX)?;
                        let (h, eps) = match plan.args[..] {
                            [.., Arg::I32(h), Arg::F32(e)] => (h, e),
                            _ => candle_core::bail!("{}: argument list changed", plan.kernel),
                        };
                        let mut b = func.builder();
                        b.arg(&x)
                            .arg(&d)
                            .arg(&w)
                            .arg(&sum)
                            .arg(&normed)
                            .arg(&h)
                            .arg(&eps);
                        // SAFETY: the argument list is the kernel's signature (the
                        // emulator's tests launch the same plan against the source);
                        // the shapes were checked above.
                        unsafe { b.launch(config(&plan)) }.w()?;
                        crate::launch_count::note(1);
                    }
                    Ok((
                        CudaStorage::wrap_cuda_slice(out, dev.clone()),
                        Shape::from(dims),
                    ))
                }};
            }
            match dtype {
                DType::F32 => launch!(f32),
                DType::F16 => launch!(f16),
                DType::BF16 => launch!(bf16),
                d => candle_core::bail!("fused add + rms_norm: {d:?} is not f32, f16 or bf16"),
            }
        }
    }

    pub(super) struct SiluMulOp {
        pub width: usize,
    }

    impl candle_core::CustomOp1 for SiluMulOp {
        fn name(&self) -> &'static str {
            "hearth-silu-mul-cuda"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("fused silu·mul: the kernel is CUDA only")
        }

        fn cuda_fwd(&self, gs: &CudaStorage, gl: &Layout) -> Result<(CudaStorage, Shape)> {
            let (rows, width) = super::silu_mul_shape(gl, self.width)?;
            let dtype = gs.dtype();
            let mut dims = gl.dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last = width;
            }
            let dev = gs.device().clone();
            macro_rules! launch {
                ($ty:ty) => {{
                    // SAFETY: every element is written by the kernel (rows > 0).
                    let out: CudaSlice<$ty> = unsafe { dev.alloc::<$ty>((rows * width).max(1))? };
                    if rows > 0 {
                        let plan = super::silu_mul_plan(rows, width, dtype)?;
                        let g: CudaView<$ty> =
                            gs.as_cuda_slice::<$ty>()?.slice(gl.start_offset()..);
                        let (w, stride) = match plan.args[..] {
                            [.., Arg::I32(w), Arg::I32(s)] => (w, s),
                            _ => candle_core::bail!("{}: argument list changed", plan.kernel),
                        };
                        let func =
                            dev.get_or_load_custom_func(&plan.kernel, "hearth_layer_ops", PTX)?;
                        let mut b = func.builder();
                        b.arg(&g).arg(&out).arg(&w).arg(&stride);
                        // SAFETY: as in AddRmsNormOp.
                        unsafe { b.launch(config(&plan)) }.w()?;
                        crate::launch_count::note(1);
                    }
                    Ok((
                        CudaStorage::wrap_cuda_slice(out, dev.clone()),
                        Shape::from(dims),
                    ))
                }};
            }
            match dtype {
                DType::F32 => launch!(f32),
                DType::F16 => launch!(f16),
                DType::BF16 => launch!(bf16),
                d => candle_core::bail!("fused silu·mul: {d:?} is not f32, f16 or bf16"),
            }
        }
    }
}
