//! The Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3) as one transformer that
//! runs a whole scheduler step in one pass: the tokens of every scheduled sequence are
//! flattened into one `[T, hidden]` activation, so the projections and MLPs are single
//! matmuls over the batch, and only attention looks at sequence boundaries, reading each
//! sequence's keys and values from the paged cache through its block table.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::RmsNorm;

use crate::config::ModelConfig;
use crate::kv_cache::KvCacheTensors;
use crate::linear::{Embedding, Linear, WeightLoader};
use crate::rope::RotaryTables;

/// What attention needs to know about one sequence in the step.
#[derive(Debug, Clone)]
pub struct SeqSlice {
    /// Cache slots of every token of the context, the step's new tokens included,
    /// in position order.
    pub context_slots: Vec<u32>,
    /// How many of the step's tokens belong to this sequence (1 for a decode).
    pub query_len: usize,
    /// Whether the step must return logits for this sequence's last token (false for
    /// a prefill chunk that does not reach the end of the prompt).
    pub wants_logits: bool,
}

/// One step's input. Tokens are laid out as all single-token sequences first (their
/// attention is batched), then each multi-token chunk, contiguous, in `seqs` order.
#[derive(Debug, Clone, Default)]
pub struct ForwardBatch {
    pub token_ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub slots: Vec<u32>,
    pub seqs: Vec<SeqSlice>,
}

impl ForwardBatch {
    pub fn push(&mut self, tokens: &[u32], first_position: usize, seq: SeqSlice) {
        debug_assert_eq!(tokens.len(), seq.query_len);
        let ctx = seq.context_slots.len();
        self.token_ids.extend_from_slice(tokens);
        self.positions
            .extend((first_position..first_position + tokens.len()).map(|p| p as u32));
        self.slots
            .extend_from_slice(&seq.context_slots[ctx - tokens.len()..]);
        self.seqs.push(seq);
    }

    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
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
}

fn linear(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: WeightLoader,
) -> candle_core::Result<Linear> {
    vb.linear(in_dim, out_dim, bias)
}

/// Per-step tensors shared by every layer.
struct StepTensors {
    cos: Tensor,
    sin: Tensor,
    slot_index: Tensor,
    decode: Option<DecodeGroup>,
    prefills: Vec<PrefillSeq>,
}

/// The single-token sequences of a step, padded to the longest context.
struct DecodeGroup {
    count: usize,
    max_len: usize,
    gather: Tensor,
    mask: Tensor,
}

struct PrefillSeq {
    start: usize,
    query_len: usize,
    gather: Tensor,
    mask: Tensor,
}

