//! Fetching a model folder from the Hugging Face Hub (honours `HF_HOME`, `HF_TOKEN`,
//! `HF_ENDPOINT` and `HF_HUB_OFFLINE`).

use std::path::PathBuf;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Result, RuntimeError};

const OPTIONAL: &[&str] = &["tokenizer_config.json", "generation_config.json"];

fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE").as_deref(),
        Ok("1") | Ok("true") | Ok("TRUE") | Ok("yes")
    )
}

fn hint(id: &str) -> String {
    format!(
        "download it elsewhere (`huggingface-cli download {id} --local-dir DIR`) and pass the folder: --model DIR"
    )
}

/// Returns the snapshot folder holding the model's files.
pub fn download(id: &str, revision: Option<&str>, config_only: bool) -> Result<PathBuf> {
    let repo = match revision {
        Some(r) => Repo::with_revision(id.to_string(), RepoType::Model, r.to_string()),
        None => Repo::model(id.to_string()),
    };
    let fail = |reason: String| RuntimeError::ModelSource {
        source_name: id.to_string(),
        reason,
    };
    if offline() {
        let cache = Cache::from_env().repo(repo);
        let config = cache.get("config.json").ok_or_else(|| {
            fail(format!(
                "HF_HUB_OFFLINE is set and it is not in the Hub cache; {}",
                hint(id)
            ))
        })?;
        return config
            .parent()
            .map(|p| p.to_path_buf())
            .ok_or_else(|| fail("bad cache path".into()));
    }
    let api = ApiBuilder::from_env()
        .with_progress(true)
        .with_token(std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()))
        .build()
        .map_err(|e| fail(format!("cannot reach the Hub: {e}; {}", hint(id))))?;
    let r = api.repo(repo);
    let config = r
        .get("config.json")
        .map_err(|e| fail(format!("cannot fetch config.json: {e}; {}", hint(id))))?;
    r.get("tokenizer.json")
        .map_err(|e| fail(format!("cannot fetch tokenizer.json: {e}")))?;
    for f in OPTIONAL {
        let _ = r.get(f);
    }
    if !config_only {
        match r.get("model.safetensors.index.json") {
            Ok(index) => {
                let text =
                    std::fs::read_to_string(&index).map_err(|e| RuntimeError::io(&index, e))?;
                let v: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| RuntimeError::Json {
                        path: index.clone(),
                        source: e,
                    })?;
                let mut shards: Vec<String> = v
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .map(|m| {
                        m.values()
                            .filter_map(|s| s.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                shards.sort();
                shards.dedup();
                for s in shards {
                    r.get(&s)
                        .map_err(|e| fail(format!("cannot fetch {s}: {e}")))?;
                }
            }
            Err(_) => {
                r.get("model.safetensors")
                    .map_err(|e| fail(format!("no model.safetensors or index: {e}")))?;
            }
        }
    }
    config
        .parent()
        .map(|p| p.to_path_buf())
        .ok_or_else(|| fail("bad cache path".into()))
}

/// One file of a Hub repo (a GGUF named by `--gguf-file`), from the cache or downloaded.
pub fn download_file(id: &str, revision: Option<&str>, file: &str) -> Result<PathBuf> {
    let repo = match revision {
        Some(r) => Repo::with_revision(id.to_string(), RepoType::Model, r.to_string()),
        None => Repo::model(id.to_string()),
    };
    let fail = |reason: String| RuntimeError::ModelSource {
        source_name: id.to_string(),
        reason,
    };
    if offline() {
        return Cache::from_env().repo(repo).get(file).ok_or_else(|| {
            fail(format!(
                "HF_HUB_OFFLINE is set and {file} is not in the Hub cache; download it elsewhere and pass the file: --model FILE.gguf"
            ))
        });
    }
    let api = ApiBuilder::from_env()
        .with_progress(true)
        .with_token(std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()))
        .build()
        .map_err(|e| {
            fail(format!(
                "cannot reach the Hub: {e}; pass a local file: --model FILE.gguf"
            ))
        })?;
    api.repo(repo)
        .get(file)
        .map_err(|e| fail(format!("cannot fetch {file}: {e}")))
}
