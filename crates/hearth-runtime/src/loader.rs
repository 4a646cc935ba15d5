//! From a `--model` string to a running engine: a local Hugging Face folder, a GGUF file
//! (or a folder or Hub repo holding one, with `--gguf-file`), a Hub id, `demo`, or
//! `dummy:SHAPE`; weights from safetensors (optionally quantized as they load), GGUF, or
//! seeded random.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};

use crate::config::ModelConfig;
use crate::engine::{Engine, EngineConfig, EngineHandle};
use crate::error::{Result, RuntimeError};
use crate::gguf::{GgufFile, GgufTensors};
use crate::gguf_tokenizer::GgufTokenizer;
use crate::model::Transformer;
use crate::tokenizer::TextTokenizer;
use crate::weight_loader::WeightLoader;
use crate::weights::{var_builder, WeightSource};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadFormat {
    #[default]
    Auto,
    /// The config's shape with seeded random weights; no weight files are read.
    Dummy,
}

#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub model: String,
    pub load_format: LoadFormat,
    pub dtype: String,
    pub device: String,
    pub revision: Option<String>,
    pub seed: u64,
    pub cache_dir: PathBuf,
    /// The GGUF file to load from a folder or Hub repo holding several.
    pub gguf_file: Option<String>,
    /// Quantize safetensors weights to this type while loading (`q8_0`, `q4_k`, ...).
    pub quantize: Option<String>,
    /// Run a GGUF's weights dequantized to the compute dtype (for accuracy comparisons).
    pub dequantize: bool,
    /// A file with a chat template (Jinja) in place of the model's own, as vLLM's
    /// `--chat-template`.
    pub chat_template: Option<PathBuf>,
    /// How dense weights are stored on the CPU under f32 compute: `f32`, or `bf16` (half
    /// the memory and bandwidth; products on bf16-rounded activations).
    pub cpu_weight_dtype: String,
}

impl ModelSpec {
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            load_format: LoadFormat::Auto,
            dtype: "auto".into(),
            device: "auto".into(),
            revision: None,
            seed: 0,
            cache_dir: crate::demo::default_cache_dir(),
            gguf_file: None,
            quantize: None,
            dequantize: false,
            chat_template: None,
            cpu_weight_dtype: "f32".into(),
        }
    }
}

/// Everything read from a model folder, before any tensor is touched.
pub struct ModelFiles {
    /// What the user called it: `demo`, a Hub id, a folder name, `dummy:NAME`.
    pub name: String,
    pub dir: Option<PathBuf>,
    pub config: ModelConfig,
    pub tokenizer: TokenizerSource,
    pub generation_config: Option<serde_json::Value>,
    pub weights: WeightSource,
}

/// Where the tokenizer comes from.
pub enum TokenizerSource {
    /// tokenizer.json, with tokenizer_config.json's contents when there is one.
    Json {
        path: PathBuf,
        config: Option<serde_json::Value>,
    },
    /// The vocabulary inside a GGUF file.
    Gguf(PathBuf),
}

impl ModelFiles {
    pub fn load_tokenizer(&self) -> Result<TextTokenizer> {
        match &self.tokenizer {
            TokenizerSource::Json { path, config } => TextTokenizer::load(path, config.as_ref()),
            TokenizerSource::Gguf(path) => {
                let g = GgufTokenizer::from_gguf(&GgufFile::open(path)?)?;
                Ok(TextTokenizer::from_parts(
                    g.tokenizer,
                    g.chat_template,
                    g.bos_token,
                    g.eos_token,
                ))
            }
        }
    }

    /// Bytes that identify the tokenizer, for the model's version id. A GGUF's
    /// vocabulary is part of the file, whose content the weights digest covers.
    pub fn tokenizer_identity(&self) -> Result<Vec<u8>> {
        match &self.tokenizer {
            TokenizerSource::Json { path, .. } => {
                std::fs::read(path).map_err(|e| RuntimeError::io(path, e))
            }
            TokenizerSource::Gguf(_) => Ok(b"gguf".to_vec()),
        }
    }

