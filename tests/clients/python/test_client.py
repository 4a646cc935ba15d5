"""The official Replicate Python client (replicate==1.0.7) against a running hearth server.

Env: REPLICATE_BASE_URL (http://127.0.0.1:PORT, without /v1: 1.0.x adds /v1 itself) and
REPLICATE_API_TOKEN, exactly what an unchanged application would set. HEARTH_MODEL_NAME
overrides the model (default hearth/demo); CLIENT_CHECK_TIMEOUT the per-check bound (s).

A plain script: every check runs, each failure is reported with its traceback, the last
line is `python: N passed, N failed`, and the exit status is non-zero if any check failed.
Every wait is bounded: each check runs under a SIGALRM deadline (the client's own
`Prediction.wait()` has no timeout), and the webhook wait has its own.

Client behaviour these checks lean on, read in the installed 1.0.7 source:
- `predictions.create(model=..., wait=N)` *drops* `wait` (it forwards **params without it
  to `models.predictions.create`), so the `Prefer: wait=N` checks use the version form or
  `models.predictions.create(model=..., wait=N)`, which do send the header.
- `Prefer: wait=N` requests carry a read timeout of N + 0.5 s.
- `run("owner/name:VERSION")` also GETs /v1/models/owner/name/versions/VERSION and
  returns a generator when the schema's Output is an iterator array; the model form
  returns the output list as is.
- `webhooks.validate(headers=..., body=..., secret=WebhookSigningSecret, tolerance=...)`
  returns None and raises a WebhookValidationError subclass on any problem.
"""
import http.server
import json
import os
import re
import signal
import sys
import threading
import time
import traceback

import httpx
import replicate
from replicate.__about__ import __version__ as CLIENT_VERSION
from replicate.exceptions import ReplicateError
from replicate.stream import ServerSentEvent
from replicate.webhook import InvalidSignatureError

MODEL = os.environ.get("HEARTH_MODEL_NAME", "hearth/demo")
BASE = os.environ["REPLICATE_BASE_URL"].rstrip("/")
TOKEN = os.environ["REPLICATE_API_TOKEN"]
CHECK_TIMEOUT = float(os.environ.get("CLIENT_CHECK_TIMEOUT", "90"))
TERMINAL = ("succeeded", "failed", "canceled")

# min_tokens == max_tokens bans end-of-sequence until the end, so the (random-weight)
# demo model always produces exactly that many tokens: outputs are never empty and a
# long job is really long. Standard Replicate LLM inputs only (no hearth extensions).
SHORT = {"prompt": "Hello", "max_tokens": 8, "min_tokens": 8, "seed": 1}
SEEDED = {"prompt": "Tell me a story", "max_tokens": 24, "min_tokens": 24, "temperature": 0.8, "seed": 42}
# The demo's context is 8192 tokens and prompt + max_tokens must fit, so 8000 leaves
# room for the chat template: several seconds, far longer than the ~1 s the checks need.
LONG = {"prompt": "Count to a thousand", "max_tokens": 8000, "min_tokens": 8000}

passed, failed = [], []
print(f"replicate (python) {CLIENT_VERSION} against {BASE}, model {MODEL}", flush=True)


class CheckTimeout(Exception):
    pass


def _on_alarm(signum, frame):  # noqa: ARG001
    raise CheckTimeout(f"check did not finish within {CHECK_TIMEOUT:g}s")


signal.signal(signal.SIGALRM, _on_alarm)


def check(name, timeout=None):
    """Runs the decorated function at once as a named check, bounded by SIGALRM."""

    def wrap(fn):
        started = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, timeout or CHECK_TIMEOUT)
        try:
            fn()
            signal.setitimer(signal.ITIMER_REAL, 0)
            passed.append(name)
            print(f"ok   {name} ({time.monotonic() - started:.2f}s)", flush=True)
        except Exception:  # noqa: BLE001 - report every failure, keep going
            signal.setitimer(signal.ITIMER_REAL, 0)
            failed.append(name)
            print(f"FAIL {name} ({time.monotonic() - started:.2f}s)", flush=True)
            traceback.print_exc()
            sys.stderr.flush()
        return fn

    return wrap


def text(output):
    """The clients' view of a text-generation output: chunks joined with ''."""
    if output is None:
        return ""
    if isinstance(output, str):
        return output
    return "".join(str(x) for x in output)


def version_id():
    model = replicate.models.get(MODEL)
    assert model.latest_version is not None, "GET /v1/models/{o}/{n} has no latest_version"
    vid = model.latest_version.id
    assert re.fullmatch(r"[0-9a-f]{64}", vid), f"latest_version.id is not 64 hex chars: {vid!r}"
    return vid


