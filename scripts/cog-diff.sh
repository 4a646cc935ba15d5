#!/usr/bin/env bash
# The differential test of Cog's container API: installs the real Cog server
# (cog==0.23.1, which pulls coglet==0.23.1) in a venv, runs it on a mirror predictor
# (scripts/cog_diff/predict.py: hearth/demo's inputs, a ConcatenateIterator[str]) with
# the .cog/openapi_schema.json that `cog build` would write, starts `hearth serve`
# beside it, sends both the same requests (sync, async, SSE, PUT attach, cancel,
# validation errors, bad ids, capacity, webhooks, startup and setup failure, the
# OpenAPI document, shutdown) and compares status codes, body shapes, SSE event
# sequences and webhook sequences. Prints a table; fails on any difference that
# scripts/cog_diff/diff.py's ALLOWED list (documented in crates/hearth-server/README.md)
# does not explain.
#
# Env: HEARTH_BIN (default target/debug/hearth, built if missing), COG_DIFF_VENV
#      (default .venv-cog-diff), KEEP_COG_DIFF=1 keeps the servers' logs.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${HEARTH_BIN:-target/debug/hearth}
if [ ! -x "$bin" ]; then
  if [ -n "${HEARTH_BIN:-}" ]; then
    echo "HEARTH_BIN=$bin is not an executable" >&2
    exit 1
  fi
  cargo build --bin hearth
fi

venv=${COG_DIFF_VENV:-.venv-cog-diff}
req=scripts/cog_diff/requirements.txt
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ "$(cat "$venv/.hearth-requirements" 2>/dev/null || true)" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
  echo "$want" >"$venv/.hearth-requirements"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/hearth-cog-diff.XXXXXX")
cleanup() {
  if [ "${KEEP_COG_DIFF:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The mirror model, and the schema `cog build` writes beside it.
mkdir -p "$work/model/.cog"
cp scripts/cog_diff/predict.py "$work/model/"
(cd "$work/model" && "$OLDPWD/$venv/bin/python" "$OLDPWD/scripts/cog_diff/cog_build_schema.py" .cog/openapi_schema.json)

"$venv/bin/python" scripts/cog_diff/diff.py "$(realpath "$bin")" "$work/model" "$work"
