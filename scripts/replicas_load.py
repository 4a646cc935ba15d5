"""Load through the balancer, then one replica killed with -9 (scripts/replicas-test.sh).

1. Throughput: batches of short predictions (Prefer: wait) through the balancer and
   straight to one replica, alternated, same concurrency; predictions/s and tokens/s.
2. Kill: predictions (short and long, each with a `completed` webhook) created through
   the balancer (the long ones before the kill straight on the victim, so it always
   has work in flight) while one replica is killed with SIGKILL part-way. Then every
   prediction created must be found through the balancer (none lost) and end (none
   stuck: the survivors end the dead replica's once its lease runs out), and each must
   get exactly one `completed` webhook.
Exit status 0 when every check holds.
"""

import argparse
import collections
import concurrent.futures
import http.server
import json
import os
import signal
import threading
import time

import httpx

TERMINAL = {"succeeded", "failed", "canceled"}


class Hooks:
    def __init__(self):
        self.lock = threading.Lock()
        self.calls = []  # (webhook-id, prediction id, status)
        hooks = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                try:
                    v = json.loads(body)
                except ValueError:
                    v = {}
                with hooks.lock:
                    hooks.calls.append((self.headers.get("webhook-id"), v.get("id"), v.get("status")))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def per_prediction(self):
        with self.lock:
            return collections.Counter(pid for _, pid, _ in self.calls)


def create(client, base, token, input, hook=None, wait=False, retries=8):
    """POSTs a prediction; retries (a new prediction each time) when the balancer
    answers 5xx or the connection drops, as a client would. Returns (json, retries)."""
    body = {"input": input}
    if hook:
        body.update(webhook=hook, webhook_events_filter=["completed"])
    headers = {"Authorization": f"Bearer {token}"}
    if wait:
        headers["Prefer"] = "wait"
    for attempt in range(retries):
        try:
            r = client.post(f"{base}/v1/models/hearth/demo/predictions", json=body, headers=headers, timeout=90)
            if r.status_code == 201:
                return r.json(), attempt
            if r.status_code < 500 and r.status_code != 429:
                raise RuntimeError(f"create: {r.status_code} {r.text}")
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError("create: no replica answered")


