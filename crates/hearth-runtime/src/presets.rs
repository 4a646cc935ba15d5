//! Built-in model shapes for `--model dummy:NAME`: a load-tester measures a real
//! architecture's cost with nothing downloaded.

use crate::config::{Architecture, ModelConfig, RopeScaling};

pub const PRESET_NAMES: &[&str] = &[
    "llama-3-8b",
    "llama-3.1-8b",
    "llama-3.2-1b",
    "qwen2.5-0.5b",
    "bench-small",
    "demo",
];

fn llama(
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
) -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim: hidden_size / num_attention_heads,
        rms_norm_eps: 1e-5,
        rope_theta: 500_000.0,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: 8192,
        tie_word_embeddings: false,
        attention_bias: false,
        qk_norm: false,
        bos_token_id: None,
        eos_token_ids: Vec::new(),
    }
}

pub fn preset(name: &str) -> Option<ModelConfig> {
    let llama31_scaling = |factor: f64| RopeScaling::Llama3 {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    Some(match name {
        "llama-3-8b" => llama(128_256, 4096, 14_336, 32, 32, 8),
        "llama-3.1-8b" => ModelConfig {
            rope_scaling: llama31_scaling(8.0),
            max_position_embeddings: 131_072,
            ..llama(128_256, 4096, 14_336, 32, 32, 8)
        },
        "llama-3.2-1b" => ModelConfig {
            rope_scaling: llama31_scaling(32.0),
            max_position_embeddings: 131_072,
            tie_word_embeddings: true,
            ..llama(128_256, 2048, 8192, 16, 32, 8)
        },
        "qwen2.5-0.5b" => ModelConfig {
            architecture: Architecture::Qwen2,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 32_768,
            tie_word_embeddings: true,
            attention_bias: true,
            ..llama(151_936, 896, 4864, 24, 14, 2)
        },
        // ~100M parameters: big enough that batching matters, small enough for 2 cores.
        "bench-small" => ModelConfig {
            max_position_embeddings: 4096,
            ..llama(32_000, 768, 2048, 8, 12, 4)
        },
        // The built-in demo: a few MB, instant on any machine. A long context, so that a
        // long job (thousands of tokens) outlasts the waits the API tests time.
        "demo" => ModelConfig {
            max_position_embeddings: 8192,
            rope_theta: 10_000.0,
            ..llama(crate::demo::DEMO_VOCAB_SIZE, 128, 256, 4, 4, 2)
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn shapes_have_the_published_sizes() {
        let billions = |n: &str| super::preset(n).unwrap().num_parameters() as f64 / 1e9;
        assert!((billions("llama-3-8b") - 8.03).abs() < 0.02);
        assert!((billions("llama-3.2-1b") - 1.24).abs() < 0.02);
        assert!((billions("qwen2.5-0.5b") - 0.494).abs() < 0.01);
        assert!((billions("bench-small") - 0.1).abs() < 0.02);
    }
}
