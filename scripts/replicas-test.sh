#!/usr/bin/env bash
# Replicas behind a real load balancer, all on loopback: a PostgreSQL from Debian's
# packages (initdb in a temp dir, a free port, run as the unprivileged `postgres` user),
# N `hearth serve` replicas sharing it (--store postgres://...), and HAProxy round-robin
# in front, checking each replica's /health. Through the balancer:
#   1. the official Replicate and OpenAI clients' suites (scripts/client-tests.sh with
#      HEARTH_BASE_URL);
#   2. throughput: the same batch of short predictions through the balancer and straight
#      to one replica, alternated;
#   3. kill -9 of one replica under load: every prediction created is found and ends
#      (none lost, none stuck), and each one's `completed` webhook arrives exactly once.
# Ends with "replicas: N passed, M failed".
#
# Usage: scripts/replicas-test.sh [--replicas N] [--load N] [--no-clients]
# Env: HEARTH_BIN (default target/debug/hearth, built if missing), CLIENT_VENV,
#      KEEP_REPLICA_DATA=1 keeps the temp dir (logs, haproxy.cfg), LOAD_ARGS: more
#      arguments for scripts/replicas_load.py (e.g. "--long-tokens 6000").
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/ports.sh

replicas=3 load=60 clients=1
while [ $# -gt 0 ]; do
  case "$1" in
    --replicas) replicas=$2; shift 2 ;;
    --load) load=$2; shift 2 ;;
    --no-clients) clients=0; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$replicas" -ge 2 ] || { echo "--replicas: at least 2 (one is killed)" >&2; exit 2; }

bin=${HEARTH_BIN:-target/debug/hearth}
if [ ! -x "$bin" ]; then
  [ -z "${HEARTH_BIN:-}" ] || { echo "HEARTH_BIN=$bin is not an executable" >&2; exit 1; }
  cargo build --bin hearth
fi

# PostgreSQL and HAProxy from Debian's packages.
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$pgbin" ] || ! command -v haproxy >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql haproxy >/dev/null
    pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  else
    echo "PostgreSQL and HAProxy are needed: apt-get install -y postgresql haproxy" >&2
    exit 1
  fi
fi

venv=${CLIENT_VENV:-.venv-clients}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c 'import httpx' 2>/dev/null \
  || "$venv/bin/python" -m pip install -q --disable-pip-version-check -r tests/clients/python/requirements.txt
py="$venv/bin/python"

