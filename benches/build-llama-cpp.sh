#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (the CPU peer hearth is measured against) and
# `llama-quantize` (which makes the K-quant files both engines load) from the
# source vendored in PyPI's llama-cpp-python==0.3.36 sdist, with cmake and ninja from
# PyPI, into the cache; later runs reuse it. Prints the cache folder, which holds
#   bin/llama-server      the server
#   bin/llama-quantize    the quantizer (Q4_K_M etc. from an f32/f16 GGUF)
#   src/.../gguf-py       llama.cpp's own GGUF Python package (for converting weights)
#   venv/                 a Python venv with cmake, ninja, numpy and that gguf-py
# About 5 minutes on 2 cores the first time.
set -euo pipefail
ver=0.3.36
sha=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
url="https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-$ver.tar.gz"
root="${HEARTH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hearth}/llama.cpp-$ver"
if [ -x "$root/bin/llama-server" ] && [ -x "$root/bin/llama-quantize" ] && [ -f "$root/venv/.complete" ]; then
  echo "$root"
  exit 0
fi
# Tests that need llama.cpp run in parallel: on a fresh cache they would all build it at
# once into the same folder (one removing the venv another is using). One builds; the
# others wait for it and reuse its result.
mkdir -p "$root"
exec 9>"$root.lock"
flock 9
if [ -x "$root/bin/llama-server" ] && [ -x "$root/bin/llama-quantize" ] && [ -f "$root/venv/.complete" ]; then
  echo "$root"
  exit 0
fi
cd "$root"
if [ ! -d src ]; then
  curl -sSfL -o sdist.tar.gz "$url" || { echo "build-llama-cpp: cannot download $url" >&2; exit 1; }
  echo "$sha  sdist.tar.gz" | sha256sum -c --quiet - >&2
  mkdir -p src.tmp && tar xzf sdist.tar.gz -C src.tmp && mv src.tmp src && rm sdist.tar.gz
fi
lc="$root/src/llama_cpp_python-$ver/vendor/llama.cpp"
if [ ! -f venv/.complete ]; then
  rm -rf venv
  python3 -m venv venv
  venv/bin/python -m pip install --quiet --disable-pip-version-check --only-binary=:all: \
    'cmake>=3.21,<5' ninja 'numpy<3' pyyaml tqdm >&2
  venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "$lc/gguf-py" >&2
  touch venv/.complete
fi
export PATH="$root/venv/bin:$PATH"
cmake -S "$lc" -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >&2
cmake --build build --target llama-server llama-quantize -j "$(nproc)" >&2
mkdir -p bin && cp build/bin/llama-server build/bin/llama-quantize bin/
echo "$root"
