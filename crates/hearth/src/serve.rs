//! `hearth serve`: models behind Replicate's API and Cog's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use hearth_runtime::weights::WeightSource;
use hearth_runtime::{LoadFormat, LoadedModel};
use hearth_server::{ModelCard, ServedModel, ServerConfig, VersionInputs};

use crate::args::{EngineArgs, ModelArgs};

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[arg(long, env = "HEARTH_HOST", default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, env = "HEARTH_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Predictions database, uploaded files, webhook secret. Default: a per-user folder.
    #[arg(long, env = "HEARTH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Accepted API tokens (repeatable, or comma-separated in the env). None: no auth.
    #[arg(long = "api-token", env = "HEARTH_API_TOKEN", value_delimiter = ',')]
    pub api_tokens: Vec<String>,
    /// The model's Replicate name, owner/name (default from the model: hearth/demo,
    /// the Hub id, or local/FOLDER).
    #[arg(long, env = "HEARTH_NAME")]
    pub name: Option<String>,
    /// Other owner/name that reach the model, e.g. meta/meta-llama-3-8b-instruct.
    #[arg(long = "alias", env = "HEARTH_ALIAS", value_delimiter = ',')]
    pub aliases: Vec<String>,
    /// Hosted version ids to accept as this model's version.
    #[arg(
        long = "version-alias",
        env = "HEARTH_VERSION_ALIAS",
        value_delimiter = ','
    )]
    pub version_aliases: Vec<String>,
    /// Serve every model card (*.toml) in this folder instead of --model.
    #[arg(long, env = "HEARTH_MODELS")]
    pub models: Option<PathBuf>,
    /// Base of the URLs handed out (default http://{Host header}).
    #[arg(long, env = "HEARTH_PUBLIC_URL")]
    pub public_url: Option<String>,
    #[arg(long, env = "HEARTH_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Seconds SIGTERM waits for predictions in flight before cancelling them.
    #[arg(long, env = "HEARTH_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,
}

fn default_data_dir() -> PathBuf {
    if let Ok(d) = std::env::var("XDG_DATA_HOME") {
        return PathBuf::from(d).join("hearth");
    }
    match std::env::var("HOME") {
        Ok(h) => PathBuf::from(h).join(".local/share/hearth"),
        Err(_) => PathBuf::from("hearth-data"),
    }
}

fn default_name(model: &str, loaded: &LoadedModel) -> String {
    if model == "demo" {
        return "hearth/demo".into();
    }
    if let Some(shape) = model.strip_prefix("dummy:") {
        return format!("hearth/dummy-{}", shape.replace('.', "-"));
    }
    if loaded.files.dir.as_ref().is_some_and(|d| d.is_dir())
        && !std::path::Path::new(model).exists()
    {
        return model.to_string();
    }
    format!("local/{}", loaded.files.name)
}

/// What the weights are, for the version id: each file's name and content digest (cached
/// beside it, so only the first start hashes), and how they are quantized at load.
fn weights_manifest(weights: &WeightSource, quantize: Option<&str>) -> anyhow::Result<String> {
    let cache = hearth_runtime::demo::default_cache_dir();
    let files: &[PathBuf] = match weights {
        WeightSource::Safetensors(paths) => paths,
        WeightSource::Gguf(path) => std::slice::from_ref(path),
        WeightSource::Dummy(seed) => return Ok(format!("dummy:{seed}")),
    };
    let mut parts = Vec::with_capacity(files.len() + 1);
    for p in files {
        let digest = hearth_runtime::digest::file_sha256(p, &cache)
            .with_context(|| format!("hashing {}", p.display()))?;
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        parts.push(format!("{name}:sha256:{digest}"));
    }
    if let Some(q) = quantize.filter(|q| !q.is_empty() && *q != "none") {
        parts.push(format!("quantize:{q}"));
    }
    Ok(parts.join(","))
}

