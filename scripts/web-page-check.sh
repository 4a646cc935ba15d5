#!/usr/bin/env bash
# The prediction page at `urls.web`, in a real browser: headless Chromium (Debian's
# package, installed if missing), driven by playwright-core (tests/web), loads it
# without any API token, runs its script and renders a finished prediction (status,
# output, metrics) and a running one (output arriving over the stream URL). Then the
# console at /ui (tests/web/check-console.mjs): token, form, streaming run, cancel,
# chat (on the demo, a chat model; absent for hearth/base, `dummy:demo` with no chat
# template), the predictions list filtered and searched on the server, the operations
# charts under load; and on a second hearth (the front) that routes `hearth/demo` to
# the first one only (`upstream:up`), the chat view of that upstream-only chat model.
# Then tests/web/check-console-live.mjs: a running row of the predictions list turning
# succeeded without a reload, the list filtered by model, and on the front (which
# also serves hearth/base itself as a 50% canary to the first) the operations view's
# local-vs-upstream and upstream panels, with no upstream URL or token in the page.
# Screenshots land in $OUT_DIR (default: target/web-check, kept; the path is printed).
#
# Env: HEARTH_BIN (default target/debug/hearth, built if missing), OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/ports.sh

if ! command -v chromium >/dev/null; then
  echo "== installing Debian's chromium"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
fi
web=tests/web
if [ ! -d "$web/node_modules/playwright-core" ] || [ "$web/package-lock.json" -nt "$web/node_modules/.package-lock.json" ]; then
  (cd "$web" && npm ci --no-audit --no-fund >/dev/null)
fi
bin=${HEARTH_BIN:-target/debug/hearth}
[ -x "$bin" ] || cargo build --bin hearth

work=$(mktemp -d "${TMPDIR:-/tmp}/hearth-web.XXXXXX")
out=${OUT_DIR:-target/web-check}
mkdir -p "$out"
server=
front=
cleanup() {
  [ -n "$front" ] && kill "$front" 2>/dev/null && wait "$front" 2>/dev/null || true
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

token=web-check-$RANDOM$RANDOM
# Two model cards: the demo (it has a chat template) and a base model without one.
mkdir -p "$work/models"
printf 'name = "hearth/demo"\nmodel = "demo"\ndescription = "The built-in demo (a chat model)."\n' >"$work/models/demo.toml"
printf 'name = "hearth/base"\nmodel = "dummy:demo"\ndescription = "The demo shape, no chat template."\n' >"$work/models/base.toml"
HEARTH_LOG=warn "$bin" serve --port 0 --data-dir "$work/data" --api-token "$token" \
  --models "$work/models" --max-num-seqs 4 >"$work/server.log" 2>&1 &
server=$!
base="http://127.0.0.1:$(hearth_port "$work/server.log" "$server")"
for _ in $(seq 300); do
  curl -sf "$base/health-check" | grep -q '"READY"' && break
  kill -0 "$server" 2>/dev/null || { cat "$work/server.log"; exit 1; }
  sleep 0.2
done

# The front: hearth/base served here and as a canary on the first server (half its
# predictions run there), and hearth/demo on the first server only.
mkdir -p "$work/front-models"
printf 'name = "hearth/base"\nmodel = "dummy:demo"\n' >"$work/front-models/base.toml"
HEARTH_LOG=warn HEARTH_UPSTREAM_TOKEN_UP="$token" "$bin" serve --port 0 --data-dir "$work/front" \
  --api-token "$token" --models "$work/front-models" --upstream "up=$base" --route "hearth/demo=upstream:up" \
  --route "hearth/base=canary:up:50" \
  >"$work/front.log" 2>&1 &
front=$!
fbase="http://127.0.0.1:$(hearth_port "$work/front.log" "$front")"
for _ in $(seq 300); do
  curl -sf "$fbase/health-check" | grep -q '"READY"' && break
  kill -0 "$front" 2>/dev/null || { cat "$work/front.log"; exit 1; }
  sleep 0.2
done

node "$web/check-page.mjs" "$base" "$token" "$out" || { echo "--- server log"; tail -30 "$work/server.log"; exit 1; }
node "$web/check-console.mjs" "$base" "$token" "$out" "$fbase" || { echo "--- server log"; tail -30 "$work/server.log"; echo "--- front log"; tail -30 "$work/front.log"; exit 1; }
node "$web/check-console-live.mjs" "$base" "$token" "$out" "$fbase" || { echo "--- server log"; tail -30 "$work/server.log"; echo "--- front log"; tail -30 "$work/front.log"; exit 1; }
echo "screenshots: $(cd "$out" && pwd)"
