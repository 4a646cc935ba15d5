#!/usr/bin/env bash
# Records llama.cpp's greedy continuations of 5 prompts, 32 tokens each, on a GGUF file
# (default: SmolLM2's Q4_K_M from scripts/make-smollm2-q4km.sh) into a JSON golden the
# real-model tests read (crates/hearth-runtime/tests/goldens/). Prompts go in as token
# ids (llama-server's /tokenize, no BOS added), so both engines see the same ids; the
# file's sha256 is recorded so the test knows it runs on the same bytes. A sixth case,
# `chat`, is one user message through the file's own chat template (llama-server
# --jinja, default system message included), tokenized with its special tokens.
# Each generated token also gets llama.cpp's margin, its top-1 minus top-2 log-prob
# (`n_probs: 2`), so a test can tell a near-tie from a real disagreement.
#
# ATTENTION picks llama-server's attention arithmetic:
#   f32 (default)  `-fa off -ctk f32 -ctv f32`: an f32 KV cache, and attention as f32
#                  mul_mats and an f32 softmax. This is the arithmetic hearth does with
#                  `--kv-cache-dtype f32`, so both engines compute the same function and
#                  the goldens the tests check are recorded this way.
#   default        llama-server's defaults: `-fa auto` is flash attention on a CPU build,
#                  which rounds Q to f16, keeps K/V in f16 (`-ctk/-ctv f16`) and sums P·V
#                  in f16, rounded after every key. `-fa on` with an f32 cache is no
#                  different: llama.cpp casts K/V to f16 for flash attention.
#
#   [ATTENTION=f32|default] bash scripts/llama-cpp-goldens.sh [GGUF] [OUT.json]
set -euo pipefail
cd "$(dirname "$0")/.."
gguf=${1:-$(bash scripts/make-smollm2-q4km.sh)}
out=${2:-crates/hearth-runtime/tests/goldens/llama_cpp_smollm2_q4_k_m.json}
attention=${ATTENTION:-f32}
case "$attention" in
  f32) attn_args=(-fa off -ctk f32 -ctv f32) ;;
  default) attn_args=() ;;
  *) echo "llama-cpp-goldens: ATTENTION must be f32 or default, not $attention" >&2; exit 1 ;;
esac
llama=$(bash benches/build-llama-cpp.sh)
port=${LLAMA_GOLDEN_PORT:-18399}
log=$(mktemp)
args=(-t 2 -np 1 -c 512 --jinja "${attn_args[@]}")
"$llama/bin/llama-server" -m "$gguf" --host 127.0.0.1 --port "$port" "${args[@]}" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
curl -sf "http://127.0.0.1:$port/health" >/dev/null || { tail "$log" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
python3 - "$port" "$gguf" "$out" "$attention" "${args[*]}" <<'PY'
import hashlib, json, os, sys, urllib.request
port, gguf, out, attention, args = sys.argv[1:6]
def post(path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)
prompts = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
]
h = hashlib.sha256()
with open(gguf, "rb") as f:
    while chunk := f.read(1 << 20):
        h.update(chunk)
def complete(ids):
    r = post("/completion", {"prompt": ids, "n_predict": 32, "temperature": 0, "top_k": 1,
                              "cache_prompt": False, "return_tokens": True, "n_probs": 2})
    toks = r["tokens"]
    margins = []
    for p in r["completion_probabilities"]:
        top = p["top_logprobs"]
        margins.append(round(top[0]["logprob"] - top[1]["logprob"], 6) if len(top) > 1 else None)
    # A greedy EOS ends the continuation on both engines: record the tokens before it.
    eos = r.get("stop_type") == "eos"
    if eos:
        toks, margins = toks[:-1], margins[:-1]
    return {"tokens": toks, "margins": margins, "ends_with_eos": eos, "text": r["content"]}
cases = []
for p in prompts:
    ids = post("/tokenize", {"content": p, "add_special": False})["tokens"]
    cases.append({"prompt": p, "prompt_tokens": ids, **complete(ids)})
chat = "What is the capital of France?"
text = post("/apply-template", {"messages": [{"role": "user", "content": chat}]})["prompt"]
ids = post("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]
chat_case = {"prompt": chat, "templated": text, "prompt_tokens": ids, **complete(ids)}
json.dump({
    "made_by": "scripts/llama-cpp-goldens.sh (llama-server from llama-cpp-python 0.3.36, greedy, 32 tokens)",
    "attention": attention,
    "llama_server_args": args,
    "file": os.path.basename(gguf),
    "file_sha256": h.hexdigest(),
    "cases": cases,
    "chat": chat_case,
}, open(out, "w"), indent=1)
print(out)
PY
