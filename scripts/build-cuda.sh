#!/usr/bin/env bash
# Builds hearth with --features cuda for sm_90 (H100/H200) on a machine without a CUDA
# toolkit, and the runtime's test binaries, into target/gpu-bundle/ for
# scripts/gpu-tests.sh to run on the GPU machine (which has no Rust). The CUDA build
# lives in its own target dir (target/cuda/release/hearth), so it never replaces the
# CPU build of target/release/hearth that needs no CUDA library to start. Where a real
# CUDA toolkit is installed, `cargo build --release --features cuda` is all it takes.
# The first build compiles candle's kernels with nvcc: 10+ minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/cuda-toolchain.sh | tail -n 1)"
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-target/cuda}
cargo build --release --features cuda
mkdir -p target/gpu-bundle
cp "$CARGO_TARGET_DIR/release/hearth" target/gpu-bundle/hearth
cargo test --release --features cuda -p hearth-runtime --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], "target/gpu-bundle/test-" + m["target"]["name"])
        print("bundled", m["target"]["name"])
'
ls -la target/gpu-bundle
