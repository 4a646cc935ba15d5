"""The differential test: the same requests to the real Cog server (cog==0.23.1, its
Rust coglet, on predict.py) and to hearth's Cog API, side by side; compares status
codes, body shapes (keys and JSON types, not ids or timestamps), SSE event sequences
and webhook sequences; prints a table; exits 1 on a difference not in ALLOWED.

Run by scripts/cog-diff.sh, which installs Cog and writes the mirror's
.cog/openapi_schema.json. Usage: diff.py HEARTH_BIN COG_DIR WORK_DIR
"""

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import requests

HEARTH_BIN, COG_DIR, WORK = sys.argv[1], sys.argv[2], sys.argv[3]
TIMEOUT = 60

# Documented deliberate differences (crates/hearth-server/README.md, "Where hearth
# differs from Cog"): (case regex, difference regex) -> why.
ALLOWED = [
    (r".*", r"\bmetrics: hearth adds (input_token_count|output_token_count|time_to_first_token|tokens_per_second|total_time)",
     "hearth reports token counts and timings in metrics, as LLM predictors on Replicate do"),
    (r".*", r"\.version: (hearth adds hearth|cog has (git_sha|build_time|python_sdk|python))",
     "no Python runs in hearth: version names the Cog API version and hearth's own"),
    (r"openapi", r"Input\.properties\.max_tokens: hearth adds maximum",
     "hearth bounds max_tokens by the model's context length"),
    (r"openapi", r"Input\.properties\.json_schema: (cog has type|hearth adds anyOf)",
     "hearth takes a JSON Schema as the object itself or a string holding one, and says so"),
    (r"validation: .*(id 5|filter|body \[\])", r"body: cog text, hearth object",
     "Cog's framework answers a body of the wrong shape in plain text; hearth in Cog's 422 JSON"),
    (r"malformed JSON", r"body: cog text, hearth object",
     "Cog's framework answers malformed JSON in plain text; hearth in Cog's error JSON"),
    (r"validation: seed null", r"status 422 != 200|body",
     "seed is nullable in both schemas; Cog 0.23.1 still refuses null, hearth follows the schema"),
    (r"validation: webhook not a URL", r"status 200 != 422|body",
     "hearth checks webhook URLs at creation (http(s), public addresses unless allowed)"),
    (r"bad id: space", r"status 200 != 422|body",
     "hearth ids are letters, digits, '-', '_' and '.': they appear in URLs and logs"),
    (r"PUT a finished id", r"status 200 != 409|body",
     "hearth never reuses an id (issue 7); Cog forgets finished predictions and runs it again"),
    (r"SSE attach \+ cancel", r"events: hearth has log before completed",
     "hearth logs a summary line at every end, cancel included"),
    (r"GET /predictions/\{id\}", r"body",
     "both 405; hearth's errors are JSON"),
]


