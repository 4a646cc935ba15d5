#!/usr/bin/env bash
# Runs ON the GPU machine (driver 580 / CUDA 13, PyTorch's pip-installed CUDA libraries,
# no Rust), from the repo root, with the executables that scripts/build-cuda.sh packed
# into target/gpu-bundle/ on a machine with Rust (`scripts/build-cuda.sh --check` says
# whether that bundle is current).
#
# target/ is git-ignored, so the device tool does not send it by itself: name the bundle
# in `carry`:
#     run(command="bash scripts/gpu-tests.sh", carry=["target/gpu-bundle"], timeout_s=450)
# (the bundle is ~11 MB of xz; the tool's limit is 64 MiB with the working tree, and the
# executables unpacked come to ~170 MB, which is why they travel packed; dummy weights
# are generated on the device, never carried).
#
# A GPU slot is 15 minutes of device time, machine start included, and a hang must not
# eat it: every phase runs under `timeout` with a budget in seconds, and the budgets of
# one whole run add up to 420 s (7 min), so a rerun fits in the same slot:
#     phase                                   budget (s)  override
#     unpack the bundle                           20      GPU_T_UNPACK
#     device and compute-capability check         10      (fixed)
#     kernel tests: paged attention, CPU+CUDA     30      GPU_T_KERNEL
#     compute-sanitizer probe (when present)      10      (fixed)
#     memcheck on the kernel tests                45      GPU_T_SANITIZER
#     racecheck on the kernel tests               45      GPU_T_SANITIZER
#     goldens f32                                 30      GPU_T_GOLDENS
#     engine f32                                  45      GPU_T_ENGINE
#     goldens bf16                                30      GPU_T_GOLDENS
#     engine bf16 (reported, not counted)         30      GPU_T_ENGINE_BF16
#     soak                                       120      GPU_T_SOAK
# The small kernel tests run first: when the kernel is wrong, they say so in seconds,
# before the goldens' whole-model failures.
#
#  1. the kernel tests, then compute-sanitizer memcheck and racecheck on them when the
#     machine has compute-sanitizer (probed with a short timeout: some machines refuse
#     it; skipped with a note when so);
#  2. the fixture goldens and the engine tests on CUDA in f32: tokens exact, logits 1e-4;
#  3. the goldens on CUDA in bf16: logits within 0.25 (goldens.rs says why no tokens);
#     the engine tests in bf16 too, reported but not counted (batched-vs-alone token
#     equality is not promised in bf16);
#  4. a soak: SOAK_N (600) predictions over the HTTP API, SOAK_CONCURRENCY (64) at a
#     time after SOAK_WARMUP (100), max_tokens 32..128 with ignore_eos, a fifth cancelled
#     mid-flight; device memory (nvidia-smi) after the soak must not exceed memory after
#     the warm-up by more than 5%. The KV cache is fixed at SOAK_KV (1GiB) so that 5%
#     means ~100 MiB: with the default --gpu-memory-utilization 0.9 the cache takes 90%
#     of the card and a leak would need gigabytes to show.
# The PTX that CUDA JIT-compiles for the GPU is cached under target/cuda-jit-cache
# (CUDA_CACHE_MAXSIZE 4 GiB, so candle's kernels fit) and reused by every phase and by a
# rerun on the same machine.
# Exits non-zero on any failure. With $OUT set (the device tool), logs land there too.
#
# Fixtures: the test executables were compiled on another machine, and the fixtures
# path baked into them, env!("CARGO_MANIFEST_DIR")/../../models/fixtures, is that
# machine's (/work/main/crates/hearth-runtime/../../models/fixtures). It cannot be
# recreated with one symlink here: the kernel resolves `..` against real directories,
# so /work/main/crates/hearth-runtime would have to exist too. The tests take
# HEARTH_FIXTURES first (tests/goldens.rs, tests/engine.rs), and this script points it
# at this checkout's models/fixtures, which travels with the working tree.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${OUT:-}" ] && [ -z "${GPU_TESTS_LOGGED:-}" ]; then
  export GPU_TESTS_LOGGED=1
  bash "$0" "$@" 2>&1 | tee "$OUT/gpu-tests.log"
  exit "${PIPESTATUS[0]}"
fi
B=target/gpu-bundle
BIN=${GPU_BIN:-target/gpu-bin}     # GPU_BIN: use executables already unpacked there
STEPS=${GPU_TESTS_STEPS:-tests soak}
DEVICE=${GPU_TESTS_DEVICE:-cuda}   # cpu only to try the script's mechanics without a GPU
die() { echo "gpu-tests: $*" >&2; exit 1; }

