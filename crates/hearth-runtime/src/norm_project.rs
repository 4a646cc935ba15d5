//! The step between a layer's residual stream and a projection (model.rs): the
//! residual add and RMSNorm, then the projection. On CUDA at most gemv::MAX_ROWS rows
//! with a dense fused weight, all of it is one launch of hearth's GEMV (gemv.rs) with
//! the add and the norm as its prologue, and fused weights come back as contiguous
//! parts; otherwise the norm hands its rows on and the projection runs on its own.

use candle_core::{DType, Module, Tensor};
use candle_nn::RmsNorm;

use crate::fused::FusedLinear;
use crate::gemv;
use crate::linear::Linear;
use crate::model::{add_norm, norm};

/// A projection's dense weight, bias and part widths when hearth's GEMV takes it at
/// `rows` rows (CUDA, at most gemv::MAX_ROWS rows, one fused dense matrix).
pub(crate) type GemvParts<'a> = (&'a Tensor, Option<&'a Tensor>, Vec<usize>);

pub(crate) fn gemv_weights(proj: &FusedLinear, rows: usize, dtype: DType) -> Option<GemvParts<'_>> {
    match proj {
        FusedLinear::One { linear, widths } => {
            gemv::dense(linear, rows, dtype).map(|(w, b)| (w, b, widths.clone()))
        }
        FusedLinear::Separate(_) => None,
    }
}

/// What a norm hands the projection after it: the normed rows (the projection runs on
/// its own), or the projection's parts already (the GEMV with the norm fused in).
pub(crate) enum LayerInput {
    Normed(Tensor),
    Projected(Vec<Tensor>),
}

/// The residual add (when `delta` is given) and the norm before a projection: the
/// new residual and what the projection needs. With `gemv` weights on CUDA the add,
/// the norm and the projection are one launch (gemv.rs); otherwise add + norm as
/// before (one fused kernel on CUDA, cpu_ops' on the CPU).
pub(crate) fn norm_project(
    x: &Tensor,
    delta: Option<&Tensor>,
    n: &RmsNorm,
    gemv: Option<GemvParts<'_>>,
) -> candle_core::Result<(Tensor, LayerInput)> {
    // The fused norm reads its weight in the activations' dtype.
    let gemv = gemv.filter(|_| n.weight().dtype() == x.dtype());
    match (delta, gemv) {
        (Some(d), Some((weight, bias, parts))) => {
            let (x, d) = (x.contiguous()?, d.contiguous()?);
            let out = gemv::gemv(
                &gemv::GemvWeights {
                    weight,
                    bias,
                    parts: &parts,
                },
                &gemv::GemvInput::AddNorm {
                    residual: &x,
                    delta: &d,
                    norm_weight: n.weight(),
                    eps: n.eps(),
                },
            )?;
            let residual = out
                .residual
                .ok_or_else(|| candle_core::Error::Msg("gemv: no residual".into()))?;
            Ok((residual, LayerInput::Projected(out.parts)))
        }
        (None, Some((weight, bias, parts))) => {
            let h = norm(n, x)?;
            let out = gemv::gemv(
                &gemv::GemvWeights {
                    weight,
                    bias,
                    parts: &parts,
                },
                &gemv::GemvInput::Plain(&h),
            )?;
            Ok((x.clone(), LayerInput::Projected(out.parts)))
        }
        (Some(d), None) => {
            let (x, h) = add_norm(x, d, n)?;
            Ok((x, LayerInput::Normed(h)))
        }
        (None, None) => Ok((x.clone(), LayerInput::Normed(norm(n, x)?))),
    }
}

/// `x · Wᵀ`: hearth's GEMV on CUDA at few rows, the Linear's own forward otherwise.
pub(crate) fn project(lin: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
    let rows = x.dim(0)?;
    match gemv::dense(lin, rows, x.dtype()) {
        Some((weight, bias)) => {
            let parts = [weight.dim(0)?];
            let x = x.contiguous()?;
            let mut out = gemv::gemv(
                &gemv::GemvWeights {
                    weight,
                    bias,
                    parts: &parts,
                },
                &gemv::GemvInput::Plain(&x),
            )?;
            out.parts
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("gemv: no output".into()))
        }
        None => lin.forward(x),
    }
}
