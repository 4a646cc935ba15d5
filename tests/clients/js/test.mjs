// The official Replicate JS client (replicate@1.4.0) against a running hearth server.
//
// Env: REPLICATE_BASE_URL (http://127.0.0.1:PORT, without /v1: JS's baseUrl includes it,
// so this adds it), REPLICATE_API_TOKEN. HEARTH_MODEL_NAME overrides the model (default
// hearth/demo); CLIENT_CHECK_TIMEOUT the per-check bound in seconds.
//
// Every check runs, each failure is printed with its stack, the last line is
// `js: N passed, N failed`, and the exit status is non-zero if any failed. Every wait is
// bounded (a per-check deadline, the webhook's own 30 s, and a whole-run watchdog).
//
// Client behaviour these checks lean on, read in the installed 1.4.0 source:
// - The client is built as an application would build it, useFileOutput left at its
//   default (true): output strings starting with "https:" or "data:" would become
//   FileOutput objects (text() below stringifies either way; stream events only become
//   files when the stream URL's path starts with /v1/files/).
// - predictions.create({wait: N}) sends `Prefer: wait=N` (N = max(1, ceil(N))), `wait:
//   true` sends `Prefer: wait`; run() defaults to {mode: "block"} -> `Prefer: wait`, and
//   {mode: "block", timeout: N} -> `Prefer: wait=N`. If the answer is "starting", run()
//   polls GET /predictions/{id} every 500 ms until terminal; it does not return early.
//   An aborted `signal` stops that polling and POSTs /predictions/{id}/cancel.
// - stream() never sends `stream: true` and fetches urls.stream with only
//   `Accept: text/event-stream`: no Authorization header.
// - Errors are ApiError (not exported by 1.4.0; name "ApiError") with .response.status;
//   the body has been read into .message.
// - validateWebhook({headers, body}, secret) -> Promise<boolean>; it compares the
//   base64 of HMAC-SHA256(base64decode(secret after "_"), `${id}.${timestamp}.${body}`)
//   with each space-separated "v1,<sig>" in webhook-signature (no timestamp tolerance).
import http from "node:http";
import { createRequire } from "node:module";
import Replicate, { validateWebhook } from "replicate";

const MODEL = process.env.HEARTH_MODEL_NAME || "hearth/demo";
const [OWNER, NAME] = MODEL.split("/");
const BASE = process.env.REPLICATE_BASE_URL.replace(/\/+$/, "");
const auth = process.env.REPLICATE_API_TOKEN;
const CHECK_TIMEOUT_MS = Number(process.env.CLIENT_CHECK_TIMEOUT || 90) * 1000;
const TERMINAL = ["succeeded", "failed", "canceled"];

const replicate = new Replicate({ auth, baseUrl: `${BASE}/v1` });

// min_tokens == max_tokens bans end-of-sequence until the end: outputs are never empty
// and a long job is really long. Standard Replicate LLM inputs only.
const SHORT = { prompt: "Hello", max_tokens: 8, min_tokens: 8, seed: 1 };
const SEEDED = { prompt: "Tell me a story", max_tokens: 24, min_tokens: 24, temperature: 0.8, seed: 42 };
// The demo's context is 8192 tokens: 8000 leaves room for the chat template, and takes
// several seconds, far longer than the ~1 s the checks need.
const LONG = { prompt: "Count to a thousand", max_tokens: 8000, min_tokens: 8000 };

const passed = [];
const failed = [];

// Whole-run watchdog: never hang CI, whatever a check leaves behind.
const watchdog = setTimeout(() => {
  console.log("FAIL the whole JS run took longer than 20 minutes");
  console.log(`js: ${passed.length} passed, ${failed.length + 1} failed`);
  process.exit(1);
}, 20 * 60 * 1000);
watchdog.unref();

