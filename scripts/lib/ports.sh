# Ports for the scripts' servers (sourced by scripts/*.sh; the Rust tests have theirs
# in crates/hearth-server/tests/support/ports.rs, cog_diff/diff.py its own).
#
# `hearth serve --port 0` binds a free port itself and says which on stderr
# ("hearth listening on http://ADDR"): hearth_port reads it back. A port picked here and
# bound by the server later can be taken meanwhile (another server binding port 0 may
# be handed the same one), so a server that must be told its port (PostgreSQL,
# HAProxy) is started by on_free_port, again on another port while it fails because
# its port was in use.

# A port nothing listens on now (none is held: the server binds it later).
pick_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# port_taken FILE: whether a server's output in FILE says its port was in use.
port_taken() {
  grep -qiE 'address already in use|os error 98|EADDRINUSE|cannot bind socket' "$1" 2>/dev/null
}

# hearth_port LOG PID [SECONDS]: the port `hearth serve --port 0` (process PID, its
# stderr in LOG) announced; fails, printing LOG, if it exits first or takes longer
# than SECONDS (default 120).
hearth_port() {
  local log=$1 pid=$2 limit=${3:-120} start=$SECONDS line
  while :; do
    line=$(grep -m1 -o 'hearth listening on http://[^ ]*' "$log" 2>/dev/null || true)
    if [ -n "$line" ]; then
      echo "${line##*:}"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "hearth serve ($pid) exited before it listened:" >&2
      cat "$log" >&2
      return 1
    fi
    if [ $((SECONDS - start)) -ge "$limit" ]; then
      echo "hearth serve ($pid) did not listen within ${limit}s:" >&2
      cat "$log" >&2
      return 1
    fi
    sleep 0.05
  done
}

# on_free_port FN: runs `FN PORT` on a picked port; again on another while FN returns
# 98 (the port was taken: FN checks with port_taken), up to 8 ports. FN's status
# otherwise. The port FN last ran on is in FREE_PORT.
on_free_port() {
  local fn=$1 i rc
  for i in 1 2 3 4 5 6 7 8; do
    FREE_PORT=$(pick_port)
    rc=0
    "$fn" "$FREE_PORT" || rc=$?
    [ "$rc" = 98 ] || return "$rc"
    echo "port $FREE_PORT was taken before the server bound it: another (try $i)" >&2
  done
  return 1
}
