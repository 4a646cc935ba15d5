#!/usr/bin/env bash
# Regenerate models/fixtures/gguf/: GGUF versions of the tiny fixtures with their goldens
# (scripts/make_gguf_fixtures.py) and the GGUF tokenizer goldens, for the fixtures and for
# the real SmolLM2-135M-Instruct Q4_1 file (scripts/gguf_tokenizer_goldens.py).
# Needs no torch: a venv at ${FIXTURE_GGUF_VENV:-.venv-gguf} with the pins below.
# When llama.cpp's llama-server is available (LLAMA_SERVER, or the cache of
# benches/build-llama-cpp.sh), every tokenizer golden is also checked against it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${FIXTURE_GGUF_VENV:-.venv-gguf}"
PINS=(
  "numpy==2.4.6"
  "gguf==0.19.0"
  "transformers==5.24.0"
  "tokenizers==0.23.3"
  "jinja2==3.1.6"
)
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "creating venv at $VENV" >&2
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"
fi

if [[ -z "${LLAMA_SERVER:-}" ]]; then
  cached="${HEARTH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hearth}/llama.cpp-0.3.36/bin/llama-server"
  [[ -x "$cached" ]] && export LLAMA_SERVER="$cached"
fi
[[ -n "${LLAMA_SERVER:-}" ]] || echo "llama-server not found: tokenizer goldens will not be cross-checked (bash benches/build-llama-cpp.sh builds it)" >&2

"$VENV/bin/python" scripts/make_gguf_fixtures.py
out=models/fixtures/gguf/tokenizer
for name in llama mistral qwen2; do
  "$VENV/bin/python" scripts/gguf_tokenizer_goldens.py "$out/$name.json" "models/fixtures/gguf/$name.gguf"
done
smollm2=$(bash scripts/fetch-smollm2.sh)
"$VENV/bin/python" scripts/gguf_tokenizer_goldens.py "$out/smollm2-135m-instruct.json" "$smollm2"
