//! The models a server serves: their Replicate names, aliases, version ids and input
//! defaults, and the model cards (`models/*.toml`) that describe them.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use hearth_runtime::{EngineHandle, RequestLimits};

use crate::schema;

pub struct ServedModel {
    pub owner: String,
    pub name: String,
    /// Other `owner/name`s that reach this model (e.g. a hosted model's name).
    pub aliases: Vec<String>,
    /// 64 hex characters, stable for the same config, weights, tokenizer and defaults.
    pub version: String,
    /// Hosted version ids that apps pin, mapped onto this model.
    pub version_aliases: Vec<String>,
    pub description: String,
    pub defaults: Map<String, Value>,
    pub engine: EngineHandle,
    pub created_at: String,
}

impl ServedModel {
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }

    /// Its own version id, or a hosted one mapped onto it.
    pub fn has_version(&self, v: &str) -> bool {
        v == self.version || self.version_aliases.iter().any(|a| a == v)
    }

    /// What a request to this model may ask for (every API checks against these).
    pub fn limits(&self) -> RequestLimits {
        self.engine.limits().request()
    }

    pub fn openapi_schema(&self) -> Value {
        schema::openapi_schema(&self.defaults, &self.limits())
    }
}

/// What a version id is a hash of.
pub struct VersionInputs<'a> {
    pub config_json: &'a str,
    /// File names and sizes of the weights, or a description of dummy weights.
    pub weights_manifest: &'a str,
    pub tokenizer_json: &'a [u8],
    pub defaults: &'a Map<String, Value>,
}

pub fn version_id(v: &VersionInputs) -> String {
    let mut h = Sha256::new();
    for part in [
        v.config_json.as_bytes(),
        v.weights_manifest.as_bytes(),
        v.tokenizer_json,
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    // serde_json's Map is ordered by key, so this is canonical.
    h.update(Value::Object(v.defaults.clone()).to_string().as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// `models/NAME.toml`: one served model.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCard {
    /// `owner/name` as clients will call it.
    pub name: String,
    /// What `--model` takes: a folder, a Hub id, `demo`, `dummy:SHAPE`. Relative
    /// folders are relative to the card. Left out (empty) only when `route` is
    /// `upstream:UP`: nothing is loaded here.
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub version_aliases: Vec<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub dtype: Option<String>,
    #[serde(default)]
    pub load_format: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    /// Input defaults shown in the schema and used when a request leaves them out.
    #[serde(default)]
    pub defaults: toml::Table,
    /// Where this model's predictions run, as `--route` takes it (`crate::upstream::card`).
    #[serde(default)]
    pub route: Option<String>,
    /// Upstreams this card declares (`[upstream.NAME]`, no token in the card).
    #[serde(default)]
    pub upstream: std::collections::BTreeMap<String, crate::upstream::card::CardUpstream>,
}

impl ModelCard {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // Messages name the line, never quote it: a card could hold a secret by mistake.
        let table: toml::Table = toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .and_then(|s| text.get(..s.start))
                .map(|before| before.matches('\n').count() + 1);
            format!(
                "{}: line {}: {}",
                path.display(),
                line.unwrap_or(0),
                e.message()
            )
        })?;
        crate::upstream::card::refuse_tokens(&table)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut card: ModelCard = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| format!("{}: {}", path.display(), e.message()))?;
        split_name(&card.name).map_err(|e| format!("{}: name: {e}", path.display()))?;
        crate::upstream::card::check_card(&card).map_err(|e| format!("{}: {e}", path.display()))?;
        let candidate = path
            .parent()
            .filter(|_| !card.model.is_empty())
            .map(|d| d.join(&card.model));
        if let Some(c) = candidate.filter(|c| c.is_dir() && !Path::new(&card.model).is_absolute()) {
            card.model = c.to_string_lossy().into_owned();
        }
        Ok(card)
    }

    /// The card's defaults over the standard ones, checked like a request's input.
    pub fn merged_defaults(&self) -> Result<Map<String, Value>, String> {
        let mut d = schema::default_inputs();
        for (k, v) in &self.defaults {
            let json = serde_json::to_value(v).map_err(|e| format!("defaults.{k}: {e}"))?;
            d.insert(k.clone(), json);
        }
        // Before the model loads: its own bounds are checked on every request.
        schema::parse_input(&Value::Object(Map::new()), &d, None)
            .map_err(|e| format!("defaults: {e}"))?;
        Ok(d)
    }
}

