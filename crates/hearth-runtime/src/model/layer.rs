//! One decoder layer of the transformer: its weights as loaded (attention with Q/K/V
//! fused where the weights allow, the gated MLP) and its two blocks' math on a step.

use candle_core::{Module, Tensor};
use candle_nn::RmsNorm;

use super::StepTensors;
use crate::config::ModelConfig;
use crate::cpu_ops;
use crate::fused::FusedLinear;
use crate::gemv;
use crate::kv_cache::KvCacheTensors;
use crate::linear::Linear;
use crate::norm_project::{project, LayerInput};
use crate::paged_attention::paged_attention;
use crate::weight_loader::WeightLoader;

pub(super) struct Attention {
    /// Q, K and V in that order, one matmul where the weights allow (fused.rs).
    pub(super) qkv_proj: FusedLinear,
    pub(super) o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

pub(super) struct Mlp {
    /// Gate and up, one matmul where the weights allow.
    pub(super) gate_up_proj: FusedLinear,
    pub(super) down_proj: Linear,
}

pub(super) struct Layer {
    pub(super) input_layernorm: RmsNorm,
    pub(super) attn: Attention,
    pub(super) post_attention_layernorm: RmsNorm,
    pub(super) mlp: Mlp,
}

impl Layer {
    /// Layer `vb_l`'s weights; fused groups are built by the model's loader `vb`.
    pub(super) fn load(
        cfg: &ModelConfig,
        vb: &WeightLoader,
        vb_l: WeightLoader,
    ) -> candle_core::Result<Layer> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
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
            o_proj: vb_a
                .pp("o_proj")
                .linear(cfg.num_attention_heads * d, h, false)?,
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
            down_proj: vb_mlp
                .pp("down_proj")
                .linear(cfg.intermediate_size, h, false)?,
        };
        Ok(Layer {
            input_layernorm: vb_l.pp("input_layernorm").rms_norm(h, cfg.rms_norm_eps)?,
            attn,
            post_attention_layernorm: vb_l
                .pp("post_attention_layernorm")
                .rms_norm(h, cfg.rms_norm_eps)?,
            mlp,
        })
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
    pub(super) fn forward(&self, input: LayerInput) -> candle_core::Result<Tensor> {
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
        // Gate and up as one matmul: SiLU·mul in one pass over its output (one kernel on
        // CUDA), where narrowing would copy each strided half first.
        if let FusedLinear::One { linear, widths } = &self.gate_up_proj {
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
    pub(super) fn forward(
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
