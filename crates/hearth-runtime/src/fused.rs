//! Projections that read the same input fused into one matmul: Q/K/V and gate/up. One
//! product over the concatenated weight streams the activations once and gives the
//! kernels one wide matrix to split across threads instead of three narrow ones (K and
//! V are a sixth of Q's width on grouped-query models). The weights are concatenated at
//! load; the outputs are split by narrow views of the one result.
//!
//! Quantized weights fuse only when every part has the same GGML type (a llama.cpp mix
//! may store V at more bits than Q and K): their rows are quantized independently, so
//! the fused tensor is the parts' blocks one after another.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::linear::Linear;

/// Several projections of the same input: one fused matmul, or the parts as loaded.
pub enum FusedLinear {
    One {
        linear: Linear,
        /// Output width of each part, in order.
        widths: Vec<usize>,
    },
    Separate(Vec<Linear>),
}

impl FusedLinear {
    /// Fuses `parts` (each `[out_i, in]`) when `fuse` is set and their storage allows.
    pub fn new(parts: Vec<Linear>, fuse: bool) -> candle_core::Result<Self> {
        if !fuse || parts.len() < 2 {
            return Ok(Self::Separate(parts));
        }
        match concat(&parts)? {
            Some((linear, widths)) => Ok(Self::One { linear, widths }),
            None => Ok(Self::Separate(parts)),
        }
    }

    /// Whether the parts run as one matmul.
    pub fn is_fused(&self) -> bool {
        matches!(self, Self::One { .. })
    }

    /// The matmul(s) this runs: the fused one, or the parts.
    pub fn parts(&self) -> Vec<&Linear> {
        match self {
            Self::One { linear, .. } => vec![linear],
            Self::Separate(parts) => parts.iter().collect(),
        }
    }

    /// Each matmul's weight packed for the CPU's dense kernels (`Linear::packed`); done
    /// after fusing, so the fused weight is packed once as one matrix.
    pub fn packed(self, dtype: crate::packed_linear::WeightDtype) -> candle_core::Result<Self> {
        Ok(match self {
            Self::One { linear, widths } => Self::One {
                linear: linear.packed(dtype)?,
                widths,
            },
            Self::Separate(parts) => Self::Separate(
                parts
                    .into_iter()
                    .map(|p| p.packed(dtype))
                    .collect::<candle_core::Result<_>>()?,
            ),
        })
    }

    /// Each part's output `[.., out_i]`, in order (narrow views of one result when fused).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        match self {
            Self::Separate(parts) => parts.iter().map(|p| p.forward(x)).collect(),
            Self::One { linear, widths } => {
                let y = linear.forward(x)?;
                let last = y.rank() - 1;
                let mut start = 0;
                widths
                    .iter()
                    .map(|&w| {
                        let part = y.narrow(last, start, w);
                        start += w;
                        part
                    })
                    .collect()
            }
        }
    }
}

