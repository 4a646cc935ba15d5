#!/usr/bin/env bash
# Where one prediction's time goes through an `upstream` route (issue 20), at
# concurrency 1 on an idle path: N predictions one after another, each created and
# its stream read to `done`, sent to a hearth upstream directly and through a front
# routing the model there. Prints the client's create-to-`done` median both ways,
# and from the front's debug log (`hearth_server::upstream::timing`) the median
# milliseconds since the create reached the front at which each stage happened:
# create sent upstream, its answer, the upstream id stored, the stream connected,
# its first event, its `done`, the final record read, the end stored and shown.
# The upstream is pinned to CPU 1, the front and this client to CPU 0 (PIN=0: not).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${HEARTH_BIN:-target/release/hearth}
model=${MODEL:-demo}
n=${N:-40}; out=${OUTPUT_LEN:-64}
port=${PORT:-18400}
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
serve() {
  local p=$1 cpu=$2; shift 2
  HEARTH_LOG="info,hearth_server::upstream::timing=debug" $(pin "$cpu") \
    "$bin" serve --port "$p" --data-dir "$data/$p" "$@" >"$data/$p.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$p/health-check" | grep -q '"READY"' && return 0
    sleep 0.1
  done
  echo "server on $p did not come up" >&2; tail -n 20 "$data/$p.log" >&2; exit 1
}
up=$port; front=$((port + 1))
serve "$up" 1 --model "$model"
name=$(curl -sf "http://127.0.0.1:$up/v1/models" | python3 -c "import json,sys; m=json.load(sys.stdin)['results'][0]; print(m['owner']+'/'+m['name'])")
serve "$front" 0 --upstream "up=http://127.0.0.1:$up" --route "$name=upstream:up"
$(pin 0) python3 - "$up" "$front" "$name" "$n" "$out" "$data/$front.log" <<'PY'
import json, re, statistics, sys, time, urllib.request
up, front, name, n, out, log = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]

def one(port, i):
    body = json.dumps({"input": {"prompt": f"trace {i}", "max_tokens": out, "min_tokens": out,
                                 "temperature": 0, "prompt_template": "{prompt}"}}).encode()
    t0 = time.perf_counter()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/{name}/predictions", body,
                                 {"Content-Type": "application/json"})
    p = json.load(urllib.request.urlopen(req))
    t_created = time.perf_counter()
    s = urllib.request.urlopen(urllib.request.Request(p["urls"]["stream"], headers={"Accept": "text/event-stream"}))
    first = None
    for line in s:
        if line.startswith(b"event: output") and first is None:
            first = time.perf_counter()
        if line.startswith(b"event: done"):
            break
    t_done = time.perf_counter()
    return (t_created - t0) * 1e3, ((first or t_done) - t0) * 1e3, (t_done - t0) * 1e3

for port in (up, front):  # warm-up
    for i in range(3):
        one(port, -i)
rows = {"direct": [], "front": []}
for i in range(n):
    rows["direct"].append(one(up, i))
    rows["front"].append(one(front, i))
med = lambda xs: statistics.median(xs)
for side, r in rows.items():
    print(f"{side:7s} create answered {med([x[0] for x in r]):7.2f} ms, first output {med([x[1] for x in r]):7.2f} ms, done {med([x[2] for x in r]):7.2f} ms (median of {n})")
d, f = med([x[2] for x in rows["direct"]]), med([x[2] for x in rows["front"]])
print(f"front adds {f - d:.2f} ms to create->done at c=1 ({f / d:.3f}x)")
ansi = re.compile(r"\x1b\[[0-9;]*m")
stages = {}
for line in open(log, errors="replace"):
    line = ansi.sub("", line)
    m = re.search(r'stage="([^"]+)" ms=([0-9.]+)', line)
    if m:
        stages.setdefault(m.group(1), []).append(float(m.group(2)))
print("front stages, ms since the create reached it (median over all predictions):")
for k, v in sorted(stages.items(), key=lambda kv: med(kv[1])):
    print(f"  {k:20s} {med(v):8.3f}  (n={len(v)})")
PY
