#!/usr/bin/env bash
# The official Replicate clients (Python replicate==1.0.7, JS replicate@1.4.0) and
# OpenAI's Python client (pinned in tests/clients/openai) against a live `hearth serve`
# on the built-in demo model, each with one setting changed: the base URL. Fails if any
# suite fails.
#
# Env: HEARTH_BIN (default target/debug/hearth, built with cargo if missing),
#      CLIENT_VENV (default .venv-clients), CLIENT_SUITE_TIMEOUT (s, default 900 each),
#      KEEP_CLIENT_DATA=1 keeps the server's data dir and logs,
#      HEARTH_BASE_URL + HEARTH_TOKEN: run the suites against that server (e.g. replicas
#      behind a load balancer, scripts/replicas-test.sh) instead of starting one,
#      CLIENT_ROUTE=upstream|fallback: a second `hearth serve` is the upstream and the
#      demo model's route is upstream:up (every prediction runs there), or fallback:up
#      with local creates refused (--max-waiting 0: the local queue is always full, so
#      every prediction falls back). The Replicate suites only: OpenAI's routes serve
#      local models. Fails unless the upstream ran predictions.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/ports.sh

bin=${HEARTH_BIN:-target/debug/hearth}
if [ ! -x "$bin" ]; then
  if [ -n "${HEARTH_BIN:-}" ]; then
    echo "HEARTH_BIN=$bin is not an executable" >&2
    exit 1
  fi
  cargo build --bin hearth
fi

# Python: a venv with the pinned client, reinstalled only when requirements.txt changes.
venv=${CLIENT_VENV:-.venv-clients}
req=tests/clients/python/requirements.txt
oai_req=tests/clients/openai/requirements.txt
want=$(cat "$req" "$oai_req" | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ "$(cat "$venv/.hearth-requirements" 2>/dev/null || true)" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" -r "$oai_req"
  echo "$want" >"$venv/.hearth-requirements"
fi

# JS: npm ci when node_modules is missing or older than the lockfile.
js=tests/clients/js
if [ ! -f "$js/node_modules/.package-lock.json" ] || [ ! -d "$js/node_modules/replicate" ] \
  || [ "$js/package-lock.json" -nt "$js/node_modules/.package-lock.json" ]; then
  (cd "$js" && npm ci --no-audit --no-fund)
fi

data=$(mktemp -d "${TMPDIR:-/tmp}/hearth-clients.XXXXXX")
server=
upstream_pid=
cleanup() {
  if [ -n "$upstream_pid" ]; then
    kill "$upstream_pid" 2>/dev/null || true
    wait "$upstream_pid" 2>/dev/null || true
  fi
  if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then
    kill "$server" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$server" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
  if [ "${KEEP_CLIENT_DATA:-0}" = 1 ]; then echo "kept $data"; else rm -rf "$data"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -n "${HEARTH_BASE_URL:-}" ]; then
base=${HEARTH_BASE_URL%/}
token=${HEARTH_TOKEN:?HEARTH_TOKEN must be set with HEARTH_BASE_URL}
echo "" >"$data/server.err"
else
route_args=()
route=${CLIENT_ROUTE:-}
if [ -n "$route" ]; then
  case "$route" in
    upstream) route_args=(--route hearth/demo=upstream:up) ;;
    fallback) route_args=(--route hearth/demo=fallback:up --max-waiting 0) ;;
    *) echo "CLIENT_ROUTE=$route: expected upstream or fallback" >&2; exit 1 ;;
  esac
  up_token=client-upstream-$RANDOM$RANDOM
  HEARTH_LOG=${HEARTH_LOG:-warn} "$bin" serve --port 0 --data-dir "$data/upstream" \
    --api-token "$up_token" >"$data/upstream.out" 2>"$data/upstream.err" &
  upstream_pid=$!
  up_base="http://127.0.0.1:$(hearth_port "$data/upstream.err" "$upstream_pid")"
  route_args+=(--upstream "up=$up_base")
  export HEARTH_UPSTREAM_TOKEN_UP=$up_token
  echo "== route $route: hearth/demo runs on a second hearth at $up_base"
fi
token=client-test-$RANDOM$RANDOM
HEARTH_LOG=${HEARTH_LOG:-warn} "$bin" serve --port 0 --data-dir "$data/data" --api-token "$token" --webhook-allow-private \
  "${route_args[@]}" >"$data/server.out" 2>"$data/server.err" &