def throughput(base, token, n, conc, label, tokens):
    toks = 0
    t0 = time.perf_counter()
    with httpx.Client() as c, concurrent.futures.ThreadPoolExecutor(conc) as ex:
        inp = {"prompt": "throughput", "max_tokens": tokens, "ignore_eos": True}
        for p, _ in ex.map(lambda _: create(c, base, token, inp, wait=True), range(n)):
            assert p["status"] == "succeeded", p
            toks += (p.get("metrics") or {}).get("output_token_count", 0)
    dt = time.perf_counter() - t0
    print(f"  {label}: {n} predictions in {dt:.2f}s = {n / dt:.1f}/s, {toks / dt:.0f} tokens/s")
    return n / dt


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--balancer", required=True)
    a.add_argument("--direct", required=True, help="one replica, for the throughput baseline")
    a.add_argument("--token", required=True)
    a.add_argument("--replicas", type=int, required=True)
    a.add_argument("--load", type=int, default=60)
    a.add_argument("--kill-pid", type=int, required=True)
    a.add_argument("--victim", required=True,
                   help="the URL of the replica --kill-pid is: long predictions before the kill go "
                        "straight to it, so the kill always has work in flight to strand (a balancer "
                        "that had marked it down under load would otherwise spare it)")
    a.add_argument("--throughput", type=int, default=96, help="predictions per throughput batch")
    a.add_argument("--throughput-tokens", type=int, default=64)
    a.add_argument("--rounds", type=int, default=3, help="throughput batches each way, alternated")
    a.add_argument("--concurrency", type=int, default=16)
    a.add_argument("--long-tokens", type=int, default=3000, help="max_tokens of every other prediction")
    args = a.parse_args()
    base, token = args.balancer.rstrip("/"), args.token
    auth = {"Authorization": f"Bearer {token}"}
    failures = []

    n, t = args.throughput, args.throughput_tokens
    print(f"throughput ({n} predictions of {t} tokens, Prefer: wait, concurrency {args.concurrency}):")
    lb, one = [], []
    for _ in range(args.rounds):
        lb.append(throughput(base, token, n, args.concurrency, f"balancer, {args.replicas} replicas", t))
        one.append(throughput(args.direct, token, n, args.concurrency, "one replica, direct", t))
    print(f"  best: balancer {max(lb):.1f}/s, one replica {max(one):.1f}/s, ratio {max(lb) / max(one):.2f}")

    hooks = Hooks()
    ids, retries = [], 0
    kill_at = args.load * 2 // 5
    killed_at = None
    print(f"kill -9 under load: {args.load} predictions, replica pid {args.kill_pid} killed after {kill_at}")
    with httpx.Client() as c:
        for i in range(args.load):
            if i == kill_at:
                os.kill(args.kill_pid, signal.SIGKILL)
                killed_at = time.monotonic()
            long = i % 2 == 0
            inp = {"prompt": f"load {i}", "max_tokens": args.long_tokens if long else 24, "ignore_eos": True}
            target = args.victim.rstrip("/") if long and killed_at is None else base
            p, r = create(c, target, token, inp, hook=hooks.url)
            ids.append(p["id"])
            retries += r
            time.sleep(0.02)

        # Long enough for the whole load to finish on a loaded 2-core machine; a
        # prediction not ended by then is stuck.
        deadline = time.monotonic() + 300
        final, ended_at = {}, {}
        next_note = time.monotonic() + 15
        while time.monotonic() < deadline:
            if time.monotonic() > next_note:
                print(f"  ... {len(final)}/{len(ids)} ended")
                next_note += 15
            for pid in ids:
                if pid in final:
                    continue
                try:
                    r = c.get(f"{base}/v1/predictions/{pid}", headers=auth, timeout=10)
                except httpx.TransportError:
                    continue
                if r.status_code == 200 and r.json()["status"] in TERMINAL:
                    final[pid] = r.json()
                    ended_at[pid] = time.monotonic() - killed_at
                elif r.status_code == 404:
                    final[pid] = None
            if len(final) == len(ids):
                break
            time.sleep(0.5)
        ended_after = time.monotonic() - killed_at
    lost = [p for p in ids if final.get(p, 0) is None]
    stuck = [p for p in ids if p not in final]
    statuses = collections.Counter(v["status"] for v in final.values() if v)
    bad_errors = [
        p for p, v in final.items()
        if v and v["status"] == "failed" and "stopped" not in (v.get("error") or "")
    ]
    print(f"  created {len(ids)} ({retries} create retries while the balancer noticed the dead replica)")
    print(f"  all ended {ended_after:.1f}s after the kill: {dict(statuses)}")
    orphans = [ended_at[p] for p, v in final.items() if v and v["status"] == "failed"]
    if orphans:
        print(f"  the killed replica's {len(orphans)} predictions were ended failed by survivors "
              f"{min(orphans):.1f}-{max(orphans):.1f}s after the kill (lease 5 s)")
    if lost:
        failures.append(f"{len(lost)} predictions lost (404): {lost[:5]}")
    if stuck:
        with httpx.Client() as c:
            states = collections.Counter(
                c.get(f"{base}/v1/predictions/{p}", headers=auth, timeout=10).json().get("status")
                for p in stuck
            )
        failures.append(f"{len(stuck)} predictions stuck ({dict(states)}): {stuck[:5]}")
    if bad_errors:
        failures.append(f"failed without the replica-stopped error: {bad_errors[:5]}")
    if statuses.get("failed", 0) == 0:
        failures.append("no prediction was running on the killed replica: the kill tested nothing")

    # Webhooks: one `completed` per prediction. A delivery the dead replica had claimed
    # is made by a survivor once the claim expires (30 s), so wait that out.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        seen = hooks.per_prediction()
        if all(seen.get(p, 0) >= 1 for p in ids):
            break
        time.sleep(0.5)
    time.sleep(3)
    seen = hooks.per_prediction()
    missing = [p for p in ids if seen.get(p, 0) == 0]
    twice = {p: n for p, n in seen.items() if n > 1}
    with hooks.lock:
        wids = collections.Counter(w for w, _, _ in hooks.calls)
    print(f"  webhooks: {sum(seen.values())} completed deliveries for {len(ids)} predictions, "
          f"{len(missing)} missing, {len(twice)} delivered more than once, "
          f"{sum(1 for n in wids.values() if n > 1)} webhook-ids repeated")
    if missing:
        failures.append(f"no completed webhook for {len(missing)}: {missing[:5]}")
    if twice:
        failures.append(f"completed webhook more than once: {dict(list(twice.items())[:5])}")

    for f in failures:
        print("FAIL:", f)
    print(f"load: {0 if failures else 1} passed, {1 if failures else 0} failed")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
