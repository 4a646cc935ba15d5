//! The Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3) as one transformer that
//! runs a whole scheduler step in one pass: the tokens of every scheduled sequence are
//! flattened into one `[T, hidden]` activation, so the projections and MLPs are single
//! matmuls over the batch, and only attention looks at sequence boundaries: one
//! paged-attention call per layer reads each sequence's keys and values in place from
//! the paged cache through its block table (paged_attention.rs).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::RmsNorm;

use crate::config::ModelConfig;
use crate::cpu_ops::Rope;
use crate::fused::FusedLinear;
use crate::gemv;
use crate::kv_cache::KvCacheTensors;
use crate::linear::{Embedding, Linear};
use crate::norm_project::{gemv_weights, norm_project, LayerInput};
use crate::paged_attention::AttentionMetadata;
use crate::rope::RotaryTables;
use crate::weight_loader::WeightLoader;

mod batch;
mod layer;

pub use batch::ForwardBatch;
use layer::Layer;
pub(crate) use layer::{add_norm, norm};

pub struct Transformer {
    cfg: ModelConfig,
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: RotaryTables,
    dtype: DType,
    device: Device,
    /// CUDA: the pinned host buffer each step's metadata is packed into for its one
    /// upload (step_metadata.rs), kept across steps and grown when a step needs more.
    #[cfg(feature = "cuda")]
    pinned: std::sync::Mutex<Option<PinnedHostSlice<u32>>>,
}

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::PinnedHostSlice;

/// The smallest pinned buffer (words): a decode step of a few dozen sequences fits.
#[cfg(feature = "cuda")]
const PINNED_MIN_WORDS: usize = 16 * 1024;

/// Per-step inputs shared by every layer.
struct StepTensors<'a> {
    /// Host tables and positions for the CPU kernels (RoPE fused into the cache write).
    rope: Rope<'a>,
    /// Other devices and dtypes: the positions' cos/sin rows for candle's RoPE, and
    /// each new token's slot repeated across a K/V row for `scatter_set`.
    generic: Option<(Tensor, Tensor, Tensor)>,
    attention: &'a AttentionMetadata,
    /// CUDA: the token ids and the rows that get logits, views of the step's packed
    /// upload (None elsewhere: uploaded as tensors).
    ids: Option<Tensor>,
    logits_rows: Option<Tensor>,
    /// CUDA: the fused norm + RoPE + cache-write kernel's tables and the step's
    /// positions and slots on the device (views of the packed upload).
    #[cfg(feature = "cuda")]
    fused: Option<FusedRope<'a>>,
}

#[cfg(feature = "cuda")]
struct FusedRope<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    positions: Tensor,
    slots: Tensor,
}

