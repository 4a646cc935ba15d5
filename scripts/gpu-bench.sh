#!/usr/bin/env bash
# Runs ON the GPU machine, from the repo root, with target/gpu-bundle carried (see
# scripts/gpu-tests.sh; `scripts/build-cuda.sh --check` says whether it is current):
#     run(command="bash scripts/gpu-bench.sh", carry=["target/gpu-bundle"], timeout_s=450)
# The measurements of issue 4, on dummy:llama-3-8b (random weights generated on the
# device, Llama-3-8B shape) in bf16, every size explicit:
#   batch1  `hearth bench --offline --max-concurrency 1 --input-len 128 --output-len 256
#           --num-prompts 4`: decode steps/s, and the fraction of HBM bandwidth that is:
#           (weight bytes read per step + KV bytes read per step) x steps/s / bandwidth,
#           weights = (8.03e9 params - the 128256 x 4096 embedding table, of which a step
#           reads one row per token) x 2 bytes, KV = 128 KiB per token of context
#           (8 KV heads x 128 x K,V x 32 layers x 2 bytes) at the mean decode context,
#           input + output/2; bandwidth H100 SXM 3.35e12 B/s, H200 4.8e12 (by name);
#   c64     concurrency 64, input 512, output 256, 256 prompts (the same fraction, with
#           64 sequences' KV per step and steps/s ~ output tok/s / 64: approximate);
#   c256    concurrency 256, input 512, output 256, 512 prompts;
#   peer    scripts/hf_peer_bench.py: the same shape in Hugging Face transformers,
#           `generate` on a batch of 64, then 256 if it fits, 512 random prompt tokens,
#           256 new tokens.
# Budgets (seconds, under `timeout`): unpack 20, device and compute-capability check 10,
# batch1 120, c64 150, c256 200, peer 240 (BENCH_TIMEOUT_<STEP> overrides). A GPU slot
# is 15 minutes with the machine's start: run one or two steps per call
# (GPU_BENCH_STEPS, default "batch1 c64"), so a rerun fits.
# The PTX JIT cache is kept under target/cuda-jit-cache (CUDA_CACHE_MAXSIZE 4 GiB).
#
# Results: a section appended to benches/RESULTS-gpu.md with the device, date, commit
# and commands. That file is written on the GPU machine, whose working tree does not
# come back: with $OUT set (the device tool) the section is also written to
# $OUT/RESULTS-gpu-section.md, with the raw logs beside it; append it to
# benches/RESULTS-gpu.md here (the template is benches/RESULTS-gpu-template.md).
# benches/roofline.py's estimates are the columns these measurements are read against.
set -uo pipefail
cd "$(dirname "$0")/.."
B=target/gpu-bundle
BIN=${GPU_BIN:-target/gpu-bin}
STEPS=${GPU_BENCH_STEPS:-batch1 c64}
LOGS=${OUT:-$(mktemp -d)}
die() { echo "gpu-bench: $*" >&2; exit 1; }

# -- the executables and the CUDA libraries: as in scripts/gpu-tests.sh
if [ -z "${GPU_BIN:-}" ] && { [ ! -x "$BIN/hearth" ] || [ "$B/bundle.tar.xz" -nt "$BIN/.unpacked" ]; }; then
  [ -f "$B/bundle.tar.xz" ] || die "no $B/bundle.tar.xz: run scripts/build-cuda.sh on a machine with Rust and carry target/gpu-bundle"
  rm -rf "$BIN" && mkdir -p "$BIN"
  timeout 20 python3 - "$B/bundle.tar.xz" "$BIN" <<'PY' || die "could not unpack the bundle (or not within 20 s)"
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    t.extractall(sys.argv[2], **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
PY
  touch "$BIN/.unpacked"
fi
NV=$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null || true)
for d in "${NV:-/nonexistent}"/*/lib /usr/local/cuda/lib64; do
  [ -d "$d" ] && LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
export LD_LIBRARY_PATH
ldd "$BIN/hearth" | grep -q 'not found' && { ldd "$BIN/hearth"; die "a library the binary needs was not found"; }

gpu=$(timeout 10 nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
driver=$(timeout 10 nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)
[ -n "$gpu" ] || die "nvidia-smi found no GPU (or hung for 10 s)"
want_cap=$(sed -n 's/.*CUDA_COMPUTE_CAP=\([0-9]*\).*/\1/p' "$B/MANIFEST.txt" 2>/dev/null | head -n 1)
have_cap=$(timeout 10 nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')
[ -z "$want_cap" ] || [ "${have_cap:-0}" -ge "$want_cap" ] ||
  die "the bundle's kernels need compute capability >= $want_cap; this GPU is ${have_cap:-unknown}"
export CUDA_CACHE_PATH=${CUDA_CACHE_PATH:-$PWD/target/cuda-jit-cache} CUDA_CACHE_MAXSIZE=${CUDA_CACHE_MAXSIZE:-4294967296}
mkdir -p "$CUDA_CACHE_PATH"
case "$gpu" in
  *H200*) bw=4.8e12 ;;
  *H100*NVL*) bw=3.9e12 ;;
  *H100*PCIe*) bw=2.0e12 ;;
  *H100*) bw=3.35e12 ;;   # SXM5, "NVIDIA H100 80GB HBM3"
  *) bw=3.35e12; echo "gpu-bench: unknown GPU $gpu: taking H100 SXM's bandwidth" >&2 ;;
