//! Where a model's layers come from: `WeightLoader` hands out projections, embeddings
//! and norms by their Hugging Face names from safetensors, seeded random weights or a
//! GGUF file, quantizing (`--quantize`), packing (packed_linear.rs) and fusing
//! (fused.rs) them as it goes, and counts what it made for the load log.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::{RmsNorm, VarBuilder};

use crate::fused::FusedLinear;
use crate::gguf::GgufTensors;
use crate::linear::{fallback_for_row, Embedding, Linear};
use crate::packed_linear::{self, WeightDtype};

enum Source {
    /// safetensors or seeded random weights; with `quantize`, 2-D weights are quantized
    /// as they are read (the builder then reads f32 on the CPU).
    Dense {
        vb: VarBuilder<'static>,
        quantize: Option<GgmlDType>,
    },
    Gguf {
        tensors: GgufTensors,
        /// Every tensor dequantized to the compute dtype (accuracy comparisons).
        dequantize: bool,
    },
}

/// Hands out the layers of a model by their Hugging Face names (`model.layers.0.mlp.up_proj`),
/// whatever the file calls them.
#[derive(Clone)]
pub struct WeightLoader {
    source: Arc<Source>,
    /// How many projections of each kind were made, for the load log.
    made: Arc<std::sync::Mutex<std::collections::BTreeMap<String, usize>>>,
    /// Bytes of weights handed out.
    bytes: Arc<std::sync::atomic::AtomicUsize>,
    prefix: String,
    dtype: DType,
    device: Device,
    /// Whether Q/K/V and gate/up are fused into one matmul each (fused.rs).
    fuse: bool,
    /// How dense f32 CPU weights are packed for the dense kernels (None: not packed).
    pack: Option<WeightDtype>,
}

/// Dense f32 weights on the CPU are packed where the AVX-512 kernel runs: there it is
/// 1.9–12× gemm's product from 8 rows up and level at 1 (benches/RESULTS.md). The AVX2
/// kernel is level with gemm from 128 rows and slower at 1, so AVX2-only CPUs keep the
/// unpacked path (cpu_matmul.rs) unless `--cpu-weight-dtype bf16` asks for packing.
fn default_packing(dtype: DType, device: &Device) -> Option<WeightDtype> {
    use hearth_kernels::dense::Isa;
    let avx512 = Isa::detected(WeightDtype::F32) == Isa::Avx512;
    (device.is_cpu() && dtype == DType::F32 && avx512).then_some(WeightDtype::F32)
}

/// Whether dense weights of `dtype` on `device` can be packed at all.
fn can_pack(dtype: DType, device: &Device) -> bool {
    device.is_cpu() && dtype == DType::F32
}

impl WeightLoader {
    /// `vb` must read f32 on the CPU when `quantize` is set; `dtype`/`device` are what the
    /// model computes in.
    pub fn dense(
        vb: VarBuilder<'static>,
        quantize: Option<GgmlDType>,
        dtype: DType,
        device: Device,
    ) -> Self {
        Self {
            source: Arc::new(Source::Dense { vb, quantize }),
            made: Default::default(),
            bytes: Default::default(),
            prefix: String::new(),
            pack: default_packing(dtype, &device),
            dtype,
            device,
            fuse: true,
        }
    }

    pub fn gguf(tensors: GgufTensors, dequantize: bool, dtype: DType, device: Device) -> Self {
        Self {
            source: Arc::new(Source::Gguf {
                tensors,
                dequantize,
            }),
            made: Default::default(),
            bytes: Default::default(),
            prefix: String::new(),
            pack: default_packing(dtype, &device),
            dtype,
            device,
            fuse: true,
        }
    }

