#!/usr/bin/env bash
# Hybrid serving's cost (issue 20), two comparisons in one run, each against its
# baseline in the same run:
#  1. `hearth bench --url` at concurrency 32 through a front whose route for the model
#     is `upstream` to a local hearth, against the same load sent to that upstream
#     directly: p50 latency (create to the stream's `done`) ratio and milliseconds added
#     per prediction (goal: <= 1.05 and <= 2 ms). The upstream is pinned to CPU 1 and
#     the bench client (and the front, when there is one) to CPU 0, so the front's
#     cost shows as latency rather than as CPU taken from the upstream's engine.
#  2. `shadow:UP:100`: the primary's output throughput with every create copied to a
#     shadow side against the same primary without the route (goal: >= 0.95). The
#     primary and the bench client are pinned to CPU 0 and the shadow side, a
#     separate process, to CPU 1, so the shadow side's engine takes nothing from the
#     primary or the client (PIN=0 turns pinning off).
#     The primary's CPU time (utime + stime) over each run, read from /proc after the
#     run's last copy ended, gives the CPU each copy cost the primary's core: (CPU
#     shadowed - CPU alone) / copies, a figure far steadier under load than throughput.
#     BASE_BIN=PATH runs the same comparison with that binary too, alternating the two
#     binaries within each round (a before/after in one run; the shadow side is
#     HEARTH_BIN's). SKIP_ROUTE=1 skips comparison 1. PERF_DIR=DIR records `perf
#     record -g` of each primary during its first round into DIR/LABEL-KIND.data
#     (that round's figures then carry perf's cost).
# Rounds alternate the two sides of each comparison (ROUNDS, default 2); the figures
# are the means over rounds. The last line is one JSON object with every figure.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${HEARTH_BIN:-target/release/hearth}
[ -x "$bin" ] || cargo build --release -p hearth
model=${MODEL:-demo}
n=${NUM_PROMPTS:-128}; c=${CONCURRENCY:-32}; in=${INPUT_LEN:-32}; out=${OUTPUT_LEN:-64}
rounds=${ROUNDS:-2}
port=${PORT:-18300}
data=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$data"
}
trap cleanup EXIT

pin() {
  if [ "${PIN:-1}" = 1 ] && command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    echo "taskset -c $1"
  fi
}

# serve PORT CPU|- ARGS...: a server in the background, waited for until READY.
serve() {
  local p=$1 cpu=$2; shift 2
  local wrap=""
  [ "$cpu" = - ] || wrap=$(pin "$cpu")
  $wrap "$bin" serve --port "$p" --data-dir "$data/$p" "$@" >"$data/$p.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$p/health-check" | grep -q '"READY"' && return 0
    sleep 0.1
  done
  echo "server on $p did not come up:" >&2; tail -n 20 "$data/$p.log" >&2; exit 1
}

# bench PORT CPU|-: one load run against the server on PORT, the client pinned to CPU.
bench() {
  local wrap=""
  [ "$2" = - ] || wrap=$(pin "$2")
  $wrap "$bin" bench --url "http://127.0.0.1:$1" --backend replicate --model "$name" \
    --tokenizer "$model" --num-prompts "$n" --max-concurrency "$c" --input-len "$in" \
    --output-len "$out" --seed 0 --json | tail -n 1
}

# cpu PID: the process's CPU time so far, in clock ticks.
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
tick_ms=$((1000 / $(getconf CLK_TCK)))

# 1. Through an `upstream` route vs directly.
up=$port; front=$((port + 1))
direct=(); routed=()
serve "$up" 1 --model "$model"
name=$(curl -sf "http://127.0.0.1:$up/v1/models" | python3 -c "import json,sys; m=json.load(sys.stdin)['results'][0]; print(m['owner']+'/'+m['name'])")
if [ "${SKIP_ROUTE:-0}" != 1 ]; then
  serve "$front" 0 --upstream "up=http://127.0.0.1:$up" --route "$name=upstream:up"
  for r in $(seq "$rounds"); do
    d=$(bench "$up" 0); echo "direct   #$r: $d"; direct+=("$d")
    f=$(bench "$front" 0); echo "upstream #$r: $f"; routed+=("$f")
  done
