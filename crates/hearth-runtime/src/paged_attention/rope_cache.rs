//! The fused RoPE + cache write (kernels/rope_cache.cu): one launch per layer takes the
//! projections' q, k, v, applies Qwen3's q/k norm when the model has it, rotates q and
//! k with the model's cos/sin tables, writes k and v into their cache slots and returns
//! the rotated q. Described here once for the CUDA path (cuda.rs) and the CPU emulator
//! (emulated.rs), with the host-side checks that make the kernel's indexing safe.

use candle_core::{DType, Layout, Result, Tensor};

use super::launch::{supports, Arg, Buffer, Launch, SM90_LIMITS, WARPS};

/// One call's inputs (every tensor of one dtype, on one device).
pub struct RopeCacheInputs<'a> {
    /// `[T, heads, head_dim]`, k and v `[T, kv_heads, head_dim]`: the projections.
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    /// The model's tables, `[max_positions, head_dim / 2]` (rope.rs).
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    /// Qwen3's per-head RMSNorm of q and k before RoPE: weights `[head_dim]`, epsilon.
    pub norms: Option<(&'a Tensor, &'a Tensor, f64)>,
    /// Each token's position and cache slot (`block * block_size + offset`).
    pub positions: &'a [u32],
    pub slots: &'a [u32],
}

impl RopeCacheInputs<'_> {
    /// The checks of [`check`] on these tensors and the caches.
    pub(crate) fn check(&self, k_cache: &Tensor, v_cache: &Tensor) -> Result<RopeCacheShapes> {
        let dtype = self.q.dtype();
        let mut all = vec![self.k, self.v, k_cache, v_cache, self.cos, self.sin];
        if let Some((qn, kn, _)) = self.norms {
            all.extend([qn, kn]);
        }
        if all.iter().any(|t| t.dtype() != dtype) {
            return Err(bad(format_args!("every tensor must be {dtype:?} like q")));
        }
        check(
            &RopeCacheLayouts {
                q: self.q.layout(),
                k: self.k.layout(),
                v: self.v.layout(),
                k_cache: k_cache.layout(),
                v_cache: v_cache.layout(),
                cos: self.cos.layout(),
                sin: self.sin.layout(),
                norms: self.norms.map(|(qn, kn, _)| (qn.layout(), kn.layout())),
            },
            self.positions,
            self.slots,
        )
    }
}

/// The call's sizes, read off and checked against each other.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RopeCacheShapes {
    pub tokens: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// The layouts of one call: q `[T, heads, D]`, k and v `[T, kv_heads, D]`, caches
/// `[blocks, block_size, kv_heads, D]`, cos/sin `[positions, D / 2]`, norm weights
/// `[D]`; `positions` and `slots` one per token.
pub(crate) struct RopeCacheLayouts<'a> {
    pub q: &'a Layout,
    pub k: &'a Layout,
    pub v: &'a Layout,
    pub k_cache: &'a Layout,
    pub v_cache: &'a Layout,
    pub cos: &'a Layout,
    pub sin: &'a Layout,
    pub norms: Option<(&'a Layout, &'a Layout)>,
}

fn bad(what: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("rope + cache write: {what}"))
}

