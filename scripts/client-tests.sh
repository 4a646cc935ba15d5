#!/usr/bin/env bash
# The official Replicate clients (Python replicate==1.0.7, JS replicate@1.4.0) against a
# live `hearth serve` on the demo model, each with one setting changed: the base URL.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${HEARTH_BIN:-target/debug/hearth}
[ -x "$bin" ] || cargo build
venv=${CLIENT_VENV:-.venv-clients}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q -r tests/clients/python/requirements.txt
if [ ! -d tests/clients/js/node_modules/replicate ]; then
  (cd tests/clients/js && npm ci --no-audit --no-fund)
fi

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
data=$(mktemp -d)
token=client-test-token
HEARTH_LOG=warn "$bin" serve --port "$port" --data-dir "$data" --api-token "$token" >"$data/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$data"' EXIT
for i in $(seq 600); do
  if python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" "http://127.0.0.1:$port/health-check" 2>/dev/null; then break; fi
  if ! kill -0 $server 2>/dev/null || [ "$i" = 600 ]; then
    echo "the server did not start:"; cat "$data/server.log"; exit 1
  fi
  sleep 0.1
done
export REPLICATE_BASE_URL="http://127.0.0.1:$port" REPLICATE_API_TOKEN="$token"
status=0
echo "== Python replicate client"
timeout 300 "$venv/bin/python" tests/clients/python/test_client.py || status=1
echo "== JS replicate client"
timeout 300 node tests/clients/js/test.mjs || status=1
if [ $status -ne 0 ]; then
  echo "--- server log"; tail -50 "$data/server.log"
fi
exit $status