    pub fn pp(&self, name: impl AsRef<str>) -> Self {
        let mut s = self.clone();
        if !s.prefix.is_empty() {
            s.prefix.push('.');
        }
        s.prefix.push_str(name.as_ref());
        s
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Loads Q/K/V and gate/up as separate matmuls (to compare against the fused model).
    pub fn without_fusion(mut self) -> Self {
        self.fuse = false;
        self
    }

    pub fn fuses(&self) -> bool {
        self.fuse
    }

    /// Stores dense CPU weights as `dtype` (bf16: half the bytes, products on bf16
    /// activations). Only for f32 compute on the CPU, where dense weights are packed.
    pub fn with_cpu_weight_dtype(mut self, dtype: WeightDtype) -> Result<Self, String> {
        if dtype == WeightDtype::F32 {
            return Ok(self);
        }
        if !can_pack(self.dtype, &self.device) {
            return Err(format!(
                "{dtype:?} needs f32 compute on the CPU (the model runs {:?} on {:?})",
                self.dtype,
                self.device.location()
            ));
        }
        self.pack = Some(dtype);
        Ok(self)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn dense_vb(&self) -> Option<(&VarBuilder<'static>, Option<GgmlDType>)> {
        match self.source.as_ref() {
            Source::Dense { vb, quantize } => Some((vb, *quantize)),
            Source::Gguf { .. } => None,
        }
    }

    /// A dense tensor in the compute dtype on the compute device.
    fn dense_tensor(&self, name: &str, shape: &[usize]) -> candle_core::Result<Tensor> {
        let t = self.dense_tensor_inner(name, shape)?;
        self.add_bytes(t.elem_count() * t.dtype().size_in_bytes());
        Ok(t)
    }

    fn dense_tensor_inner(&self, name: &str, shape: &[usize]) -> candle_core::Result<Tensor> {
        let full = format!("{}.{name}", self.prefix);
        match self.source.as_ref() {
            Source::Dense { vb, .. } => vb
                .get(shape, &full)?
                .to_dtype(self.dtype)?
                .to_device(&self.device),
            Source::Gguf { tensors, .. } => {
                let q = tensors.tensor(&full, shape, &Device::Cpu)?;
                q.dequantize(&Device::Cpu)?
                    .to_dtype(self.dtype)?
                    .to_device(&self.device)
            }
        }
    }

    /// A 2-D weight as stored (GGUF) or quantized now (`--quantize`); None when it is
    /// to be dense.
    fn quantized_weight(&self, shape: (usize, usize)) -> candle_core::Result<Option<QTensor>> {
        let q = self.quantized_weight_inner(shape)?;
        if let Some(q) = &q {
            self.add_bytes(q.storage_size_in_bytes());
        }
        Ok(q)
    }

    fn quantized_weight_inner(
        &self,
        shape: (usize, usize),
    ) -> candle_core::Result<Option<QTensor>> {
        let full = format!("{}.weight", self.prefix);
        match self.source.as_ref() {
            Source::Dense { vb, quantize } => {
                let Some(q) = quantize else { return Ok(None) };
                let q = fallback_for_row(*q, shape.1);
                if q == GgmlDType::F32 {
                    return Ok(None);
                }
                let w = vb.get(shape, &full)?;
                Ok(Some(QTensor::quantize_onto(&w, q, &self.device)?))
            }
            Source::Gguf {
                tensors,
                dequantize,
            } => {
                if *dequantize || tensors.is_float(&full) {
                    return Ok(None);
                }
                Ok(Some(tensors.tensor(
                    &full,
                    &[shape.0, shape.1],
                    &self.device,
                )?))
            }
        }
    }

    fn contains(&self, name: &str) -> bool {
        let full = format!("{}.{name}", self.prefix);
        match self.source.as_ref() {
            Source::Dense { vb, .. } => vb.contains_tensor(&full),
            Source::Gguf { tensors, .. } => tensors.contains(&full),
        }
    }

    /// A projection, packed for the CPU's dense kernels where that applies.
    pub fn linear(&self, in_dim: usize, out_dim: usize, bias: bool) -> candle_core::Result<Linear> {
        let l = self.fusion_part(in_dim, out_dim, bias)?;
        self.pack_linear(l)
    }

    /// Projections of one input, fused into one matmul when `fuses()`, then packed.
    pub fn fused(&self, parts: Vec<Linear>) -> candle_core::Result<FusedLinear> {
        let fused = FusedLinear::new(parts, self.fuse)?;
        match self.pack {
            Some(dtype) => {
                let before: usize = fused
                    .parts()
                    .into_iter()
                    .map(packed_linear::dense_bytes)
                    .sum();
                let fused = fused.packed(dtype)?;
                let after: usize = fused
                    .parts()
                    .into_iter()
                    .map(packed_linear::packed_bytes)
                    .sum();
                self.rebytes(before, after);
                Ok(fused)
            }
            None => Ok(fused),
        }
    }

    fn pack_linear(&self, l: Linear) -> candle_core::Result<Linear> {
        let Some(dtype) = self.pack else {
            return Ok(l);
        };
        let before = packed_linear::dense_bytes(&l);
        let l = l.packed(dtype)?;
        self.rebytes(before, packed_linear::packed_bytes(&l));
        Ok(l)
    }

    /// A packed copy replaced `before` bytes of dense weights with `after`.
    fn rebytes(&self, before: usize, after: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        if after > 0 {
            self.bytes.fetch_add(after, Relaxed);
            self.bytes
                .fetch_sub(before.min(self.bytes.load(Relaxed)), Relaxed);
        }
    }

    /// A projection that `fused` will fuse with others and pack.
    pub fn fusion_part(
        &self,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> candle_core::Result<Linear> {
        let b = if bias {
            Some(self.dense_tensor("bias", &[out_dim])?)
        } else {
            None
        };
        let l = match self.quantized_weight((out_dim, in_dim))? {
            Some(q) => Linear::quantized(Arc::new(q), b)?,
            None => Linear::Dense(candle_nn::Linear::new(
                self.dense_tensor("weight", &[out_dim, in_dim])?,
                b,
            )),
        };
        self.count(&l);
        Ok(l)
    }

    /// Bytes of the weights made so far (a tied output projection counts once).
    pub fn bytes(&self) -> usize {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn add_bytes(&self, n: usize) {
        self.bytes
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    fn count(&self, l: &Linear) {
        let kind = match (l, self.pack) {
            (Linear::Dense(d), Some(dtype)) if d.weight().device().is_cpu() => {
                packed_linear::label(dtype)
            }
            _ => l.kind(),
        };
        if let Ok(mut m) = self.made.lock() {
            *m.entry(kind).or_default() += 1;
        }
    }

    /// How the projections made so far are stored, e.g. `Q4_1×210, Q8_0×1`.
    pub fn summary(&self) -> String {
        self.made
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(k, n)| format!("{k}×{n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    }

    pub fn embedding(&self, vocab: usize, hidden: usize) -> candle_core::Result<Embedding> {
        if let Some(q) = self.quantized_weight((vocab, hidden))? {
            return Ok(Embedding::Quantized {
                table: Arc::new(q),
                dtype: self.dtype,
            });
        }
        let w = self.dense_tensor("weight", &[vocab, hidden])?;
        Ok(Embedding::Dense(candle_nn::Embedding::new(w, hidden)))
    }

    pub fn rms_norm(&self, size: usize, eps: f64) -> candle_core::Result<RmsNorm> {
        Ok(RmsNorm::new(self.dense_tensor("weight", &[size])?, eps))
    }

    /// The output projection: `lm_head` when the file has one, the embedding otherwise.
    /// A dense tied table is packed for the projection and `embedding` then reads its
    /// rows from the packed copy (one copy of the table, not two).
    pub fn lm_head(
        &self,
        tied: bool,
        embedding: &mut Embedding,
        vocab: usize,
        hidden: usize,
    ) -> candle_core::Result<Linear> {
        let head = self.pp("lm_head");
        if tied || (self.dense_vb().is_none() && !head.contains("weight")) {
            if let (Some(dtype), Embedding::Dense(e)) = (self.pack, &*embedding) {
                let t = e.embeddings();
                if t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() == 2 {
                    let table = Arc::new(packed_linear::pack(t, dtype)?);
                    self.rebytes(t.elem_count() * 4, table.bytes());
                    *embedding = Embedding::Packed {
                        table,
                        dtype: self.dtype,
                    };
                }
            }
            let l = embedding.as_lm_head()?;
            self.count(&l);
            return Ok(l);
        }
        head.linear(hidden, vocab, false)
    }
}
