#!/usr/bin/env bash
# Records llama.cpp's greedy continuations of 5 prompts, 32 tokens each, on a GGUF file
# (default: SmolLM2's Q4_K_M from scripts/make-smollm2-q4km.sh) into a JSON golden the
# real-model tests read (crates/hearth-runtime/tests/goldens/). Prompts go in as token
# ids (llama-server's /tokenize, no BOS added), so both engines see the same ids; the
# file's sha256 is recorded so the test knows it runs on the same bytes. A sixth case,
# `chat`, is one user message through the file's own chat template (llama-server
# --jinja, default system message included), tokenized with its special tokens.
#
#   bash scripts/llama-cpp-goldens.sh [GGUF] [OUT.json]
set -euo pipefail
cd "$(dirname "$0")/.."
gguf=${1:-$(bash scripts/make-smollm2-q4km.sh)}
out=${2:-crates/hearth-runtime/tests/goldens/llama_cpp_smollm2_q4_k_m.json}
llama=$(bash benches/build-llama-cpp.sh)
port=${LLAMA_GOLDEN_PORT:-18399}
log=$(mktemp)
"$llama/bin/llama-server" -m "$gguf" --host 127.0.0.1 --port "$port" -t 2 -np 1 -c 512 --jinja >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
curl -sf "http://127.0.0.1:$port/health" >/dev/null || { tail "$log" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
python3 - "$port" "$gguf" "$out" <<'PY'
import hashlib, json, os, sys, urllib.request
port, gguf, out = sys.argv[1:4]
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
cases = []
for p in prompts:
    ids = post("/tokenize", {"content": p, "add_special": False})["tokens"]
    r = post("/completion", {"prompt": ids, "n_predict": 32, "temperature": 0, "top_k": 1,
                              "cache_prompt": False, "return_tokens": True})
    toks = r["tokens"]
    # A greedy EOS ends the continuation on both engines: record the tokens before it.
    eos = r.get("stop_type") == "eos"
    if eos:
        toks = toks[:-1]
    cases.append({"prompt": p, "prompt_tokens": ids, "tokens": toks, "ends_with_eos": eos,
                  "text": r["content"]})
chat = "What is the capital of France?"
text = post("/apply-template", {"messages": [{"role": "user", "content": chat}]})["prompt"]
ids = post("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]
r = post("/completion", {"prompt": ids, "n_predict": 32, "temperature": 0, "top_k": 1,
                          "cache_prompt": False, "return_tokens": True})
toks = r["tokens"]
eos = r.get("stop_type") == "eos"
if eos:
    toks = toks[:-1]
chat_case = {"prompt": chat, "templated": text, "prompt_tokens": ids, "tokens": toks,
             "ends_with_eos": eos, "text": r["content"]}
json.dump({
    "made_by": "scripts/llama-cpp-goldens.sh (llama-server from llama-cpp-python 0.3.36, greedy, 32 tokens)",
    "file": os.path.basename(gguf),
    "file_sha256": h.hexdigest(),
    "cases": cases,
    "chat": chat_case,
}, open(out, "w"), indent=1)
print(out)
PY