impl Transformer {
    pub fn load(cfg: &ModelConfig, vb: WeightLoader) -> candle_core::Result<Self> {
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let vb_m = vb.pp("model");
        let embed_tokens = vb_m
            .pp("embed_tokens")
            .embedding(cfg.vocab_size, cfg.hidden_size)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        for i in 0..cfg.num_hidden_layers {
            let vb_l = vb_m.pp(format!("layers.{i}"));
            let vb_a = vb_l.pp("self_attn");
            let bias = cfg.attention_bias;
            let attn = Attention {
                q_proj: linear(h, cfg.num_attention_heads * d, bias, vb_a.pp("q_proj"))?,
                k_proj: linear(h, cfg.num_key_value_heads * d, bias, vb_a.pp("k_proj"))?,
                v_proj: linear(h, cfg.num_key_value_heads * d, bias, vb_a.pp("v_proj"))?,
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
                gate_proj: linear(h, cfg.intermediate_size, false, vb_mlp.pp("gate_proj"))?,
                up_proj: linear(h, cfg.intermediate_size, false, vb_mlp.pp("up_proj"))?,
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
        let lm_head = vb.lm_head(cfg.tie_word_embeddings, &embed_tokens, cfg.vocab_size, h)?;
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
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs one step and returns the logits, `[S, vocab]` in f32, of the last token of
    /// each sequence with `wants_logits`, in `batch.seqs` order.
    pub fn forward(
        &self,
        batch: &ForwardBatch,
        cache: &KvCacheTensors,
    ) -> candle_core::Result<Tensor> {
        let t = batch.num_tokens();
        let dev = &self.device;
        let ids = Tensor::from_slice(&batch.token_ids, t, dev)?;
        let positions = Tensor::from_slice(&batch.positions, t, dev)?;
        let step = self.step_tensors(batch, &positions)?;
        let mut x = self.embed_tokens.forward(&ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let h = layer.input_layernorm.forward(&x)?;
            let h = layer.attn.forward(&h, &step, cache, i)?;
            let x1 = (residual + h)?;
            let h = layer.post_attention_layernorm.forward(&x1)?;
            let h = layer.mlp.forward(&h)?;
            x = (x1 + h)?;
        }
        // Only the rows that get sampled go through the final norm and the LM head:
        // a 2k-token prefill chunk needs one row of logits, not 2k.
        let mut rows = Vec::new();
        let mut offset = 0u32;
        for s in &batch.seqs {
            offset += s.query_len as u32;
            if s.wants_logits {
                rows.push(offset - 1);
            }
        }
        if rows.is_empty() {
            return Tensor::zeros((0, self.cfg.vocab_size), DType::F32, dev);
        }
        let n = rows.len();
        let rows = Tensor::from_vec(rows, n, dev)?;
        let x = x.index_select(&rows, 0)?;
        let x = self.norm.forward(&x)?;
        self.lm_head.forward(&x)?.to_dtype(DType::F32)
    }

    fn step_tensors(
        &self,
        batch: &ForwardBatch,
        positions: &Tensor,
    ) -> candle_core::Result<StepTensors> {
        let dev = &self.device;
        let cos = self.rotary.cos.index_select(positions, 0)?.contiguous()?;
        let sin = self.rotary.sin.index_select(positions, 0)?.contiguous()?;
        let t = batch.num_tokens();
        let width = self.cfg.num_key_value_heads * self.cfg.head_dim;
        let slot_index = Tensor::from_slice(&batch.slots, (t, 1), dev)?
            .broadcast_as((t, width))?
            .contiguous()?;
        let neg = f32::NEG_INFINITY;
        // Single-token sequences come first; batch their attention into one matmul.
        let n_decode = batch.seqs.iter().take_while(|s| s.query_len == 1).count();
        let decode = if n_decode > 0 {
            let max_len = batch.seqs[..n_decode]
                .iter()
                .map(|s| s.context_slots.len())
                .max()
                .unwrap_or(1);
            let mut gather = Vec::with_capacity(n_decode * max_len);
            let mut mask = Vec::with_capacity(n_decode * max_len);
            for s in &batch.seqs[..n_decode] {
                let l = s.context_slots.len();
                gather.extend_from_slice(&s.context_slots);
                gather.extend(std::iter::repeat_n(0u32, max_len - l));
                mask.extend(std::iter::repeat_n(0f32, l));
                mask.extend(std::iter::repeat_n(neg, max_len - l));
            }
            Some(DecodeGroup {
                count: n_decode,
                max_len,
                gather: Tensor::from_vec(gather, n_decode * max_len, dev)?,
                mask: Tensor::from_vec(mask, (n_decode, 1, 1, max_len), dev)?
                    .to_dtype(self.dtype)?,
            })
        } else {
            None
        };
        let mut prefills = Vec::new();
        let mut start = n_decode;
        for s in &batch.seqs[n_decode..] {
            let l = s.context_slots.len();
            let q = s.query_len;
            let past = l - q;
            let mut mask = Vec::with_capacity(q * l);
            for i in 0..q {
                for j in 0..l {
                    mask.push(if j <= past + i { 0f32 } else { neg });
                }
            }
            prefills.push(PrefillSeq {
                start,
                query_len: q,
                gather: Tensor::from_slice(&s.context_slots, l, dev)?,
                mask: Tensor::from_vec(mask, (q, l), dev)?.to_dtype(self.dtype)?,
            });
            start += q;
        }
        Ok(StepTensors {
            cos,
            sin,
            slot_index,
            decode,
            prefills,
        })
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        let up = self.up_proj.forward(x)?;
        self.down_proj.forward(&(gate * up)?)
    }
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        step: &StepTensors,
        cache: &KvCacheTensors,
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        let t = x.dim(0)?;
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self.q_proj.forward(x)?.reshape((t, h, d))?;
        let k = self.k_proj.forward(x)?.reshape((t, kvh, d))?;
        let v = self.v_proj.forward(x)?;
        let q = match &self.q_norm {
            Some(n) => n.forward(&q.contiguous()?)?,
            None => q,
        };
        let k = match &self.k_norm {
            Some(n) => n.forward(&k.contiguous()?)?,
            None => k,
        };
        let q =
            candle_nn::rotary_emb::rope_thd(&q.contiguous()?.unsqueeze(0)?, &step.cos, &step.sin)?
                .squeeze(0)?;
        let k =
            candle_nn::rotary_emb::rope_thd(&k.contiguous()?.unsqueeze(0)?, &step.cos, &step.sin)?
                .squeeze(0)?;

        let (k_cache, v_cache) = cache.layer(layer);
        k_cache.scatter_set(&step.slot_index, &k.reshape((t, kvh * d))?, 0)?;
        v_cache.scatter_set(&step.slot_index, &v.contiguous()?, 0)?;

        let scale = 1.0 / (d as f64).sqrt();
        let g = h / kvh;
        let mut outputs = Vec::with_capacity(1 + step.prefills.len());
        if let Some(dg) = &step.decode {
            let b = dg.count;
            let q = q.narrow(0, 0, b)?.reshape((b, kvh, g, d))?;
            let kc = k_cache
                .index_select(&dg.gather, 0)?
                .reshape((b, dg.max_len, kvh, d))?
                .transpose(1, 2)?
                .contiguous()?;
            let vc = v_cache
                .index_select(&dg.gather, 0)?
                .reshape((b, dg.max_len, kvh, d))?
                .transpose(1, 2)?
                .contiguous()?;
            let scores = (q.matmul(&kc.t()?)? * scale)?.broadcast_add(&dg.mask)?;
            let p = candle_nn::ops::softmax_last_dim(&scores)?;
            outputs.push(p.matmul(&vc)?.reshape((b, h * d))?);
        }
        for ps in &step.prefills {
            let (lq, l) = (ps.query_len, ps.gather.dim(0)?);
            let q = q
                .narrow(0, ps.start, lq)?
                .reshape((lq, kvh, g, d))?
                .permute((1, 2, 0, 3))?
                .contiguous()?
                .reshape((kvh, g * lq, d))?;
            let kc = k_cache
                .index_select(&ps.gather, 0)?
                .reshape((l, kvh, d))?
                .transpose(0, 1)?
                .contiguous()?;
            let vc = v_cache
                .index_select(&ps.gather, 0)?
                .reshape((l, kvh, d))?
                .transpose(0, 1)?
                .contiguous()?;
            let scores = (q.matmul(&kc.t()?)? * scale)?
                .reshape((kvh, g, lq, l))?
                .broadcast_add(&ps.mask)?;
            let p = candle_nn::ops::softmax_last_dim(&scores)?.reshape((kvh, g * lq, l))?;
            let o = p
                .matmul(&vc)?
                .reshape((kvh, g, lq, d))?
                .permute((2, 0, 1, 3))?
                .contiguous()?
                .reshape((lq, h * d))?;
            outputs.push(o);
        }
        let o = if outputs.len() == 1 {
            outputs
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("empty step".into()))?
        } else {
            Tensor::cat(&outputs, 0)?
        };
        self.o_proj.forward(&o)
    }
}