def pick_port():
    """A port nothing listens on now, for a server that must be told its port (Cog).
    It can be taken before the server binds it: Server.wait_listening then starts the
    server again on another. hearth binds port 0 and says which port it got."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


IN_USE = re.compile(r"address already in use|os error 98|EADDRINUSE", re.I)
PORT_TRIES = 8


# ---------------------------------------------------------------- the two servers

class ServerDown(Exception):
    pass


class Server:
    """A server started by `make(port)` -> (cmd, env): on a picked port when `picked`
    (again on another while the port was taken), else on port 0, the port read back
    from the line hearth writes when it listens."""

    def __init__(self, name, make, cwd, log, picked):
        self.name, self.make, self.cwd, self.log_path, self.picked = name, make, cwd, log, picked
        self.tries = 0
        self.start()

    def start(self):
        self.tries += 1
        self.port = pick_port() if self.picked else 0
        self.base = f"http://127.0.0.1:{self.port}" if self.picked else None
        cmd, env = self.make(self.port)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, cwd=self.cwd, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def url(self, path):
        return self.base + path

    def wait_listening(self):
        deadline = time.time() + TIMEOUT
        while time.time() < deadline:
            if self.base is None:
                m = re.search(r"hearth listening on (http://\S+)", self.output())
                if m:
                    self.base = m.group(1)
            if self.base is not None:
                try:
                    r = requests.get(self.url("/health-check"), timeout=2)
                    if self.proc.poll() is None:  # ours, not another server on the port
                        return r
                except requests.ConnectionError:
                    pass
            if self.proc.poll() is not None:
                if self.picked and self.tries < PORT_TRIES and IN_USE.search(self.output()):
                    self.start()
                    continue
                raise ServerDown(f"{self.name} exited (exit status {self.proc.returncode})")
            time.sleep(0.02)
        raise ServerDown(f"{self.name} did not listen within {TIMEOUT}s")

    def wait_status(self, *want, setup_done=False):
        deadline = time.time() + TIMEOUT
        while time.time() < deadline:
            h = requests.get(self.url("/health-check"), timeout=5).json()
            # Cog says READY a moment before it fills in the setup result.
            done = "completed_at" in (h.get("setup") or {})
            if h["status"] in want and (done or not setup_done):
                return h
            time.sleep(0.05)
        raise ServerDown(f"{self.name}: /health-check never said {' or '.join(want)}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def cog(tag, **env):
    def make(port):
        e = dict(os.environ, PORT=str(port), COG_PREDICT_TYPE_STUB="predict.py:Predictor",
                 MIRROR_TOKEN_SECONDS="0.01", **env)
        e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
        return [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"], e
    return Server("cog", make, COG_DIR, f"{WORK}/cog-{tag}.log", picked=True)


def hearth(tag, *args):
    data = f"{WORK}/hearth-{tag}-data"
    cmd = [HEARTH_BIN, "serve", "--port", "0", "--data-dir", data, "--cog-max-concurrency", "1",
           "--webhook-allow-private", *args]
    return Server("hearth", lambda _port: (cmd, dict(os.environ, HEARTH_LOG="warn")), None,
                  f"{WORK}/hearth-{tag}.log", picked=False)


# ---------------------------------------------------------------- shapes and diffs

def shape(v):
    """Keys and JSON types, recursively; values only where they are the contract."""
    if isinstance(v, dict):
        return {k: shape(x) for k, x in v.items()}
    if isinstance(v, list):
        sigs = []
        for x in v:
            s = shape(x)
            if s not in sigs:
                sigs.append(s)
        return sigs
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return "string"


def shape_diffs(c, h, path="body"):
    out = []
    if isinstance(c, dict) and isinstance(h, dict):
        for k in sorted(set(c) | set(h)):
            if k not in h:
                out.append(f"{path}: cog has {k}")
            elif k not in c:
                out.append(f"{path}: hearth adds {k}")
            else:
                out.extend(shape_diffs(c[k], h[k], f"{path}.{k}"))
    elif isinstance(c, list) and isinstance(h, list):
        # Element types, merged: an empty list matches any list.
        if c and h:
            for sc in c:
                if sc not in h:
                    out.extend(shape_diffs(sc, h[0], f"{path}[]"))
    elif c != h:
        out.append(f"{path}: cog {c}, hearth {h}")
    return out


def body_of(r):
    try:
        return r.json()
    except ValueError:
        return "text"


def kind(b):
    return "text" if b == "text" else type(b).__name__.replace("dict", "object").replace("list", "array")


def compare(c_status, c_body, h_status, h_body, exact=False):
    diffs = []
    if c_status != h_status:
        diffs.append(f"status {c_status} != {h_status}")
    if (c_body == "text") != (h_body == "text"):
        diffs.append(f"body: cog {kind(c_body)}, hearth {kind(h_body)}")
    elif c_body != "text":
        diffs.extend(shape_diffs(shape(c_body), shape(h_body)))
        if exact and c_body != h_body:
            diffs.append(f"body: cog {json.dumps(c_body)} != hearth {json.dumps(h_body)}")
        locs = lambda b: [d.get("loc") for d in b.get("detail", [])] if isinstance(b, dict) and isinstance(b.get("detail"), list) else None  # noqa: E731
        if locs(c_body) != locs(h_body):
            diffs.append(f"detail locs: cog {locs(c_body)} != hearth {locs(h_body)}")
    return diffs


ROWS = []


def record(case, cog_result, hearth_result, diffs):
    unexplained, reasons = [], []
    for d in diffs:
        why = next((w for cre, dre, w in ALLOWED if re.search(cre, case) and re.search(dre, d)), None)
        if why:
            if why not in reasons:
                reasons.append(why)
        else:
            unexplained.append(d)
    verdict = "same" if not diffs else ("DIFF: " + "; ".join(unexplained)) if unexplained else "allowed: " + "; ".join(reasons)
    ROWS.append((case, str(cog_result), str(hearth_result), verdict))


def both(case, c, h, method, path, body=None, headers=None, exact=False, raw=None):
    results = []
    for srv in (c, h):
        kw = {"headers": headers or {}, "timeout": TIMEOUT}
        if raw is not None:
            kw["data"] = raw
            if raw:
                kw["headers"] = {"content-type": "application/json", **kw["headers"]}
        elif body is not None:
            kw["json"] = body
        r = requests.request(method, srv.url(path), **kw)
        results.append((r.status_code, body_of(r)))
    (cs, cb), (hs, hb) = results
    record(case, cs, hs, compare(cs, cb, hs, hb, exact))
    return cb, hb


# ---------------------------------------------------------------- SSE and webhooks

CANCELS = []


def sse(srv, method, path, body, cancel_after=None, cancel_id=None):
    r = requests.request(method, srv.url(path), json=body, stream=True, timeout=TIMEOUT,
                         headers={"accept": "text/event-stream"})
    if cancel_after is not None:
        def cancel():
            try:
                c = requests.post(srv.url(f"/predictions/{cancel_id}/cancel"), timeout=TIMEOUT)
                CANCELS.append((srv.name, c.status_code, body_of(c)))
            except requests.RequestException as e:
                CANCELS.append((srv.name, f"no answer ({type(e).__name__})", "text"))
        threading.Timer(cancel_after, cancel).start()
    events, ev, data = [], None, []
    for line in r.iter_lines(decode_unicode=True):
        if line.startswith("event:"):
            ev = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and ev:
            events.append((ev, json.loads("\n".join(data))))
            ev, data = None, []
    return r.status_code, events


def collapse(names):
    """A run of outputs is one `output*`: the chunking of text is the model's."""
    out = []
    for n in names:
        if n != "output":
            out.append(n)
        elif not out or out[-1] != "output*":
            out.append("output*")
    return out