fi

# 2. Shadowing at 100% vs not: two primaries on CPU 0 (one with the route, one
# without, loaded one at a time), the shadow side on CPU 1; with BASE_BIN, a pair of
# primaries of each binary.
shadow=$((port + 2))
# The shadow side queues rather than refusing: under others' load on CPU 1 it can fall
# behind a fast primary, and refused copies would make the comparison count fewer.
serve "$shadow" 1 --model "$model" --max-waiting 4096 --max-queued-per-client 4096
labels=(new); bins=("$bin")
if [ -n "${BASE_BIN:-}" ]; then labels=(base new); bins=("$BASE_BIN" "$bin"); fi
declare -A plain_port shadowed_port plain_pid shadowed_pid
next=$((port + 3))
for i in "${!labels[@]}"; do
  l=${labels[$i]}
  plain_port[$l]=$next; shadowed_port[$l]=$((next + 1)); next=$((next + 2))
  bin=${bins[$i]} serve "${plain_port[$l]}" 0 --model "$model"; plain_pid[$l]=${pids[-1]}
  bin=${bins[$i]} serve "${shadowed_port[$l]}" 0 --model "$model" \
    --upstream "sh=http://127.0.0.1:$shadow" --route "$name=shadow:sh:100" \
    --shadow-max-concurrent 10000 --shadow-max-per-minute 100000
  shadowed_pid[$l]=${pids[-1]}
done

# copies PORT: the shadow copies a primary has started so far, once none is in flight.
copies() {
  for _ in $(seq 300); do
    c=$(curl -sf "http://127.0.0.1:$1/v1/hearth/compare" | python3 -c "import json,sys; d=json.load(sys.stdin); s=[m.get('shadow',{}) for m in d['models']]; print(-1 if any(x.get('in_flight',0) for x in s) else sum(x.get('copies') or 0 for x in s))")
    [ "$c" != -1 ] && { echo "$c"; return; }
    sleep 0.2
  done
  echo "copies on $1 never finished" >&2; exit 1
}

# run PORT PID KIND LABEL ROUND: one bench run; prints its JSON with the primary's
# CPU milliseconds over it (after its copies ended) and the copies it made.
run() {
  local p=$1 pid=$2 before after res c0=0 c1=0 perf_pid=""
  [ "$3" = shadowed ] && c0=$(copies "$p")
  if [ -n "${PERF_DIR:-}" ] && [ "$5" = 1 ]; then
    mkdir -p "$PERF_DIR"
    perf record -F 1999 -g -p "$pid" -o "$PERF_DIR/$4-$3.data" >/dev/null 2>&1 &
    perf_pid=$!; sleep 0.5
  fi
  before=$(cpu "$pid")
  res=$(bench "$p" 0)
  [ "$3" = shadowed ] && c1=$(copies "$p")
  after=$(cpu "$pid")
  if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
  echo "$res" | python3 -c "import json,sys; d=json.load(sys.stdin); d['front_cpu_ms']=$(( (after - before) * tick_ms )); d['copies']=$((c1 - c0)); print(json.dumps(d))"
}

shadow_runs=()
for r in $(seq "$rounds"); do
  for l in "${labels[@]}"; do
    load=$(cut -d' ' -f1 /proc/loadavg)
    a=$(run "${plain_port[$l]}" "${plain_pid[$l]}" alone "$l" "$r")
    echo "$l primary alone    #$r (load $load): $a"
    s=$(run "${shadowed_port[$l]}" "${shadowed_pid[$l]}" shadowed "$l" "$r")
    echo "$l primary shadowed #$r: $s"
    shadow_runs+=("$(python3 -c "import json,sys; print(json.dumps({'label': '$l', 'load': $load, 'alone': json.loads(sys.argv[1]), 'shadowed': json.loads(sys.argv[2])}))" "$a" "$s")")
  done
done
compare=$(curl -sf "http://127.0.0.1:${shadowed_port[new]}/v1/hearth/compare")

