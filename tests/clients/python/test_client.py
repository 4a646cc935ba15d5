"""The official Replicate Python client (1.0.7) against a running hearth server.

Env: REPLICATE_BASE_URL (http://127.0.0.1:PORT), REPLICATE_API_TOKEN. Exits non-zero
if any check fails. Every wait is bounded.
"""
import http.server
import json
import os
import socket
import sys
import threading
import time
import traceback

import httpx
import replicate
from replicate.exceptions import ModelError, ReplicateError

MODEL = os.environ.get("HEARTH_MODEL_NAME", "hearth/demo")
BASE = os.environ["REPLICATE_BASE_URL"].rstrip("/")
TOKEN = os.environ["REPLICATE_API_TOKEN"]
LONG = {"prompt": "a long one", "max_tokens": 1900, "ignore_eos": True}
failures = []


def check(name):
    def wrap(fn):
        started = time.time()
        try:
            fn()
            print(f"ok   {name} ({time.time() - started:.2f}s)")
        except Exception:  # noqa: BLE001 - report every failure, keep going
            failures.append(name)
            print(f"FAIL {name}")
            traceback.print_exc()
        return fn

    return wrap


def text(output):
    if isinstance(output, str):
        return output
    return "".join(str(x) for x in output)


@check("run owner/name")
def _():
    out = replicate.run(MODEL, input={"prompt": "Hello", "max_tokens": 8, "seed": 1})
    assert isinstance(text(out), str) and len(text(out)) > 0, repr(out)


@check("run owner/name:version (looks up the version's schema)")
def _():
    version = replicate.models.get(MODEL).latest_version.id
    assert len(version) == 64, version
    out = replicate.run(f"{MODEL}:{version}", input={"prompt": "Hello", "max_tokens": 8, "seed": 1})
    assert len(text(out)) > 0, repr(out)


@check("stream, and the same seed gives the same text as run")
def _():
    inp = {"prompt": "Tell me", "max_tokens": 24, "temperature": 0.8, "seed": 42, "ignore_eos": True}
    events = list(replicate.stream(MODEL, input=inp))
    streamed = "".join(str(e) for e in events)
    assert streamed, events
    ran = text(replicate.run(MODEL, input=inp))
    assert ran == streamed, (ran, streamed)


@check("predictions.create / wait / get / list / paginate")
def _():
    p = replicate.predictions.create(model=MODEL, input={"prompt": "Hi", "max_tokens": 6})
    p.wait()
    assert p.status == "succeeded", (p.status, p.error)
    assert "predict_time" in (p.metrics or {}), p.metrics
    got = replicate.predictions.get(p.id)
    assert got.output == p.output
    page = replicate.predictions.list()
    assert any(x.id == p.id for x in page.results)
    seen = 0
    for page in replicate.paginate(replicate.predictions.list):
        seen += len(page.results)
        if seen > 250:
            break
    assert seen >= 1


@check("cancel a running prediction")
def _():
    p = replicate.predictions.create(model=MODEL, input=LONG)
    replicate.predictions.cancel(p.id)
    deadline = time.time() + 20
    while time.time() < deadline:
        p.reload()
        if p.status in ("succeeded", "failed", "canceled"):
            break
        time.sleep(0.1)
    assert p.status == "canceled", p.status


@check("Prefer: wait=1 times out as starting within ~1.5s")
def _():
    version = replicate.models.get(MODEL).latest_version.id
    started = time.time()
    # The version form sends `Prefer: wait=1` (1.0.7's model form does not).
    p = replicate.predictions.create(version=version, input=LONG, wait=1)
    took = time.time() - started
    assert p.status == "starting", p.status
    assert 0.9 < took < 2.0, took
    replicate.predictions.cancel(p.id)


@check("422 names the bad field")
def _():
    try:
        replicate.run(MODEL, input={"prompt": "x", "max_tokens": "lots"})
    except ReplicateError as e:
        assert e.status == 422, e.status
        assert "max_tokens" in (e.detail or ""), e.detail
    else:
        raise AssertionError("a bad max_tokens was accepted")


@check("404 for an unknown model")
def _():
    try:
        replicate.run("nobody/nothing", input={"prompt": "x"})
    except ReplicateError as e:
        assert e.status == 404, e.status
    else:
        raise AssertionError("an unknown model ran")


@check("401 for a bad token")
def _():
    c = replicate.Client(api_token="not-the-token", base_url=BASE)
    try:
        c.models.get(MODEL)
    except ReplicateError as e:
        assert e.status == 401, e.status
    else:
        raise AssertionError("a bad token was accepted")


@check("webhook received and validated with Webhooks.validate")
def _():
    got = {}
    done = threading.Event()

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            got["headers"] = dict(self.headers)
            got["body"] = body
            self.send_response(200)
            self.end_headers()
            done.set()

        def log_message(self, *a):
            pass

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = http.server.HTTPServer(("127.0.0.1", port), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        replicate.predictions.create(
            model=MODEL,
            input={"prompt": "hook", "max_tokens": 4},
            webhook=f"http://127.0.0.1:{port}/hook",
            webhook_events_filter=["completed"],
        )
        assert done.wait(30), "no webhook within 30s"
        secret = replicate.webhooks.default.secret()
        replicate.webhooks.validate(headers=got["headers"], body=got["body"], secret=secret)
        assert json.loads(got["body"])["status"] == "succeeded"
    finally:
        server.shutdown()


@check("raw API: cancel with no body, SSE ids, error shape")
def _():
    h = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(timeout=30) as c:
        r = c.post(f"{BASE}/v1/models/{MODEL}/predictions", headers=h, json={"input": LONG})
        assert r.status_code == 201, r.text
        pid = r.json()["id"]
        r = c.post(f"{BASE}/v1/predictions/{pid}/cancel", headers=h)
        assert r.status_code == 200 and r.json()["status"] == "canceled", r.text
        r = c.post(f"{BASE}/v1/predictions", headers={**h, "Content-Type": "application/json"}, content=b"{nope")
        assert r.status_code == 400 and "detail" in r.json(), r.text


if __name__ == "__main__":
    print(f"replicate {replicate.__version__ if hasattr(replicate, '__version__') else '1.0.7'} against {BASE}")
    if failures:
        print(f"{len(failures)} check(s) failed: {', '.join(failures)}")
        sys.exit(1)
    print("all Python client checks passed")