esac
rev=$(cat "$B/MANIFEST.txt" 2>/dev/null | sed -n 's/.* from \([0-9a-f]*\).*/\1/p' | head -n 1)
M=${GPU_BENCH_MODEL:-"--model dummy:llama-3-8b --dtype bf16 --device cuda"}   # override only to try the script
sec=$LOGS/RESULTS-gpu-section.md
{
  echo
  echo "## $(date -u '+%F %H:%M UTC'), $gpu (driver $driver), hearth ${rev:-?}"
  echo
  echo "Peak HBM bandwidth taken as $bw B/s. Binary: \`target/gpu-bundle\` from \`scripts/build-cuda.sh\`; run with \`GPU_BENCH_STEPS=\"$STEPS\" bash scripts/gpu-bench.sh\`."
  echo
} >"$sec"
status=0

bench() { # step, budget (s), concurrency, input len, output len, prompts
  local step=$1 TMO=$2 conc=$3 inlen=$4 outlen=$5 n=$6
  local args="--max-concurrency $conc --input-len $inlen --output-len $outlen --num-prompts $n"
  local cmd="hearth bench --offline $M $args"
  echo "== $step (budget ${TMO}s): $cmd" >&2
  # shellcheck disable=SC2086 # word splitting of the flags is intended
  timeout --kill-after=5 "$TMO" "$BIN/hearth" bench --offline $M $args --seed 0 --json >"$LOGS/bench-$step.log" 2>"$LOGS/bench-$step.err"
  local rc=$?
  tail -n 5 "$LOGS/bench-$step.err" >&2
  local json; json=$(tail -n 1 "$LOGS/bench-$step.log")
  if [ $rc -ne 0 ] || ! python3 -c 'import json,sys; json.loads(sys.argv[1])' "$json" 2>/dev/null; then
    echo "- **$step** \`$cmd\`: failed (exit $rc$( [ $rc -eq 124 ] && echo ", stopped at ${TMO}s")): \`$(tail -n 1 "$LOGS/bench-$step.err" | sed "s/\x1b\[[0-9;]*m//g")\`" >>"$sec"
    status=1; return
  fi
  python3 - "$step" "$cmd" "$json" "$bw" "$conc" "$inlen" "$outlen" >>"$sec" <<'PY'
import json, sys
step, cmd, r, bw = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])
conc, inlen, outlen = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
# Bytes one decode step reads: every weight but the embedding table (one row per token),
# plus the KV of each sequence at the mean decode context.
WEIGHTS = (8.03e9 - 128256 * 4096) * 2
KV_PER_TOKEN = 8 * 128 * 2 * 32 * 2
ctx = inlen + outlen / 2
print(f"- **{step}** `{cmd}`")
print(f"  - {r['completed']}/{r['num_prompts']} completed in {r['duration']:.1f} s: output {r['output_throughput']:.1f} tok/s, "
      f"total {r['total_token_throughput']:.1f} tok/s, {r['request_throughput']:.2f} req/s, preemptions {r['preemptions']}")