python3 - "$rounds" "$compare" "${#direct[@]}" "${direct[@]}" "${routed[@]}" "${shadow_runs[@]}" <<'PY'
import json, sys
rounds = int(sys.argv[1]); compare = json.loads(sys.argv[2]); nd = int(sys.argv[3])
direct = [json.loads(x) for x in sys.argv[4:4 + nd]]
routed = [json.loads(x) for x in sys.argv[4 + nd:4 + 2 * nd]]
shadow = [json.loads(x) for x in sys.argv[4 + 2 * nd:]]
mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
failed = sum(r["failed"] for r in direct + routed)
failed += sum(s[k]["failed"] for s in shadow for k in ("alone", "shadowed"))
out = {}
if direct:
    d50, f50 = mean(direct, "median_e2el_ms"), mean(routed, "median_e2el_ms")
    d99, f99 = mean(direct, "p99_e2el_ms"), mean(routed, "p99_e2el_ms")
    dt, ft = mean(direct, "output_throughput"), mean(routed, "output_throughput")
    print(f"upstream route: p50 latency {f50:.1f} vs {d50:.1f} ms direct = {f50 / d50:.3f}x, "
          f"+{f50 - d50:.1f} ms per prediction (goal <= 1.05x, <= 2 ms); "
          f"p99 {f99:.1f} vs {d99:.1f} ms; output {ft:.1f} vs {dt:.1f} tok/s = {ft / dt:.3f}")
    out.update({"p50_e2el_ms_direct": round(d50, 2), "p50_e2el_ms_upstream_route": round(f50, 2),
                "p50_ratio": round(f50 / d50, 4), "added_ms": round(f50 - d50, 2),
                "output_tok_s_direct": round(dt, 1), "output_tok_s_upstream_route": round(ft, 1)})
for label in dict.fromkeys(s["label"] for s in shadow):
    rs = [s for s in shadow if s["label"] == label]
    alone = [s["alone"] for s in rs]; copied = [s["shadowed"] for s in rs]
    at, st = mean(alone, "output_throughput"), mean(copied, "output_throughput")
    n_alone = sum(r["completed"] for r in alone); n_copied = sum(r["completed"] for r in copied)
    cpu_alone = sum(r["front_cpu_ms"] for r in alone) / n_alone
    cpu_copied = sum(r["front_cpu_ms"] for r in copied) / n_copied
    copies = sum(r["copies"] for r in copied)
    per_copy = (sum(r["front_cpu_ms"] for r in copied) - cpu_alone * n_copied) / max(copies, 1)
    ratios = [s["shadowed"]["output_throughput"] / s["alone"]["output_throughput"] for s in rs]
    print(f"{label}: shadow 100%: primary output {st:.1f} vs {at:.1f} tok/s alone = {st / at:.3f} "
          f"(goal >= 0.95; per round {', '.join(f'{x:.3f}' for x in ratios)}); primary CPU "
          f"{cpu_copied:.3f} vs {cpu_alone:.3f} ms per prediction, {per_copy:.3f} ms per copy "
          f"({copies} copies); 1-min load {', '.join(str(s['load']) for s in rs)}")
    out[label] = {"primary_tok_s_alone": round(at, 1), "primary_tok_s_shadowed": round(st, 1),
                  "shadow_throughput_ratio": round(st / at, 4),
                  "round_ratios": [round(x, 4) for x in ratios],
                  "primary_cpu_ms_per_prediction_alone": round(cpu_alone, 4),
                  "primary_cpu_ms_per_prediction_shadowed": round(cpu_copied, 4),
                  "primary_cpu_ms_per_copy": round(per_copy, 4), "copies": copies,
                  "load": [s["load"] for s in rs]}
m = compare["models"][0] if compare.get("models") else {}
sh = m.get("shadow", {})
up_side = m.get("sides", {}).get("upstream", {})
print(f"the new binary's shadowed primary: copies {sh.get('copies')}, skipped {sh.get('skipped_total')} "
      f"{sh.get('skipped')}, succeeded {up_side.get('succeeded')}, failed {up_side.get('failed')}; "
      f"failed requests in all runs: {failed}")
out.update({"shadow_skipped": sh.get("skipped_total"), "failed_requests": failed})
print(json.dumps(out))
PY