/// Every check the kernel's indexing relies on: shapes, contiguity, and each position
/// inside the tables and each slot inside the cache.
pub(crate) fn check(
    l: &RopeCacheLayouts<'_>,
    positions: &[u32],
    slots: &[u32],
) -> Result<RopeCacheShapes> {
    let (t, h, d) = l.q.shape().dims3()?;
    let (tk, kvh, dk) = l.k.shape().dims3()?;
    if l.v.shape() != l.k.shape() || tk != t || dk != d || kvh == 0 || h % kvh != 0 {
        return Err(bad(format_args!(
            "q {:?}, k {:?}, v {:?}",
            l.q.shape(),
            l.k.shape(),
            l.v.shape()
        )));
    }
    let (nb, bs, ckvh, cd) = l.k_cache.shape().dims4()?;
    if l.v_cache.shape() != l.k_cache.shape() || ckvh != kvh || cd != d {
        return Err(bad(format_args!(
            "caches {:?} and {:?} for k {:?}",
            l.k_cache.shape(),
            l.v_cache.shape(),
            l.k.shape()
        )));
    }
    let (max_pos, half) = l.cos.shape().dims2()?;
    if l.sin.shape() != l.cos.shape() || half * 2 != d {
        return Err(bad(format_args!(
            "cos/sin tables {:?} and {:?} for head_dim {d}",
            l.cos.shape(),
            l.sin.shape()
        )));
    }
    let mut all = vec![l.q, l.k, l.v, l.k_cache, l.v_cache, l.cos, l.sin];
    if let Some((qn, kn)) = l.norms {
        if qn.shape().dims() != [d] || kn.shape().dims() != [d] {
            return Err(bad(format_args!(
                "norm weights {:?} and {:?} for head_dim {d}",
                qn.shape(),
                kn.shape()
            )));
        }
        all.extend([qn, kn]);
    }
    if all.iter().any(|l| !l.is_contiguous()) {
        return Err(bad("every input must be contiguous"));
    }
    if positions.len() != t || slots.len() != t {
        return Err(bad(format_args!(
            "{t} tokens, {} positions, {} slots",
            positions.len(),
            slots.len()
        )));
    }
    if let Some(p) = positions.iter().find(|&&p| p as usize >= max_pos) {
        return Err(bad(format_args!(
            "position {p} outside the tables' {max_pos}"
        )));
    }
    if let Some(s) = slots.iter().find(|&&s| s as usize >= nb * bs) {
        return Err(bad(format_args!(
            "slot {s} outside a cache of {} slots",
            nb * bs
        )));
    }
    Ok(RopeCacheShapes {
        tokens: t,
        heads: h,
        kv_heads: kvh,
        head_dim: d,
    })
}

/// The launch (`s.tokens > 0`); `eps` is the q/k norm's when the model has one.
pub(crate) fn plan(s: &RopeCacheShapes, dtype: DType, norm_eps: Option<f64>) -> Result<Launch> {
    supports(s.head_dim, s.heads / s.kv_heads)
        .map_err(|e| candle_core::Error::Msg(format!("rope + cache write on CUDA: {e}")))?;
    let name = match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => return Err(bad("tensors must be f32, f16 or bf16")),
    };
    let mut args = vec![
        Arg::Buffer(Buffer::Q),
        Arg::Buffer(Buffer::K),
        Arg::Buffer(Buffer::V),
        Arg::Buffer(Buffer::QOut),
        Arg::Buffer(Buffer::KCache),
        Arg::Buffer(Buffer::VCache),
        Arg::Buffer(Buffer::Cos),
        Arg::Buffer(Buffer::Sin),
    ];
    if norm_eps.is_some() {
        args.extend([Arg::Buffer(Buffer::QNorm), Arg::Buffer(Buffer::KNorm)]);
    }
    args.extend([
        Arg::Buffer(Buffer::Positions),
        Arg::Buffer(Buffer::Slots),
        Arg::I32(s.heads as i32),
        Arg::I32(s.kv_heads as i32),
    ]);
    if let Some(eps) = norm_eps {
        args.push(Arg::F32(eps as f32));
    }
    let norm = if norm_eps.is_some() { "norm_" } else { "" };
    let launch = Launch {
        kernel: format!("hearth_rope_cache_{norm}{name}_d{}", s.head_dim),
        grid: [s.tokens as u32, 1, 1],
        block: [WARPS * 32, 1, 1],
        dynamic_shared_bytes: 0,
        shared_opt_in: false,
        args,
    };
    launch.check(&SM90_LIMITS)?;
    Ok(launch)
}

/// The fused kernel on q's CUDA device: returns the rotated (and, with `norms`,
/// normalised) q `[T, heads, head_dim]` and writes k and v into their cache slots.
/// `positions` and `slots` are `x.positions` and `x.slots` already on the device (U32,
/// one upload per step); the host copies are what the checks read.
#[cfg(feature = "cuda")]
pub fn rope_cache(
    x: &RopeCacheInputs<'_>,
    positions: &Tensor,
    slots: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
) -> Result<Tensor> {
    let shapes = x.check(k_cache, v_cache)?;
    if shapes.tokens == 0 {
        return Ok(x.q.clone());
    }
    x.q.apply_op1_no_bwd(&super::cuda::RopeCacheOp {
        x,
        positions,
        slots,
        k_cache,
        v_cache,
        shapes,
    })
}
