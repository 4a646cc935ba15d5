#!/usr/bin/env bash
# Dumps llama.cpp's intermediate tensors on a GGUF file, to find the first op where hearth
# and llama.cpp part (issue 22): builds scripts/llama-dump-tensors.cpp against the
# llama.cpp the benches build (static libraries, the same arithmetic as its
# llama-server), runs the prompt's ids in one batch and each further id as a one-token
# step (`-t 2`, `-c 512`; FA=0: `-fa off -ctk f32 -ctv f32`, FA=1: flash attention, f16
# cache, FA=auto: llama-server's defaults, `-fa auto` over an f16 cache, which a CPU build
# resolves to flash attention), and writes OUT/<step>/. Then compare op by op (a decode
# step's attention reads the keys of steps 0..step from the sibling folders):
#   LLAMA_DUMP=OUT/<step> HEARTH_GGUF=FILE HEARTH_LAYERS=30 cargo test --workspace \
#     --test llama_cpp_goldens llama_cpp_ops_report -- --ignored --nocapture
#
#   [FA=0|1|auto] bash scripts/llama-dump-tensors.sh FILE.gguf OUT N_PROMPT ID...
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 4 ] || { echo "usage: $0 FILE.gguf OUT N_PROMPT ID..." >&2; exit 1; }
root=$(bash benches/build-llama-cpp.sh)
src=$(echo "$root"/src/llama_cpp_python-*/vendor/llama.cpp)
b=$root/build
exe=$root/bin/llama-dump-tensors
if [ ! -x "$exe" ] || [ scripts/llama-dump-tensors.cpp -nt "$exe" ]; then
  g++ -O2 -std=c++17 scripts/llama-dump-tensors.cpp -I"$src/include" -I"$src/ggml/include" \
    "$b/src/libllama.a" "$b/ggml/src/libggml.a" "$b/ggml/src/libggml-cpu.a" \
    "$b/ggml/src/libggml-base.a" -fopenmp -lpthread -ldl -o "$exe"
fi
gguf=$1 out=$2
shift 2
rm -rf "$out"
"$exe" "$gguf" "$out" "${FA:-0}" "$@" 2>"$out.log" || { tail "$out.log" >&2; exit 1; }
echo "$out"
