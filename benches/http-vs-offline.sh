#!/usr/bin/env bash
# The same load in-process and through each HTTP API (Replicate's predictions + SSE,
# OpenAI's completions and chat completions, streamed), in one run: the HTTP front's
# cost as a ratio of output throughput (goal: >= 0.95 for each). Each run's figures are
# also drawn by `hearth bench --plot` beside RESULTS.md as
# benches/http-vs-offline-<mode>.svg (output tok/s, TTFT and TPOT p50/p99); PLOT=0 skips.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${HEARTH_BIN:-target/release/hearth}
[ -x "$bin" ] || cargo build --release
model=${MODEL:-dummy:bench-small}
n=${NUM_PROMPTS:-64}; c=${CONCURRENCY:-32}; in=${INPUT_LEN:-128}; out=${OUTPUT_LEN:-64}
port=${PORT:-18181}
data=$(mktemp -d)
"$bin" serve --model "$model" --port "$port" --data-dir "$data" >"$data/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/health-check" | grep -q '"READY"' && break; sleep 0.1; done
name=$(curl -sf "http://127.0.0.1:$port/v1/models" | python3 -c "import json,sys; m=json.load(sys.stdin)['results'][0]; print(m['owner']+'/'+m['name'])")
common="--num-prompts $n --max-concurrency $c --input-len $in --output-len $out --seed 0 --json"
plot() { [ "${PLOT:-1}" = 0 ] || echo "--plot benches/http-vs-offline-$1.svg"; }
offline=$("$bin" bench --offline --model "$model" $common $(plot offline) | tail -n 1)
echo "offline:     $offline"
results=("$offline")
for backend in replicate openai openai-chat; do
  r=$("$bin" bench --url "http://127.0.0.1:$port" --backend "$backend" --model "$name" --tokenizer "$model" $common $(plot "$backend") | tail -n 1)
  echo "$backend: $r"
  results+=("$r")
done
python3 - "${results[@]}" <<'PY'
import json, sys
o, *hs = map(json.loads, sys.argv[1:])
for h in hs:
    print(f"{h['backend']:>12}/offline output_throughput = {h['output_throughput']/o['output_throughput']:.3f} "
          f"({h['output_throughput']:.1f} vs {o['output_throughput']:.1f} tok/s); "
          f"median TTFT {h['median_ttft_ms']:.0f} vs {o['median_ttft_ms']:.0f} ms; "
          f"input tokens {h['total_input_tokens']} vs {o['total_input_tokens']}")
PY
