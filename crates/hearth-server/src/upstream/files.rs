//! Files across the upstream boundary. Inputs: a hearth file URL (`/v1/files/{id}`,
//! which only hearth can resolve, behind its token) is sent to the upstream inlined
//! as a data URL, up to `INLINE_MAX`; data URLs and other URLs go as they are.
//! Outputs: with `--mirror-upstream-files`, each output that is an http(s) URL is
//! fetched (through the webhook SSRF guard: public addresses only unless
//! `--webhook-allow-private`, no redirects, `--mirror-upstream-max-bytes`) into
//! hearth's file store, content type kept, and the output points at hearth's copy,
//! which outlives the upstream's expiry (hosted outputs are deleted after an hour).
//! A file that cannot be copied keeps its upstream URL, and the logs say why.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::error::ApiError;
use crate::record::{new_id, now_rfc3339, Record};
use crate::store::SharedStore;
use crate::webhook::guard;

/// The largest hearth file inlined into an upstream's input.
pub const INLINE_MAX: u64 = 8 << 20;
const FETCH_TIMEOUT: Duration = Duration::from_secs(120);
/// Outputs copied per prediction at most.
const MIRROR_MAX_FILES: usize = 64;

/// `--mirror-upstream-files`' settings.
#[derive(Debug, Clone)]
pub struct Mirror {
    pub max_bytes: u64,
    /// The webhook guard's `--webhook-allow-private`.
    pub allow_private: bool,
    /// Where fetched files are written before the store takes them (the store's
    /// files folder: it moves them into place).
    pub temp_dir: PathBuf,
}

/// The hearth file id a URL of this server names: `{base}/v1/files/{id}` or
/// `.../download`.
fn hearth_file_id<'a>(s: &'a str, base: &str) -> Option<&'a str> {
    let rest = s.strip_prefix(base)?.strip_prefix("/v1/files/")?;
    let id = rest.strip_suffix("/download").unwrap_or(rest);
    crate::store::valid_file_id(id).then_some(id)
}