    /// EOS ids: generation_config.json first (Llama 3 lists several there), then
    /// config.json, then the tokenizer's eos_token.
    pub fn eos_token_ids(&self, tokenizer: &TextTokenizer) -> Vec<u32> {
        let from_gen = crate::config::token_ids(
            &self
                .generation_config
                .as_ref()
                .and_then(|g| g.get("eos_token_id").cloned()),
        );
        let mut ids = if !from_gen.is_empty() {
            from_gen
        } else {
            self.config.eos_token_ids.clone()
        };
        if let Some(e) = tokenizer.eos_token_id() {
            if !ids.contains(&e) {
                ids.push(e);
            }
        }
        ids
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| RuntimeError::Json {
        path: path.into(),
        source: e,
    })
}

fn read_optional_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// The safetensors files of a folder: those the index names, or every `*.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| RuntimeError::Weights(format!("{}: no weight_map", index.display())))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        return files
            .into_iter()
            .map(|f| {
                let p = dir.join(&f);
                if p.exists() {
                    Ok(p)
                } else {
                    Err(RuntimeError::Weights(format!(
                        "{} names {f}, which is missing",
                        index.display()
                    )))
                }
            })
            .collect();
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| RuntimeError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

fn from_folder(name: String, dir: &Path, load_format: LoadFormat, seed: u64) -> Result<ModelFiles> {
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Err(RuntimeError::ModelSource {
            source_name: name,
            reason: format!("{} has no config.json", dir.display()),
        });
    }
    let config = ModelConfig::from_file(&config_path)?;
    let tokenizer_json = dir.join("tokenizer.json");
    if !tokenizer_json.exists() {
        return Err(RuntimeError::ModelSource {
            source_name: name,
            reason: format!("{} has no tokenizer.json", dir.display()),
        });
    }
    let weights = match load_format {
        LoadFormat::Dummy => WeightSource::Dummy(seed),
        LoadFormat::Auto => {
            let files = weight_files(dir)?;
            if files.is_empty() {
                return Err(RuntimeError::Weights(format!(
                    "{} has no *.safetensors files (use --load-format dummy for random weights)",
                    dir.display()
                )));
            }
            WeightSource::Safetensors(files)
        }
    };
    Ok(ModelFiles {
        name,
        dir: Some(dir.to_path_buf()),
        config,
        tokenizer: TokenizerSource::Json {
            path: tokenizer_json,
            config: read_optional_json(&dir.join("tokenizer_config.json"))?,
        },
        generation_config: read_optional_json(&dir.join("generation_config.json"))?,
        weights,
    })
}

/// Resolves `--model` to files on disk (downloading from the Hub if needed).
pub fn resolve(spec: &ModelSpec) -> Result<ModelFiles> {
    let m = spec.model.as_str();
    if m == "demo" {
        let dir = crate::demo::ensure_demo_model(&spec.cache_dir)?;
        return from_folder("demo".into(), &dir, spec.load_format, spec.seed);
    }
    if let Some(shape) = m.strip_prefix("dummy:") {
        let config = crate::presets::preset(shape).ok_or_else(|| RuntimeError::ModelSource {
            source_name: m.into(),
            reason: format!(
                "unknown shape; built in: {}",
                crate::presets::PRESET_NAMES.join(", ")
            ),
        })?;
        // Any byte-level tokenizer will do for random weights: the demo's, padded
        // to the shape's vocabulary.
        let tokenizer_json =
            crate::demo::ensure_dummy_tokenizer(&spec.cache_dir, config.vocab_size)?;
        return Ok(ModelFiles {
            name: m.into(),
            dir: None,
            config,
            tokenizer: TokenizerSource::Json {
                path: tokenizer_json,
                config: None,
            },
            generation_config: None,
            weights: WeightSource::Dummy(spec.seed),
        });
    }
    let path = Path::new(m);
    let display_name = |p: &Path| {
        p.canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| m.to_string())
    };
    if path.is_file() {
        if spec.gguf_file.is_some() {
            return Err(RuntimeError::ModelSource {
                source_name: m.into(),
                reason: "--gguf-file names a file inside a folder or Hub repo; --model is already a file".into(),
            });
        }
        let stem = path
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| m.to_string());
        return from_gguf(stem, path, spec.load_format);
    }
    if path.is_dir() {
        if let Some(file) = gguf_in_folder(m, path, spec.gguf_file.as_deref())? {
            return from_gguf(display_name(path), &file, spec.load_format);
        }
        return from_folder(display_name(path), path, spec.load_format, spec.seed);
    }
    let looks_like_hub_id = m.split('/').count() == 2 && !m.starts_with('.') && !m.starts_with('/');
    if !looks_like_hub_id {
        return Err(RuntimeError::ModelSource {
            source_name: m.into(),
            reason: "not a folder, not a Hub id (org/name), not `demo` or `dummy:SHAPE`".into(),
        });
    }
    if let Some(file) = &spec.gguf_file {
        let path = crate::hub::download_file(m, spec.revision.as_deref(), file)?;
        return from_gguf(m.into(), &path, spec.load_format);
    }
    let dir = crate::hub::download(
        m,
        spec.revision.as_deref(),
        spec.load_format == LoadFormat::Dummy,
    )?;
    from_folder(m.into(), &dir, spec.load_format, spec.seed)
}

