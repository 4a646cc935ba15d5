#!/usr/bin/env bash
# What `cargo build --features cuda` needs on a machine with no CUDA toolkit and no
# root (see ../shared/cuda-build.md):
#   - CUDA 13.0 compilers from PyPI, pinned: the GPU machines run driver 580 (CUDA 13.0);
#     PTX from a newer nvcc does not load there, and ptxas refuses PTX newer than itself.
#     nvvm and crt must be pinned too, or pip pulls 13.x and nvcc emits PTX 9.x > 9.0.
#   - a root laid out like /usr/local/cuda: bin, include, nvvm linked to the wheels'
#     folders, and lib64/ with libcudart (real, from the wheel).
#   - link-time stand-ins in lib64/ for the driver and the math libraries (libcuda,
#     libnvrtc, libcurand, libcublas, libcublasLt): one empty function per symbol that
#     the cudarc version pinned in Cargo.lock declares, with the real library's soname,
#     so the binary loads the real libraries on the GPU machine. Never shipped.
# Idempotent: reinstalls only when the pins change, rebuilds a stand-in only when its
# symbol list changes. Progress goes to stderr; the last line on stdout is the
# environment to export:   eval "$(bash scripts/cuda-toolchain.sh | tail -n 1)"
# Overrides: CUDA_TC (venv), CUDA_ROOT_DIR (root), PYTHON (interpreter for the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
TC=${CUDA_TC:-$HOME/.cache/hearth-cuda/tc}
ROOT=${CUDA_ROOT_DIR:-$HOME/.cache/hearth-cuda/root}
PINS="nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.*"
log() { echo "cuda-toolchain: $*" >&2; }

# 1. the pinned toolchain venv
if [ "$(cat "$TC/.hearth-pins" 2>/dev/null || true)" != "$PINS" ]; then
  log "installing $PINS into $TC"
  [ -x "$TC/bin/python" ] || "${PYTHON:-python3}" -m venv "$TC" >&2
  # shellcheck disable=SC2086 # PINS is a list of requirement strings
  "$TC/bin/python" -m pip install -q $PINS >&2
  echo "$PINS" >"$TC/.hearth-pins"
fi
NV=$(ls -d "$TC"/lib/python3*/site-packages/nvidia/cu13 2>/dev/null | head -n 1)
[ -n "$NV" ] && [ -x "$NV/bin/nvcc" ] || { log "no nvcc under $TC/lib/python3*/site-packages/nvidia/cu13"; exit 1; }
"$NV/bin/nvcc" --version | grep -q 'release 13\.0' || {
  log "nvcc is not CUDA 13.0:"; "$NV/bin/nvcc" --version >&2; exit 1; }

# 2. the root, like /usr/local/cuda
mkdir -p "$ROOT/lib64"
for d in bin include nvvm; do ln -sfn "$NV/$d" "$ROOT/$d"; done
ln -sf "$NV/lib/libcudart.so.13" "$ROOT/lib64/libcudart.so.13"
ln -sf libcudart.so.13 "$ROOT/lib64/libcudart.so"

# 3. stand-ins from the cudarc that Cargo.lock pins
CUDARC_VERSION=$(awk '/^name = "cudarc"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
[ -n "$CUDARC_VERSION" ] || { log "cudarc not in Cargo.lock"; exit 1; }
CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$CUDARC_VERSION" 2>/dev/null | head -n 1 || true)
if [ -z "$CUDARC" ]; then
  cargo fetch -q >&2
  CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$CUDARC_VERSION" | head -n 1)
fi
stub() { # lib soname sysdir
  local lib=$1 soname=$2 dir="$CUDARC/src/$3" c="$ROOT/lib64/$1.c"
  # cudarc 0.19's sys modules name every function twice: `load::<_F>("NAME")` for
  # dynamic-loading and in `extern "C" { fn NAME(...` for dynamic-linking (what candle
  # uses). The strings are unambiguous; the extern form is the fallback.
  grep -rhoE 'load::<_F>\("[A-Za-z0-9_]+"\)' "$dir" | sed -E 's/.*\("([^"]+)"\).*/\1/' | sort -u >"$c.names" || true
  [ -s "$c.names" ] || grep -rhoE '^[[:space:]]+fn (cu|nvrtc)[A-Za-z0-9_]*\(' "$dir" |
    sed -E 's/^[[:space:]]+fn ([A-Za-z0-9_]+)\(/\1/' | sort -u >"$c.names" || true
  sed 's/.*/void &(void){}/' "$c.names" >"$c.new"; rm -f "$c.names"
  local n; n=$(wc -l <"$c.new")
  [ "$n" -gt 0 ] || { log "no symbols found in $dir: has cudarc changed how it names them?"; exit 1; }
  if [ -f "$ROOT/lib64/$lib.so" ] && cmp -s "$c.new" "$c" &&
     [ "$(cat "$ROOT/lib64/$lib.soname" 2>/dev/null)" = "$soname" ]; then
    rm "$c.new"; return 0
  fi
  mv "$c.new" "$c"
  gcc -shared -fPIC -Wl,-soname,"$soname" -o "$ROOT/lib64/$lib.so" "$c"
  echo "$soname" >"$ROOT/lib64/$lib.soname"
  log "stand-in $lib.so ($soname): $n symbols from cudarc-$CUDARC_VERSION/src/$3"
}
stub libcuda libcuda.so.1 driver/sys
stub libnvrtc libnvrtc.so.13 nvrtc/sys
stub libcurand libcurand.so.10 curand/sys
stub libcublas libcublas.so.13 cublas/sys
stub libcublasLt libcublasLt.so.13 cublaslt/sys

echo "export PATH=$ROOT/bin:\$PATH CUDA_ROOT=$ROOT CUDA_PATH=$ROOT CUDA_HOME=$ROOT CUDA_COMPUTE_CAP=90 LIBRARY_PATH=$ROOT/lib64"
