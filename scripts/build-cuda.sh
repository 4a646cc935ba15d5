#!/usr/bin/env bash
# Builds hearth with --features cuda for sm_90 (H100/H200) on a machine without a CUDA
# toolkit, plus the runtime's integration-test executables (goldens, engine), and packs
# them into target/gpu-bundle/ for scripts/gpu-tests.sh and scripts/gpu-bench.sh to run
# on the GPU machine, which has no Rust. Where a real CUDA toolkit is installed,
# `cargo build --release --features cuda` is all the build takes.
#
# Where things go:
#   target/cuda/release/hearth     the CUDA build. It has its own target dir so that it
#                                  never replaces the CPU build, target/release/hearth:
#                                  the CUDA binary needs libcuda.so.1 and cuBLAS just to
#                                  start, so it cannot run on a machine without them.
#                                  Set CUDA_TARGET_DIR to build elsewhere.
#   target/gpu-bundle/bundle.tar.xz  hearth, test-goldens, test-engine, stripped and
#                                  compressed: the three come to ~180 MB stripped, and
#                                  what the device tool carries is capped at 64 MiB with
#                                  the working tree; xz -9 gets them to ~11 MB
#                                  (the three share candle and its PTX).
#   target/gpu-bundle/MANIFEST.txt what was built, from which commit, sizes, sha256.
# The GPU scripts unpack the archive into target/gpu-bin/ there.
#
# The first build compiles candle's kernels with nvcc: 10+ minutes on 2 cores (28 min
# seen here with other builds beside it). Later builds are incremental: ~1 min
# for a change in crates/, plus ~2 min of xz.
#
# `scripts/build-cuda.sh --check` builds nothing: it says whether target/gpu-bundle is
# current, i.e. was built from exactly the sources here (every tracked or unignored file
# under crates/, Cargo.toml, Cargo.lock, this script and cuda-toolchain.sh, and
# CUDA_COMPUTE_CAP), by a digest recorded in MANIFEST.txt. Exit 0 current, 1 stale,
# 2 no bundle.
set -euo pipefail
cd "$(dirname "$0")/.."
inputs_digest() {
  { echo "CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}"
    git ls-files -co --exclude-standard -- crates Cargo.toml Cargo.lock scripts/build-cuda.sh scripts/cuda-toolchain.sh |
      LC_ALL=C sort | while IFS= read -r f; do [ -f "$f" ] && sha256sum "$f"; done
  } | sha256sum | cut -c1-32
}
if [ "${1:-}" = "--check" ]; then
  m=target/gpu-bundle/MANIFEST.txt
  [ -f target/gpu-bundle/bundle.tar.xz ] && [ -f "$m" ] || { echo "build-cuda: no bundle in target/gpu-bundle"; exit 2; }
  built=$(sed -n 's/^inputs: //p' "$m")
  now=$(inputs_digest)
  if [ "$built" = "$now" ]; then echo "build-cuda: target/gpu-bundle is current ($(head -n 1 "$m"))"; exit 0; fi
  echo "build-cuda: target/gpu-bundle is STALE: $(head -n 1 "$m"); its inputs ${built:-(not recorded)}, now $now"
  exit 1
fi
t0=$(date +%s)
eval "$(bash scripts/cuda-toolchain.sh | tail -n 1)"
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-target/cuda}
B=target/gpu-bundle
log=$(mktemp)
trap 'rm -rf "$log" "$log.d"' EXIT

# The binary, then the test executables. One cargo call for both, naming the packages
# of both, so the features resolve the same way and the test build reuses everything
# the binary build compiled (a separate `cargo test -p hearth-runtime` resolves features
# for hearth-runtime alone and compiles candle and its kernels a second time).
# Equivalent to `cargo build --release --features cuda` followed by
# `cargo test --release --features cuda -p hearth-runtime --no-run`.
cargo build --release --features cuda -p hearth -p hearth-runtime \
  --bin hearth --test goldens --test engine --test paged_attention --message-format=json-render-diagnostics >"$log"

mkdir -p "$log.d" "$B"
python3 - "$log" "$log.d" <<'PY'
import json, shutil, sys
log, stage = sys.argv[1], sys.argv[2]
want = {("bin", "hearth"): "hearth", ("test", "goldens"): "test-goldens", ("test", "engine"): "test-engine",
        ("test", "paged_attention"): "test-paged-attention"}
found = {}
for line in open(log):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    key = (m["target"]["kind"][0], m["target"]["name"])
    if key in want:
        found[want[key]] = m["executable"]
missing = sorted(set(want.values()) - set(found))
if missing:
    sys.exit("build-cuda: no executable for %s in cargo's output" % missing)
for name, path in sorted(found.items()):
    shutil.copy2(path, f"{stage}/{name}")
    print(f"build-cuda: {name} <- {path}", file=sys.stderr)
PY
strip "$log.d"/*

# Check that the stripped executables load and link (against the stand-ins here: they
# only need to resolve; nothing CUDA runs).
ld=$(mktemp -d)
for l in libcuda.so:libcuda.so.1 libcublas.so:libcublas.so.13 libcublasLt.so:libcublasLt.so.13 \
         libcurand.so:libcurand.so.10 libnvrtc.so:libnvrtc.so.13 libcudart.so.13:libcudart.so.13; do
  ln -s "$CUDA_ROOT/lib64/${l%%:*}" "$ld/${l##*:}"
done
LD_LIBRARY_PATH=$ld "$log.d/hearth" --help >/dev/null
LD_LIBRARY_PATH=$ld "$log.d/test-goldens" --list >/dev/null
LD_LIBRARY_PATH=$ld "$log.d/test-engine" --list >/dev/null
LD_LIBRARY_PATH=$ld "$log.d/test-paged-attention" --list >/dev/null
rm -rf "$ld"

rm -f "$B/bundle.tar.xz" "$B/hearth" "$B"/test-*
tar -C "$log.d" -cf - hearth test-goldens test-engine test-paged-attention | xz -9 -T0 >"$B/bundle.tar.xz"
{
  echo "built $(date -u +%FT%TZ) on $(uname -n) from $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates Cargo.toml Cargo.lock || echo ' + uncommitted changes in crates/')"
  echo "cargo build --release --features cuda -p hearth -p hearth-runtime --bin hearth --test goldens --test engine --test paged_attention"
  echo "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP nvcc: $(nvcc --version | grep -o 'release [0-9.]*')"
  echo "needs at run time: $(readelf -d "$log.d/hearth" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
  (cd "$log.d" && for f in hearth test-goldens test-engine test-paged-attention; do
     echo "$(sha256sum "$f" | cut -c1-16)  $(stat -c %s "$f") bytes  $f"; done)
  echo "bundle.tar.xz: $(stat -c %s "$B/bundle.tar.xz") bytes"
  echo "inputs: $(inputs_digest)"
} >"$B/MANIFEST.txt"
cat "$B/MANIFEST.txt"
size=$(stat -c %s "$B/bundle.tar.xz")
[ "$size" -lt $((56 << 20)) ] || { echo "build-cuda: bundle is $size bytes: too big to carry with the working tree (64 MiB)" >&2; exit 1; }
echo "build-cuda: done in $(( $(date +%s) - t0 ))s; the binary is $CARGO_TARGET_DIR/release/hearth ($(stat -c %s "$CARGO_TARGET_DIR/release/hearth") bytes)"
echo "build-cuda: on the GPU machine: run(command=\"bash scripts/gpu-tests.sh\", carry=[\"$B\"])"
