#!/bin/bash
# A/B of two hearth binaries (OLD, NEW: e.g. main's and a branch's release builds) and
# llama-server, all three serving the same GGUF at once with THREADS threads each, the
# loads (concurrency 1 and 16, 20 tokens in / 128 out over HTTP with `hearth bench --url`;
# a load written C/IN/OUT sets the prompt and output lengths, e.g. 16/2000/64 as
# vs-llama-cpp.sh's c16-long) run against each in turn, the order rotated every round; then the greedy check (5
# prompts × 32 tokens, free-running) of both hearths against llama-server and a table of
# medians and ratios. Rows with failed requests are dropped (and said).
#   OLD=/work/bin/hearth-a87e1d4 NEW=target/release/hearth FMTS="small-q4_k_m small-q6_k" \
#     LOADS="1 16" ROUNDS=2 THREADS=1 bash benches/ab-vs-llama-cpp.sh
set -u
cd "$(dirname "$0")/.."
old=${OLD:?OLD=path of the baseline hearth}; new=${NEW:-target/release/hearth}
threads=${THREADS:-1}; rounds=${ROUNDS:-2}
# Ports PORT, PORT+1, PORT+2 (old, new, llama-server): another session may run this too.
p1=${PORT:-18401}; p2=$((p1 + 1)); p3=$((p1 + 2))
llama=$(bash benches/build-llama-cpp.sh)
out=${OUTF:-$(mktemp)}; : > $out
for fmt in ${FMTS:-small-q4_k_m small-q6_k}; do
  gguf=$(bash scripts/bench-gguf.sh "$fmt")
  tmp=$(mktemp -d)
  RAYON_NUM_THREADS=$threads CANDLE_NUM_THREADS=$threads $old serve --model $gguf --port $p1 --data-dir $tmp/o --no-prefix-caching --max-num-seqs 16 --kv-cache-memory 1GiB >$tmp/o.log 2>&1 & op=$!
  RAYON_NUM_THREADS=$threads CANDLE_NUM_THREADS=$threads $new serve --model $gguf --port $p2 --data-dir $tmp/n --no-prefix-caching --max-num-seqs 16 --kv-cache-memory 1GiB >$tmp/n.log 2>&1 & np_=$!
  $llama/bin/llama-server -m $gguf --host 127.0.0.1 --port $p3 -t $threads -np 16 -c 36864 >$tmp/l.log 2>&1 & lp=$!
  for _ in $(seq 600); do curl -sf http://127.0.0.1:$p1/health-check | grep -q READY && curl -sf http://127.0.0.1:$p2/health-check | grep -q READY && curl -sf http://127.0.0.1:$p3/health >/dev/null && break; sleep 0.2; done
  name=$(curl -sf http://127.0.0.1:$p1/v1/models | python3 -c "import json,sys; m=json.load(sys.stdin)['results'][0]; print(m['owner']+'/'+m['name'])")
  python3 - $name $p1 $p2 $p3 <<'PY' | sed "s/^/$fmt greedy: /" | tee -a ${out%.txt}-greedy.txt
import json, sys, urllib.request
name = sys.argv[1]
p1, p2, p3 = sys.argv[2:5]
prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "To make a cup of tea, first"]
def post(url, body, headers={}):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)
same = {"old": 0, "new": 0}
for p in prompts:
    ltext = post(f"http://127.0.0.1:{p3}/completion", {"prompt": p, "n_predict": 32, "temperature": 0, "top_k": 1, "cache_prompt": False})["content"].replace("\ufffd", "")
    for e, port in (("old", p1), ("new", p2)):
        h = post(f"http://127.0.0.1:{port}/v1/models/{name}/predictions",
                 {"input": {"prompt": p, "prompt_template": "{prompt}", "max_tokens": 32, "temperature": 0}}, {"Prefer": "wait=60"})
        out = h.get("output")
        htext = ("".join(out) if isinstance(out, list) else (out or "")).replace("\ufffd", "")
        same[e] += htext == ltext
print(f"old {same['old']} of 5, new {same['new']} of 5 equal to llama-server")
PY
  for r in $(seq $rounds); do
    for spec in ${LOADS:-1 16}; do
      IFS=/ read -r c inl outl <<<"$spec"; inl=${inl:-20}; outl=${outl:-128}
      np=$((c==1 ? (inl>=1000 ? 2 : 4) : (inl>=1000 ? 16 : 32)))
      engines=(old new llama); k=$(( (r-1) % 3 )); engines=("${engines[@]:$k}" "${engines[@]:0:$k}")
      for e in "${engines[@]}"; do
        case $e in old) url=http://127.0.0.1:$p1; be=replicate; md=$name;; new) url=http://127.0.0.1:$p2; be=replicate; md=$name;; llama) url=http://127.0.0.1:$p3; be=llama-cpp; md=llama;; esac
        avg=$(cut -d' ' -f1 /proc/loadavg)
        j=$($new bench --url $url --backend $be --model $md --tokenizer $gguf --max-concurrency $c --num-prompts $np --input-len $inl --output-len $outl --seed 20 --json 2>/dev/null | tail -1)
        echo "$fmt|$spec|$e|$r|$avg|$j" >> $out
        echo "$fmt $spec $e r$r load $avg: $(echo "$j" | python3 -c "import json,sys; d=json.load(sys.stdin); print('%.1f tok/s tpot %.2f ttft %.0f failed %d' % (d['output_throughput'], d['median_tpot_ms'], d['median_ttft_ms'], d['failed']))")"
      done
    done
  done
  kill $op $np_ $lp; wait 2>/dev/null; rm -rf $tmp
done
python3 - $out <<'PY'
import json,sys,statistics,collections
rows=collections.defaultdict(list); loads=collections.defaultdict(list)
for line in open(sys.argv[1]):
    f,c,e,r,avg,j=line.rstrip('\n').split('|',5)
    d=json.loads(j)
    if d.get('failed',1) or not d.get('completed'): print('dropped (failed requests):', f, c, e, r); continue
    rows[(f,c,e)].append(d); loads[(f,c)].append(float(avg))
print("| format | c/in/out | old tok/s | new tok/s | llama tok/s | new/old | new/llama | old/llama | TPOT old/new/llama ms | TTFT old/new/llama ms | load |")
for (f,c) in sorted(set((k[0],k[1]) for k in rows), key=lambda x:(x[0],[int(v) for v in x[1].split('/')])):
    med=lambda e,key: statistics.median(d[key] for d in rows[(f,c,e)])
    o,n,l=(med(e,'output_throughput') for e in ('old','new','llama'))
    t=[med(e,'median_tpot_ms') for e in ('old','new','llama')]
    ft=[med(e,'median_ttft_ms') for e in ('old','new','llama')]
    print(f"| {f} | {c} | {o:.1f} | {n:.1f} | {l:.1f} | {n/o:.2f}x | {n/l:.2f}x | {o/l:.2f}x | {t[0]:.2f}/{t[1]:.2f}/{t[2]:.2f} | {ft[0]:.0f}/{ft[1]:.0f}/{ft[2]:.0f} | {min(loads[(f,c)]):.2f}-{max(loads[(f,c)]):.2f} |")
PY
