//! The Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3) as one transformer that
//! runs a whole scheduler step in one pass: the tokens of every scheduled sequence are
//! flattened into one `[T, hidden]` activation, so the projections and MLPs are single
//! matmuls over the batch, and only attention looks at sequence boundaries: one
//! paged-attention call per layer reads each sequence's keys and values in place from
//! the paged cache through its block table (paged_attention.rs).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::RmsNorm;

use crate::config::ModelConfig;
use crate::cpu_ops::{self, Rope};
use crate::fused::FusedLinear;
use crate::gemv;
use crate::kv_cache::KvCacheTensors;
use crate::linear::{Embedding, Linear};
use crate::norm_project::{gemv_weights, norm_project, project, LayerInput};
use crate::paged_attention::{paged_attention, AttentionMetadata};
use crate::rope::RotaryTables;
use crate::weight_loader::WeightLoader;

/// One step's input: the scheduled sequences' new tokens flattened in order, each
/// token's position (for RoPE), which rows to return logits for, and the attention
/// metadata (query offsets, sequence lengths, block tables, cache slots) that one
/// paged-attention call per layer reads.
#[derive(Debug, Clone)]
pub struct ForwardBatch {
    pub token_ids: Vec<u32>,
    pub positions: Vec<u32>,
    /// Flattened index of the last token of each sequence that wants logits.
    pub logits_rows: Vec<u32>,
    pub attention: AttentionMetadata,
}

impl ForwardBatch {
    pub fn new(block_size: usize) -> Self {
        Self {
            token_ids: Vec::new(),
            positions: Vec::new(),
            logits_rows: Vec::new(),
            attention: AttentionMetadata::new(block_size),
        }
    }

    /// Adds a sequence's chunk: `tokens` at positions `first_position..`, its KV
    /// blocks covering them (and everything before), and whether the step returns
    /// logits for the chunk's last token (false for a prefill chunk that does not
    /// reach the end of the prompt).
    pub fn push(
        &mut self,
        tokens: &[u32],
        first_position: usize,
        block_table: &[u32],
        wants_logits: bool,
    ) {
        let n = tokens.len();
        self.token_ids.extend_from_slice(tokens);
        self.positions
            .extend((first_position..first_position + n).map(|p| p as u32));
        if wants_logits {
            self.logits_rows.push((self.token_ids.len() - 1) as u32);
        }
        self.attention.push(n, first_position + n, block_table);
    }

    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }
}

