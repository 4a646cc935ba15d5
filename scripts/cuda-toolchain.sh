#!/usr/bin/env bash
# What `cargo build --features cuda` needs on a machine with no CUDA toolkit and no
# root (as ../shared/cuda-build.md found): CUDA 13.0 compilers from PyPI, pinned (the
# GPU machines run driver 580 = CUDA 13.0, and newer PTX does not load there), a root
# laid out like /usr/local/cuda, and link-time stand-ins for the driver and math
# libraries, named like the real ones so the binary loads those on the GPU machine.
# Idempotent. Prints the environment to export.
set -euo pipefail
cd "$(dirname "$0")/.."
TC=${CUDA_TC:-$HOME/.cache/hearth-cuda/tc}
ROOT=${CUDA_ROOT_DIR:-$HOME/.cache/hearth-cuda/root}

if [ ! -x "$TC/bin/nvcc-ok" ]; then
  python3 -m venv "$TC"
  "$TC/bin/pip" install -q \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 "nvidia-cuda-cccl==13.0.*"
  touch "$TC/bin/nvcc-ok" && chmod +x "$TC/bin/nvcc-ok"
fi
NV=$("$TC/bin/python" -c 'import nvidia, os; print(os.path.join(os.path.dirname(nvidia.__path__[0] if hasattr(nvidia, "__path__") else nvidia.__file__), "nvidia", "cu13"))' 2>/dev/null || true)
[ -d "$NV" ] || NV=$(ls -d "$TC"/lib/python3*/site-packages/nvidia/cu13 | head -n 1)
mkdir -p "$ROOT/lib64"
for d in bin include nvvm; do ln -sfn "$NV/$d" "$ROOT/$d"; done
ln -sf "$NV/lib/libcudart.so.13" "$ROOT/lib64/libcudart.so"
ln -sf "$NV/lib/libcudart.so.13" "$ROOT/lib64/libcudart.so.13"

# Stand-ins: every symbol cudarc loads, as an empty function, with the real soname.
cargo fetch -q
CUDARC=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-"$(grep -A1 'name = "cudarc"' Cargo.lock | sed -n 's/version = "\(.*\)"/\1/p')" | head -n 1)
stub() { # lib soname sysdir
  local lib=$1 soname=$2 dir=$3 c="$ROOT/lib64/$1.c"
  [ -f "$ROOT/lib64/$lib.so" ] && return 0
  grep -rhoE 'load::<_F>\("[A-Za-z0-9_]+"\)' "$CUDARC/src/$dir" | sed -E 's/.*\("([^"]+)"\).*/void \1(void){}/' | sort -u >"$c"
  gcc -shared -fPIC -Wl,-soname,"$soname" -o "$ROOT/lib64/$lib.so" "$c"
}
stub libcuda libcuda.so.1 driver/sys
stub libnvrtc libnvrtc.so.13 nvrtc/sys
stub libcurand libcurand.so.10 curand/sys
stub libcublas libcublas.so.13 cublas/sys
stub libcublasLt libcublasLt.so.13 cublaslt/sys

cat <<ENV
export PATH=$ROOT/bin:\$PATH CUDA_ROOT=$ROOT CUDA_PATH=$ROOT CUDA_HOME=$ROOT CUDA_COMPUTE_CAP=90 LIBRARY_PATH=$ROOT/lib64
ENV