# -- the executables
[ -n "${GPU_BIN:-}" ] || [ -f "$B/bundle.tar.xz" ] || die "no $B/bundle.tar.xz: run scripts/build-cuda.sh on a machine with Rust and carry target/gpu-bundle"
if [ -z "${GPU_BIN:-}" ] && { [ ! -x "$BIN/hearth" ] || [ "$B/bundle.tar.xz" -nt "$BIN/.unpacked" ]; }; then
  rm -rf "$BIN" && mkdir -p "$BIN"
  timeout "${GPU_T_UNPACK:-20}" python3 - "$B/bundle.tar.xz" "$BIN" <<'PY' || die "could not unpack the bundle (or not within ${GPU_T_UNPACK:-20} s)"
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    t.extractall(sys.argv[2], **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
PY
  touch "$BIN/.unpacked"
fi
cat "$B/MANIFEST.txt" 2>/dev/null

# -- CUDA libraries: the driver's libcuda.so.1 is on the loader's path already; cuBLAS,
# cuRAND and cudart 13 come from the pip-installed nvidia packages (PyTorch's), every
# <nvidia>/*/lib folder (nvidia/cu13/lib for CUDA 13 wheels), then /usr/local/cuda.
NV=$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null || true)
for d in "${NV:-/nonexistent}"/*/lib /usr/local/cuda/lib64; do
  [ -d "$d" ] && LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
export LD_LIBRARY_PATH
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
ldd "$BIN/hearth" | grep -E 'libcuda|libcublas|libcurand|libcudart|not found'
ldd "$BIN/hearth" | grep -q 'not found' && die "a library the binary needs was not found (above)"
timeout 10 nvidia-smi || die "nvidia-smi failed (or hung for 10 s)"
# The bundle's PTX is for CUDA_COMPUTE_CAP (MANIFEST.txt); an older GPU cannot JIT it.
want_cap=$(sed -n 's/.*CUDA_COMPUTE_CAP=\([0-9]*\).*/\1/p' "$B/MANIFEST.txt" 2>/dev/null | head -n 1)
have_cap=$(timeout 10 nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')
[ -n "$have_cap" ] || die "nvidia-smi reports no compute capability"
echo "compute capability: device ${have_cap}, bundle built for ${want_cap:-?}"
[ -z "$want_cap" ] || [ "$have_cap" -ge "$want_cap" ] ||
  die "the bundle's kernels need compute capability >= $want_cap; this GPU is $have_cap"
export CUDA_CACHE_PATH=${CUDA_CACHE_PATH:-$PWD/target/cuda-jit-cache} CUDA_CACHE_MAXSIZE=${CUDA_CACHE_MAXSIZE:-4294967296}
mkdir -p "$CUDA_CACHE_PATH"

export HEARTH_FIXTURES=$PWD/models/fixtures HEARTH_TEST_DEVICE=$DEVICE
status=0
failed=()
run() { # label, budget in seconds, command...
  local label=$1 budget=$2; shift 2
  echo; echo "== $label (budget ${budget}s)"
  local t0=$SECONDS rc
  timeout --kill-after=5 "$budget" "$@"; rc=$?
  if [ $rc -eq 0 ]; then echo "== $label: ok in $((SECONDS - t0))s"
  else
    [ $rc -eq 124 ] && echo "== $label: stopped at its budget of ${budget}s"
    echo "== $label: FAILED (exit $rc)"; status=1; failed+=("$label")
  fi
}
# compute-sanitizer, when the machine has one that answers within 10 s.
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1 || true)
if [ -n "$SAN" ] && ! timeout 10 "$SAN" --version >/dev/null 2>&1; then
  echo "compute-sanitizer at $SAN did not answer within 10 s: skipped"; SAN=
fi

# -- 1, 2: the test executables (each test loads its own model; one thread at a time
# keeps the device memory of one test at a time)
if [[ " $STEPS " == *" tests "* ]]; then
grep -q HEARTH_FIXTURES "$BIN/test-goldens" ||
  die "these test executables predate HEARTH_FIXTURES: rebuild with scripts/build-cuda.sh"