function assert(cond, msg) {
  if (!cond) throw new Error(`assertion failed: ${msg}`);
}
const text = (out) => (out == null ? "" : Array.isArray(out) ? out.map(String).join("") : String(out));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function deadline(ms, what) {
  let timer;
  const p = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no result within ${ms / 1000}s`)), ms);
  });
  return { promise: p, clear: () => clearTimeout(timer) };
}

async function check(name, fn, timeoutMs = CHECK_TIMEOUT_MS) {
  const started = Date.now();
  const d = deadline(timeoutMs, "check");
  try {
    await Promise.race([fn(), d.promise]);
    passed.push(name);
    console.log(`ok   ${name} (${((Date.now() - started) / 1000).toFixed(2)}s)`);
  } catch (e) {
    failed.push(name);
    console.log(`FAIL ${name} (${((Date.now() - started) / 1000).toFixed(2)}s)\n${e && e.stack ? e.stack : e}`);
  } finally {
    d.clear();
  }
}

async function versionId() {
  const model = await replicate.models.get(OWNER, NAME);
  assert(model.latest_version, "GET /models/{o}/{n} has no latest_version");
  const id = model.latest_version.id;
  assert(/^[0-9a-f]{64}$/.test(id), `latest_version.id is not 64 hex chars: ${id}`);
  return id;
}

async function quietlyCancel(id) {
  try {
    await replicate.predictions.cancel(id);
  } catch {}
}

async function expectApiError(status, fn, what) {
  try {
    await fn();
  } catch (e) {
    assert(e && e.name === "ApiError", `${what}: expected an ApiError, got ${e && e.stack ? e.stack : e}`);
    assert(e.response && e.response.status === status, `${what}: expected HTTP ${status}, got ${e.response && e.response.status}: ${e.message}`);
    return e;
  }
  throw new Error(`${what}: expected ApiError ${status}, but the call succeeded`);
}

const clientVersion = createRequire(import.meta.url)("replicate/package.json").version;
console.log(`replicate (js) ${clientVersion} against ${BASE}/v1, model ${MODEL}`);

// --- run -------------------------------------------------------------------------------

await check("run owner/name returns text (Prefer: wait, one request)", async () => {
  const seen = [];
  const out = await replicate.run(MODEL, { input: SHORT }, (p) => seen.push(p.status));
  assert(Array.isArray(out), `expected the output array, got ${JSON.stringify(out)}`);
  assert(out.every((x) => typeof x === "string"), `output items are not all strings: ${JSON.stringify(out)}`);
  assert(text(out).length > 0, `empty output: ${JSON.stringify(out)}`);
  assert(seen[0] === "succeeded", `the blocking create answered ${seen[0]}, not the finished prediction (statuses: ${seen})`);
});

await check("run owner/name:version gives the same text as owner/name", async () => {
  const version = await versionId();
  const byVersion = text(await replicate.run(`${MODEL}:${version}`, { input: SHORT }));
  assert(byVersion.length > 0, "empty output");
  const byModel = text(await replicate.run(MODEL, { input: SHORT }));
  assert(byVersion === byModel, `same input and seed: ${JSON.stringify(byVersion)} != ${JSON.stringify(byModel)}`);
});

await check("run with wait {mode: poll} polls to the output", async () => {
  const out = await replicate.run(MODEL, { input: SHORT, wait: { mode: "poll", interval: 100 } });
  assert(text(out).length > 0, `empty output: ${JSON.stringify(out)}`);
});

await check("run with wait {mode: block, timeout: 1} on a long job: starting after ~1s, then cancel via signal", async () => {
  const controller = new AbortController();
  const seen = [];
  const started = Date.now();
  await replicate.run(MODEL, { input: LONG, wait: { mode: "block", timeout: 1 }, signal: controller.signal }, (p) => {
    seen.push({ status: p.status, id: p.id, at: (Date.now() - started) / 1000 });
    controller.abort(); // run() stops polling and cancels the prediction
  });
  const took = (Date.now() - started) / 1000;
  const first = seen[0];
  assert(first, "the progress callback never ran");
  try {
    assert(first.status === "starting", `a Prefer: wait=1 timeout must answer starting, got ${first.status}`);
    assert(first.at >= 0.8 && first.at < 2.0, `Prefer: wait=1 answered after ${first.at}s (expected ~1s)`);
    assert(seen[seen.length - 1].status === "canceled", `run's last status ${seen[seen.length - 1].status}, expected canceled`);
    assert(took < 10, `run took ${took}s after the abort`);
    const got = await replicate.predictions.get(first.id);
    assert(got.status === "canceled", `GET after run's cancel: ${got.status}`);
  } finally {
    await quietlyCancel(first.id);
  }
});

// --- stream ----------------------------------------------------------------------------

