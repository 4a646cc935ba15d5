#!/usr/bin/env bash
# Two hearth binaries (A: a baseline, B: a change) through `hearth bench --json-schema`,
# alternated in one script on the same machine, c=16 then c=1, ROUNDS times, with the
# load average before each run (a shared machine's load moves between runs).
# Usage: benches/constrained-ab.sh A_BINARY B_BINARY [SCHEMA]
set -euo pipefail
a=$1 b=$2
schema=${3:-$(dirname "$0")/schemas/order-2k.json}
model=${MODEL:-$(dirname "$0")/../scripts/fetch-smollm2.sh}
[ -x "$model" ] && model=$("$model")
for round in $(seq 1 "${ROUNDS:-2}"); do
  for c in 16 1; do
    n=$([ "$c" = 16 ] && echo 16 || echo 4)
    for bin in "$a" "$b"; do
      echo "== round $round c=$c $bin load: $(cut -d' ' -f1-3 /proc/loadavg)"
      "$bin" bench --offline --model "$model" --json-schema "$schema" --num-prompts "$n" \
        --input-len 32 --output-len 64 --max-concurrency "$c" 2>&1 |
        grep -E '^(unconstrained|constrained)'
    done
  done
done