print(f"  - TTFT mean/median/p99 {r['mean_ttft_ms']:.1f}/{r['median_ttft_ms']:.1f}/{r['p99_ttft_ms']:.1f} ms; "
      f"TPOT {r['mean_tpot_ms']:.2f}/{r['median_tpot_ms']:.2f}/{r['p99_tpot_ms']:.2f} ms; "
      f"ITL p99 {r['p99_itl_ms']:.2f} ms; engine {r['engine_steps_per_s']:.1f} steps/s")
if step == "batch1":
    # One sequence: one decode step per output token after the first, so steps/s is
    # 1000 / TPOT (prefill excluded); engine_steps_per_s also counts the 4 prefills.
    steps = 1000.0 / r["median_tpot_ms"] if r["median_tpot_ms"] > 0 else 0.0
    how = "1000 / median TPOT"
else:
    # Approximate: every step a decode of `conc` sequences (prefill steps counted in).
    steps = r["output_throughput"] / conc
    how = f"output tok/s / {conc}, approximate"
kv = conc * ctx * KV_PER_TOKEN
frac = (WEIGHTS + kv) * steps / bw
print(f"  - decode {steps:.1f} steps/s ({how}): (weights {WEIGHTS / 1e9:.2f} GB + KV {kv / 1e9:.3f} GB at mean context "
      f"{ctx:.0f}) x {steps:.1f}/s = {(WEIGHTS + kv) * steps / 1e12:.2f} TB/s = **{100 * frac:.1f}% of HBM bandwidth** "
      f"({bw:.3g} B/s); weights alone {100 * WEIGHTS * steps / bw:.1f}%")
print(f"  - `{json.dumps(r)}`")
PY
}

for step in $STEPS; do
  case $step in
    batch1) bench batch1 "${BENCH_TIMEOUT_BATCH1:-120}" 1 128 256 4 ;;
    c64)    bench c64 "${BENCH_TIMEOUT_C64:-150}" 64 512 256 256 ;;
    c256)   bench c256 "${BENCH_TIMEOUT_C256:-200}" 256 512 256 512 ;;
    peer)
      echo "== peer: python3 scripts/hf_peer_bench.py --batch 64 256 --input-len 512 --output-len 256" >&2
      TMO=${BENCH_TIMEOUT_PEER:-240}
      timeout --kill-after=5 "$TMO" python3 scripts/hf_peer_bench.py --batch 64 256 --input-len 512 --output-len 256 \
        >"$LOGS/peer.log" 2>"$LOGS/peer.err"
      rc=$?
      tail -n 5 "$LOGS/peer.err" >&2
      echo "- **peer** \`python3 scripts/hf_peer_bench.py --batch 64 256 --input-len 512 --output-len 256\` (transformers $(python3 -c 'import transformers; print(transformers.__version__)' 2>/dev/null), torch $(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null), bf16, random init, \`generate\` greedy with min_new_tokens=max_new_tokens):" >>"$sec"
      python3 - "$LOGS/peer.log" >>"$sec" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if "error" in r:
        print(f"  - batch {r['batch']}: {r['error']}")
    else:
        print(f"  - batch {r['batch']}: output {r['output_throughput']:.1f} tok/s, total {r['total_token_throughput']:.1f} tok/s "
              f"({r['output_tokens']} new tokens in {r['duration']:.1f} s; prefill {r['prefill_s']:.2f} s; "
              f"peak memory {r['peak_memory_gib']:.1f} GiB)")
    print(f"    `{json.dumps(r)}`")
PY
      [ $rc -eq 0 ] || { echo "  - exit $rc$( [ $rc -eq 124 ] && echo ", stopped at ${TMO}s"): \`$(tail -n 1 "$LOGS/peer.err" | sed "s/\x1b\[[0-9;]*m//g")\`" >>"$sec"; status=1; }
      ;;
    *) die "unknown step $step (batch1 c64 c256 peer)" ;;
  esac
done

out=benches/RESULTS-gpu.md
[ -f "$out" ] || sed -n '1,/^<!-- results below -->/p' benches/RESULTS-gpu-template.md >"$out"
cat "$sec" >>"$out"
cat "$sec"
exit $status