fn from_gguf(name: String, path: &Path, load_format: LoadFormat) -> Result<ModelFiles> {
    if load_format == LoadFormat::Dummy {
        return Err(RuntimeError::ModelSource {
            source_name: name,
            reason:
                "--load-format dummy needs a Hugging Face config; a GGUF file is its own weights"
                    .into(),
        });
    }
    let gguf = GgufFile::open(path)?;
    let config = gguf.config()?;
    Ok(ModelFiles {
        name,
        dir: path.parent().map(Path::to_path_buf),
        config,
        tokenizer: TokenizerSource::Gguf(path.to_path_buf()),
        generation_config: None,
        weights: WeightSource::Gguf(path.to_path_buf()),
    })
}

/// The GGUF file a folder stands for: the one `--gguf-file` names, or the only one in a
/// folder without a config.json. None: load the folder as safetensors.
fn gguf_in_folder(m: &str, dir: &Path, wanted: Option<&str>) -> Result<Option<PathBuf>> {
    if let Some(name) = wanted {
        let p = dir.join(name);
        if !p.is_file() {
            return Err(RuntimeError::ModelSource {
                source_name: m.into(),
                reason: format!("--gguf-file {name}: no such file in {}", dir.display()),
            });
        }
        return Ok(Some(p));
    }
    if dir.join("config.json").exists() {
        return Ok(None);
    }
    let mut ggufs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| RuntimeError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    ggufs.sort();
    match ggufs.len() {
        0 => Ok(None),
        1 => Ok(ggufs.pop()),
        _ => Err(RuntimeError::ModelSource {
            source_name: m.into(),
            reason: format!(
                "it holds several GGUF files; choose one with --gguf-file: {}",
                ggufs
                    .iter()
                    .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// How the model's layers get their weights.
fn weight_loader(
    spec: &ModelSpec,
    files: &ModelFiles,
    dtype: DType,
    device: &Device,
) -> Result<WeightLoader> {
    let quantize = match spec.quantize.as_deref() {
        None | Some("") | Some("none") => None,
        Some(q) => Some(crate::linear::parse_ggml_dtype(q).ok_or_else(|| {
            RuntimeError::invalid(
                "quantize",
                format!("{q:?} is not one of {}", crate::linear::QUANTIZE_NAMES),
            )
        })?),
    };
    let cpu_weight_dtype = crate::packed_linear::WeightDtype::parse(&spec.cpu_weight_dtype)
        .ok_or_else(|| {
            RuntimeError::invalid(
                "cpu_weight_dtype",
                format!("{:?} is not one of f32, bf16", spec.cpu_weight_dtype),
            )
        })?;
    let loader = weight_loader_for(spec, files, quantize, dtype, device)?;
    loader
        .with_cpu_weight_dtype(cpu_weight_dtype)
        .map_err(|reason| RuntimeError::invalid("cpu_weight_dtype", reason))
}

fn weight_loader_for(
    spec: &ModelSpec,
    files: &ModelFiles,
    quantize: Option<candle_core::quantized::GgmlDType>,
    dtype: DType,
    device: &Device,
) -> Result<WeightLoader> {
    match &files.weights {
        WeightSource::Gguf(path) => {
            if quantize.is_some() {
                return Err(RuntimeError::invalid(
                    "quantize",
                    "applies to safetensors weights; a GGUF file's weights are used as stored",
                ));
            }
            let tensors = GgufTensors::new(GgufFile::open(path)?, &files.config)?;
            Ok(WeightLoader::gguf(
                tensors,
                spec.dequantize,
                dtype,
                device.clone(),
            ))
        }
        source => {
            // Quantizing reads each weight as f32 on the CPU first.
            let vb = match quantize {
                Some(_) => var_builder(source, DType::F32, &Device::Cpu)?,
                None => var_builder(source, dtype, device)?,
            };
            Ok(WeightLoader::dense(vb, quantize, dtype, device.clone()))
        }
    }
}

/// Hands the allocator's free pages back to the OS. Building a tokenizer from a GGUF
/// vocabulary and reading tensors leave tens of MB of freed heap that glibc would otherwise
/// keep resident for the life of the server.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's malloc_trim only releases memory that is free.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// This process's resident memory (Linux), for the load log: how much the weights took.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// A loaded model with its engine running.
pub struct LoadedModel {
    pub files: ModelFiles,
    pub engine: EngineHandle,
    pub dtype: candle_core::DType,
    pub device_name: String,
}

pub fn load(spec: &ModelSpec, engine_cfg: &EngineConfig) -> Result<LoadedModel> {
    let files = resolve(spec)?;
    let device = crate::device::select_device(&spec.device)?;
    let dtype = crate::device::resolve_dtype(&spec.dtype, &device)?;
    let mut tokenizer = files.load_tokenizer()?;
    if let Some(path) = &spec.chat_template {
        let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::io(path, e))?;
        tokenizer.set_chat_template(text);
    }
    let tokenizer = Arc::new(tokenizer);
    let rss_before = resident_bytes();
    let weights = weight_loader(spec, &files, dtype, &device)?;
    let started = std::time::Instant::now();
    let model = Transformer::load(&files.config, weights.clone())
        .map_err(|e| RuntimeError::Weights(e.to_string()))?;
    let projections = weights.summary();
    let weights_mib = weights.bytes() as f64 / (1 << 20) as f64;
    // The GGUF header (vocabulary included) goes with the loader.
    drop(weights);
    release_free_memory();
    let weights_resident_mib = match (rss_before, resident_bytes()) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / (1 << 20) as f64,
        _ => f64::NAN,
    };
    tracing::info!(
        weights_mib,
        weights_resident_mib,
        model = %files.name,
        architecture = files.config.architecture.hf_name(),
        parameters = files.config.num_parameters(),
        ?dtype,
        %projections,
        secs = started.elapsed().as_secs_f32(),
        "weights loaded"
    );
    let eos = files.eos_token_ids(&tokenizer);
    let engine = Engine::start(model, tokenizer, eos, engine_cfg)?;
    Ok(LoadedModel {
        files,
        engine,
        dtype,
        device_name: if device.is_cuda() {
            "cuda".into()
        } else {
            "cpu".into()
        },
    })
}

/// Just the model, without an engine: for baselines and tools.
pub fn load_model(spec: &ModelSpec) -> Result<(ModelFiles, Transformer)> {
    load_model_fused(spec, true)
}

/// `load_model` with Q/K/V and gate/up fused or not (fused.rs), to compare the two.
pub fn load_model_fused(spec: &ModelSpec, fuse: bool) -> Result<(ModelFiles, Transformer)> {
    let files = resolve(spec)?;
    let device = crate::device::select_device(&spec.device)?;
    let dtype = crate::device::resolve_dtype(&spec.dtype, &device)?;
    let mut weights = weight_loader(spec, &files, dtype, &device)?;
    if !fuse {
        weights = weights.without_fusion();
    }
    let mut model = Transformer::load(&files.config, weights)
        .map_err(|e| RuntimeError::Weights(e.to_string()))?;
    // A GGUF file is llama.cpp's format: its RoPE angles too (a table, no cost), so the
    // quantized layers after attention see llama.cpp's inputs to the bit.
    if matches!(files.weights, WeightSource::Gguf(_)) {
        model
            .use_llama_cpp_rope()
            .map_err(|e| RuntimeError::Weights(e.to_string()))?;
    }
    Ok((files, model))
}