# 1: hearth's CUDA paged-attention kernel against the same float64 reference as the
# CPU op, first alone, then under compute-sanitizer (the ragged-batch test only: the
# sanitizers slow kernels 10-100x).
K=${GPU_T_KERNEL:-30} S=${GPU_T_SANITIZER:-45}
run "kernel tests (CPU and CUDA)" "$K" "$BIN/test-paged-attention" --test-threads 1
if [ -n "$SAN" ]; then
  run "memcheck: kernel tests" "$S" "$SAN" --tool memcheck --error-exitcode 1 \
    "$BIN/test-paged-attention" --test-threads 1 ragged_batches
  run "racecheck: kernel tests" "$S" "$SAN" --tool racecheck --error-exitcode 1 \
    "$BIN/test-paged-attention" --test-threads 1 ragged_batches
else
  echo; echo "== compute-sanitizer: not on this machine; memcheck and racecheck skipped"
fi
# 2, 3: each test loads its own model; one thread at a time keeps the device memory of
# one test at a time.
G=${GPU_T_GOLDENS:-30} E=${GPU_T_ENGINE:-45}
run "goldens f32"  "$G" env HEARTH_TEST_DTYPE=f32  "$BIN/test-goldens" --test-threads 1
run "engine f32"   "$E" env HEARTH_TEST_DTYPE=f32  "$BIN/test-engine"  --test-threads 1
run "goldens bf16" "$G" env HEARTH_TEST_DTYPE=bf16 "$BIN/test-goldens" --test-threads 1
echo; echo "== engine bf16 (informational, not counted; budget ${GPU_T_ENGINE_BF16:-30}s)"
timeout --kill-after=5 "${GPU_T_ENGINE_BF16:-30}" env HEARTH_TEST_DTYPE=bf16 "$BIN/test-engine" --test-threads 1 &&
  echo "== engine bf16: ok" || echo "== engine bf16: failed or over budget (not counted)"
fi