pub fn split_name(name: &str) -> Result<(String, String), String> {
    match name.split_once('/') {
        Some((o, n)) if !o.is_empty() && !n.is_empty() && !n.contains('/') => {
            Ok((o.to_string(), n.to_string()))
        }
        _ => Err(format!("{name:?} is not of the form owner/name")),
    }
}

/// All served models, looked up by name, alias or version.
pub struct ModelRegistry {
    models: Vec<std::sync::Arc<ServedModel>>,
    by_name: HashMap<String, usize>,
    by_version: HashMap<String, usize>,
}

impl ModelRegistry {
    pub fn new(models: Vec<ServedModel>) -> Result<Self, String> {
        let mut by_name = HashMap::new();
        let mut by_version = HashMap::new();
        for (i, m) in models.iter().enumerate() {
            for n in std::iter::once(m.full_name()).chain(m.aliases.iter().cloned()) {
                if by_name.insert(n.clone(), i).is_some() {
                    return Err(format!("two models are called {n}"));
                }
            }
            for v in std::iter::once(m.version.clone()).chain(m.version_aliases.iter().cloned()) {
                if by_version.insert(v.clone(), i).is_some() {
                    return Err(format!("two models have version {v}"));
                }
            }
        }
        Ok(Self {
            models: models.into_iter().map(std::sync::Arc::new).collect(),
            by_name,
            by_version,
        })
    }

    pub fn all(&self) -> &[std::sync::Arc<ServedModel>] {
        &self.models
    }

    pub fn default_model(&self) -> Option<&std::sync::Arc<ServedModel>> {
        self.models.first()
    }

    pub fn by_name(&self, owner: &str, name: &str) -> Option<&std::sync::Arc<ServedModel>> {
        self.by_name
            .get(&format!("{owner}/{name}"))
            .map(|&i| &self.models[i])
    }

    pub fn by_version(&self, version: &str) -> Option<&std::sync::Arc<ServedModel>> {
        self.by_version.get(version).map(|&i| &self.models[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_ids_are_64_hex_and_change_with_any_input() {
        let d = schema::default_inputs();
        let base = VersionInputs {
            config_json: "{}",
            weights_manifest: "a:1",
            tokenizer_json: b"tok",
            defaults: &d,
        };
        let v = version_id(&base);
        assert_eq!(v.len(), 64);
        assert!(v.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(v, version_id(&VersionInputs { ..base }));
        let other = VersionInputs {
            config_json: "{}",
            weights_manifest: "a:2",
            tokenizer_json: b"tok",
            defaults: &d,
        };
        assert_ne!(v, version_id(&other));
        let mut d2 = d.clone();
        d2.insert("max_tokens".into(), 7.into());
        let other = VersionInputs {
            config_json: "{}",
            weights_manifest: "a:1",
            tokenizer_json: b"tok",
            defaults: &d2,
        };
        assert_ne!(v, version_id(&other));
    }

    #[test]
    fn cards_parse_and_bad_defaults_are_refused() {
        let dir = std::env::temp_dir().join(format!("hearth-card-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.toml");
        std::fs::write(&p, "name = \"me/m\"\nmodel = \"demo\"\naliases = [\"meta/x\"]\n[defaults]\nmax_tokens = 64\n").unwrap();
        let c = ModelCard::load(&p).unwrap();
        assert_eq!(c.merged_defaults().unwrap()["max_tokens"], 64);
        std::fs::write(
            &p,
            "name = \"me/m\"\nmodel = \"demo\"\n[defaults]\ntemperature = \"hot\"\n",
        )
        .unwrap();
        let e = ModelCard::load(&p).unwrap().merged_defaults().unwrap_err();
        assert!(e.contains("temperature"), "{e}");
        std::fs::write(&p, "name = \"nope\"\nmodel = \"demo\"\n").unwrap();
        assert!(ModelCard::load(&p).unwrap_err().contains("owner/name"));
    }
}