/// The parts as one `Linear` and their widths, or None when they cannot be one.
fn concat(parts: &[Linear]) -> candle_core::Result<Option<(Linear, Vec<usize>)>> {
    let biases: Vec<Option<&Tensor>> = parts.iter().map(Linear::bias).collect();
    let bias = if biases.iter().all(Option::is_some) {
        Some(Tensor::cat(
            &biases.iter().flatten().collect::<Vec<_>>(),
            0,
        )?)
    } else if biases.iter().all(Option::is_none) {
        None
    } else {
        return Ok(None);
    };
    let dense: Option<Vec<&Tensor>> = parts
        .iter()
        .map(|p| match p {
            Linear::Dense(l) => Some(l.weight()),
            // Packed weights are packed after fusing (WeightLoader::fused).
            Linear::Quantized { .. } | Linear::Packed { .. } => None,
        })
        .collect();
    if let Some(ws) = dense {
        let widths = ws
            .iter()
            .map(|w| w.dim(0))
            .collect::<candle_core::Result<_>>()?;
        let w = Tensor::cat(&ws, 0)?;
        return Ok(Some((
            Linear::Dense(candle_nn::Linear::new(w, bias)),
            widths,
        )));
    }
    let quantized: Option<Vec<&Arc<QTensor>>> = parts
        .iter()
        .map(|p| match p {
            Linear::Quantized {
                weight: QMatMul::QTensor(q),
                ..
            } => Some(q),
            _ => None,
        })
        .collect();
    let Some(qs) = quantized else { return Ok(None) };
    let dtype = qs[0].dtype();
    // Host blocks only: the CPU's kernels read them in place; other devices keep theirs.
    let same = qs
        .iter()
        .all(|q| q.dtype() == dtype && q.device().is_cpu() && q.shape().dims().len() == 2);
    if !same {
        return Ok(None);
    }
    let k = qs[0].shape().dims()[1];
    if qs.iter().any(|q| q.shape().dims()[1] != k) {
        return Ok(None);
    }
    let mut widths = Vec::with_capacity(qs.len());
    let mut bytes = 0;
    for q in &qs {
        widths.push(q.shape().dims()[0]);
        bytes += q.storage_size_in_bytes();
    }
    // u128 words so the bytes are aligned for every block type candle reads them as.
    let mut words = vec![0u128; bytes.div_ceil(16)];
    // SAFETY: the words' memory viewed as bytes, within its length.
    let buf = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), bytes) };
    let mut at = 0;
    for q in &qs {
        let data = q.data()?;
        buf[at..at + data.len()].copy_from_slice(&data);
        at += data.len();
    }
    let storage = QStorage::from_data(Cow::Borrowed(&buf[..at]), &Device::Cpu, dtype)?;
    let n: usize = widths.iter().sum();
    let fused = QTensor::new(storage, (n, k))?;
    Ok(Some((Linear::quantized(Arc::new(fused), bias)?, widths)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    fn noise(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn dense(n: usize, k: usize, seed: u64, bias: bool) -> Linear {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(noise(n * k, seed), (n, k), &dev).unwrap();
        let b = bias.then(|| Tensor::from_vec(noise(n, seed + 100), n, &dev).unwrap());
        Linear::Dense(candle_nn::Linear::new(w, b))
    }

    fn quantized(n: usize, k: usize, seed: u64, dtype: GgmlDType) -> Linear {
        let w = Tensor::from_vec(noise(n * k, seed), (n, k), &Device::Cpu).unwrap();
        Linear::quantized(Arc::new(QTensor::quantize(&w, dtype).unwrap()), None).unwrap()
    }

    /// Fused parts give each part's own output: dense with biases (Qwen2's Q/K/V) at
    /// few and many rows (both CPU kernels), and quantized of one type.
    #[test]
    fn fused_outputs_equal_the_parts() {
        let k = 256;
        let cases: Vec<(Vec<Linear>, usize)> = vec![
            (
                vec![
                    dense(64, k, 1, true),
                    dense(16, k, 2, true),
                    dense(16, k, 3, true),
                ],
                3,
            ),
            (vec![dense(96, k, 4, false), dense(96, k, 5, false)], 70),
            (
                vec![
                    quantized(64, k, 6, GgmlDType::Q4_0),
                    quantized(32, k, 7, GgmlDType::Q4_0),
                    quantized(32, k, 8, GgmlDType::Q4_0),
                ],
                5,
            ),
            (
                vec![
                    quantized(64, k, 9, GgmlDType::Q4K),
                    quantized(64, k, 10, GgmlDType::Q4K),
                ],
                2,
            ),
        ];
        for (i, (parts, rows)) in cases.into_iter().enumerate() {
            let x =
                Tensor::from_vec(noise(rows * k, 50 + i as u64), (rows, k), &Device::Cpu).unwrap();
            let want: Vec<Tensor> = parts.iter().map(|p| p.forward(&x).unwrap()).collect();
            let fused = FusedLinear::new(parts, true).unwrap();
            assert!(fused.is_fused(), "case {i}");
            let got = fused.forward(&x).unwrap();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.dims(), w.dims(), "case {i}");
                let d = max_diff(g, w);
                assert!(d < 1e-4, "case {i}: max difference {d}");
            }
        }
    }

    #[test]
    fn mixed_types_or_biases_stay_separate() {
        let k = 256;
        let mixed = vec![
            quantized(32, k, 1, GgmlDType::Q4_0),
            quantized(32, k, 2, GgmlDType::Q8_0),
        ];
        assert!(!FusedLinear::new(mixed, true).unwrap().is_fused());
        let bias = vec![dense(8, k, 3, true), dense(8, k, 4, false)];
        assert!(!FusedLinear::new(bias, true).unwrap().is_fused());
        let both = vec![dense(8, k, 5, false), quantized(32, k, 6, GgmlDType::Q8_0)];
        assert!(!FusedLinear::new(both, true).unwrap().is_fused());
        let off = vec![dense(8, k, 7, false), dense(8, k, 8, false)];
        assert!(!FusedLinear::new(off, false).unwrap().is_fused());
    }
}