server=$!
unset HEARTH_UPSTREAM_TOKEN_UP
base="http://127.0.0.1:$(hearth_port "$data/server.err" "$server")"

# Ready when /health-check answers 200 with a status other than STARTING; 60 s at most.
started=$SECONDS
while :; do
  health=$(curl -s -m 2 -w ' %{http_code}' "$base/health-check" 2>/dev/null || true)
  case "$health" in
    *' 200')
      case "$health" in
        *'"STARTING"'*) ;;
        *'"SETUP_FAILED"'* | *'"DEFUNCT"'*)
          echo "the server is unhealthy: $health"; cat "$data/server.err"; exit 1 ;;
        *) break ;;
      esac ;;
  esac
  if ! kill -0 "$server" 2>/dev/null; then
    echo "the server exited before it was healthy; its stderr:"; cat "$data/server.err"; exit 1
  fi
  if [ $((SECONDS - started)) -ge 60 ]; then
    echo "the server was not healthy within 60 s; its stderr:"; cat "$data/server.err"; exit 1
  fi
  sleep 0.2
done
if [ -n "$upstream_pid" ]; then
  for _ in $(seq 300); do
    case "$(curl -s -m 2 "$up_base/health-check" 2>/dev/null || true)" in
      *'"READY"'*) break ;;
    esac
    if ! kill -0 "$upstream_pid" 2>/dev/null; then
      echo "the upstream exited; its stderr:"; cat "$data/upstream.err"; exit 1
    fi
    sleep 0.2
  done
fi
fi

export REPLICATE_BASE_URL=$base REPLICATE_API_TOKEN=$token
# Nothing of the developer's own Replicate setup may leak in.
unset REPLICATE_POLL_INTERVAL || true
limit=${CLIENT_SUITE_TIMEOUT:-900}
status=0

echo "== Python replicate client ($(grep -E '^replicate==' "$req"))"
timeout -k 10 "$limit" "$venv/bin/python" tests/clients/python/test_client.py 2>&1 | tee "$data/python.log" || status=1

echo "== JS replicate client (replicate@$(node -p 'require("./'"$js"'/node_modules/replicate/package.json").version'))"
timeout -k 10 "$limit" node "$js/test.mjs" 2>&1 | tee "$data/js.log" || status=1

suites="python js"
if [ -z "${CLIENT_ROUTE:-}" ]; then
  suites="python js openai"
  echo "== OpenAI Python client ($(grep -E '^openai==' "$oai_req"))"
  OPENAI_BASE_URL=$base/v1 OPENAI_API_KEY=$token timeout -k 10 "$limit" "$venv/bin/python" \
    tests/clients/openai/test_openai.py 2>&1 | tee "$data/openai.log" || status=1
else
  # The suites' predictions ran upstream: the upstream lists them, the front's
  # records say so.
  ran=$(curl -s -m 10 -H "Authorization: Bearer $up_token" "$up_base/v1/predictions" \
    | "$venv/bin/python" -c 'import json,sys; print(len(json.load(sys.stdin)["results"]))' || echo 0)
  sides=$(curl -s -m 10 -H "Authorization: Bearer $token" "$base/v1/predictions" \
    | "$venv/bin/python" -c 'import json,sys; r=json.load(sys.stdin)["results"]; print(sum(1 for p in r if (p.get("hearth") or {}).get("side") == "upstream"), len(r))' || echo "0 0")
  echo "route $CLIENT_ROUTE: the upstream ran $ran predictions (its newest page); the front's newest page: $sides (upstream, all)"
  if [ "$ran" -eq 0 ] || [ "${sides%% *}" -eq 0 ]; then
    echo "route $CLIENT_ROUTE: no prediction ran upstream"
    status=1
  fi
fi

# One closing line over the suites; a suite that died before its own line counts as a failure.
p=0 f=0
for suite in $suites; do
  line=$(grep -E "^$suite: [0-9]+ passed, [0-9]+ failed$" "$data/$suite.log" | tail -1 || true)
  if [ -z "$line" ]; then
    echo "the $suite suite ended without its summary line"
    f=$((f + 1)) status=1
  else
    set -- $line
    p=$((p + $2)) f=$((f + $4))
  fi
done
if [ $status -ne 0 ]; then
  echo "--- server stderr (last 80 lines)"
  tail -80 "$data/server.err"
fi
echo "clients: $p passed, $f failed"
exit $status
