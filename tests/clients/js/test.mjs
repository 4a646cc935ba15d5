// The official Replicate JS client (1.4.0) against a running hearth server.
// Env: REPLICATE_BASE_URL (http://127.0.0.1:PORT, without /v1), REPLICATE_API_TOKEN.
import http from "node:http";
import Replicate, { validateWebhook } from "replicate";

const MODEL = process.env.HEARTH_MODEL_NAME || "hearth/demo";
const BASE = process.env.REPLICATE_BASE_URL.replace(/\/$/, "");
const auth = process.env.REPLICATE_API_TOKEN;
const replicate = new Replicate({ auth, baseUrl: `${BASE}/v1` });
const LONG = { prompt: "a long one", max_tokens: 1900, ignore_eos: true };
const failures = [];

function assert(cond, msg) {
  if (!cond) throw new Error(`assertion failed: ${msg}`);
}
const text = (out) => (Array.isArray(out) ? out.map(String).join("") : String(out));

async function check(name, fn) {
  const started = Date.now();
  try {
    await Promise.race([
      fn(),
      new Promise((_, reject) => setTimeout(() => reject(new Error("timed out after 60s")), 60000)),
    ]);
    console.log(`ok   ${name} (${((Date.now() - started) / 1000).toFixed(2)}s)`);
  } catch (e) {
    failures.push(name);
    console.log(`FAIL ${name}\n${e.stack || e}`);
  }
}

await check("run owner/name", async () => {
  const out = await replicate.run(MODEL, { input: { prompt: "Hello", max_tokens: 8, seed: 1 } });
  assert(text(out).length > 0, JSON.stringify(out));
});

await check("run owner/name:version", async () => {
  const model = await replicate.models.get(...MODEL.split("/"));
  const version = model.latest_version.id;
  assert(version.length === 64, version);
  const out = await replicate.run(`${MODEL}:${version}`, { input: { prompt: "Hello", max_tokens: 8 } });
  assert(text(out).length > 0, JSON.stringify(out));
});

await check("stream, and the same seed gives the same text as run", async () => {
  const input = { prompt: "Tell me", max_tokens: 24, temperature: 0.8, seed: 42, ignore_eos: true };
  let streamed = "";
  let done = false;
  for await (const ev of replicate.stream(MODEL, { input })) {
    if (ev.event === "output") streamed += ev.data;
    if (ev.event === "done") done = true;
  }
  assert(done, "no done event");
  assert(streamed.length > 0, "nothing streamed");
  const ran = text(await replicate.run(MODEL, { input }));
  assert(ran === streamed, `${JSON.stringify(ran)} != ${JSON.stringify(streamed)}`);
});

await check("predictions.create / wait / get / list / paginate", async () => {
  let p = await replicate.predictions.create({ model: MODEL, input: { prompt: "Hi", max_tokens: 6 } });
  p = await replicate.wait(p, { interval: 100 });
  assert(p.status === "succeeded", p.status);
  assert(typeof p.metrics.predict_time === "number", JSON.stringify(p.metrics));
  const got = await replicate.predictions.get(p.id);
  assert(JSON.stringify(got.output) === JSON.stringify(p.output), "get differs");
  const page = await replicate.predictions.list();
  assert(page.results.some((x) => x.id === p.id), "not listed");
  let seen = 0;
  for await (const results of replicate.paginate(replicate.predictions.list)) {
    seen += results.length;
    if (seen > 250) break;
  }
  assert(seen >= 1, "paginate saw nothing");
});

await check("cancel a running prediction", async () => {
  const p = await replicate.predictions.create({ model: MODEL, input: LONG });
  const c = await replicate.predictions.cancel(p.id);
  assert(c.status === "canceled", c.status);
});

await check("predictions.create with wait: 1 on a long job answers starting after ~1s", async () => {
  const started = Date.now();
  const model = await replicate.models.get(...MODEL.split("/"));
  const p = await replicate.predictions.create({ version: model.latest_version.id, input: LONG, wait: 1 });
  const took = (Date.now() - started) / 1000;
  assert(p.status === "starting", p.status);
  assert(took > 0.9 && took < 2.5, `took ${took}s`);
  await replicate.predictions.cancel(p.id);
});

await check("422 names the bad field", async () => {
  try {
    await replicate.run(MODEL, { input: { prompt: "x", max_tokens: "lots" } });
  } catch (e) {
    assert(e.response && e.response.status === 422, `status ${e.response && e.response.status}`);
    assert(String(e.message).includes("max_tokens"), e.message);
    return;
  }
  throw new Error("a bad max_tokens was accepted");
});

await check("404 for an unknown model", async () => {
  try {
    await replicate.run("nobody/nothing", { input: { prompt: "x" } });
  } catch (e) {
    assert(e.response && e.response.status === 404, `status ${e.response && e.response.status}`);
    return;
  }
  throw new Error("an unknown model ran");
});

await check("webhook received and validated with validateWebhook", async () => {
  const received = new Promise((resolve) => {
    const server = http.createServer((req, res) => {
      let body = "";
      req.on("data", (c) => (body += c));
      req.on("end", () => {
        res.end("ok");
        server.close();
        resolve({ headers: req.headers, body });
      });
    });
    server.listen(0, "127.0.0.1", async () => {
      const port = server.address().port;
      await replicate.predictions.create({
        model: MODEL,
        input: { prompt: "hook", max_tokens: 4 },
        webhook: `http://127.0.0.1:${port}/hook`,
        webhook_events_filter: ["completed"],
      });
    });
  });
  const { headers, body } = await received;
  const { key } = await replicate.webhooks.default.secret.get();
  const valid = await validateWebhook({ headers, body }, key);
  assert(valid === true, "signature rejected");
  assert(JSON.parse(body).status === "succeeded", body);
});

if (failures.length) {
  console.log(`${failures.length} check(s) failed: ${failures.join(", ")}`);
  process.exit(1);
}
console.log("all JS client checks passed");
