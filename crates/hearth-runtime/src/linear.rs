//! The model's weight-bearing layers (projections, embeddings) as the model computes
//! with them; weight_loader.rs makes them from a file. Quantization is a property of these layers only: a projection is either a plain
//! weight matrix in the compute dtype or one of candle's quantized tensors (`QMatMul`),
//! and everything downstream (attention, the KV cache, the engine) sees activations in
//! the compute dtype either way.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::packed_linear::{self, WeightDtype};
use hearth_kernels::dense::PackedWeight;

/// `x · Wᵀ (+ b)`.
#[derive(Clone)]
pub enum Linear {
    Dense(candle_nn::Linear),
    Quantized {
        weight: QMatMul,
        bias: Option<Tensor>,
    },
    /// A CPU weight packed at load for the dense kernels (packed_linear.rs), as f32 or
    /// bf16; shared with a tied embedding table.
    Packed {
        weight: Arc<PackedWeight>,
        bias: Option<Tensor>,
    },
}

impl Linear {
    pub fn quantized(weight: Arc<QTensor>, bias: Option<Tensor>) -> candle_core::Result<Self> {
        Ok(Self::Quantized {
            weight: QMatMul::from_arc(weight)?,
            bias,
        })
    }

    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Self::Dense(l) => l.bias(),
            Self::Quantized { bias, .. } | Self::Packed { bias, .. } => bias.as_ref(),
        }
    }

    /// A dense f32 weight on the CPU packed as `dtype` for the dense kernels; any other
    /// weight as it is. The unpacked copy is dropped unless something else holds it.
    pub fn packed(self, dtype: WeightDtype) -> candle_core::Result<Self> {
        match self {
            Self::Dense(l)
                if l.weight().device().is_cpu()
                    && l.weight().dtype() == DType::F32
                    && l.weight().rank() == 2 =>
            {
                Ok(Self::Packed {
                    weight: Arc::new(packed_linear::pack(l.weight(), dtype)?),
                    bias: l.bias().cloned(),
                })
            }
            other => Ok(other),
        }
    }

    /// How the weight is held, for the load log: `F32`, `BF16 packed`, `Q4_K`, ...
    pub fn kind(&self) -> String {
        match self {
            Self::Dense(l) => format!("{:?}", l.weight().dtype()),
            Self::Quantized { .. } => self
                .ggml_dtype()
                .map_or_else(|| "quantized".into(), |d| format!("{d:?}")),
            Self::Packed { weight, .. } => packed_linear::label(weight.dtype()),
        }
    }

    /// The quantized type of the weight, or None for a dense one.
    pub fn ggml_dtype(&self) -> Option<GgmlDType> {
        match self {
            Self::Quantized {
                weight: QMatMul::QTensor(q),
                ..
            } => Some(q.dtype()),
            _ => None,
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            // hearth's threaded kernel where it applies (few rows, f32, CPU).
            Self::Dense(l) => crate::cpu_matmul::linear(x, l.weight(), l.bias()),
            Self::Packed { weight, bias } => {
                let y = packed_linear::linear(x, weight)?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
            Self::Quantized { weight, bias } => {
                if let QMatMul::QTensor(q) = weight {
                    if x.device().is_cpu() {
                        if let Some(wt) = hearth_kernels::q8::WeightType::from_ggml(q.dtype()) {
                            let y = cpu_q8_forward(wt, q, x)?;
                            return match bias {
                                Some(b) => y.broadcast_add(b),
                                None => Ok(y),
                            };
                        }
                    }
                }
                let dtype = x.dtype();
                // candle's quantized CPU kernels take f32/f16/bf16; its CUDA fallback
                // (shapes the fast kernels skip) only f32: give it f32 off the CPU.
                let y = if x.device().is_cpu() || dtype == DType::F32 {
                    weight.forward(&x.contiguous()?)?
                } else {
                    weight
                        .forward(&x.to_dtype(DType::F32)?.contiguous()?)?
                        .to_dtype(dtype)?
                };
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }
}

/// hearth's 8-bit-activation kernels (hearth-kernels' q8) over the tensor's blocks in
/// place: Q4_0/Q4_1/Q8_0, the K-quants and their legacy fallbacks, computed as llama.cpp
/// computes them.
fn cpu_q8_forward(
    wt: hearth_kernels::q8::WeightType,
    q: &QTensor,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    let (n, k) = q.shape().dims2()?;
    let mut dims = x.dims().to_vec();
    if dims.last() != Some(&k) {
        candle_core::bail!(
            "quantized matmul: input {:?} against weight {:?}",
            x.dims(),
            q.shape()
        );
    }
    let m = x.elem_count() / k;
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    let data = q.data()?;
    hearth_kernels::q8::check(wt, data.len(), n, k, m * k)
        .map_err(|e| candle_core::Error::Msg(format!("quantized matmul: {e}")))?;
    let out = {
        let (storage, layout) = x32.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("quantized matmul: input not on the CPU");
        };
        let start = layout.start_offset();
        let xs = &cpu.as_slice::<f32>()?[start..start + m * k];
        hearth_kernels::q8::matmul(wt, &data, n, k, xs, &|n, work| {
            crate::threads::parallel_chunks(n, 1, work)
        })
    };
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Tensor::from_vec(out, dims, &Device::Cpu)?.to_dtype(x.dtype())
}

/// Token embeddings: a dense table, or a quantized one whose looked-up rows are
/// dequantized (so a Q8_0 table costs a quarter of an f32 one in memory).
#[derive(Clone)]
pub enum Embedding {
    Dense(candle_nn::Embedding),
    Quantized {
        table: Arc<QTensor>,
        dtype: DType,
    },
    /// A tied table packed for the output projection, its rows read from the panels.
    Packed {
        table: Arc<PackedWeight>,
        dtype: DType,
    },
}

impl Embedding {
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(e) => e.forward(ids),
            Self::Quantized { table, dtype } => table.embedding(ids)?.to_dtype(*dtype),
            Self::Packed { table, dtype } => packed_linear::embedding(ids, table, *dtype),
        }
    }

    /// The same table as the output projection (tied embeddings), without a copy.
    pub fn as_lm_head(&self) -> candle_core::Result<Linear> {
        match self {
            Self::Dense(e) => Ok(Linear::Dense(candle_nn::Linear::new(
                e.embeddings().clone(),
                None,
            ))),
            Self::Quantized { table, .. } => Linear::quantized(table.clone(), None),
            Self::Packed { table, .. } => Ok(Linear::Packed {
                weight: table.clone(),
                bias: None,
            }),
        }
    }
}