def compare_sse(case, c_result, h_result):
    (cs, ce), (hs, he) = c_result, h_result
    diffs = [f"status {cs} != {hs}"] if cs != hs else []
    cn, hn = collapse([e for e, _ in ce]), collapse([e for e, _ in he])
    if cn != hn:
        extra = [n for n in hn if n not in cn]
        diffs.append(f"events: hearth has {' '.join(extra)} before completed" if extra == ["log"]
                     else f"events: cog {cn} != hearth {hn}")
    for name in ("start", "output", "log", "completed"):
        cd = [d for e, d in ce if e == name]
        hd = [d for e, d in he if e == name]
        if cd and hd:
            diffs.extend(d.replace("body", f"{name}") for d in shape_diffs(shape(cd[-1]), shape(hd[-1])))
    for events, who in ((ce, "cog"), (he, "hearth")):
        idx = [d["index"] for e, d in events if e == "output"]
        if idx != list(range(len(idx))):
            diffs.append(f"{who}: output indices {idx[:5]}... not 0..n-1")
    record(case, f"{cs} {' '.join(cn)}", f"{hs} {' '.join(hn)}", diffs)


HOOKS = {}
HOOK_LOCK = threading.Lock()


class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        with HOOK_LOCK:
            HOOKS.setdefault(self.path, []).append((dict(self.headers), body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


def ordered(calls):
    """Cog sends each webhook from a task of its own, so they may arrive out of order;
    their order of sending is that of their content: output, then logs, then the end."""
    terminal = ("succeeded", "failed", "canceled")
    return sorted(calls, key=lambda c: (c[1]["status"] in terminal, len(c[1].get("output") or []),
                                        len(c[1].get("logs") or "")))


def hook_kinds(calls, events):
    """start / output (one more chunk) / logs (same output, more logs) / completed."""
    kinds, n = [], 0
    for _, b in calls:
        out = len(b.get("output") or [])
        if b["status"] in ("succeeded", "failed", "canceled"):
            kinds.append("completed")
        elif out == n == 0 and not kinds and "start" in events:
            kinds.append("start")
        elif "output" not in events:
            kinds.append("logs")
        elif out == n + 1:
            kinds.append("output")
        elif out == n:
            kinds.append("logs")
        else:
            kinds.append(f"output(+{out - n})")
        n = out
    return kinds


def compare_hooks(case, events, c_calls, h_calls):
    c_calls, h_calls = ordered(c_calls), ordered(h_calls)
    c_kinds, h_kinds = hook_kinds(c_calls, events), hook_kinds(h_calls, events)
    ck, hk = collapse(c_kinds), collapse(h_kinds)
    diffs = [] if ck == hk else [f"webhooks: cog {ck} != hearth {hk}"]
    for k in set(c_kinds) & set(h_kinds):
        cb = [b for (_, b), x in zip(c_calls, c_kinds) if x == k]
        hb = [b for (_, b), x in zip(h_calls, h_kinds) if x == k]
        diffs.extend(d.replace("body", k) for d in shape_diffs(shape(cb[-1]), shape(hb[-1])))
    for calls, who in ((c_calls, "cog"), (h_calls, "hearth")):
        ua = {h.get("User-Agent") or h.get("user-agent") for h, _ in calls}
        if ua != {"coglet/0.23.1"}:
            diffs.append(f"{who} user-agent {ua}")
    record(case, " ".join(ck), " ".join(hk), diffs)


def wait_hooks(path, done):
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        with HOOK_LOCK:
            calls = list(HOOKS.get(path, []))
        if done(calls):
            time.sleep(0.3)
            with HOOK_LOCK:
                return list(HOOKS.get(path, []))
        time.sleep(0.05)
    return calls


# ---------------------------------------------------------------- the cases

def phase(name, run):
    """Runs a group of cases; a server that exits or never listens is a difference."""
    servers = []
    try:
        run(servers)
    except ServerDown as e:
        record(f"{name}: a server went away", "", "", [str(e)])
    except Exception as e:  # noqa: BLE001 - an answer of the wrong kind ends the phase
        record(f"{name}: stopped", "", "", [f"{type(e).__name__}: {e}"])
    finally:
        for srv in servers:
            srv.stop()


def startup_phase(servers):
    c = cog("startup", MIRROR_SETUP_SECONDS="3")
    h = hearth("startup", "--model", "dummy:bench-small")
    servers += [c, h]
    for srv in (c, h):
        srv.wait_listening()
    first = [requests.get(s.url("/health-check")).json() for s in (c, h)]
    record("health-check while starting", first[0]["status"], first[1]["status"],
           ([] if first[0]["status"] == first[1]["status"] == "STARTING" else ["not both STARTING"])
           + shape_diffs(shape(first[0]), shape(first[1])))
    both("POST /predictions while starting", c, h, "POST", "/predictions", {"input": {}}, exact=True)
    both("GET /openapi.json while starting", c, h, "GET", "/openapi.json", exact=True)
    ready = [s.wait_status("READY", setup_done=True) for s in (c, h)]
    record("health-check once ready", ready[0]["status"], ready[1]["status"],
           shape_diffs(shape(ready[0]), shape(ready[1])))


def setup_failure_phase(servers):
    c = cog("failed", MIRROR_SETUP_FAIL="1")
    h = hearth("failed", "--model", f"{WORK}/no-such-model")
    servers += [c, h]
    for srv in (c, h):
        srv.wait_listening()
    failed = [s.wait_status("SETUP_FAILED") for s in (c, h)]
    record("health-check: setup failed", failed[0]["status"], failed[1]["status"],
           shape_diffs(shape(failed[0]), shape(failed[1])))
    both("POST /predictions: setup failed", c, h, "POST", "/predictions", {"input": {}}, exact=True)
    both("GET /openapi.json: setup failed", c, h, "GET", "/openapi.json", exact=True)


def main_phase(servers, hook_base):
    c = cog("main")
    h = hearth("main")
    servers += [c, h]
    for s in (c, h):
        s.wait_listening()
        s.wait_status("READY")

    both("GET /", c, h, "GET", "/", exact=True)
    both("GET /health-check", c, h, "GET", "/health-check")
    both("GET /openapi.json", c, h, "GET", "/openapi.json")
    both("GET /predictions/{id}", c, h, "GET", "/predictions/x")
    # A prompt template of its own: no prompt prefix shared with another request, so
    # hearth logs no prefix-cache line at the start (the mirror logs nothing there).
    # A fixed seed: the random demo model sometimes samples only pieces of characters,
    # and an output-less run has no output webhooks to compare.
    small = {"prompt": "Hello", "max_tokens": 8, "prompt_template": "{prompt}", "seed": 1}
    both("POST sync", c, h, "POST", "/predictions", {"input": small})
    both("POST sync, id with dots", c, h, "POST", "/predictions", {"id": "diff.sync.1", "input": small})
    both("POST sync, no body", c, h, "POST", "/predictions", raw=b"")
    both("POST Prefer: respond-async", c, h, "POST", "/predictions", {"input": small},
         {"prefer": "respond-async"})
    for s in (c, h):
        s.wait_status("READY")
    both("POST Prefer: respond-async, wait=5 (sync)", c, h, "POST", "/predictions", {"input": small},
         {"prefer": "respond-async, wait=5"})
    compare_sse("SSE POST", sse(c, "POST", "/predictions", {"input": small}),
                sse(h, "POST", "/predictions", {"input": small}))

    # Validation: every bad field, each with its loc.
    for name, body, raw in [
        ("validation: three bad fields", {"input": {"max_tokens": "x", "temperature": 9, "prompt": 5, "bogus": 1}}, None),
        ("validation: below minimum", {"input": {"max_tokens": 0}}, None),
        ("validation: fractional integer", {"input": {"max_tokens": 1.5}}, None),
        ("validation: prompt null", {"input": {"prompt": None, "max_tokens": 1}}, None),
        ("validation: seed null", {"input": {"seed": None, "max_tokens": 1}}, None),
        ("validation: bool", {"input": {"ignore_eos": "yes"}}, None),
        ("validation: input not an object", {"input": [1]}, None),
        ("validation: id 5", {"id": 5, "input": {}}, None),
        ("validation: filter", {"webhook_events_filter": ["nope"], "input": {}}, None),
        ("validation: webhook not a URL", {"webhook": "not a url", "input": {"max_tokens": 1}}, None),
        ("validation: body []", None, b"[]"),
        ("malformed JSON", None, b"{not json"),
    ]:
        both(name, c, h, "POST", "/predictions", body, raw=raw)
    both("bad id: space", c, h, "PUT", "/predictions/has%20space", {"input": {"max_tokens": 1}})
    both("cancel unknown", c, h, "POST", "/predictions/nope/cancel", exact=True)

    # A long prediction in flight: PUT attaches, the slots are busy, cancel ends it.
    raw = {"prompt": "a long job", "prompt_template": "{prompt}"}
    long = {c: {**raw, "max_tokens": 600}, h: {**raw, "max_tokens": 8000, "ignore_eos": True}}
    res = []
    for s in (c, h):
        r = requests.post(s.url("/predictions"), json={"id": "diff.long.1", "input": long[s]},
                          headers={"prefer": "respond-async"}, timeout=TIMEOUT)
        res.append((r.status_code, body_of(r)))
    record("POST async (long)", res[0][0], res[1][0], compare(*res[0], *res[1], exact=True))
    time.sleep(1.0)
    res = []
    for s in (c, h):
        r = requests.put(s.url("/predictions/diff.long.1"), json={"input": {"prompt": "other"}}, timeout=TIMEOUT)
        b = body_of(r)
        if isinstance(b, dict):
            b["input"] = {"prompt": "(as created)"}  # the two servers ran different inputs
        res.append((r.status_code, b))
    record("PUT in-flight id (no SSE)", res[0][0], res[1][0], compare(*res[0], *res[1]))
    both("PUT id mismatch", c, h, "PUT", "/predictions/diff.long.1", {"id": "other", "input": {}})
    both("POST while all slots busy", c, h, "POST", "/predictions", {"input": small}, exact=True)
    both("POST SSE while all slots busy", c, h, "POST", "/predictions", {"input": small},
         {"accept": "text/event-stream"}, exact=True)
    both("validation while all slots busy", c, h, "POST", "/predictions", {"input": {"max_tokens": "x"}})
    busy = [requests.get(s.url("/health-check")).json()["status"] for s in (c, h)]
    record("health-check while busy", busy[0], busy[1], [] if busy[0] == busy[1] == "BUSY" else ["not both BUSY"])
    compare_sse("SSE attach + cancel",
                sse(c, "PUT", "/predictions/diff.long.1", {"input": {}}, 0.8, "diff.long.1"),
                sse(h, "PUT", "/predictions/diff.long.1", {"input": {}}, 0.8, "diff.long.1"))
    time.sleep(0.5)
    got = {name: (st, b) for name, st, b in CANCELS}
    none = ("not sent", "text")
    cc, hc = got.get("cog", none), got.get("hearth", none)
    record("cancel in flight", cc[0], hc[0], compare(*cc, *hc, exact=True))
    for s in (c, h):
        s.wait_status("READY")
    both("PUT a finished id", c, h, "PUT", "/predictions/diff.long.1", {"input": small})
    # A sync request canceled from elsewhere.
    res = []
    for s in (c, h):
        threading.Timer(0.8, lambda s=s: requests.post(s.url("/predictions/diff.cancel.1/cancel"))).start()
        r = requests.post(s.url("/predictions"), json={"id": "diff.cancel.1", "input": long[s]}, timeout=TIMEOUT)
        res.append((r.status_code, body_of(r)))
    record("POST sync, canceled", f"{res[0][0]} {res[0][1].get('status')}", f"{res[1][0]} {res[1][1].get('status')}",
           compare(*res[0], *res[1]))

    # Webhooks, each filter to its own receiver path.
    for name, filt, n in [("webhooks: all events", None, 8), ("webhooks: output", ["output"], 8),
                          ("webhooks: logs", ["logs"], 8), ("webhooks: completed", ["completed"], 8)]:
        calls = []
        for s in (c, h):
            s.wait_status("READY")
            path = f"/hook/{len(ROWS)}/{s.name}"
            body = {"input": {**small, "max_tokens": n}, "webhook": hook_base + path}
            if filt:
                body["webhook_events_filter"] = filt
            requests.post(s.url("/predictions"), json=body, timeout=TIMEOUT)
            want_last = "completed" in (filt or ["completed"])
            calls.append(wait_hooks(path, lambda cs, w=want_last: bool(cs) and (
                not w or cs[-1][1]["status"] in ("succeeded", "failed", "canceled"))))
        compare_hooks(name, filt or ["start", "output", "logs", "completed"], *calls)

    res = []
    for s in (c, h):
        r = requests.post(s.url("/shutdown"), timeout=TIMEOUT)
        res.append((r.status_code, body_of(r)))
        try:
            s.proc.wait(20)
            res[-1] = (res[-1][0], res[-1][1], "exited")
        except subprocess.TimeoutExpired:
            res[-1] = (res[-1][0], res[-1][1], "still running")
    record("POST /shutdown", f"{res[0][0]} {res[0][2]}", f"{res[1][0]} {res[1][2]}",
           compare(res[0][0], res[0][1], res[1][0], res[1][1], exact=True)
           + ([] if res[0][2] == res[1][2] == "exited" else ["not both exited"]))


def main():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    hook_port = srv.server_address[1]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    t0 = time.time()
    phase("startup", startup_phase)
    phase("setup failure", setup_failure_phase)
    phase("main", lambda servers: main_phase(servers, f"http://127.0.0.1:{hook_port}"))
    w = [max(len(r[i]) for r in ROWS + [("case", "cog 0.23.1", "hearth", "")]) for i in range(3)]
    print(f"{'case':<{w[0]}}  {'cog 0.23.1':<{w[1]}}  {'hearth':<{w[2]}}  result")
    for case, cr, hr, verdict in ROWS:
        print(f"{case:<{w[0]}}  {cr:<{w[1]}}  {hr:<{w[2]}}  {verdict}")
    bad = [r for r in ROWS if r[3].startswith("DIFF")]
    allowed = [r for r in ROWS if r[3].startswith("allowed")]
    print(f"cog-diff: {len(ROWS)} cases, {len(ROWS) - len(bad) - len(allowed)} same, "
          f"{len(allowed)} allowed (documented), {len(bad)} unexplained, {time.time() - t0:.0f}s")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