def quietly_cancel(pid):
    """Cancels a long job a check left running, so it does not hold the engine."""
    try:
        replicate.predictions.cancel(pid)
    except Exception:  # noqa: BLE001
        pass


def expect_error(status, fn, what):
    try:
        fn()
    except ReplicateError as e:
        assert e.status == status, f"{what}: expected HTTP {status}, got {e.status} ({e.detail!r})"
        return e
    raise AssertionError(f"{what}: expected ReplicateError {status}, but the call succeeded")


# --- run -------------------------------------------------------------------------------


@check("run owner/name returns text")
def _():
    out = replicate.run(MODEL, input=SHORT)
    assert isinstance(out, list), f"expected the output list, got {type(out).__name__}: {out!r}"
    assert all(isinstance(x, str) for x in out), f"output items are not all strings: {out!r}"
    assert text(out), f"empty output: {out!r}"


@check("run owner/name:version returns an iterator (schema says iterator) with the same text")
def _():
    vid = version_id()
    out = replicate.run(f"{MODEL}:{vid}", input=SHORT)
    assert not isinstance(out, (list, str)), (
        "run with a version should return a generator: the version's "
        "openapi_schema.components.schemas.Output must be "
        '{"type":"array","x-cog-array-type":"iterator"}; got ' + repr(out)
    )
    got = text(out)
    assert got, "empty output"
    same = text(replicate.run(MODEL, input=SHORT))
    assert got == same, f"same input and seed, different text by version and by model: {got!r} != {same!r}"


# --- stream ----------------------------------------------------------------------------


@check("stream yields SSE output..done, and run with the same seed gives the same text")
def _():
    events = list(replicate.stream(MODEL, input=SEEDED))
    assert events, "no events"
    assert all(isinstance(e, ServerSentEvent) for e in events), events
    kinds = [e.event for e in events]
    assert kinds[-1] == ServerSentEvent.EventType.DONE, f"the stream did not end with done: {kinds}"
    assert ServerSentEvent.EventType.OUTPUT in kinds, f"no output events: {kinds}"
    assert all(e.id for e in events), "an event without an id"
    streamed = "".join(str(e) for e in events)
    assert streamed, f"output events joined to nothing: {events!r}"
    ran = text(replicate.run(MODEL, input=SEEDED))
    assert ran == streamed, f"seed 42, temperature 0.8: run gave {ran!r}, stream gave {streamed!r}"


@check("stream by version (predictions.create with stream=True, then Prediction.stream())")
def _():
    vid = version_id()
    p = replicate.predictions.create(version=vid, input=SEEDED, stream=True)
    assert p.urls and isinstance(p.urls.get("stream"), str), f"no urls.stream: {p.urls!r}"
    streamed = "".join(str(e) for e in p.stream())
    assert streamed, "nothing streamed"
    # A prediction created without stream=True (as JS does) still streams.
    q = replicate.predictions.create(model=MODEL, input=SEEDED)
    assert q.urls and isinstance(q.urls.get("stream"), str), f"no urls.stream without stream=True: {q.urls!r}"
    again = "".join(str(e) for e in q.stream())
    assert again == streamed, f"same seed, different streams: {again!r} != {streamed!r}"


# --- predictions -----------------------------------------------------------------------


@check("predictions.create / wait / get / list")
def _():
    p = replicate.predictions.create(model=MODEL, input=SHORT)
    assert p.status in ("starting", "processing", "succeeded"), p.status
    assert p.model == MODEL, f"model {p.model!r}"
    assert re.fullmatch(r"[0-9a-f]{64}", p.version), f"version {p.version!r}"
    for key in ("get", "cancel"):
        url = (p.urls or {}).get(key, "")
        assert url.startswith(BASE + "/v1/"), f"urls.{key} is not absolute to this server: {url!r}"
    p.wait()
    assert p.status == "succeeded", f"status {p.status}, error {p.error!r}"
    assert isinstance((p.metrics or {}).get("predict_time"), (int, float)), f"metrics: {p.metrics!r}"
    assert text(p.output), f"empty output: {p.output!r}"
    assert p.completed_at, "no completed_at"
    got = replicate.predictions.get(p.id)
    assert got.id == p.id and got.status == "succeeded" and got.output == p.output, got
    page = replicate.predictions.list()
    assert any(x.id == p.id for x in page.results), f"{p.id} not on the first page of predictions.list()"