/// The quantized types `--quantize` accepts, by the names llama.cpp uses.
pub fn parse_ggml_dtype(name: &str) -> Option<GgmlDType> {
    Some(match name.to_ascii_lowercase().as_str() {
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q8_0" => GgmlDType::Q8_0,
        "q2_k" => GgmlDType::Q2K,
        "q3_k" => GgmlDType::Q3K,
        "q4_k" => GgmlDType::Q4K,
        "q5_k" => GgmlDType::Q5K,
        "q6_k" => GgmlDType::Q6K,
        _ => return None,
    })
}

pub const QUANTIZE_NAMES: &str = "q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k";

/// K-quants pack 256 values per block; a row whose length is not a multiple of that
/// (SmolLM2's 576) gets the nearest legacy type of at least as many bits, as llama.cpp's
/// quantizer does. candle's Q4_1/Q5_0/Q5_1 dot products also assume an even number of
/// blocks per row (as ggml's did), so odd ones move on to Q8_0.
pub fn fallback_for_row(dtype: GgmlDType, row_len: usize) -> GgmlDType {
    let fits = |d: GgmlDType| {
        let bs = d.block_size();
        let even_blocks = !matches!(d, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1);
        row_len.is_multiple_of(bs) && (even_blocks || (row_len / bs).is_multiple_of(2))
    };
    let legacy = match dtype {
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        _ => GgmlDType::Q8_0,
    };
    [dtype, legacy, GgmlDType::Q8_0]
        .into_iter()
        .find(|d| fits(*d))
        .unwrap_or(GgmlDType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every quantized type through `Linear` (hearth's q8 kernels for Q4_0/Q4_1/Q5_x/Q8_0
    /// and Q4_K–Q6_K, candle's for Q2_K/Q3_K), with a bias and a 3-D input, against the dequantized weights.
    #[test]
    fn every_quantized_type_matches_its_dequantized_weights() {
        let dev = Device::Cpu;
        let (n, k) = (16, 512);
        // Fixed pseudo-random values: the test must give the same answer on every run.
        let noise = |len: usize, seed: u64| {
            let mut state = seed;
            (0..len)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                })
                .collect::<Vec<f32>>()
        };
        let w = Tensor::from_vec(noise(n * k, 1), (n, k), &dev).unwrap();
        let b = Tensor::from_vec(noise(n, 2), n, &dev).unwrap();
        let x = Tensor::from_vec(noise(6 * k, 3), (2, 3, k), &dev).unwrap();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let dense = q.dequantize(&dev).unwrap();
            let want = x
                .broadcast_matmul(&dense.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            let l = Linear::quantized(Arc::new(q), Some(b.clone())).unwrap();
            assert_eq!(l.ggml_dtype(), Some(dtype));
            let got = l.forward(&x).unwrap();
            assert_eq!(got.dims(), &[2, 3, n]);
            let norm = |t: &Tensor| {
                t.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            // Relative to the result's size: 8-bit activations (candle's kernels) cost a
            // percent or two even at 2-bit weights; a misread or shifted block costs tens.
            let rel = norm(&(got - &want).unwrap()) / norm(&want);
            assert!(rel < 0.05, "{dtype:?}: relative error {rel}");
        }
    }

    #[test]
    fn short_rows_fall_back_like_llama_cpp() {
        assert_eq!(fallback_for_row(GgmlDType::Q4K, 4096), GgmlDType::Q4K);
        assert_eq!(fallback_for_row(GgmlDType::Q4K, 576), GgmlDType::Q5_0);
        assert_eq!(fallback_for_row(GgmlDType::Q6K, 576), GgmlDType::Q8_0);
        assert_eq!(fallback_for_row(GgmlDType::Q4K, 96), GgmlDType::Q8_0);
        assert_eq!(fallback_for_row(GgmlDType::Q8_0, 48), GgmlDType::F32);
    }
}
