#!/usr/bin/env bash
# Batching on dummy:bench-small (c=32 vs c=1 output tok/s, input 128 / output 64, the
# command of RESULTS.md's "Batching on dummy:bench-small") for several builds or weight
# dtypes in one run, alternated round by round so a shared machine's load hits them
# alike; the load average is printed before every run.
# Env: VARIANTS, a ;-separated list of "NAME=BINARY [FLAGS]" (default: this tree's
# release binary with f32 and with --cpu-weight-dtype bf16), ROUNDS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
variants=${VARIANTS:-"f32=target/release/hearth;bf16=target/release/hearth --cpu-weight-dtype bf16"}
rounds=${ROUNDS:-2}
run() { # "binary [flags]" concurrency prompts
  local bin flags
  read -r bin flags <<<"$1"
  # shellcheck disable=SC2086 # the flags are words
  "$bin" bench $flags --offline --model dummy:bench-small --max-concurrency "$2" \
    --num-prompts "$3" --input-len 128 --output-len 64 --seed 0 --json | tail -n 1
}
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])['$2'])" "$1"; }
IFS=';' read -ra list <<<"$variants"
for r in $(seq 1 "$rounds"); do
  for v in "${list[@]}"; do
    name=${v%%=*}; cmd=${v#*=}
    l1=$(cut -d' ' -f1 /proc/loadavg); one=$(run "$cmd" 1 8)
    l32=$(cut -d' ' -f1 /proc/loadavg); many=$(run "$cmd" 32 64)
    t1=$(field "$one" output_throughput); t32=$(field "$many" output_throughput)
    python3 -c "print(f'round $r $name: c=1 {$t1:.1f} tok/s (load $l1), c=32 {$t32:.1f} tok/s (load $l32), ratio {$t32/$t1:.2f}x')"
  done
done
