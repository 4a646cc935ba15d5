#!/usr/bin/env bash
# Runs ON the GPU machine (CUDA + PyTorch, no Rust), from the repo root, with the
# binaries built here by scripts/build-cuda.sh. target/ is git-ignored, so the device
# tool must carry it: run(command="bash scripts/gpu-tests.sh", carry=["target/gpu-bundle"]).
#  1. the fixture goldens and the engine tests on CUDA in f32 (tokens exact),
#  2. the goldens in bf16 (logits within 0.1),
#  3. a soak: thousands of predictions, a fifth cancelled, and device memory after it
#     must not exceed memory after warm-up by more than 5%.
set -euo pipefail
cd "$(dirname "$0")/.."
B=target/gpu-bundle
NVDIR=$(python3 -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null || true)
if [ -n "$NVDIR" ]; then
  for d in "$NVDIR"/nvidia/*/lib "$NVDIR"/nvidia/cu13/lib; do [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; done
  export LD_LIBRARY_PATH
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
export HEARTH_FIXTURES=$PWD/models/fixtures HEARTH_TEST_DEVICE=cuda
status=0
for t in "$B"/test-*; do
  echo "== $t (f32)"; HEARTH_TEST_DTYPE=f32 "$t" --test-threads 1 || status=1
done
echo "== goldens (bf16)"; HEARTH_TEST_DTYPE=bf16 "$B/test-goldens" --test-threads 1 || status=1

echo "== soak"
data=$(mktemp -d)
"$B/hearth" serve --model dummy:bench-small --device cuda --port 18080 --data-dir "$data" --max-waiting 4096 >"$data/log" 2>&1 &
srv=$!
trap 'kill $srv 2>/dev/null || true' EXIT
python3 - <<'PY' || status=1
import json, random, subprocess, threading, time, urllib.request
BASE = "http://127.0.0.1:18080"
for _ in range(600):
    try:
        urllib.request.urlopen(BASE + "/health-check", timeout=1); break
    except Exception:
        time.sleep(0.1)
def mem():
    out = subprocess.check_output(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"])
    return int(out.decode().split()[0])
def post(path, body=None):
    req = urllib.request.Request(BASE + path, data=json.dumps(body or {}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=120))
def wave(n, seed):
    rnd = random.Random(seed); errors = []
    def one(i):
        try:
            p = post("/v1/models/hearth/dummy-bench-small/predictions",
                     {"input": {"prompt": "soak %d " % i * rnd.randint(1, 20), "max_tokens": rnd.randint(32, 128), "ignore_eos": True}})
            if rnd.random() < 0.2:
                time.sleep(rnd.random() * 0.2); post("/v1/predictions/%s/cancel" % p["id"])
        except Exception as e:
            errors.append(repr(e))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    [t.start() for t in threads]; [t.join() for t in threads]
    return errors
wave(200, 0); time.sleep(5); warm = mem(); print("after warm-up:", warm, "MiB")
errs = []
for k in range(10):
    errs += wave(300, k + 1)
    print("wave", k, "memory", mem(), "MiB")
time.sleep(10); after = mem(); print("after soak:", after, "MiB; request errors:", len(errs))
assert after <= warm * 1.05, f"device memory grew: {warm} -> {after} MiB"
PY
exit $status