fn served(
    loaded: LoadedModel,
    quantize: Option<&str>,
    name: &str,
    aliases: Vec<String>,
    version_aliases: Vec<String>,
    description: String,
    defaults: serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<ServedModel> {
    let (owner, short) = hearth_server::models::split_name(name).map_err(anyhow::Error::msg)?;
    for a in &aliases {
        hearth_server::models::split_name(a).map_err(|e| anyhow::anyhow!("--alias: {e}"))?;
    }
    let files = &loaded.files;
    let manifest = weights_manifest(&files.weights, quantize)?;
    let tokenizer = files.tokenizer_identity()?;
    let version = hearth_server::models::version_id(&VersionInputs {
        config_json: &files.config.to_hf_json().to_string(),
        weights_manifest: &manifest,
        tokenizer_json: &tokenizer,
        defaults: &defaults,
    });
    Ok(ServedModel {
        owner,
        name: short,
        aliases,
        version,
        version_aliases,
        description,
        defaults,
        engine: loaded.engine,
        created_at: hearth_server::prediction::now_rfc3339(),
    })
}

fn load_models(a: &ServeArgs) -> anyhow::Result<Vec<ServedModel>> {
    let engine_cfg = a.engine.config();
    let Some(dir) = &a.models else {
        let loaded =
            hearth_runtime::load(&a.model.spec(), &engine_cfg).context("loading the model")?;
        let name = a
            .name
            .clone()
            .unwrap_or_else(|| default_name(&a.model.model, &loaded));
        let description = format!("{} served by hearth", loaded.files.name);
        return Ok(vec![served(
            loaded,
            a.model.quantize.as_deref(),
            &name,
            a.aliases.clone(),
            a.version_aliases.clone(),
            description,
            hearth_server::schema::default_inputs(),
        )?]);
    };
    let mut cards: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    cards.sort();
    if cards.is_empty() {
        bail!("{} has no *.toml model cards", dir.display());
    }
    let mut out = Vec::new();
    for path in cards {
        let card = ModelCard::load(&path).map_err(anyhow::Error::msg)?;
        let defaults = card
            .merged_defaults()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let mut spec = a.model.spec();
        spec.model = card.model.clone();
        if let Some(d) = &card.dtype {
            spec.dtype = d.clone();
        }
        if let Some(r) = &card.revision {
            spec.revision = Some(r.clone());
        }
        match card.load_format.as_deref() {
            Some("dummy") => spec.load_format = LoadFormat::Dummy,
            Some("auto") | None => {}
            Some(other) => bail!(
                "{}: load_format {other:?}: expected auto or dummy",
                path.display()
            ),
        }
        let loaded = hearth_runtime::load(&spec, &engine_cfg)
            .with_context(|| format!("loading {}", path.display()))?;
        tracing::info!(card = %path.display(), name = %card.name, "model loaded");
        out.push(served(
            loaded,
            spec.quantize.as_deref(),
            &card.name,
            card.aliases,
            card.version_aliases,
            card.description,
            defaults,
        )?);
    }
    Ok(out)
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let addr: SocketAddr = format!("{}:{}", a.host, a.port)
        .parse()
        .with_context(|| format!("--host {} --port {} is not an address", a.host, a.port))?;
    let models = load_models(&a)?;
    let cfg = ServerConfig {
        addr,
        data_dir: a.data_dir.clone().unwrap_or_else(default_data_dir),
        api_tokens: a
            .api_tokens
            .iter()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect(),
        public_url: a.public_url.clone(),
        max_body_bytes: a.max_body_bytes,
        shutdown_timeout: Duration::from_secs(a.shutdown_timeout),
    };
    for m in &models {
        eprintln!(
            "serving {} (version {}){}",
            m.full_name(),
            m.version,
            if m.aliases.is_empty() {
                String::new()
            } else {
                format!(", aliases {}", m.aliases.join(", "))
            }
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let state = hearth_server::build_state(cfg, models)?;
        hearth_server::serve(state).await
    })?;
    Ok(())
}
