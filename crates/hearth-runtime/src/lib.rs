//! hearth's runtime: loads Hugging Face-format Llama-family models and serves many
//! generation requests at once through a continuous-batching engine over a paged KV
//! cache. It knows nothing of HTTP; see README.md for the picture.

pub mod baseline;
pub mod block_allocator;
pub mod config;
pub mod constraint;
pub mod cpu_matmul;
pub mod cpu_ops;
#[cfg(hearth_cuda_emulator)]
pub mod cuda_emulator;
pub mod demo;
pub mod detokenizer;
pub mod device;
pub mod device_sampler;
pub mod digest;
pub mod engine;
pub mod error;
pub mod fused;
pub mod gemv;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod heap;
pub mod hub;
pub mod json_bounds;
pub mod kv_cache;
pub mod launch_count;
pub mod layer_kernels;
pub mod limits;
pub mod linear;
pub mod loader;
pub mod model;
mod norm_project;
mod output;
pub mod packed_linear;
pub mod paged_attention;
pub mod penalty_table;
pub mod presets;
pub mod request;
pub mod rope;
pub mod sample_kernel;
pub mod sampler;
pub mod scheduler;
pub mod schema_check;
pub mod seeded_draw;
#[cfg_attr(not(any(feature = "cuda", hearth_cuda_emulator)), allow(dead_code))]
pub(crate) mod step_metadata;
pub mod stop;
pub mod threads;
pub mod tokenizer;
pub mod toktrie;
pub mod tool_grammar;
pub mod tool_syntax;

#[cfg(test)]
mod chat_template_tests;
#[cfg(test)]
mod constraint_tests;
pub mod weight_loader;
pub mod weights;

pub use constraint::{Constraint, ConstraintCompiler, ConstraintSpec};
pub use engine::{EngineConfig, EngineHandle, EngineLimits, EngineStats, RequestStream};
pub use error::{Result, RuntimeError};
pub use limits::RequestLimits;
pub use loader::{load, LoadFormat, LoadedModel, ModelSpec, TokenizerSource};
pub use request::{
    Completion, FinishReason, GenerationEvent, GenerationRequest, Priority, Timings, TokenLogprobs,
};
pub use sampler::SamplingParams;
pub use tokenizer::{ChatMessage, PromptSpec, TextTokenizer, TokenPiece};
