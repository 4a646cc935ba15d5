//! `hearth serve`: models behind Replicate's API and Cog's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use hearth_runtime::weights::WeightSource;
use hearth_runtime::{LoadFormat, LoadedModel};
use hearth_server::startup::SetupLog;
use hearth_server::store::StoreSpec;
use hearth_server::{ModelCard, ServedModel, ServerConfig, VersionInputs};

use crate::args::{EngineArgs, ModelArgs};

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub upstream: crate::upstream_args::UpstreamArgs,
    #[command(flatten)]
    pub shadow: crate::shadow_args::ShadowArgs,
    #[arg(long, env = "HEARTH_HOST", default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, env = "HEARTH_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Predictions database, uploaded files, webhook secret. Default: a per-user folder.
    #[arg(long, env = "HEARTH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Accepted API tokens (repeatable; in the env, several separated by whitespace,
    /// which cannot occur in a token). None (and no --api-token-file): no auth.
    #[arg(long = "api-token", env = "HEARTH_API_TOKEN")]
    pub api_tokens: Vec<String>,
    /// A file of accepted API tokens, one a line (blank lines and `#` lines skipped),
    /// besides any --api-token.
    #[arg(long = "api-token-file", env = "HEARTH_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
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
    /// `Host` names served besides loopback names, IP literals and --public-url's host
    /// (repeatable, or comma-separated in the env): a name, .domain (it and every name
    /// under it) or * (any). Other names get a 403 (DNS rebinding).
    #[arg(
        long = "allowed-host",
        env = "HEARTH_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    pub allowed_hosts: Vec<String>,
    #[arg(long, env = "HEARTH_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Seconds SIGTERM waits for predictions in flight before cancelling them.
    #[arg(long, env = "HEARTH_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Seconds a server whose engine went DEFUNCT keeps answering 503 (DEFUNCT on
    /// /health and /health-check) before it shuts down and exits non-zero: at least
    /// one period of the health checks that should see it.
    #[arg(long, env = "HEARTH_DEFUNCT_HOLD", default_value_t = 3)]
    pub defunct_hold: u64,
    /// Serve without --api-token on a non-loopback --host (e.g. behind an
    /// authenticating proxy). Without it such a server refuses to start.
    #[arg(long, env = "HEARTH_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,
    /// Cog's container API (/predictions, /shutdown, /openapi.json, ...) on the same port.
    #[arg(long, env = "HEARTH_COG_API", default_value = "on", value_parser = ["on", "off"])]
    pub cog_api: String,
    /// Let /metrics answer without the API token (for Prometheus scrapers).
    #[arg(long, env = "HEARTH_METRICS_PUBLIC")]
    pub metrics_public: bool,
    /// Let webhooks target loopback, private and link-local addresses.
    #[arg(long, env = "HEARTH_WEBHOOK_ALLOW_PRIVATE")]
    pub webhook_allow_private: bool,
    /// Largest file accepted by /v1/files, e.g. 100MiB.
    #[arg(long, env = "HEARTH_MAX_FILE_SIZE", default_value = "100MiB", value_parser = hearth_runtime::device::parse_bytes)]
    pub max_file_size: u64,
    /// Seconds a client has to send a request's headers.
    #[arg(long, env = "HEARTH_HEADER_READ_TIMEOUT", default_value_t = 30)]
    pub header_read_timeout: u64,
    /// Most open connections; past it new ones get a 503.
    #[arg(long, env = "HEARTH_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Most open connections from one client address; past it new ones get a 429.
    #[arg(long, env = "HEARTH_MAX_CONNECTIONS_PER_IP", default_value_t = 256)]
    pub max_connections_per_ip: usize,
    /// Seconds a connection may handle no request before it is closed (HTTP/1 and 2).
    #[arg(long, env = "HEARTH_IDLE_TIMEOUT", default_value_t = 120)]
    pub idle_timeout: u64,
    /// Seconds after which a connection takes no new requests and closes once its
    /// responses are done (HTTP/2: GOAWAY).
    #[arg(long, env = "HEARTH_MAX_CONNECTION_AGE", default_value_t = 3600)]
    pub max_connection_age: u64,
    /// Predictions (and OpenAI generations) one client may have queued or running at
    /// once: per API token, or per address without tokens; past it a 429 (default:
    /// half of --max-num-seqs plus --max-waiting, so no one client fills the queue).
    #[arg(long, env = "HEARTH_MAX_QUEUED_PER_CLIENT")]
    pub max_queued_per_client: Option<usize>,
    /// Cog's prediction slots: Cog-API predictions in flight at most; past it
    /// `POST /predictions` answers 409 "At capacity", as Cog does (default:
    /// --max-num-seqs).
    #[arg(long, env = "HEARTH_COG_MAX_CONCURRENCY")]
    pub cog_max_concurrency: Option<usize>,
    /// Exit when loading the models fails, instead of reporting SETUP_FAILED on
    /// /health-check (with the error) until stopped.
    #[arg(long, env = "HEARTH_EXIT_ON_SETUP_FAILURE")]
    pub exit_on_setup_failure: bool,
    /// Where predictions, webhook deliveries and files live: sqlite:PATH (one process;
    /// default: predictions.sqlite3 in the data dir) or postgres://USER:PASS@HOST/DB,
    /// shared by every replica behind a load balancer.
    #[arg(long, env = "HEARTH_STORE", value_parser = parse_store)]
    pub store: Option<StoreSpec>,
    /// Seconds a replica's predictions stay its own without a lease renewal (renewed
    /// every third of it); past it another replica sharing the store ends them failed.
    #[arg(long, env = "HEARTH_REPLICA_LEASE", default_value_t = 15)]
    pub replica_lease: u64,
}

