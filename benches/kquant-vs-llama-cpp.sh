#!/usr/bin/env bash
# SmolLM2-135M-Instruct Q4_K_M (llama-quantize's: Q5_0 for the 576-wide rows, Q4_K, Q6_K,
# Q8_0) on ONE thread: hearth built from this tree (NEW), another hearth binary (OLD, e.g.
# main's, before a kernel change) and llama.cpp's llama-server on the same file, alternated
# round by round in one run, so a loaded machine slows all three alike. hearth runs
# offline (`hearth bench --offline`, the engine in-process); llama-server through its
# streaming /completion (`hearth bench --url --backend llama-cpp`: same prompt lengths,
# greedy, EOS ignored). Prints output tok/s per round, the best of the rounds per
# contender and the ratios, with the load average. Not run in CI.
#
#   OLD=/path/to/old/hearth ROUNDS=3 bash benches/kquant-vs-llama-cpp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
new=${NEW:-target/release/hearth}
old=${OLD:-}
gguf=${GGUF:-$(bash scripts/make-smollm2-q4km.sh)}
llama=${LLAMA_SERVER:-$(bash benches/build-llama-cpp.sh)/bin/llama-server}
in=${INPUT_LEN:-20}; out=${OUTPUT_LEN:-128}; rounds=${ROUNDS:-3}
lport=${LLAMA_PORT:-18742}
tmp=$(mktemp -d)
lpid=
cleanup() { [ -n "$lpid" ] && kill "$lpid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
export RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1 HEARTH_LOG=warn

"$llama" -m "$gguf" --port "$lport" -t 1 -np 16 -c $((16 * (in + out + 64))) >"$tmp/llama.log" 2>&1 &
lpid=$!
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$lport/health" >/dev/null 2>&1 && break; sleep 0.2; done

run() { # who concurrency prompts seed
  local args=(--num-prompts "$3" --max-concurrency "$2" --input-len "$in" --output-len "$out" --seed "$4" --json)
  case "$1" in
    new) "$new" bench --offline --model "$gguf" --kv-cache-memory 512MiB "${args[@]}" ;;
    old) "$old" bench --offline --model "$gguf" --kv-cache-memory 512MiB "${args[@]}" ;;
    llama) "$new" bench --url "http://127.0.0.1:$lport" --backend llama-cpp --model smollm2 \
      --tokenizer "$gguf" "${args[@]}" ;;
  esac 2>/dev/null | tail -n 1 | python3 -c "import json,sys; print(json.load(sys.stdin)['output_throughput'])"
}
who=(new llama); [ -n "$old" ] && who=(new old llama)
echo "load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$rounds"); do
  for c in 1 16; do
    n=$([ "$c" = 1 ] && echo 2 || echo 16)
    for w in "${who[@]}"; do
      echo "$r $c $w $(run "$w" "$c" "$n" "$r") $(cut -d' ' -f1 /proc/loadavg)" | tee -a "$tmp/rows"
    done
  done
done
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$tmp/rows" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
for c in ("1", "16"):
    best = {w: max(float(r[3]) for r in rows if r[1] == c and r[2] == w) for w in {r[2] for r in rows}}
    loads = [float(r[4]) for r in rows if r[1] == c]
    line = f"c={c}: best output tok/s " + ", ".join(f"{w} {v:.1f}" for w, v in sorted(best.items()))
    line += f"; new/llama {best['new'] / best['llama']:.2f}x"
    if "old" in best:
        line += f", new/old {best['new'] / best['old']:.2f}x"
    print(line + f" (1-min load {min(loads):.1f}-{max(loads):.1f})")
PY