await check("stream yields output..done (no token on the stream URL), and run with the same seed gives the same text", async () => {
  const events = [];
  for await (const ev of replicate.stream(MODEL, { input: SEEDED })) events.push(ev);
  assert(events.length > 0, "no events");
  const kinds = events.map((e) => e.event);
  assert(kinds[kinds.length - 1] === "done", `the stream did not end with done: ${kinds}`);
  assert(kinds.includes("output"), `no output events: ${kinds}`);
  assert(kinds.every((k) => ["output", "logs", "done"].includes(k)), `unexpected events: ${kinds}`);
  assert(events.every((e) => e.id), "an event without an id");
  const streamed = events.map(String).join("");
  assert(streamed.length > 0, "output events joined to nothing");
  const ran = text(await replicate.run(MODEL, { input: SEEDED }));
  assert(ran === streamed, `seed 42, temperature 0.8: run gave ${JSON.stringify(ran)}, stream gave ${JSON.stringify(streamed)}`);
});

// --- predictions -----------------------------------------------------------------------

await check("predictions.create / wait / get / list", async () => {
  let p = await replicate.predictions.create({ model: MODEL, input: SHORT });
  assert(["starting", "processing", "succeeded"].includes(p.status), p.status);
  assert(p.model === MODEL, `model ${p.model}`);
  for (const key of ["get", "cancel", "stream"]) {
    const url = (p.urls || {})[key] || "";
    assert(/^https?:\/\//.test(url), `urls.${key} is not absolute: ${JSON.stringify(url)}`);
  }
  p = await replicate.wait(p, { interval: 100 });
  assert(p.status === "succeeded", `status ${p.status}, error ${p.error}`);
  assert(typeof (p.metrics || {}).predict_time === "number", JSON.stringify(p.metrics));
  assert(text(p.output).length > 0, `empty output: ${JSON.stringify(p.output)}`);
  const got = await replicate.predictions.get(p.id);
  assert(got.status === "succeeded" && JSON.stringify(got.output) === JSON.stringify(p.output), "get differs from wait");
  const page = await replicate.predictions.list();
  assert(Array.isArray(page.results), JSON.stringify(page).slice(0, 200));
  assert(page.results.some((x) => x.id === p.id), `${p.id} is not on the first page`);
});

await check("paginate follows absolute next URLs over every page", async () => {
  let first = await replicate.predictions.list();
  if (!first.next) {
    // 100 a page: make sure there are at least 101. One blocking create at a time.
    for (let i = first.results.length; i < 101; i++) {
      let p = await replicate.predictions.create({ model: MODEL, input: { prompt: `page ${i}`, max_tokens: 1 }, wait: true });
      if (!TERMINAL.includes(p.status)) p = await replicate.wait(p, { interval: 100 });
    }
    first = await replicate.predictions.list();
  }
  assert(first.next, "more than 100 predictions but the first page has no next");
  assert(first.next.startsWith(`${BASE}/v1/`), `next is not an absolute URL to this server: ${first.next}`);
  let pages = 0;
  const ids = [];
  for await (const results of replicate.paginate(replicate.predictions.list)) {
    pages += 1;
    ids.push(...results.map((x) => x.id));
    assert(pages <= 50, "more than 50 pages: next never ends?");
  }
  assert(pages >= 2, `paginate saw ${pages} page(s)`);
  assert(new Set(ids).size === ids.length, "a prediction appeared on two pages");
  assert(ids.length >= 101, `paginate saw ${ids.length} predictions`);
}, 240 * 1000);

await check("predictions.cancel on a long job returns it canceled", async () => {
  const p = await replicate.predictions.create({ model: MODEL, input: LONG });
  try {
    assert(!TERMINAL.includes(p.status), `the long job was already ${p.status} at create: test design`);
    const c = await replicate.predictions.cancel(p.id); // JS: Content-Type: application/json, no body
    assert(c.id === p.id, JSON.stringify(c).slice(0, 200));
    assert(c.status === "canceled", `cancel returned status ${c.status}, not the canceled prediction`);
    const got = await replicate.predictions.get(p.id);
    assert(got.status === "canceled", `GET after cancel: ${got.status}`);
    assert((got.output || []).length < LONG.max_tokens, "the job ran to the end: it was not canceled");
  } finally {
    await quietlyCancel(p.id);
  }
});

async function timedCreate(opts) {
  const started = Date.now();
  const p = await replicate.predictions.create(opts);
  const took = (Date.now() - started) / 1000;
  await quietlyCancel(p.id);
  assert(p.status === "starting", `a Prefer: wait=1 timeout must answer starting, got ${p.status}`);
  assert(took < 2.0, `Prefer: wait=1 took ${took}s`);
  assert(took >= 0.8, `Prefer: wait=1 answered after ${took}s: the server did not hold the request`);
}

await check("predictions.create({model, wait: 1}) on a long job answers starting in ~1s", async () => {
  await timedCreate({ model: MODEL, input: LONG, wait: 1 });
});

await check("predictions.create({version, wait: 1}) on a long job answers starting in ~1s", async () => {
  await timedCreate({ version: await versionId(), input: LONG, wait: 1 });
});

// --- errors ----------------------------------------------------------------------------

await check("422 names the bad field (max_tokens: 'lots' and -1)", async () => {
  for (const bad of ["lots", -1]) {
    const e = await expectApiError(422, () => replicate.run(MODEL, { input: { prompt: "x", max_tokens: bad } }), `max_tokens=${JSON.stringify(bad)}`);
    assert(e.message.includes("max_tokens"), `the error does not name max_tokens: ${e.message}`);
  }
  const version = await versionId();
  const e = await expectApiError(422, () => replicate.predictions.create({ version, input: { prompt: "x", max_tokens: "lots" } }), "by version");
  assert(e.message.includes("max_tokens"), `the error does not name max_tokens: ${e.message}`);
});

await check("404 for an unknown model and an unknown prediction", async () => {
  await expectApiError(404, () => replicate.run("nobody/nothing", { input: { prompt: "x" } }), "run nobody/nothing");
  await expectApiError(404, () => replicate.models.get("nobody", "nothing"), "models.get nobody/nothing");
  await expectApiError(404, () => replicate.predictions.get("nosuchprediction0000000000"), "predictions.get");
});

await check("401 for a bad token", async () => {
  const bad = new Replicate({ auth: "not-the-token", baseUrl: `${BASE}/v1` });
  await expectApiError(401, () => bad.models.get(OWNER, NAME), "a bad token");
});

// --- webhooks --------------------------------------------------------------------------

await check("webhook (completed) arrives once and passes validateWebhook with the default secret", async () => {
  const deliveries = [];
  let arrived;
  const first = new Promise((resolve) => (arrived = resolve));
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      deliveries.push({ path: req.url, headers: req.headers, body: Buffer.concat(chunks).toString("utf8") });
      res.writeHead(200, { "Content-Length": "0" });
      res.end();
      arrived();
    });
  });
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  const d = deadline(30 * 1000, "webhook");
  try {
    const port = server.address().port;
    const p = await replicate.predictions.create({
      model: MODEL,
      input: SHORT,
      webhook: `http://127.0.0.1:${port}/hook`,
      webhook_events_filter: ["completed"],
    });
    await Promise.race([first, d.promise]);
    await sleep(1000); // a second (wrong) delivery would show up here
    assert(deliveries.length === 1, `${deliveries.length} deliveries for a completed-only filter`);
    const { path, headers, body } = deliveries[0];
    assert(path === "/hook", path);
    const { key } = await replicate.webhooks.default.secret.get();
    assert(typeof key === "string" && key.startsWith("whsec_"), `secret ${key}`);
    assert((await validateWebhook({ headers, body }, key)) === true, "validateWebhook({headers, body}, secret) rejected the signature");
    const byFields = await validateWebhook({
      id: headers["webhook-id"],
      timestamp: headers["webhook-timestamp"],
      signature: headers["webhook-signature"],
      body,
      secret: key,
    });
    assert(byFields === true, "validateWebhook({id, timestamp, signature, body, secret}) rejected the signature");
    assert((await validateWebhook({ headers, body: `${body} ` }, key)) === false, "a tampered body passed");
    const sent = JSON.parse(body);
    assert(sent.id === p.id, `webhook for ${sent.id}, created ${p.id}`);
    assert(sent.status === "succeeded", sent.status);
    assert(text(sent.output).length > 0, `webhook without output: ${body.slice(0, 200)}`);
  } finally {
    d.clear();
    server.closeAllConnections?.();
    server.close();
  }
});

if (failed.length) console.log(`failed checks: ${failed.join("; ")}`);
console.log(`js: ${passed.length} passed, ${failed.length} failed`);
process.exit(failed.length ? 1 : 0);
