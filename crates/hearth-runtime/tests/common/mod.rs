//! Helpers shared by the tests that use real files.

use std::path::PathBuf;

/// The repository's models/fixtures (or `HEARTH_FIXTURES`, for prebuilt test binaries run
/// from another checkout).
#[allow(dead_code)]
pub fn fixtures() -> PathBuf {
    std::env::var_os("HEARTH_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/fixtures"))
}

/// SmolLM2-135M-Instruct.Q4_1.gguf, downloaded once into the cache by
/// scripts/fetch-smollm2.sh (`HEARTH_SMOLLM2_GGUF` overrides the path).
#[allow(dead_code)]
pub fn smollm2() -> PathBuf {
    if let Some(p) = std::env::var_os("HEARTH_SMOLLM2_GGUF") {
        return PathBuf::from(p);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fetch-smollm2.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "SmolLM2-135M-Instruct.Q4_1.gguf cannot be had (needed by this test): {}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}
