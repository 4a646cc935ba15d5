//! Content digests of weight files, for version ids that change when the weights do.
//! Hashing gigabytes at every start would be slow, so the digest is cached beside the
//! file (`NAME.hearth-sha256`), keyed by the file's size and modification time; where
//! that folder is read-only (a Hub cache, a mounted volume) the cache goes under
//! hearth's cache folder instead.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use crate::error::{Result, RuntimeError};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the cached digest is valid for.
fn stamp(path: &Path) -> Result<(u64, u128)> {
    let m = std::fs::metadata(path).map_err(|e| RuntimeError::io(path, e))?;
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok((m.len(), mtime))
}

fn cache_paths(path: &Path, cache_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(name) = path.file_name() {
        let mut n = name.to_os_string();
        n.push(".hearth-sha256");
        out.push(path.with_file_name(n));
    }
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let key = hex(&Sha256::digest(canonical.to_string_lossy().as_bytes()));
    out.push(cache_dir.join("digests").join(format!("{key}.json")));
    out
}

fn read_cached(cache: &Path, size: u64, mtime: u128) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(cache).ok()?).ok()?;
    let ok = v.get("size")?.as_u64()? == size && v.get("mtime_ns")?.as_str()? == mtime.to_string();
    let d = v.get("sha256")?.as_str()?;
    (ok && d.len() == 64).then(|| d.to_string())
}

fn hash_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| RuntimeError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| RuntimeError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// The sha256 of the file's content, from the cache when its size and mtime still match.
pub fn file_sha256(path: &Path, cache_dir: &Path) -> Result<String> {
    let (size, mtime) = stamp(path)?;
    let caches = cache_paths(path, cache_dir);
    if let Some(d) = caches.iter().find_map(|c| read_cached(c, size, mtime)) {
        return Ok(d);
    }
    let started = std::time::Instant::now();
    let digest = hash_file(path)?;
    // The file changed while we read it: do not cache a digest of a moving target.
    if stamp(path)? != (size, mtime) {
        return Ok(digest);
    }
    tracing::info!(file = %path.display(), secs = started.elapsed().as_secs_f32(), "hashed weights");
    let record = serde_json::json!({"size": size, "mtime_ns": mtime.to_string(), "sha256": digest});
    for c in &caches {
        let tmp = c.with_extension(format!("tmp-{}", std::process::id()));
        let written = c
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|_| std::fs::write(&tmp, record.to_string()))
            .and_then(|_| std::fs::rename(&tmp, c));
        if written.is_ok() {
            break;
        }
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_of_content_and_cached_until_the_file_changes() {
        let dir = std::env::temp_dir().join(format!("hearth-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("w.bin");
        std::fs::write(&f, b"abc").unwrap();
        let d = file_sha256(&f, &dir).unwrap();
        assert_eq!(
            d,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(dir.join("w.bin.hearth-sha256").exists());
        // A cache entry is trusted while size and mtime match...
        let cache = dir.join("w.bin.hearth-sha256");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cache).unwrap()).unwrap();
        v["sha256"] = "0".repeat(64).into();
        std::fs::write(&cache, v.to_string()).unwrap();
        assert_eq!(file_sha256(&f, &dir).unwrap(), "0".repeat(64));
        // ...and not once the content (same size) is rewritten.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&f, b"abd").unwrap();
        let d2 = file_sha256(&f, &dir).unwrap();
        assert_eq!(d2, hash_file(&f).unwrap());
        assert_ne!(d2, d);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
