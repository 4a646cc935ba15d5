//! Models that run upstream only: `GET /v1/models/{owner}/{name}` and its versions
//! answered from the upstream's documents (cached), so the official clients find the
//! version and its schema. Version ids seen there are remembered, so a create naming
//! a bare version id reaches the right model. A version's `Input` schema, once its
//! document is cached, checks creates before they are sent (`input_check`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::client::{CallError, UpstreamClient};
use super::input_check::InputCheck;

/// How long a fetched document is served before it is fetched again.
const TTL: Duration = Duration::from_secs(300);
/// Documents kept at most (each route has a few).
const MAX_ENTRIES: usize = 1024;

#[derive(Default)]
pub struct ModelCache {
    docs: Mutex<HashMap<String, (Instant, Value)>>,
    versions: Mutex<HashMap<String, String>>,
    /// By upstream, model and version id (a version's schema never changes): None
    /// where its document has no usable `Input` schema.
    checks: Mutex<HashMap<String, Option<Arc<InputCheck>>>>,
}

impl ModelCache {
    /// The upstream's document at `path` for `model`, from the cache when fresh.
    pub async fn get(
        &self,
        client: &UpstreamClient,
        model: &str,
        path: &str,
    ) -> Result<Value, CallError> {
        let key = format!("{}{path}", client.name);
        if let Some((at, v)) = self.docs.lock().ok().and_then(|d| d.get(&key).cloned()) {
            if at.elapsed() < TTL {
                return Ok(v);
            }
        }
        let v = client.get_path(path).await?;
        self.learn_versions(model, &v);
        if let Ok(mut d) = self.docs.lock() {
            if d.len() >= MAX_ENTRIES {
                d.retain(|_, (at, _)| at.elapsed() < TTL);
            }
            if d.len() < MAX_ENTRIES {
                d.insert(key, (Instant::now(), v.clone()));
            }
        }
        Ok(v)
    }

    fn learn_versions(&self, model: &str, v: &Value) {
        let mut ids = Vec::new();
        for doc in [v, &v["latest_version"]] {
            if let Some(id) = doc["id"]
                .as_str()
                .filter(|_| doc.get("openapi_schema").is_some())
            {
                ids.push(id.to_string());
            }
        }
        if let Some(results) = v["results"].as_array() {
            ids.extend(
                results
                    .iter()
                    .filter_map(|r| r["id"].as_str().map(str::to_string)),
            );
        }
        if let Ok(mut m) = self.versions.lock() {
            for id in ids {
                if m.len() < MAX_ENTRIES || m.contains_key(&id) {
                    m.insert(id, model.to_string());
                }
            }
        }
    }

    /// The check for creates of `model` at `version` (None: its latest version) on
    /// `upstream`, from documents already cached: a create never waits for a fetch
    /// here, and without a cached schema the upstream's own 422 is relayed. The
    /// latest version is taken only from a fresh model document.
    pub fn input_check(
        &self,
        upstream: &str,
        model: &str,
        version: Option<&str>,
    ) -> Option<Arc<InputCheck>> {
        let model_path = format!("{upstream}/v1/models/{model}");
        let (key, version, schema) = {
            let docs = self.docs.lock().ok()?;
            let version = match version {
                Some(v) => v.to_string(),
                None => {
                    let (at, doc) = docs.get(&model_path)?;
                    if at.elapsed() >= TTL {
                        return None;
                    }
                    doc["latest_version"]["id"].as_str()?.to_string()
                }
            };
            let key = format!("{model_path}@{version}");
            if let Some(c) = self.checks.lock().ok()?.get(&key) {
                return c.clone();
            }
            let named = |d: &Value| d["id"].as_str() == Some(version.as_str());
            let schema = docs
                .get(&format!("{model_path}/versions/{version}"))
                .map(|(_, d)| d)
                .filter(|d| named(d))
                .or_else(|| {
                    docs.get(&model_path)
                        .map(|(_, d)| &d["latest_version"])
                        .filter(|d| named(d))
                })
                .or_else(|| {
                    docs.get(&format!("{model_path}/versions"))?.1["results"]
                        .as_array()?
                        .iter()
                        .find(|d| named(d))
                })
                .map(|d| d["openapi_schema"].clone())
                .filter(Value::is_object)?;
            (key, version, schema)
        };
        // Built outside the locks: a large schema takes a while.
        let check = match InputCheck::from_openapi(&schema) {
            Ok(c) => {
                if let Some(c) = &c {
                    tracing::info!(%upstream, %model, version = %version, not_checked = ?c.skipped, "checking creates against the upstream version's input schema");
                }
                c.map(Arc::new)
            }
            Err(e) => {
                tracing::warn!(%upstream, %model, version = %version, error = %e, "the upstream version's input schema cannot be checked here; its 422s are relayed");
                None
            }
        };
        if let Ok(mut m) = self.checks.lock() {
            if m.len() < MAX_ENTRIES {
                m.insert(key, check.clone());
            }
        }
        check
    }

    /// The upstream-only model a version id belongs to, if one was seen.
    pub fn model_of_version(&self, version: &str) -> Option<String> {
        self.versions.lock().ok()?.get(version).cloned()
    }
}