fn parse_store(s: &str) -> Result<StoreSpec, String> {
    StoreSpec::parse(s).map_err(|e| e.to_string())
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
        created_at: hearth_server::record::now_rfc3339(),
    })
}

fn load_models(a: &ServeArgs, log: &SetupLog) -> anyhow::Result<Vec<ServedModel>> {
    let engine_cfg = a.engine.config();
    let Some(dir) = &a.models else {
        log.line(format!("loading {}", a.model.model));
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
        if card.model.is_empty() {
            // An upstream-only card (its route is upstream:UP): nothing to load here.
            continue;
        }
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
        log.line(format!("loading {} ({})", card.name, path.display()));
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

/// `--api-token` values (each a whitespace-separated list) and `--api-token-file`'s lines.
fn api_tokens(a: &ServeArgs) -> anyhow::Result<Vec<String>> {
    let mut tokens: Vec<String> = a
        .api_tokens
        .iter()
        .flat_map(|t| hearth_server::auth::split_tokens(t))
        .collect();
    if let Some(path) = &a.api_token_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--api-token-file {}", path.display()))?;
        let from_file = hearth_server::auth::file_tokens(&text);
        if from_file.is_empty() {
            bail!("--api-token-file {}: no token in the file", path.display());
        }
        tokens.extend(from_file);
    }
    Ok(tokens)
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let addr: SocketAddr = format!("{}:{}", a.host, a.port)
        .parse()
        .with_context(|| format!("--host {} --port {} is not an address", a.host, a.port))?;
    let mut cfg = ServerConfig::new(addr, a.data_dir.clone().unwrap_or_else(default_data_dir));
    cfg.api_tokens = api_tokens(&a)?;
    cfg.allow_unauthenticated = a.allow_unauthenticated;
    cfg.public_url = a.public_url.clone();
    cfg.allowed_hosts = a
        .allowed_hosts
        .iter()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    cfg.max_body_bytes = a.max_body_bytes;
    cfg.max_file_bytes = a.max_file_size;
    cfg.shutdown_timeout = Duration::from_secs(a.shutdown_timeout);
    cfg.defunct_hold = Duration::from_secs(a.defunct_hold);
    cfg.cog_api = a.cog_api == "on";
    cfg.metrics_public = a.metrics_public;
    cfg.webhook_allow_private = a.webhook_allow_private;
    cfg.header_read_timeout = Duration::from_secs(a.header_read_timeout.max(1));
    cfg.max_connections = a.max_connections;
    cfg.max_connections_per_ip = a.max_connections_per_ip;
    cfg.idle_timeout = Duration::from_secs(a.idle_timeout);
    cfg.max_connection_age = Duration::from_secs(a.max_connection_age);
    cfg.max_queued_per_client = a
        .max_queued_per_client
        .unwrap_or(((a.engine.max_num_seqs + a.engine.max_waiting) / 2).max(1));
    cfg.cog_max_concurrency = a.cog_max_concurrency.unwrap_or(a.engine.max_num_seqs);
    cfg.store = a.store.clone();
    cfg.replica_lease = Duration::from_secs(a.replica_lease);
    let cards = match &a.models {
        Some(dir) => crate::upstream_args::card_config(dir)?,
        None => Default::default(),
    };
    (cfg.upstreams, cfg.routes, cfg.upstream_breaker) =
        a.upstream.resolve(|k| std::env::var(k).ok(), &cards)?;
    let mirror = a
        .upstream
        .mirror(cfg.data_dir.join("files"), a.webhook_allow_private);
    for u in &mut cfg.upstreams {
        u.mirror = mirror.clone();
        u.intake = a.upstream.intake();
        u.allow_private_streams = a.webhook_allow_private;
    }
    cfg.shadow_limits = a.shadow.limits();
    cfg.upstream_memory_budget = a.upstream.upstream_memory_budget as usize;
    // Before loading models (minutes for big ones): a refused configuration says so now.
    cfg.check()?;
    let exit_on_failure = a.exit_on_setup_failure;
    // The server listens at once and says STARTING on /health-check while this runs.
    let setup = move |log: SetupLog| {
        let started = std::time::Instant::now();
        let models = load_models(&a, &log).map_err(|e| format!("{e:#}"))?;
        for m in &models {
            let line = format!(
                "serving {} (version {}){}",
                m.full_name(),
                m.version,
                if m.aliases.is_empty() {
                    String::new()
                } else {
                    format!(", aliases {}", m.aliases.join(", "))
                }
            );
            eprintln!("{line}");
            log.line(line);
        }
        log.line(format!(
            "models loaded in {:.1}s",
            started.elapsed().as_secs_f64()
        ));
        Ok(models)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(hearth_server::startup::serve_with_setup(
        cfg,
        exit_on_failure,
        setup,
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: super::ServeArgs,
    }

    fn tokens(args: &[&str]) -> anyhow::Result<Vec<String>> {
        let cli = Cli::try_parse_from([&["hearth"][..], args].concat())?;
        super::api_tokens(&cli.serve)
    }

    #[test]
    fn a_comma_stays_inside_its_token() {
        assert_eq!(tokens(&["--api-token", "ab,cd"]).unwrap(), vec!["ab,cd"]);
        assert_eq!(
            tokens(&["--api-token", "one two", "--api-token", "three"]).unwrap(),
            vec!["one", "two", "three"]
        );
    }

    #[test]
    fn a_token_file_has_one_token_a_line() {
        let dir = std::env::temp_dir().join(format!("hearth-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        std::fs::write(&path, "# team a\nfirst,one\n\nsecond\n").unwrap();
        let p = path.to_str().unwrap();
        assert_eq!(
            tokens(&["--api-token-file", p, "--api-token", "x"]).unwrap(),
            vec!["x", "first,one", "second"]
        );
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(tokens(&["--api-token-file", p]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
