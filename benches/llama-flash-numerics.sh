#!/usr/bin/env bash
# The cost of `--attention-numerics llama-cpp` (llama.cpp's CPU flash attention to the
# bit, llama_flash.rs / llama_flash_simd.rs) against hearth's own kernels
# (`--attention-numerics hearth`) on SmolLM2-135M-Instruct Q4_K_M with the f16 cache,
# in-process (`hearth bench --offline`, prefix caching off), the settings alternated and
# the order swapped every round. Optionally a third binary in llama-cpp mode (OTHER_BIN,
# e.g. a build with the scalar kernels) for the record. Loads:
#   ttft-2k   c=1, 3 prompts of 2,000 tokens, 2 out: median TTFT (one 2,000-token step:
#             llama.cpp's tiled kernel)
#   c1-short  c=1, 4 prompts of 20 tokens, 128 out: median TPOT (one-key kernel)
#   tpot-1900 c=8, 8 prompts of 1,900 tokens, 64 out: median TPOT (8 decodes a step
#             over ~1,900 keys each)
#   c16-short c=16, 32 prompts of 20 tokens, 128 out: output tokens/s
# Prints one line per run (the 1-minute load average before it) and the medians'
# ratios llama-cpp / hearth (> 1: llama-cpp slower; throughput inverted likewise).
#
#   ROUNDS=2 bash benches/llama-flash-numerics.sh
#   OTHER_BIN=/path/to/old/hearth OTHER_LOADS="c1-short c16-short" ROUNDS=2 \
#     bash benches/llama-flash-numerics.sh
# OTHER_LOADS (default: every load) limits the third binary's runs (a scalar build's
# 2,000-token prompts take minutes each).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${HEARTH_BIN:-target/release/hearth}
other=${OTHER_BIN:-}
rounds=${ROUNDS:-2}
model=${MODEL:-$(bash scripts/bench-gguf.sh q4_k_m)}
read -r -a loads <<<"${LOADS:-ttft-2k c1-short tpot-1900 c16-short}"
other_loads=" ${OTHER_LOADS:-${loads[*]}} "
out=$(mktemp)
trap 'rm -f "$out"' EXIT

# name|concurrency prompts input output|metric
spec() {
  case "$1" in
    ttft-2k) echo "1 3 2000 2|median_ttft_ms" ;;
    c1-short) echo "1 4 20 128|median_tpot_ms" ;;
    tpot-1900) echo "8 8 1900 64|median_tpot_ms" ;;
    c16-short) echo "16 32 20 128|output_throughput" ;;
    *) echo "unknown load $1" >&2; exit 1 ;;
  esac
}

run() { # variant binary numerics load
  local s c n i o metric load json
  s=$(spec "$4"); read -r c n i o <<<"${s%%|*}"; metric=${s##*|}
  load=$(cut -d' ' -f1 /proc/loadavg)
  json=$("$2" bench --offline --model "$model" --kv-cache-dtype f16 --no-prefix-caching \
    --attention-numerics "$3" --max-concurrency "$c" --num-prompts "$n" --input-len "$i" \
    --output-len "$o" --json 2>/dev/null | tail -1)
  local v
  v=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$json" "$metric")
  echo "$4 $1 $metric $v load $load" | tee -a "$out"
}

variants=("hearth|$bin|hearth" "llama-cpp|$bin|llama-cpp")
[ -n "$other" ] && variants+=("llama-cpp-other|$other|llama-cpp")
for r in $(seq 1 "$rounds"); do
  for load in "${loads[@]}"; do
    order=("${variants[@]}")
    if [ $((r % 2)) -eq 0 ]; then
      # Swap who goes first.
      order=()
      for ((j = ${#variants[@]} - 1; j >= 0; j--)); do order+=("${variants[j]}"); done
    fi
    for v in "${order[@]}"; do
      IFS='|' read -r name b mode <<<"$v"
      if [ "$name" = llama-cpp-other ] && [[ $other_loads != *" $load "* ]]; then continue; fi
      run "$name" "$b" "$mode" "$load"
    done
  done
done

python3 - "$out" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = {}
for load, name, metric, v, _, _ in rows:
    med.setdefault((load, metric), {}).setdefault(name, []).append(float(v))
for (load, metric), by in med.items():
    base = statistics.median(by["hearth"])
    parts = []
    for name, vs in by.items():
        if name == "hearth":
            continue
        m = statistics.median(vs)
        # Ratios as "time": throughput inverted, so > 1 always means slower.
        ratio = base / m if metric == "output_throughput" else m / base
        parts.append(f"{name}/hearth {ratio:.3f}x")
    print(f"{load} ({metric}, {len(by['hearth'])} rounds): " + ", ".join(parts))
EOF