/// The input as the upstream gets it: hearth file URLs (top-level values, or items
/// of a top-level list) inlined as data URLs. `INLINE_MAX` bounds the files of one
/// input together, not each file: a list of many URLs to one large file must not make
/// the process hold each copy. Over it, or a file that is gone, is a 422 naming the
/// field.
pub async fn inline_inputs(
    store: &SharedStore,
    input: &Value,
    bases: &[&str],
) -> Result<Value, ApiError> {
    let Value::Object(fields) = input else {
        return Ok(input.clone());
    };
    let mut out = fields.clone();
    let mut left = INLINE_MAX;
    for (key, v) in out.iter_mut() {
        match v {
            Value::String(s) => {
                if let Some(d) = inline_one(store, s, bases, key, &mut left).await? {
                    *s = d;
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    if let Value::String(s) = item {
                        let field = format!("{key}.{i}");
                        if let Some(d) = inline_one(store, s, bases, &field, &mut left).await? {
                            *s = d;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(Value::Object(out))
}

async fn inline_one(
    store: &SharedStore,
    s: &str,
    bases: &[&str],
    field: &str,
    left: &mut u64,
) -> Result<Option<String>, ApiError> {
    let Some(id) = bases.iter().find_map(|b| hearth_file_id(s, b)) else {
        return Ok(None);
    };
    let meta = store
        .file_meta(id)
        .await?
        .ok_or_else(|| ApiError::invalid(format!("input.{field}: file {id} not found")))?;
    let size = meta["size"].as_u64().unwrap_or(0);
    if size > *left {
        return Err(ApiError::invalid(format!(
            "input.{field}: file {id} is {size} bytes; an upstream gets hearth files inlined as data URLs, up to {INLINE_MAX} bytes for all of one input's files together: give a URL the upstream can reach instead"
        )));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    let mut stream = store
        .file_read(id)
        .await?
        .ok_or_else(|| ApiError::invalid(format!("input.{field}: file {id} not found")))?;
    while let Some(piece) = stream.next().await {
        bytes.extend_from_slice(&piece?);
        if bytes.len() as u64 > *left {
            return Err(ApiError::invalid(format!(
                "input.{field}: file {id} is over the {INLINE_MAX} bytes one input's files may take together"
            )));
        }
    }
    *left -= bytes.len() as u64;
    let ct = meta["content_type"]
        .as_str()
        .filter(|c| !c.is_empty() && !c.contains([',', ';', ' ']))
        .unwrap_or("application/octet-stream");
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    Ok(Some(format!("data:{ct};base64,{b64}")))
}

/// Whether an output chunk is a file URL to copy: an http(s) URL and nothing else.
fn is_file_url(s: &str) -> bool {
    (s.starts_with("https://") || s.starts_with("http://"))
        && !s.contains(char::is_whitespace)
        && reqwest::Url::parse(s).is_ok_and(|u| u.host().is_some())
}

/// Copies the record's file outputs into the store and points them there; returns
/// the log lines to add (what was not copied, and why).
pub async fn mirror_outputs(m: &Mirror, store: &SharedStore, r: &mut Record) -> Vec<String> {
    let Some(output) = r.prediction.output.clone() else {
        return Vec::new();
    };
    let mut notes = Vec::new();
    let mut out = Vec::with_capacity(output.len());
    let mut copied = 0;
    for chunk in output {
        if !is_file_url(&chunk) || copied >= MIRROR_MAX_FILES {
            out.push(chunk);
            continue;
        }
        copied += 1;
        match fetch_into_store(m, store, &chunk).await {
            Ok(id) => out.push(format!("{}/v1/files/{id}/download", r.base_url)),
            Err(why) => {
                notes.push(format!(
                    "Output {chunk} was not copied into hearth's file store: {why}; it is the upstream's URL."
                ));
                out.push(chunk);
            }
        }
    }
    r.prediction.output = Some(out);
    notes
}

/// A temporary file removed unless the store took it.
struct Temp(PathBuf);
impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn fetch_into_store(m: &Mirror, store: &SharedStore, url: &str) -> Result<String, String> {
    guard::check_url(url, m.allow_private).await?;
    let parsed = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(FETCH_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none());
    if !m.allow_private {
        if !guard::literal_allowed(&parsed) {
            return Err("not a public address".into());
        }
        // The addresses connected to are the ones checked (no DNS rebinding).
        builder = builder.dns_resolver(std::sync::Arc::new(guard::PublicOnlyResolver));
    }
    let client = builder.build().map_err(|e| e.to_string())?;
    let mut resp = client.get(parsed).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("fetching it answered {}", resp.status()));
    }
    if resp.content_length().is_some_and(|n| n > m.max_bytes) {
        return Err(format!(
            "it is over --mirror-upstream-max-bytes ({} bytes)",
            m.max_bytes
        ));
    }
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_string();
    let name: String = resp
        .url()
        .path_segments()
        .and_then(|mut s| s.next_back())
        .unwrap_or("file")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        .take(128)
        .collect();
    let temp = Temp(m.temp_dir.join(format!(".upload-{}", new_id())));
    let mut f = tokio::fs::File::create(&temp.0)
        .await
        .map_err(|e| format!("writing it: {e}"))?;
    let mut hash = Sha256::new();
    let mut size = 0u64;
    while let Some(piece) = resp.chunk().await.map_err(|e| e.to_string())? {
        size += piece.len() as u64;
        if size > m.max_bytes {
            return Err(format!(
                "it is over --mirror-upstream-max-bytes ({} bytes)",
                m.max_bytes
            ));
        }
        hash.update(&piece);
        f.write_all(&piece)
            .await
            .map_err(|e| format!("writing it: {e}"))?;
    }
    f.flush().await.map_err(|e| format!("writing it: {e}"))?;
    drop(f);
    let sha: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let id = new_id();
    let meta = json!({
        "id": id, "name": if name.is_empty() { "file".to_string() } else { name },
        "content_type": content_type, "size": size,
        "etag": sha.clone(), "checksums": {"sha256": sha},
        "metadata": {"mirrored_from": url},
        "created_at": now_rfc3339(), "expires_at": null,
    });
    store
        .file_put(&meta, &temp.0)
        .await
        .map_err(|e| format!("storing it: {e}"))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hearth_file_urls_and_file_outputs_are_recognized() {
        let id = "abcdefghijklmnopqrstuvwxyz";
        let base = "http://127.0.0.1:8080";
        assert_eq!(
            hearth_file_id(&format!("{base}/v1/files/{id}"), base),
            Some(id)
        );
        assert_eq!(
            hearth_file_id(&format!("{base}/v1/files/{id}/download"), base),
            Some(id)
        );
        assert_eq!(hearth_file_id(&format!("{base}/v1/files/../x"), base), None);
        assert_eq!(
            hearth_file_id(&format!("http://other/v1/files/{id}"), base),
            None
        );
        assert!(is_file_url("https://replicate.delivery/x/out.png"));
        assert!(!is_file_url("see https://x.y/ for more"));
        assert!(!is_file_url("data:image/png;base64,AA=="));
        assert!(!is_file_url("hello"));
    }
}
