#!/usr/bin/env bash
# Regenerate the tiny random-weight model fixtures in models/fixtures/.
# Creates (if missing) a Python venv at ${FIXTURE_VENV:-.venv-fixtures} (relative to the repo
# root unless absolute) with pinned packages, then runs scripts/make_fixtures.py, then
# scripts/make-gguf-fixtures.sh (their GGUF versions and GGUF tokenizer goldens).
# `--gguf-only` runs only the GGUF step (it needs no torch).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ "${1:-}" == "--gguf-only" ]]; then
  exec bash scripts/make-gguf-fixtures.sh
fi

VENV="${FIXTURE_VENV:-.venv-fixtures}"
PYTHON="${PYTHON:-python3}"

PINS=(
  "torch==2.15.0"
  "transformers==5.24.0"
  "safetensors==0.8.0"
  "tokenizers==0.23.3"
  "numpy==2.4.6"
)

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "creating venv at $VENV" >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install "${PINS[@]}"
fi

# Check the venv has the pinned versions (warn only: an existing venv may be reused).
"$VENV/bin/python" - "${PINS[@]}" <<'PY' || true
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    have = version(name)
    if have.split("+")[0] != want:
        print(f"warning: {name} {have} installed, fixtures were pinned to {want}", file=sys.stderr)
PY

export PYTHONHASHSEED=0
export CUBLAS_WORKSPACE_CONFIG=:4096:8
"$VENV/bin/python" scripts/make_fixtures.py "$@"
bash scripts/make-gguf-fixtures.sh
