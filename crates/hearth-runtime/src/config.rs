//! The subset of a Hugging Face `config.json` that the Llama family needs, normalised
//! into one struct so the model code has no per-architecture branches beyond flags.

use crate::error::{Result, RuntimeError};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Architecture {
    pub fn from_hf_name(name: &str) -> Result<Self> {
        match name {
            "LlamaForCausalLM" => Ok(Self::Llama),
            "MistralForCausalLM" => Ok(Self::Mistral),
            "Qwen2ForCausalLM" => Ok(Self::Qwen2),
            "Qwen3ForCausalLM" => Ok(Self::Qwen3),
            other => Err(RuntimeError::UnsupportedArchitecture(other.to_string())),
        }
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Per-frequency divisors, as GGUF files store Llama 3.1-style scaling
    /// (`rope_freqs.weight`): frequency i becomes `inv_freq[i] / factors[i]`.
    Factors(Vec<f64>),
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Qwen2 puts biases on q/k/v.
    pub attention_bias: bool,
    /// Qwen3 normalises each head of q and k before RoPE.
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5 writes `rope_theta` and the scaling here instead.
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
}

/// `eos_token_id` is an int or a list of ints in the wild.
pub(crate) fn token_ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|n| vec![n as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|n| n as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::io(path, e))?;
        Self::from_json(&text)
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| RuntimeError::Config(e.to_string()))?;
        let arch_name = match (&raw.architectures, &raw.model_type) {
            (Some(a), _) if !a.is_empty() => a[0].clone(),
            (_, Some(t)) => match t.as_str() {
                "llama" => "LlamaForCausalLM".into(),
                "mistral" => "MistralForCausalLM".into(),
                "qwen2" => "Qwen2ForCausalLM".into(),
                "qwen3" => "Qwen3ForCausalLM".into(),
                other => other.to_string(),
            },
            _ => {
                return Err(RuntimeError::Config(
                    "no `architectures` or `model_type`".into(),
                ))
            }
        };
        let architecture = Architecture::from_hf_name(&arch_name)?;
        if raw.num_attention_heads == 0 || raw.hidden_size == 0 {
            return Err(RuntimeError::Config(
                "hidden_size and num_attention_heads must be > 0".into(),
            ));
        }
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if num_key_value_heads == 0 || !raw.num_attention_heads.is_multiple_of(num_key_value_heads)
        {
            return Err(RuntimeError::Config(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                raw.num_attention_heads, num_key_value_heads
            )));
        }
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads);
        if !head_dim.is_multiple_of(2) {
            return Err(RuntimeError::Config(format!(
                "head_dim {head_dim} must be even for RoPE"
            )));
        }
        let rope_scaling = match (&raw.rope_scaling, &raw.rope_parameters) {
            (Some(v), _) if !v.is_null() => parse_rope_scaling(Some(v))?,
            (_, Some(p)) => parse_rope_scaling(Some(p))?,
            _ => RopeScaling::None,
        };
        let rope_theta = raw.rope_theta.or_else(|| {
            raw.rope_parameters
                .as_ref()
                .and_then(|p| p.get("rope_theta"))
                .and_then(|t| t.as_f64())
        });
        let default_tie = false;
        Ok(ModelConfig {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(default_tie),
            attention_bias: raw
                .attention_bias
                .unwrap_or(architecture == Architecture::Qwen2),
            qk_norm: architecture == Architecture::Qwen3,
            bos_token_id: token_ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&raw.eos_token_id),
        })
    }

    /// Parameters in the weights, for dummy loads and bandwidth figures.
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let attn = h * q + 2 * h * kv + q * h;
        let mlp = 3 * h * self.intermediate_size;
        let per_layer = attn + mlp + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + h + per_layer * self.num_hidden_layers
    }

    /// The config as a Hugging Face `config.json` would write it, so dummy and demo
    /// models are real folders loaded through the same path as users' models.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "architectures": [self.architecture.hf_name()],
            "model_type": match self.architecture {
                Architecture::Llama => "llama",
                Architecture::Mistral => "mistral",
                Architecture::Qwen2 => "qwen2",
                Architecture::Qwen3 => "qwen3",
            },
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "torch_dtype": "float32",
        });
        if let RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } = self.rope_scaling
        {
            v["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            });
        }
        if let RopeScaling::Factors(f) = &self.rope_scaling {
            v["rope_freq_factors"] = f.clone().into();
        }
        if let Some(b) = self.bos_token_id {
            v["bos_token_id"] = b.into();
        }
        if !self.eos_token_ids.is_empty() {
            v["eos_token_id"] = self.eos_token_ids.clone().into();
        }
        v
    }
}

fn parse_rope_scaling(v: Option<&serde_json::Value>) -> Result<RopeScaling> {
    let Some(v) = v else {
        return Ok(RopeScaling::None);
    };
    if v.is_null() {
        return Ok(RopeScaling::None);
    }
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let f = |k: &str| v.get(k).and_then(|x| x.as_f64());
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: f("factor")
                .ok_or_else(|| RuntimeError::Config("rope_scaling.factor missing".into()))?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: f("factor").unwrap_or(8.0),
            low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: f("original_max_position_embeddings")
                .unwrap_or(8192.0) as usize,
        }),
        other => Err(RuntimeError::Config(format!(
            "rope_scaling type {other:?} is not supported (supported: default, linear, llama3)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_architecture_is_named() {
        let err = ModelConfig::from_json(
            r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":10,"hidden_size":8,
                "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("GPT2LMHeadModel"), "{err}");
    }

    #[test]
    fn qwen2_defaults_to_qkv_bias_and_eos_list_parses() {
        let c = ModelConfig::from_json(
            r#"{"architectures":["Qwen2ForCausalLM"],"vocab_size":10,"hidden_size":8,
                "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,
                "num_key_value_heads":1,"eos_token_id":[3,4]}"#,
        )
        .unwrap();
        assert!(c.attention_bias);
        assert_eq!(c.eos_token_ids, vec![3, 4]);
        assert_eq!(c.head_dim, 4);
    }

    #[test]
    fn roundtrips_through_hf_json() {
        let c = crate::presets::preset("llama-3-8b").unwrap();
        let back = ModelConfig::from_json(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(back.rope_scaling, c.rope_scaling);
        assert_eq!(back.num_parameters(), c.num_parameters());
    }
}
