//! Flags shared by every command that loads a model.

use clap::Args;
use hearth_runtime::{EngineConfig, LoadFormat, ModelSpec};

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A local Hugging Face folder, a GGUF file, a Hub id (org/name), `demo`, or
    /// `dummy:SHAPE` (llama-3-8b, llama-3.1-8b, llama-3.2-1b, qwen2.5-0.5b, bench-small).
    #[arg(long, env = "HEARTH_MODEL", default_value = "demo")]
    pub model: String,
    /// The GGUF file to load from a --model folder or Hub repo that holds GGUF files.
    #[arg(long, env = "HEARTH_GGUF_FILE")]
    pub gguf_file: Option<String>,
    /// Quantize safetensors weights while loading: q8_0, q6_k, q5_k, q4_k, q3_k, q2_k,
    /// q5_1, q5_0, q4_1, q4_0. K-quants fall back to a legacy type for rows whose length
    /// is not a multiple of 256.
    #[arg(long, env = "HEARTH_QUANTIZE")]
    pub quantize: Option<String>,
    /// Run a GGUF's weights dequantized to the compute dtype (accuracy comparisons).
    #[arg(long, env = "HEARTH_DEQUANTIZE")]
    pub dequantize: bool,
    /// A file with a Jinja chat template to use in place of the model's own (its tool
    /// syntax, if any, is what tool calls are written in).
    #[arg(long, env = "HEARTH_CHAT_TEMPLATE")]
    pub chat_template: Option<std::path::PathBuf>,
    /// `auto` reads the weights; `dummy` uses the config's shape with seeded random weights.
    #[arg(long, env = "HEARTH_LOAD_FORMAT", default_value = "auto", value_parser = ["auto", "dummy"])]
    pub load_format: String,
    /// auto (bf16 on CUDA, f32 on CPU), f32, f16, bf16.
    #[arg(long, env = "HEARTH_DTYPE", default_value = "auto")]
    pub dtype: String,
    /// auto, cpu, cuda, cuda:N.
    #[arg(long, env = "HEARTH_DEVICE", default_value = "auto")]
    pub device: String,
    /// Dense (unquantized) weights on the CPU under f32 compute: f32, or bf16 (half the
    /// memory and bandwidth; activations rounded to bf16 per product, AVX512-BF16 where
    /// the CPU has it).
    #[arg(long, env = "HEARTH_CPU_WEIGHT_DTYPE", default_value = "f32", value_parser = ["f32", "bf16"])]
    pub cpu_weight_dtype: String,
    /// Hub revision (branch, tag or commit).
    #[arg(long, env = "HEARTH_REVISION")]
    pub revision: Option<String>,
    /// Seed for dummy weights.
    #[arg(long, env = "HEARTH_WEIGHTS_SEED", default_value_t = 0)]
    pub weights_seed: u64,
}

#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// KV cache size, e.g. 512MiB or 4GiB. Default: on CUDA what
    /// --gpu-memory-utilization leaves after the weights; on CPU up to 2GiB.
    #[arg(long, env = "HEARTH_KV_CACHE_MEMORY", value_parser = hearth_runtime::device::parse_bytes)]
    pub kv_cache_memory: Option<u64>,
    #[arg(long, env = "HEARTH_GPU_MEMORY_UTILIZATION", default_value_t = 0.9)]
    pub gpu_memory_utilization: f32,
    /// Token budget of one engine step (prefill chunks + decodes).
    #[arg(long, env = "HEARTH_MAX_NUM_BATCHED_TOKENS", default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Most sequences running at once.
    #[arg(long, env = "HEARTH_MAX_NUM_SEQS", default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Most requests waiting to start; past it requests are refused (HTTP 429).
    #[arg(long, env = "HEARTH_MAX_WAITING", default_value_t = 1024)]
    pub max_waiting: usize,
    /// Most background requests (shadow copies of an upstream's traffic, run at low
    /// priority) waiting to start, apart from callers' queue; past it a copy is
    /// skipped and counted.
    #[arg(long, env = "HEARTH_MAX_WAITING_BACKGROUND", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_waiting_background: u32,
    /// Context length cap (default: the model's).
    #[arg(long, env = "HEARTH_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Tokens per KV cache block.
    #[arg(long, env = "HEARTH_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// Turn off sharing of cached prompt prefixes.
    #[arg(long, env = "HEARTH_NO_PREFIX_CACHING")]
    pub no_prefix_caching: bool,
    /// KV cache element type: auto (f16 on the CPU under f32 activations, as llama.cpp;
    /// the compute dtype elsewhere), f32, f16, bf16. f16/bf16 halve the cache.
    #[arg(long, env = "HEARTH_KV_CACHE_DTYPE", default_value = "auto", value_parser = ["auto", "f32", "f16", "bf16"])]
    pub kv_cache_dtype: String,
    /// Whose attention arithmetic to follow: hearth (f32 scores and sums) or llama-cpp
    /// (llama.cpp's CPU attention to the bit; needs the CPU and f32 activations): over an
    /// f16 KV cache its flash attention (an unmodified llama-server), over an f32 cache
    /// its attention without it (`llama-server -fa off -ctk f32 -ctv f32`). Slower.
    #[arg(long, env = "HEARTH_ATTENTION_NUMERICS", default_value = "hearth", value_parser = ["hearth", "llama-cpp"])]
    pub attention_numerics: String,
}

impl ModelArgs {
    pub fn spec(&self) -> ModelSpec {
        let mut s = ModelSpec::new(self.model.clone());
        s.load_format = if self.load_format == "dummy" {
            LoadFormat::Dummy
        } else {
            LoadFormat::Auto
        };
        s.dtype = self.dtype.clone();
        s.device = self.device.clone();
        s.revision = self.revision.clone();
        s.seed = self.weights_seed;
        s.gguf_file = self.gguf_file.clone();
        s.quantize = self.quantize.clone();
        s.dequantize = self.dequantize;
        s.chat_template = self.chat_template.clone();
        s.cpu_weight_dtype = self.cpu_weight_dtype.clone();
        s
    }
}

impl EngineArgs {
    pub fn config(&self) -> EngineConfig {
        EngineConfig {
            block_size: self.block_size,
            kv_cache_memory: self.kv_cache_memory,
            gpu_memory_utilization: self.gpu_memory_utilization,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_num_seqs: self.max_num_seqs,
            max_waiting: self.max_waiting,
            max_waiting_background: self.max_waiting_background as usize,
            max_model_len: self.max_model_len,
            enable_prefix_caching: !self.no_prefix_caching,
            // clap admits only the names parse_dtype knows.
            kv_cache_dtype: hearth_runtime::kv_cache::parse_dtype(&self.kv_cache_dtype)
                .unwrap_or(None),
            // clap admits only the names parse knows.
            attention_numerics: hearth_runtime::paged_attention::AttentionNumerics::parse(
                &self.attention_numerics,
            )
            .unwrap_or_default(),
        }
    }
}