# -- 4: the soak
soak() {
  local data=/tmp/soak port=${SOAK_PORT:-18080}
  rm -rf "$data" && mkdir -p "$data"
  "$BIN/hearth" serve --model dummy:bench-small --device "$DEVICE" --port "$port" --data-dir "$data" \
    --kv-cache-memory "${SOAK_KV:-1GiB}" --max-waiting 8192 >"$data/server.log" 2>&1 &
  local srv=$!
  SOAK_PORT=$port SOAK_PID=$srv python3 - <<'PY'
import collections, json, os, queue, random, subprocess, sys, threading, time, urllib.error, urllib.request

BASE = "http://127.0.0.1:%s" % os.environ["SOAK_PORT"]
MODEL = "/v1/models/hearth/dummy-bench-small/predictions"
N = int(os.environ.get("SOAK_N", "600"))
CONC = int(os.environ.get("SOAK_CONCURRENCY", "64"))
WARM = int(os.environ.get("SOAK_WARMUP", "100"))
TERMINAL = {"succeeded", "failed", "canceled", "aborted"}

def mem():
    out = subprocess.check_output(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"])
    return int(out.decode().split()[0])

def call(method, path, body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(BASE + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=180) as r:
        return json.load(r)

t0 = time.time()
while True:
    try:
        health = json.load(urllib.request.urlopen(BASE + "/health-check", timeout=2))
        if health["status"] == "SETUP_FAILED":
            sys.exit("soak: setup failed: " + health["setup"].get("logs", ""))
        if health["status"] == "STARTING":
            raise RuntimeError("still starting")
        break
    except Exception:
        if time.time() - t0 > 180:
            sys.exit("soak: the server did not answer /health-check within 180 s")
        try:
            os.kill(int(os.environ["SOAK_PID"]), 0)
        except OSError:
            sys.exit("soak: the server exited")
        time.sleep(0.5)
print("soak: server up in %.1f s; memory %d MiB" % (time.time() - t0, mem()), flush=True)

counts = collections.Counter()
problems = []
lock = threading.Lock()

def note(kind, msg=None):
    with lock:
        counts[kind] += 1
        if msg and len(problems) < 20:
            problems.append(msg)

def one(i, rnd):
    max_tokens = rnd.randint(32, 128)
    body = {"input": {"prompt": "soak %d " % i + "the quick brown fox " * rnd.randint(1, 20),
                      "max_tokens": max_tokens, "ignore_eos": True}}
    cancel = rnd.random() < 0.2
    try:
        if cancel:
            p = call("POST", MODEL, body)                  # async: 201 at once
            time.sleep(rnd.choice([0, 0.005, 0.02, 0.05, 0.1, 0.2]))  # queued .. decoding
            p = call("POST", "/v1/predictions/%s/cancel" % p["id"], {})
        else:
            p = call("POST", MODEL, body, {"Prefer": "wait=60"})
        deadline = time.time() + 300
        while p.get("status") not in TERMINAL:
            if time.time() > deadline:
                return note("stuck", "prediction %s stuck in %s" % (p.get("id"), p.get("status")))
            time.sleep(0.2)
            p = call("GET", "/v1/predictions/%s" % p["id"])
        st = p["status"]
        if st == "succeeded":
            n = (p.get("metrics") or {}).get("output_token_count")
            if n is not None and n != max_tokens:
                return note("wrong_length", "prediction %s: %s tokens, asked %d with ignore_eos" % (p["id"], n, max_tokens))
        elif st == "canceled" and not cancel:
            return note("unexpected_cancel", "prediction %s canceled" % p["id"])
        elif st in ("failed", "aborted"):
            return note(st, "prediction %s %s: %s" % (p["id"], st, p.get("error")))
        note(st)
    except urllib.error.HTTPError as e:
        note("http_error", "HTTP %s: %s" % (e.code, e.read()[:300]))
    except Exception as e:
        note("error", repr(e))

def run(n, seed):
    q = queue.Queue()
    for i in range(n):
        q.put(i)
    def worker(k):
        rnd = random.Random(seed * 1000 + k)
        while True:
            try:
                i = q.get_nowait()
            except queue.Empty:
                return
            one(i, rnd)
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(CONC)]
    for t in ts:
        t.start()
    return ts

# warm-up: the same workload, so every allocation size the engine uses has been seen
for t in run(WARM, 0):
    t.join()
time.sleep(3)
warm = mem()
print("soak: warm-up %d predictions %s; memory after warm-up %d MiB" % (WARM, dict(counts), warm), flush=True)
counts.clear()

samples = []
stop = threading.Event()
def sampler():
    while not stop.wait(2.0):
        samples.append(mem())
threading.Thread(target=sampler, daemon=True).start()
t1 = time.time()
ts = run(N, 1)
last = time.time()
while any(t.is_alive() for t in ts):
    time.sleep(1)
    if time.time() - last > 30:
        last = time.time()
        print("soak: %.0f s, %s, memory %s MiB" % (time.time() - t1, dict(counts), samples[-1] if samples else "?"), flush=True)
stop.set()
dt = time.time() - t1
time.sleep(5)
after = mem()
print("soak: %d predictions in %.0f s: %s" % (N, dt, dict(counts)))
print("soak: memory MiB: after warm-up %d, during min %d max %d, after %d (%+d, %+.1f%%)" % (
    warm, min(samples or [0]), max(samples or [0]), after, after - warm, 100.0 * (after - warm) / warm))
for p in problems:
    print("soak problem:", p)
bad = sum(counts[k] for k in ("stuck", "wrong_length", "unexpected_cancel", "failed", "aborted", "http_error", "error"))
ok = True
if after > warm * 1.05:
    print("soak: FAILED: device memory grew more than 5%% (%d -> %d MiB)" % (warm, after)); ok = False
if bad:
    print("soak: FAILED: %d predictions went wrong" % bad); ok = False
if counts["canceled"] == 0:
    print("soak: FAILED: no prediction was canceled mid-flight"); ok = False
sys.exit(0 if ok else 1)
PY
  local rc=$?
  kill "$srv" 2>/dev/null; wait "$srv" 2>/dev/null
  echo "-- server log (last 30 lines)"; tail -n 30 "$data/server.log"
  [ -n "${OUT:-}" ] && cp "$data/server.log" "$OUT/soak-server.log"
  return $rc
}
if [[ " $STEPS " == *" soak "* ]]; then
  echo "soak sizes: SOAK_N=${SOAK_N:-600} SOAK_CONCURRENCY=${SOAK_CONCURRENCY:-64} SOAK_WARMUP=${SOAK_WARMUP:-100} SOAK_KV=${SOAK_KV:-1GiB}"
  run "soak" "${GPU_T_SOAK:-120}" bash -c "$(declare -f soak); BIN='$BIN' DEVICE='$DEVICE' OUT='${OUT:-}' soak"
fi

echo
if [ $status -eq 0 ]; then echo "gpu-tests: all passed"; else echo "gpu-tests: FAILED: ${failed[*]}"; fi
exit $status