@check("paginate walks every page (creates predictions until there are two pages)", timeout=240)
def _():
    first = replicate.predictions.list()
    if first.next is None:
        # 100 a page: make sure there are at least 101. Blocking creates, one at a
        # time, so a bounded queue never answers 429 (POST is not retried by 1.0.7).
        for i in range(101 - len(first.results)):
            p = replicate.models.predictions.create(
                model=MODEL, input={"prompt": f"page {i}", "max_tokens": 1}, wait=True
            )
            if p.status not in TERMINAL:
                p.wait()
        first = replicate.predictions.list()
    assert first.next, "more than 100 predictions but the first page has no next"
    assert first.next.startswith(BASE + "/v1/"), f"next is not an absolute URL to this server: {first.next!r}"
    pages, ids = 0, []
    for page in replicate.paginate(replicate.predictions.list):
        pages += 1
        ids += [x.id for x in page.results]
        assert pages <= 50, "more than 50 pages: next never ends?"
    assert pages >= 2, f"paginate saw {pages} page(s)"
    assert len(ids) == len(set(ids)), "a prediction appeared on two pages"
    assert len(ids) >= 101, f"paginate saw {len(ids)} predictions"


@check("predictions.cancel on a long job returns it canceled")
def _():
    p = replicate.predictions.create(model=MODEL, input=LONG)
    try:
        assert p.status not in TERMINAL, f"the long job was already {p.status} at create: test design"
        c = replicate.predictions.cancel(p.id)
        assert c.id == p.id, c
        assert c.status == "canceled", f"cancel returned status {c.status!r}, not the canceled prediction"
        got = replicate.predictions.get(p.id)
        assert got.status == "canceled", f"GET after cancel: {got.status}"
        assert len(got.output or []) < LONG["max_tokens"], "the job ran to the end: it was not canceled"
        # And through the Prediction object's own method.
        q = replicate.predictions.create(model=MODEL, input=LONG)
        q.cancel()
        assert q.status == "canceled", f"Prediction.cancel() left status {q.status}"
    finally:
        quietly_cancel(p.id)


# --- Prefer: wait ----------------------------------------------------------------------


def timed_create(create):
    started = time.monotonic()
    p = create()
    took = time.monotonic() - started
    quietly_cancel(p.id)
    assert p.status == "starting", f"a Prefer: wait=1 timeout must answer status starting, got {p.status!r}"
    assert took < 2.0, f"Prefer: wait=1 took {took:.2f}s (the client's read timeout is 1.5s)"
    assert took >= 0.8, f"Prefer: wait=1 answered after {took:.2f}s: the server did not hold the request"


@check("Prefer: wait=1 on a long job (predictions.create(version=..., wait=1)) answers starting in ~1s")
def _():
    vid = version_id()
    timed_create(lambda: replicate.predictions.create(version=vid, input=LONG, wait=1))


@check("Prefer: wait=1 on a long job (models.predictions.create(model=..., wait=1)) answers starting in ~1s")
def _():
    timed_create(lambda: replicate.models.predictions.create(model=MODEL, input=LONG, wait=1))


@check("Prefer: wait on a short job answers the finished prediction in one request")
def _():
    p = replicate.models.predictions.create(model=MODEL, input=SHORT, wait=True)
    assert p.status == "succeeded", f"status {p.status!r}: sync mode did not wait for a short job"
    assert text(p.output), f"empty output: {p.output!r}"
    assert isinstance((p.metrics or {}).get("predict_time"), (int, float)), p.metrics


# --- errors ----------------------------------------------------------------------------


@check("422 names the bad field (max_tokens: 'lots' and -1)")
def _():
    for bad in ("lots", -1):
        e = expect_error(
            422,
            lambda: replicate.run(MODEL, input={"prompt": "x", "max_tokens": bad}),
            f"max_tokens={bad!r}",
        )
        assert "max_tokens" in (e.detail or ""), f"detail does not name max_tokens: {e.detail!r}"
    vid = version_id()
    e = expect_error(
        422,
        lambda: replicate.predictions.create(version=vid, input={"prompt": "x", "max_tokens": "lots"}),
        "by version",
    )
    assert "max_tokens" in (e.detail or ""), f"detail does not name max_tokens: {e.detail!r}"


@check("404 for an unknown model and an unknown prediction")
def _():
    expect_error(404, lambda: replicate.run("nobody/nothing", input={"prompt": "x"}), "run nobody/nothing")
    expect_error(404, lambda: replicate.models.get("nobody/nothing"), "models.get nobody/nothing")
    expect_error(404, lambda: replicate.predictions.get("nosuchprediction0000000000"), "predictions.get")


@check("401 for a bad token")
def _():
    c = replicate.Client(api_token="not-the-token", base_url=BASE)
    e = expect_error(401, lambda: c.models.get(MODEL), "a bad token")
    assert e.detail, "401 without a detail"


# --- webhooks --------------------------------------------------------------------------


