use std::path::PathBuf;

/// Everything the runtime can fail with. The server maps these onto HTTP statuses;
/// the CLI prints them.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("config.json: {0}")]
    Config(String),
    #[error("unsupported architecture {0:?}: hearth runs LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM")]
    UnsupportedArchitecture(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("model source {source_name:?}: {reason}")]
    ModelSource { source_name: String, reason: String },
    #[error("weights: {0}")]
    Weights(String),
    #[error("invalid {field}: {reason}")]
    InvalidRequest { field: &'static str, reason: String },
    #[error("the waiting queue is full ({0} requests); retry later")]
    QueueFull(usize),
    /// Background work (shadow copies) waits in its own queue, apart from callers'.
    #[error(
        "the background queue is full ({0} low-priority requests waiting); this one is not run"
    )]
    BackgroundQueueFull(usize),
    #[error("the engine has stopped")]
    EngineStopped,
    /// Faults the engine could not recover from (engine/supervisor.rs); the reason
    /// names a log id. The process should be restarted.
    #[error("the engine is DEFUNCT after an internal fault it could not recover from ({0}); the server must be restarted")]
    EngineDefunct(String),
    #[error("device: {0}")]
    Device(String),
}

impl RuntimeError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        RuntimeError::InvalidRequest {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, RuntimeError>;
