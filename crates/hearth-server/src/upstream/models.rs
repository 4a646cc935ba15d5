//! Models that run upstream only: `GET /v1/models/{owner}/{name}` and its versions
//! answered from the upstream's documents (cached), so the official clients find the
//! version and its schema. Version ids seen there are remembered, so a create naming
//! a bare version id reaches the right model.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::client::{CallError, UpstreamClient};

/// How long a fetched document is served before it is fetched again.
const TTL: Duration = Duration::from_secs(300);
/// Documents kept at most (each route has a few).
const MAX_ENTRIES: usize = 1024;

#[derive(Default)]
pub struct ModelCache {
    docs: Mutex<HashMap<String, (Instant, Value)>>,
    versions: Mutex<HashMap<String, String>>,
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

    /// The upstream-only model a version id belongs to, if one was seen.
    pub fn model_of_version(&self, version: &str) -> Option<String> {
        self.versions.lock().ok()?.get(version).cloned()
    }
}
