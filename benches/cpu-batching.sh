#!/usr/bin/env bash
# Continuous batching on the CPU: output throughput at concurrency 32 against
# concurrency 1, on the demo model and on dummy:bench-small, in one run, plus the
# engine's steps/s against a plain single-sequence forward loop of the same model.
# Then, per model, a sweep over concurrencies drawn by `hearth bench --plot` as
# benches/cpu-batching-<model>.svg beside RESULTS.md (output tok/s, TTFT and TPOT p50/p99).
# Env: INPUT_LEN, OUTPUT_LEN, SWEEP (default 1,2,4,8,16,32), SWEEP_PROMPTS (requests per
# sweep point, default 32), PLOT=0 to skip the sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${HEARTH_BIN:-target/release/hearth}
[ -x "$bin" ] || cargo build --release
in=${INPUT_LEN:-128}
out=${OUTPUT_LEN:-64}
run() { # model concurrency prompts [extra]
  "$bin" bench --offline --model "$1" --max-concurrency "$2" --num-prompts "$3" \
    --input-len "$in" --output-len "$out" --seed 0 --json ${4:-} | tail -n 1
}
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])['$2'])" "$1"; }
for model in demo dummy:bench-small; do
  one=$(run "$model" 1 8 --baseline)
  many=$(run "$model" 32 64)
  t1=$(field "$one" output_throughput); t32=$(field "$many" output_throughput)
  s1=$(field "$one" engine_steps_per_s); base=$(field "$one" baseline_steps_per_s)
  echo "model=$model input=$in output=$out"
  echo "  concurrency 1 : $one"
  echo "  concurrency 32: $many"
  python3 -c "print(f'  output_throughput ratio c32/c1 = {$t32/$t1:.2f}x ({$t32:.1f} vs {$t1:.1f} tok/s)'); print(f'  engine steps/s at c1 vs plain loop = {$s1/$base:.2f} ({$s1:.1f} vs {$base:.1f})')"
  if [ "${PLOT:-1}" != 0 ]; then
    svg="benches/cpu-batching-${model//:/-}.svg"
    echo "  sweep ${SWEEP:-1,2,4,8,16,32} (load before: $(cut -d' ' -f1-3 /proc/loadavg))"
    "$bin" bench --offline --model "$model" --sweep "${SWEEP:-1,2,4,8,16,32}" \
      --num-prompts "${SWEEP_PROMPTS:-32}" --input-len "$in" --output-len "$out" --seed 0 \
      --json --plot "$svg" | sed 's/^/  sweep: /'
  fi
done
