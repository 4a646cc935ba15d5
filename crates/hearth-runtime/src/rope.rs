//! Rotary position embeddings, with the frequency rescaling of Llama 3.1.

use crate::config::{ModelConfig, RopeScaling};
use candle_core::{DType, Device, Tensor};

/// cos/sin tables `[max_positions, head_dim / 2]`; a step gathers the rows of its
/// tokens' positions, so every token of a ragged batch gets its own position. The
/// host copies (f32) serve the CPU kernels, which read them in place.
pub struct RotaryTables {
    pub cos: Tensor,
    pub sin: Tensor,
    pub cos_host: Vec<f32>,
    pub sin_host: Vec<f32>,
}

pub fn inverse_frequencies(cfg: &ModelConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64))
        .collect();
    match cfg.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
        RopeScaling::Factors(ref factors) => base.iter().zip(factors).map(|(f, d)| f / d).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.into_iter()
                .map(|freq| {
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    if wavelen < high_wavelen {
                        freq
                    } else if wavelen > low_wavelen {
                        freq / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    }
                })
                .collect()
        }
    }
}

impl RotaryTables {
    pub fn new(
        cfg: &ModelConfig,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let inv = inverse_frequencies(cfg);
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv {
                // f32 angles as transformers computes them, so goldens match at long positions.
                let angle = (p as f32) * (*f as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self::from_host(cos, sin, max_positions, half, dtype, device)
    }

    /// The tables as llama.cpp's CPU RoPE computes them (`ggml_rope_cache_init`, no
    /// frequency scaling): each pair's angle is the previous one times
    /// `base^(-2/head_dim)` in f32, starting from the position, so angles drift a few ulp
    /// from transformers' (GGUF files and `--attention-numerics llama-cpp`; other scalings keep
    /// [`RotaryTables::new`]'s angles).
    pub fn llama_cpp(
        cfg: &ModelConfig,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        if !matches!(cfg.rope_scaling, RopeScaling::None) {
            return Self::new(cfg, max_positions, dtype, device);
        }
        let half = cfg.head_dim / 2;
        let theta_scale = (cfg.rope_theta as f32).powf(-2.0 / cfg.head_dim as f32);
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            let mut theta = p as f32;
            for _ in 0..half {
                cos.push(theta.cos());
                sin.push(theta.sin());
                theta *= theta_scale;
            }
        }
        Self::from_host(cos, sin, max_positions, half, dtype, device)
    }

    fn from_host(
        cos: Vec<f32>,
        sin: Vec<f32>,
        max_positions: usize,
        half: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            cos: Tensor::from_slice(&cos, (max_positions, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_slice(&sin, (max_positions, half), device)?.to_dtype(dtype)?,
            cos_host: cos,
            sin_host: sin,
        })
    }
}
