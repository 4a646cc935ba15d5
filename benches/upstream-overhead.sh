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

# 1. Through an `upstream` route vs directly.
up=$port; front=$((port + 1))
serve "$up" 1 --model "$model"
name=$(curl -sf "http://127.0.0.1:$up/v1/models" | python3 -c "import json,sys; m=json.load(sys.stdin)['results'][0]; print(m['owner']+'/'+m['name'])")
serve "$front" 0 --upstream "up=http://127.0.0.1:$up" --route "$name=upstream:up"
direct=(); routed=()
for r in $(seq "$rounds"); do
  d=$(bench "$up" 0); echo "direct   #$r: $d"; direct+=("$d")
  f=$(bench "$front" 0); echo "upstream #$r: $f"; routed+=("$f")
done

# 2. Shadowing at 100% vs not: two primaries on CPU 0 (one with the route, one
# without, loaded one at a time), the shadow side on CPU 1.
shadow=$((port + 2)); plain=$((port + 3)); shadowed=$((port + 4))
serve "$shadow" 1 --model "$model"
serve "$plain" 0 --model "$model"
serve "$shadowed" 0 --model "$model" --upstream "sh=http://127.0.0.1:$shadow" \
  --route "$name=shadow:sh:100" --shadow-max-concurrent 10000 --shadow-max-per-minute 100000
alone=(); copied=()
for r in $(seq "$rounds"); do
  a=$(bench "$plain" 0); echo "primary alone    #$r: $a"; alone+=("$a")
  s=$(bench "$shadowed" 0); echo "primary shadowed #$r: $s"; copied+=("$s")
done
# Let the last copies finish so the counts below are whole.
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$shadowed/v1/hearth/compare" | python3 -c "import json,sys; d=json.load(sys.stdin); sys.exit(0 if all(m.get('shadow',{}).get('in_flight',0)==0 for m in d['models']) else 1)" && break
  sleep 0.2
done
compare=$(curl -sf "http://127.0.0.1:$shadowed/v1/hearth/compare")

python3 - "$rounds" "$compare" "${direct[@]}" "${routed[@]}" "${alone[@]}" "${copied[@]}" <<'PY'
import json, sys
rounds = int(sys.argv[1]); compare = json.loads(sys.argv[2])
runs = [json.loads(x) for x in sys.argv[3:]]
direct, routed, alone, copied = (runs[i * rounds:(i + 1) * rounds] for i in range(4))
mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
failed = sum(r["failed"] for r in runs)
d50, f50 = mean(direct, "median_e2el_ms"), mean(routed, "median_e2el_ms")
d99, f99 = mean(direct, "p99_e2el_ms"), mean(routed, "p99_e2el_ms")
dt, ft = mean(direct, "output_throughput"), mean(routed, "output_throughput")
at, st = mean(alone, "output_throughput"), mean(copied, "output_throughput")
m = compare["models"][0] if compare.get("models") else {}
sh = m.get("shadow", {})
print(f"upstream route: p50 latency {f50:.1f} vs {d50:.1f} ms direct = {f50 / d50:.3f}x, "
      f"+{f50 - d50:.1f} ms per prediction (goal <= 1.05x, <= 2 ms); "
      f"p99 {f99:.1f} vs {d99:.1f} ms; output {ft:.1f} vs {dt:.1f} tok/s = {ft / dt:.3f}")
print(f"shadow 100%: primary output {st:.1f} vs {at:.1f} tok/s alone = {st / at:.3f} "
      f"(goal >= 0.95); copies {sh.get('copies')}, skipped {sh.get('skipped_total')}, "
      f"shadow side succeeded {m.get('sides', {}).get('upstream', {}).get('succeeded')}; "
      f"failed requests in all runs: {failed}")
print(json.dumps({
    "p50_e2el_ms_direct": round(d50, 2), "p50_e2el_ms_upstream_route": round(f50, 2),
    "p50_ratio": round(f50 / d50, 4), "added_ms": round(f50 - d50, 2),
    "output_tok_s_direct": round(dt, 1), "output_tok_s_upstream_route": round(ft, 1),
    "primary_tok_s_alone": round(at, 1), "primary_tok_s_shadowed": round(st, 1),
    "shadow_throughput_ratio": round(st / at, 4), "shadow_copies": sh.get("copies"),
    "shadow_skipped": sh.get("skipped_total"), "failed_requests": failed,
}))
PY
