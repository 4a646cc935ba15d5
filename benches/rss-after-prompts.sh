#!/bin/bash
# Resident memory of `hearth serve` per GGUF format: after load, after a 32-token greedy
# prediction, and after one ~2,000-token prompt, each minus hearth serving the built-in demo
# model after the same steps (the KV cache is resident in both), over the file's size.
# Prints one markdown row per format.
#   BIN=target/release/hearth FMTS="q4_k_m q8_0 q4_1 f32" bash benches/rss-after-prompts.sh
set -u
cd "$(dirname "$0")/.."
bin=${BIN:-target/release/hearth}; port=${PORT:-18650}
rss() { awk '/^VmRSS/ {print $2}' /proc/$1/status; }
long=$(python3 -c "print(' '.join(['The quick brown fox jumps over the lazy dog.']*200))")
run() { # model, port -> prints "load short long" RSS KiB
  d=$(mktemp -d)
  RAYON_NUM_THREADS=2 CANDLE_NUM_THREADS=2 $bin serve --model "$1" --port $2 --data-dir $d --no-prefix-caching --max-num-seqs 16 --kv-cache-memory 1GiB >$d/log 2>&1 & p=$!
  for _ in $(seq 600); do curl -sf http://127.0.0.1:$2/health-check | grep -q READY && break; sleep 0.2; done
  name=$(curl -sf http://127.0.0.1:$2/v1/models | python3 -c "import json,sys; m=json.load(sys.stdin)['results'][0]; print(m['owner']+'/'+m['name'])")
  a=$(rss $p)
  curl -sf -H 'Content-Type: application/json' -H 'Prefer: wait=60' -d '{"input":{"prompt":"The capital of France is","max_tokens":32,"temperature":0}}' http://127.0.0.1:$2/v1/models/$name/predictions >/dev/null
  b=$(rss $p)
  python3 -c "import json,sys; print(json.dumps({'input':{'prompt':sys.argv[1],'prompt_template':'{prompt}','max_tokens':32,'temperature':0}}))" "$long" > $d/body
  curl -sf -H 'Content-Type: application/json' -H 'Prefer: wait=120' -d @$d/body http://127.0.0.1:$2/v1/models/$name/predictions | python3 -c "import json,sys; d=json.load(sys.stdin); print('long prompt status', d['status'], d.get('metrics',{}).get('input_token_count'), file=sys.stderr)"
  c=$(rss $p)
  kill $p; wait $p 2>/dev/null; rm -rf $d
  echo "$a $b $c"
}
read da db dc < <(run demo $port)
echo "demo RSS KiB: load $da short $db long $dc"
for f in ${FMTS:-q4_k_m q8_0 q4_1 f32}; do
  g=$(bash scripts/bench-gguf.sh $f); size=$(stat -c %s $g)
  read a b c < <(run $g $port)
  python3 - "$f" $size $a $b $c $da $db $dc <<'PY'
import sys
f=sys.argv[1]; size=int(sys.argv[2]); a,b,c,da,db,dc=map(int,sys.argv[3:])
mib=lambda k: k/1024
print(f"| {f} | {size/2**20:.1f} | {mib(a-da):.1f} ({(a-da)*1024/size:.2f}×) | {mib(b-db):.1f} ({(b-db)*1024/size:.2f}×) | {mib(c-dc):.1f} ({(c-dc)*1024/size:.2f}×) | {mib(a):.0f} / {mib(b):.0f} / {mib(c):.0f} |")
PY
done