struct Attention {
    /// Q, K and V in that order, one matmul where the weights allow (fused.rs).
    qkv_proj: FusedLinear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

struct Mlp {
    /// Gate and up, one matmul where the weights allow.
    gate_up_proj: FusedLinear,
    down_proj: Linear,
}

struct Layer {
    input_layernorm: RmsNorm,
    attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

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

fn linear(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: WeightLoader,
) -> candle_core::Result<Linear> {
    vb.linear(in_dim, out_dim, bias)
}

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
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        for i in 0..cfg.num_hidden_layers {
            let vb_l = vb_m.pp(format!("layers.{i}"));
            let vb_a = vb_l.pp("self_attn");
            let bias = cfg.attention_bias;
            let (q_width, kv_width) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
            let qkv = vec![
                vb_a.pp("q_proj").fusion_part(h, q_width, bias)?,
                vb_a.pp("k_proj").fusion_part(h, kv_width, bias)?,
                vb_a.pp("v_proj").fusion_part(h, kv_width, bias)?,
            ];
            let attn = Attention {
                qkv_proj: vb.fused(qkv)?,
                o_proj: linear(cfg.num_attention_heads * d, h, false, vb_a.pp("o_proj"))?,
                q_norm: if cfg.qk_norm {
                    Some(vb_a.pp("q_norm").rms_norm(d, cfg.rms_norm_eps)?)
                } else {
                    None
                },
                k_norm: if cfg.qk_norm {
                    Some(vb_a.pp("k_norm").rms_norm(d, cfg.rms_norm_eps)?)
                } else {
                    None
                },
                num_heads: cfg.num_attention_heads,
                num_kv_heads: cfg.num_key_value_heads,
                head_dim: d,
            };
            let vb_mlp = vb_l.pp("mlp");
            let mlp = Mlp {
                gate_up_proj: vb.fused(vec![
                    vb_mlp
                        .pp("gate_proj")
                        .fusion_part(h, cfg.intermediate_size, false)?,
                    vb_mlp
                        .pp("up_proj")
                        .fusion_part(h, cfg.intermediate_size, false)?,
                ])?,
                down_proj: linear(cfg.intermediate_size, h, false, vb_mlp.pp("down_proj"))?,
            };
            layers.push(Layer {
                input_layernorm: vb_l.pp("input_layernorm").rms_norm(h, cfg.rms_norm_eps)?,
                attn,
                post_attention_layernorm: vb_l
                    .pp("post_attention_layernorm")
                    .rms_norm(h, cfg.rms_norm_eps)?,
                mlp,
            });
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
        for (i, layer) in self.layers.iter().enumerate() {
            let (x1, qkv) = norm_project(
                &x,
                delta.as_ref(),
                &layer.input_layernorm,
                gemv_weights(&layer.attn.qkv_proj, t, self.dtype),
            )?;
            let a = layer.attn.forward(qkv, &step, cache, i)?;
            let (x2, gate_up) = norm_project(
                &x1,
                Some(&a),
                &layer.post_attention_layernorm,
                gemv_weights(&layer.mlp.gate_up_proj, t, self.dtype),
            )?;
            delta = Some(layer.mlp.forward(gate_up)?);
            x = x2;
        }
        // Only the rows that get sampled go through the final norm and the LM head: a
        // 2k-token prefill chunk needs one row of logits, not 2k.
        if n == 0 {
            return Tensor::zeros((0, self.cfg.vocab_size), DType::F32, dev);
        }
        let x = select(x)?;
        let delta = delta.map(select).transpose()?;
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

pub(crate) fn norm(n: &RmsNorm, x: &Tensor) -> candle_core::Result<Tensor> {
    cpu_ops::rms_norm(x, n.weight(), n.eps())
}

/// The residual add and the next norm: one fused kernel on CUDA (layer_kernels.rs),
/// cpu_ops' elsewhere.
pub(crate) fn add_norm(
    x: &Tensor,
    delta: &Tensor,
    n: &RmsNorm,
) -> candle_core::Result<(Tensor, Tensor)> {
    crate::layer_kernels::add_rms_norm(x, delta, n.weight(), n.eps())
}

impl Mlp {
    fn forward(&self, input: LayerInput) -> candle_core::Result<Tensor> {
        let x = match input {
            // gate and up from the GEMV, each contiguous: SiLU·mul fused into down_proj's
            // GEMV where it takes the weight.
            LayerInput::Projected(parts) => {
                let [gate, up]: [Tensor; 2] = parts
                    .try_into()
                    .map_err(|_| candle_core::Error::Msg("mlp: gate/up split".into()))?;
                let rows = gate.dim(0)?;
                if let Some((weight, bias)) = gemv::dense(&self.down_proj, rows, gate.dtype()) {
                    let parts = [weight.dim(0)?];
                    let mut out = gemv::gemv(
                        &gemv::GemvWeights {
                            weight,
                            bias,
                            parts: &parts,
                        },
                        &gemv::GemvInput::Silu {
                            gate: &gate.contiguous()?,
                            up: &up.contiguous()?,
                        },
                    )?;
                    return out
                        .parts
                        .pop()
                        .ok_or_else(|| candle_core::Error::Msg("gemv: no output".into()));
                }
                return self.down_proj.forward(&cpu_ops::silu_mul(&gate, &up)?);
            }
            LayerInput::Normed(x) => x,
        };
        // CUDA with gate and up as one matmul: SiLU·mul in one kernel on its output,
        // where candle's two ops would each read a strided half.
        if let (true, FusedLinear::One { linear, widths }) =
            (x.device().is_cuda(), &self.gate_up_proj)
        {
            if let [g, u] = widths[..] {
                if g == u {
                    let act = crate::layer_kernels::silu_mul_joined(&linear.forward(&x)?, g)?;
                    return self.down_proj.forward(&act);
                }
            }
        }
        let [gate, up]: [Tensor; 2] = self
            .gate_up_proj
            .forward(&x)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("mlp: gate/up split".into()))?;
        self.down_proj.forward(&cpu_ops::silu_mul(&gate, &up)?)
    }
}

impl Attention {
    fn forward(
        &self,
        input: LayerInput,
        step: &StepTensors,
        cache: &KvCacheTensors,
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let qkv = match input {
            LayerInput::Normed(x) => self.qkv_proj.forward(&x)?,
            LayerInput::Projected(parts) => parts,
        };
        let [q, k, v]: [Tensor; 3] = qkv
            .try_into()
            .map_err(|_| candle_core::Error::Msg("attention: q/k/v split".into()))?;
        let t = q.dim(0)?;
        let mut q = q.reshape((t, h, d))?;
        let mut k = k.reshape((t, kvh, d))?;
        let v = v.reshape((t, kvh, d))?;
        let (k_cache, v_cache) = cache.layer(layer);
        let scale = 1.0 / (d as f32).sqrt();
        #[cfg(feature = "cuda")]
        if let Some(f) = &step.fused {
            let norms = match (&self.q_norm, &self.k_norm) {
                (Some(qn), Some(kn)) => Some((qn.weight(), kn.weight(), qn.eps())),
                _ => None,
            };
            let inputs = crate::paged_attention::RopeCacheInputs {
                q: &q,
                k: &k,
                v: &v,
                cos: f.cos,
                sin: f.sin,
                norms,
                positions: step.rope.positions,
                slots: &step.attention.slots,
            };
            let q = crate::paged_attention::rope_cache(
                &inputs,
                &f.positions,
                &f.slots,
                k_cache,
                v_cache,
            )?;
            let o = paged_attention(&q, k_cache, v_cache, step.attention, scale)?;
            return project(&self.o_proj, &o.reshape((t, h * d))?);
        }
        if let Some(n) = &self.q_norm {
            q = norm(n, &q)?;
        }
        if let Some(n) = &self.k_norm {
            k = norm(n, &k)?;
        }
        // New keys and values go straight into their slots of the paged cache (keys
        // rotated on the way); the attention op then reads every key where it lies.
        let slots = &step.attention.slots;
        let q = match &step.generic {
            None => {
                cpu_ops::write_cache(k_cache, &k, slots, Some(step.rope), unreachable_index)?;
                cpu_ops::write_cache(v_cache, &v, slots, None, unreachable_index)?;
                cpu_ops::rope(&q, step.rope)?
            }
            Some((cos, sin, slot_index)) => {
                let rope = |x: &Tensor| {
                    candle_nn::rotary_emb::rope_thd(&x.contiguous()?.unsqueeze(0)?, cos, sin)?
                        .squeeze(0)
                };
                cpu_ops::write_cache(k_cache, &rope(&k)?, slots, None, || Ok(slot_index.clone()))?;
                cpu_ops::write_cache(v_cache, &v, slots, None, || Ok(slot_index.clone()))?;
                rope(&q)?
            }
        };
        let o = paged_attention(&q, k_cache, v_cache, step.attention, scale)?;
        project(&self.o_proj, &o.reshape((t, h * d))?)
    }
}

/// The CPU f32 path never builds a slot-index tensor.
fn unreachable_index() -> candle_core::Result<Tensor> {
    candle_core::bail!("slot index requested on the CPU f32 path")
}