work=$(mktemp -d "${TMPDIR:-/tmp}/hearth-replicas.XXXXXX")
chmod 755 "$work"
pids=() haproxy_pid= pg_started=0
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  for p in "${pids[@]}" $haproxy_pid; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}" $haproxy_pid; do wait "$p" 2>/dev/null || true; done
  [ $pg_started = 1 ] && as_pg "$pgbin/pg_ctl" -D "$work/pg/data" -m immediate stop >/dev/null 2>&1 || true
  if [ "${KEEP_REPLICA_DATA:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "== PostgreSQL ($pgbin)"
mkdir -p "$work/pg"
[ "$(id -u)" = 0 ] && chown postgres "$work/pg"
as_pg "$pgbin/initdb" -D "$work/pg/data" -A trust -U postgres -E UTF8 --no-sync >"$work/pg/initdb.log"
# pg_ctl -w waits for this server's own "ready" (its postmaster.pid), never another's.
start_pg() {
  local log="$work/pg/server-$1.log"
  if as_pg "$pgbin/pg_ctl" -D "$work/pg/data" -l "$log" -w -t 60 \
    -o "-p $1 -k $work/pg -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null; then
    return 0
  fi
  port_taken "$log" && return 98
  cat "$log"
  return 1
}
on_free_port start_pg
pgport=$FREE_PORT
pg_started=1
as_pg "$pgbin/createdb" -h 127.0.0.1 -p "$pgport" -U postgres hearth
store="postgres://postgres@127.0.0.1:$pgport/hearth"

token=replicas-$RANDOM$RANDOM
echo "== $replicas replicas"
ports=()
for i in $(seq "$replicas"); do
  HEARTH_LOG=${HEARTH_LOG:-warn} "$bin" serve --port 0 --data-dir "$work/r$i" \
    --store "$store" --api-token "$token" --webhook-allow-private --replica-lease 5 \
    --kv-cache-memory 64MiB >"$work/r$i.out" 2>"$work/r$i.err" &
  pids+=($!)
done
# Each binds a port of its own and says which.
for i in $(seq "$replicas"); do
  ports+=("$(hearth_port "$work/r$i.err" "${pids[$((i - 1))]}")")
done
# Up when /health answers 200: the models serve (the server listens before they load,
# answering 503 meanwhile).
for i in $(seq "$replicas"); do
  port=${ports[$((i - 1))]}
  up=0
  for _ in $(seq 300); do
    curl -sf -m 2 "http://127.0.0.1:$port/health" >/dev/null 2>&1 && { up=1; break; }
    kill -0 "${pids[$((i - 1))]}" 2>/dev/null || { echo "replica $i died:"; cat "$work/r$i.err"; exit 1; }
    sleep 0.2
  done
  [ $up = 1 ] || { echo "replica $i did not serve within 60 s:"; cat "$work/r$i.err"; exit 1; }
done

echo "== HAProxy, round-robin"
# Up when a request through it reaches a replica (its checks found them up).
start_lb() {
  {
    cat <<EOF
global
  maxconn 4096
defaults
  mode http
  timeout connect 2s
  timeout client 120s
  timeout server 120s
  timeout tunnel 120s
  retries 0
frontend hearth
  bind 127.0.0.1:$1
  default_backend replicas
backend replicas
  balance roundrobin
  option httpchk GET /health
  default-server inter 1s fall 2 rise 2
EOF
    for i in $(seq "$replicas"); do echo "  server r$i 127.0.0.1:${ports[$((i - 1))]} check"; done
  } >"$work/haproxy.cfg"
  haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy-$1.log" 2>&1 &
  haproxy_pid=$!
  local started=$SECONDS
  until curl -sf -m 2 "http://127.0.0.1:$1/health" >/dev/null 2>&1; do
    if ! kill -0 "$haproxy_pid" 2>/dev/null; then
      wait "$haproxy_pid" 2>/dev/null || true
      haproxy_pid=
      port_taken "$work/haproxy-$1.log" && return 98
      cat "$work/haproxy-$1.log"
      return 1
    fi
    if [ $((SECONDS - started)) -ge 60 ]; then
      echo "HAProxy did not reach a replica within 60 s:"
      cat "$work/haproxy-$1.log"
      return 1
    fi
    sleep 0.1
  done
}
on_free_port start_lb
lbport=$FREE_PORT
lb="http://127.0.0.1:$lbport"

status=0 passed=0 failed=0
if [ "$clients" = 1 ]; then
  echo "== official clients through the balancer"
  if HEARTH_BASE_URL=$lb HEARTH_TOKEN=$token bash scripts/client-tests.sh 2>&1 | tee "$work/clients.log"; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1)) status=1
  fi
fi

echo "== throughput and kill -9 under load"
direct="http://127.0.0.1:${ports[0]}"
victim=$((replicas - 1))
if "$py" scripts/replicas_load.py --balancer "$lb" --direct "$direct" --token "$token" \
  --load "$load" --replicas "$replicas" --kill-pid "${pids[$victim]}" \
  --victim "http://127.0.0.1:${ports[$victim]}" ${LOAD_ARGS:-} 2>&1 | tee "$work/load.log"; then
  passed=$((passed + 1))
else
  failed=$((failed + 1)) status=1
fi
if [ $status -ne 0 ]; then
  for i in $(seq "$replicas"); do echo "--- replica $i stderr (last 30 lines)"; tail -30 "$work/r$i.err"; done
fi
echo "replicas: $passed passed, $failed failed"
exit $status
