#!/usr/bin/env bash
# Runs ON the GPU machine with target/gpu-bundle carried (see gpu-tests.sh): the
# measurements issue 4 asks for, on dummy:llama-3-8b in bf16, and a transformers peer
# on the same shape in the same call. Appends everything to benches/RESULTS-gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
B=target/gpu-bundle/hearth
NVDIR=$(python3 -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null || true)
if [ -n "$NVDIR" ]; then
  for d in "$NVDIR"/nvidia/*/lib "$NVDIR"/nvidia/cu13/lib; do [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; done
  export LD_LIBRARY_PATH
fi
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
case "$gpu" in *H200*) bw=4.8e12 ;; *) bw=3.35e12 ;; esac
out=benches/RESULTS-gpu.md
M="--model dummy:llama-3-8b --dtype bf16 --device cuda"
{
  echo "## $(date -u +%F) on $gpu"
  echo
  one=$("$B" bench --offline $M --max-concurrency 1 --input-len 128 --output-len 256 --num-prompts 4 --seed 0 --json | tail -n 1)
  echo "- batch 1 (\`hearth bench --offline $M --max-concurrency 1 --input-len 128 --output-len 256 --num-prompts 4\`): \`$one\`"
  python3 -c "import json,sys; r=json.loads(sys.argv[1]); s=r['engine_steps_per_s']; print(f'- decode {s:.1f} steps/s; weight bytes x steps/s / bandwidth = {8.03e9*2*s/$bw*100:.1f}% of $bw B/s')" "$one"
  for c in 64 256; do
    r=$("$B" bench --offline $M --max-concurrency $c --input-len 512 --output-len 256 --num-prompts 1024 --seed 0 --json | tail -n 1)
    echo "- concurrency $c (input 512, output 256, 1024 prompts): \`$r\`"
  done
  peer=$(python3 scripts/hf_peer_bench.py --batch 64 --input-len 512 --output-len 256)
  echo "- transformers peer, same shape, bf16, batch 64: \`$peer\`"
  echo
} | tee -a "$out"