@check("webhook (completed) arrives once and passes webhooks.validate with the default secret")
def _():
    deliveries = []
    arrived = threading.Event()

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8")
            deliveries.append({"path": self.path, "headers": dict(self.headers.items()), "body": body})
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            arrived.set()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        p = replicate.predictions.create(
            model=MODEL,
            input=SHORT,
            webhook=f"http://127.0.0.1:{port}/hook",
            webhook_events_filter=["completed"],
        )
        assert arrived.wait(30), "no webhook within 30s"
        time.sleep(1.0)  # a second (wrong) delivery would show up here
        assert len(deliveries) == 1, f"{len(deliveries)} deliveries for a completed-only filter"
        d = deliveries[0]
        assert d["path"] == "/hook", d["path"]
        secret = replicate.webhooks.default.secret()
        assert secret.key.startswith("whsec_"), f"secret key {secret.key!r}"
        replicate.webhooks.validate(headers=d["headers"], body=d["body"], secret=secret, tolerance=300)
        sent = json.loads(d["body"])
        assert sent["id"] == p.id, f"webhook for {sent.get('id')}, created {p.id}"
        assert sent["status"] == "succeeded", sent["status"]
        assert text(sent.get("output")), f"webhook without output: {sent!r}"
        try:
            replicate.webhooks.validate(headers=d["headers"], body=d["body"] + " ", secret=secret)
        except InvalidSignatureError:
            pass
        else:
            raise AssertionError("a tampered body passed validation")
    finally:
        server.shutdown()
        server.server_close()


# --- files -----------------------------------------------------------------------------
@check("files: create, get, list, download at urls.get, delete")
def _():
    import io

    data = "hearth file test \u2713".encode()
    f = replicate.files.create(io.BytesIO(data), filename="t.txt", content_type="text/plain", metadata={"k": "v"})
    assert f.size == len(data) and f.metadata == {"k": "v"}, f
    assert replicate.files.get(f.id).checksums == f.checksums
    assert any(x.id == f.id for x in replicate.files.list())
    got = httpx.get(f.urls["get"], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert got.status_code == 200 and got.content == data, got
    assert replicate.files.delete(f.id)
    expect_error(404, lambda: replicate.files.get(f.id), "a deleted file")


# --- raw HTTP: what the clients rely on without surfacing it ----------------------------


@check("raw: stream URL works without Authorization (as JS fetches it); every event has id and a known name")
def _():
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(timeout=httpx.Timeout(5.0, read=30.0)) as c:
        r = c.post(f"{BASE}/v1/models/{MODEL}/predictions", headers=auth, json={"input": SEEDED})
        assert r.status_code == 201, f"{r.status_code} {r.text}"
        url = r.json()["urls"]["stream"]
        with c.stream("GET", url, headers={"Accept": "text/event-stream"}) as s:
            assert s.status_code == 200, f"stream without a token: HTTP {s.status_code}"
            ctype = s.headers.get("content-type", "").split(";")[0].strip()
            assert ctype == "text/event-stream", f"content-type {ctype!r}"
            events, cur = [], {}
            for line in s.iter_lines():
                if line == "":
                    if cur:
                        events.append(cur)
                        if cur.get("event") == "done":
                            break
                    cur = {}
                elif line.startswith(":"):
                    continue
                else:
                    field, _, value = line.partition(":")
                    cur[field] = value[1:] if value.startswith(" ") else value
    assert events and events[-1].get("event") == "done", f"no done event: {events[-3:]!r}"
    for ev in events:
        assert ev.get("event") in ("output", "logs", "error", "done"), f"event {ev!r}"
        assert ev.get("id"), f"event without an id: {ev!r}"


@check("raw: cancel with JS's empty JSON-typed body, and 'Token' auth")
def _():
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(timeout=30) as c:
        r = c.post(f"{BASE}/v1/models/{MODEL}/predictions", headers=auth, json={"input": LONG})
        assert r.status_code == 201, f"{r.status_code} {r.text}"
        pid = r.json()["id"]
        r = c.post(f"{BASE}/v1/predictions/{pid}/cancel", headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 200, f"cancel: {r.status_code} {r.text}"
        assert r.json()["status"] == "canceled" and r.json()["id"] == pid, r.text
        r = c.get(f"{BASE}/v1/predictions/{pid}", headers={"Authorization": f"Token {TOKEN}"})
        assert r.status_code == 200, f"'Token <token>' auth: {r.status_code} {r.text}"
        r = c.get(f"{BASE}/v1/predictions/{pid}")
        assert r.status_code == 401, f"no token: {r.status_code}"
        assert r.headers.get("content-type", "").startswith("application/problem+json"), r.headers


if failed:
    print("failed checks: " + "; ".join(failed))
print(f"python: {len(passed)} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