impl Transformer {
    pub fn load(cfg: &ModelConfig, vb: WeightLoader) -> candle_core::Result<Self> {
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let vb_m = vb.pp("model");
        let mut embed_tokens = vb_m
            .pp("embed_tokens")
            .embedding(cfg.vocab_size, cfg.hidden_size)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let h = cfg.hidden_size;
        for i in 0..cfg.num_hidden_layers {
            layers.push(Layer::load(cfg, &vb, vb_m.pp(format!("layers.{i}")))?);
        }
        let norm = vb_m.pp("norm").rms_norm(h, cfg.rms_norm_eps)?;
        let lm_head = vb.lm_head(
            cfg.tie_word_embeddings,
            &mut embed_tokens,
            cfg.vocab_size,
            h,
        )?;
        let rotary = RotaryTables::new(cfg, cfg.max_position_embeddings, dtype, &device)?;
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary,
            dtype,
            device,
            #[cfg(feature = "cuda")]
            pinned: std::sync::Mutex::new(None),
        })
    }

    /// RoPE tables with llama.cpp's angles (every GGUF file, and `--attention-numerics
    /// llama-cpp`: see [`RotaryTables::llama_cpp`]).
    pub fn use_llama_cpp_rope(&mut self) -> candle_core::Result<()> {
        self.rotary = RotaryTables::llama_cpp(
            &self.cfg,
            self.cfg.max_position_embeddings,
            self.dtype,
            &self.device,
        )?;
        Ok(())
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// How many matmuls (a fused group counting once, the output layer included) run on
    /// weights packed for the CPU's dense kernels (packed_linear.rs).
    pub fn packed_projections(&self) -> usize {
        let packed = |l: &Linear| usize::from(matches!(l, Linear::Packed { .. }));
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let fused = |f: &FusedLinear| f.parts().into_iter().map(packed).sum::<usize>();
                fused(&l.attn.qkv_proj)
                    + packed(&l.attn.o_proj)
                    + fused(&l.mlp.gate_up_proj)
                    + packed(&l.mlp.down_proj)
            })
            .sum();
        layers + packed(&self.lm_head)
    }

    /// How many of the Q/K/V and gate/up groups run as one matmul (two per layer at most).
    pub fn fused_projections(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                usize::from(l.attn.qkv_proj.is_fused()) + usize::from(l.mlp.gate_up_proj.is_fused())
            })
            .sum()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs one step and returns the logits, `[S, vocab]` in f32, of the last token of
    /// each sequence with `wants_logits`, in batch order.
    pub fn forward(
        &self,
        batch: &ForwardBatch,
        cache: &KvCacheTensors,
    ) -> candle_core::Result<Tensor> {
        let t = batch.num_tokens();
        let dev = &self.device;
        let step = self.step_tensors(batch)?;
        let ids = match &step.ids {
            Some(ids) => ids.clone(),
            None => Tensor::from_slice(&batch.token_ids, t, dev)?,
        };
        let mut x = self.embed_tokens.forward(&ids)?;
        // What the next norm adds to the residual x first (None before the first layer).
        let mut delta: Option<Tensor> = None;
        let n = batch.logits_rows.len();
        let rows = (n != t && n > 0)
            .then(|| match &step.logits_rows {
                Some(r) => Ok(r.clone()),
                None => Tensor::from_slice(&batch.logits_rows, n, dev),
            })
            .transpose()?;
        let select = |x: Tensor| match &rows {
            Some(r) => x.index_select(r, 0),
            None => Ok(x),
        };
        // On the CPU the last layer's MLP runs on the sampled rows only, as in llama.cpp's
        // graph (`inp_out_ids`): what follows attention there is row by row, so the rows
        // kept are unchanged, a prefill chunk skips the MLP of rows nobody reads, and the
        // quantized products whose float order depends on their row count (llama.cpp's
        // tiled K-quant matmul from 8 rows: q8::SumOrder::Tiled) see llama.cpp's count.
        // CUDA keeps the launch plan its counter checks (select after the layers).
        let early = dev.is_cpu();
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let (x1, qkv) = norm_project(
                &x,
                delta.as_ref(),
                &layer.input_layernorm,
                gemv_weights(&layer.attn.qkv_proj, t, self.dtype),
            )?;
            let a = layer.attn.forward(qkv, &step, cache, i)?;
            let (x1, a, m) = match (early && i == last, n) {
                (true, 0) => break,
                (true, _) => (select(x1)?, select(a)?, n),
                (false, _) => (x1, a, t),
            };
            let (x2, gate_up) = norm_project(
                &x1,
                Some(&a),
                &layer.post_attention_layernorm,
                gemv_weights(&layer.mlp.gate_up_proj, m, self.dtype),
            )?;
            delta = Some(layer.mlp.forward(gate_up)?);
            x = x2;
        }
        // Only the rows that get sampled go through the final norm and the LM head: a
        // 2k-token prefill chunk needs one row of logits, not 2k.
        if n == 0 {
            return Tensor::zeros((0, self.cfg.vocab_size), DType::F32, dev);
        }
        let (x, delta) = if early {
            (x, delta)
        } else {
            (select(x)?, delta.map(select).transpose()?)
        };
        let head = gemv::dense(&self.lm_head, n, x.dtype())
            .and_then(|(weight, bias)| Some((weight, bias, vec![weight.dim(0).ok()?])));
        let logits = match norm_project(&x, delta.as_ref(), &self.norm, head)? {
            (_, LayerInput::Projected(mut y)) => y
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("lm_head: no output".into()))?,
            (_, LayerInput::Normed(h)) => self.lm_head.forward(&h)?,
        };
        logits.to_dtype(DType::F32)
    }

    fn step_tensors<'a>(&'a self, batch: &'a ForwardBatch) -> candle_core::Result<StepTensors<'a>> {
        let rope = Rope {
            cos: &self.rotary.cos_host,
            sin: &self.rotary.sin_host,
            positions: &batch.positions,
        };
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = &self.device {
            use crate::paged_attention::launch::Buffer;
            let (packed, layout) = self.upload_step(batch, dev)?;
            let part = |b: Buffer| -> candle_core::Result<Tensor> {
                let r = layout.range(b).ok_or_else(|| {
                    candle_core::Error::Msg(format!("step metadata: {b:?} not packed"))
                })?;
                packed.narrow(0, r.start, r.len())
            };
            crate::paged_attention::preset_device_metadata(&batch.attention, &packed, &layout)?;
            return Ok(StepTensors {
                rope,
                generic: None,
                attention: &batch.attention,
                ids: Some(part(Buffer::TokenIds)?),
                logits_rows: Some(part(Buffer::LogitsRows)?),
                fused: Some(FusedRope {
                    cos: &self.rotary.cos,
                    sin: &self.rotary.sin,
                    positions: part(Buffer::Positions)?,
                    slots: part(Buffer::Slots)?,
                }),
            });
        }
        let generic = if self.device.is_cpu() && self.dtype == DType::F32 {
            None
        } else {
            let dev = &self.device;
            let t = batch.num_tokens();
            let positions = Tensor::from_slice(&batch.positions, t, dev)?;
            let cos = self.rotary.cos.index_select(&positions, 0)?.contiguous()?;
            let sin = self.rotary.sin.index_select(&positions, 0)?.contiguous()?;
            let width = self.cfg.num_key_value_heads * self.cfg.head_dim;
            let slot_index = Tensor::from_slice(&batch.attention.slots, (t, 1), dev)?
                .broadcast_as((t, width))?
                .contiguous()?;
            Some((cos, sin, slot_index))
        };
        Ok(StepTensors {
            rope,
            generic,
            attention: &batch.attention,
            ids: None,
            logits_rows: None,
            #[cfg(feature = "cuda")]
            fused: None,
        })
    }

    /// The step's metadata (token ids, positions, slots, logits rows, the attention
    /// tables) packed into the pinned buffer and copied to the device in one copy:
    /// the whole buffer on the device (U32) and where each part lies in it.
    #[cfg(feature = "cuda")]
    fn upload_step(
        &self,
        batch: &ForwardBatch,
        dev: &candle_core::CudaDevice,
    ) -> candle_core::Result<(Tensor, crate::step_metadata::PackedLayout)> {
        use crate::paged_attention::launch::{Buffer, HostMeta};
        use crate::step_metadata::{attention_parts, PackedLayout};
        use candle_core::cuda_backend::WrapErr;
        let host = HostMeta::new(&batch.attention);
        let mut data: Vec<(Buffer, &[u32])> = vec![
            (Buffer::TokenIds, &batch.token_ids),
            (Buffer::Positions, &batch.positions),
            (Buffer::Slots, &batch.attention.slots),
            (Buffer::LogitsRows, &batch.logits_rows),
        ];
        data.extend(attention_parts(&host));
        let lens: Vec<(Buffer, usize)> = data.iter().map(|(b, d)| (*b, d.len())).collect();
        let layout = PackedLayout::new(&lens)?;
        let mut pinned = self
            .pinned
            .lock()
            .map_err(|_| candle_core::Error::Msg("step metadata: pinned buffer lock".into()))?;
        if pinned.as_ref().is_none_or(|p| p.len() < layout.words()) {
            let words = layout.words().next_power_of_two().max(PINNED_MIN_WORDS);
            // SAFETY: zeroed below before any copy reads it.
            let mut p = unsafe { dev.cuda_stream().context().alloc_pinned::<u32>(words) }.w()?;
            p.as_mut_slice().w()?.fill(0);
            *pinned = Some(p);
        }
        let Some(p) = pinned.as_mut() else {
            candle_core::bail!("step metadata: no pinned buffer");
        };
        // as_mut_slice waits for the previous step's copy out of this buffer.
        layout.write(&data, p.as_mut_slice().w()?)?;
        // The whole pinned buffer is copied, not only the layout's words: cudarc
        // copies pinned memory only as a whole slice (a part, copied as a plain slice,
        // records no event for the next step's write to wait on). The buffer never
        // shrinks, so after one large step every later step copies that size (64 KiB
        // at least); bounding it (two alternating buffers, our own event) is left.
        // SAFETY: every word is written by the copy below.
        let mut dst = unsafe { dev.alloc::<u32>(p.len())? };
        dev.memcpy_htod(&*p, &mut dst)?;
        let n = p.len();
        let packed = Tensor::from_storage(
            candle_core::Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(dst, dev.clone())),
            n,
            candle_core::op::BackpropOp::none(),
            false,
        );
        Ok((packed, layout))
    }
}
