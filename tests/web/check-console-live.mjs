// The console's live list and hybrid operations in headless Chromium:
// - a running prediction's row in the predictions list turns succeeded by itself (the
//   page asks for that row, not the list again, and is never reloaded), and the
//   asking stops once nothing shown is running;
// - the list filtered by model on the server (`model=`), kept in the URL;
// - on FRONT_URL (a hearth serving hearth/base itself and as a 50% canary on
//   BASE_URL, and hearth/demo on BASE_URL only): the operations view's panels
//   comparing the local engine and the upstream, the upstream-only model's upstream
//   side, and the upstream's own panel (calls, circuit), with neither the upstream's
//   URL nor the token anywhere in the page;
// - a structured-output input (json_schema) through the form, its output following it.
// Usage: node check-console-live.mjs BASE_URL API_TOKEN OUT_DIR FRONT_URL
import { chromium } from "playwright-core";

const [base, token, outDir, front] = process.argv.slice(2);
let failed = 0;
const check = (name, ok, detail = "") => {
  console.log(`${ok ? "ok  " : "FAIL"} console-live: ${name}${ok ? "" : "  " + detail}`);
  if (!ok) failed++;
};
// Generous: CI shares its cores; every wait ends as soon as its condition holds.
const WAIT = Number(process.env.WAIT_MS || 90000);
const auth = { Authorization: `Bearer ${token}` };

async function create(server, model, input, wait) {
  const r = await fetch(`${server}/v1/models/${model}/predictions`, {
    method: "POST", headers: { ...auth, "Content-Type": "application/json", ...(wait ? { Prefer: "wait" } : {}) },
    body: JSON.stringify({ input }),
  });
  if (r.status !== 201) throw new Error(`create ${model}: ${r.status} ${await r.text()}`);
  return r.json();
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
  const requests = [];
  page.on("request", (r) => requests.push({ at: Date.now(), url: r.url(), method: r.method(), body: r.postData() }));
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => {
    if (m.type() === "error" && !/status of 401/.test(m.text())) errors.push(m.text() + " " + m.location().url);
  });
  const shot = (name) => page.screenshot({ path: `${outDir}/console-${name}.png`, fullPage: true });
  const login = async (server) => {
    await page.goto(server + "/ui");
    await page.waitForSelector("#token-panel:not([hidden])", { timeout: WAIT });
    await page.fill("#token-input", token);
    await page.click("#token-form button[type=submit]");
    await page.waitForSelector(".card[data-model]", { timeout: WAIT });
  };
  const path = (u) => new URL(u).pathname;
  let navigations = 0;
  page.on("framenavigated", (f) => { if (f === page.mainFrame()) navigations++; });

  // Each part on its own: one that fails does not hide how the others went.
  const part = async (name, f) => {
    try {
      await f();
    } catch (e) {
      check(name, false, e && e.message ? e.message.split("\n").slice(0, 4).join(" | ") : String(e));
      await shot(`live-failure-${name}`).catch(() => {});
    }
  };

  await login(base);

  // A running row turns succeeded without a reload.
  await part("live", async () => {
    const long = await create(base, "hearth/demo", { prompt: "live row", max_tokens: 6000, ignore_eos: true });
    await page.goto(base + "/ui#/predictions");
    const rowSel = `#predictions-body tr[data-id="${long.id}"]`;
    await page.waitForSelector(rowSel, { timeout: WAIT });
    const first = await page.$eval(rowSel, (r) => r.dataset.status);
    check("live: the long prediction listed while running", first === "starting" || first === "processing", first);
    await page.evaluate(() => { window.__sameDocument = true; });
    const navBefore = navigations;
    const listAsked = () => requests.filter((r) => path(r.url) === "/v1/predictions").length;
    const listBefore = listAsked();
    await shot("list-running");
    await page.waitForFunction((sel) => document.querySelector(sel)?.dataset.status === "succeeded", rowSel, { timeout: WAIT });
    const same = await page.evaluate(() => window.__sameDocument === true);
    check("live: the row turned succeeded in the same page, no reload", same && navigations === navBefore, `${same} ${navigations - navBefore}`);
    check("live: the list itself was not asked for again", listAsked() === listBefore, `${listAsked() - listBefore} more`);
    const rowAsks = requests.filter((r) => path(r.url) === `/v1/predictions/${long.id}`);
    check("live: the running row was asked for by id", rowAsks.length >= 1, String(rowAsks.length));
    check("live: its time shown once ended", /\d+\.\d\d s$/.test(await page.$eval(`${rowSel} td:nth-child(6)`, (t) => t.textContent)));
    await shot("list-live-succeeded");
    // Nothing shown is running now: the page stops asking.
    const settled = Date.now();
    await page.waitForTimeout(5000);
    const after = requests.filter((r) => r.at > settled && /^\/v1\/predictions\/[^/]+$/.test(path(r.url)));
    check("live: no more asking once nothing shown runs", after.length === 0, after.map((r) => r.url).join(" "));
  });

  // A structured-output input through the form: the schema typed as JSON is sent as
  // an object, the output follows it, and text that is not JSON is refused in the page.
  await part("structured", async () => {
    await page.goto(base + "/ui#/models/hearth/demo");
    await page.waitForSelector("#in-prompt", { timeout: WAIT });
    await page.click("details.structured summary");
    await page.fill("#in-json_schema", "{not json");
    await page.click("#run");
    check("structured: a schema that is not JSON refused in the page", /not valid JSON/.test(await page.textContent("#err-json_schema")), await page.textContent("#err-json_schema"));
    const schema = { type: "object", properties: { color: { enum: ["red", "green"] } }, required: ["color"], additionalProperties: false };
    await page.fill("#in-json_schema", JSON.stringify(schema, null, 2));
    await page.fill("#in-prompt", "Pick a color");
    await page.fill("#in-max_tokens", "200");
    await page.click("#run");
    await page.waitForFunction(() => document.querySelector("#run-status .status")?.dataset.status === "succeeded", null, { timeout: WAIT });
    const sent = requests.filter((r) => r.method === "POST" && path(r.url) === "/v1/models/hearth/demo/predictions").map((r) => JSON.parse(r.body)).pop();
    check("structured: the schema sent as an object", JSON.stringify(sent?.input?.json_schema) === JSON.stringify(schema), JSON.stringify(sent));
    const text = await page.textContent("#run-output");
    let out = null;
    try { out = JSON.parse(text); } catch { out = null; }
    check("structured: the output follows the schema", out !== null && ["red", "green"].includes(out.color) && Object.keys(out).length === 1, text);
    await shot("structured");
  });

  // The list by model, on the server.
  await part("model", async () => {
    await page.goto(base + "/ui#/predictions");
    const bases = [];
    for (let i = 0; i < 2; i++) bases.push((await create(base, "hearth/base", { prompt: `by model ${i}`, max_tokens: 2 }, true)).id);
    await page.reload();
    await page.waitForSelector('#model-filter option[value="hearth/base"]', { state: "attached", timeout: WAIT });
    await page.selectOption("#model-filter", "hearth/base");
    await page.waitForFunction(() => document.getElementById("predictions-body").dataset.model === "hearth/base", null, { timeout: WAIT });
    const byModel = await page.$$eval("#predictions-body tr[data-id]", (rs) => rs.map((r) => [r.dataset.id, r.children[1].textContent]));
    check("model: only hearth/base listed, both of them", byModel.length >= 2 && byModel.every(([, m]) => m === "hearth/base")
      && bases.every((id) => byModel.some(([x]) => x === id)), JSON.stringify(byModel));
    check("model: asked of the server", requests.some((r) => path(r.url) === "/v1/predictions" && new URL(r.url).searchParams.get("model") === "hearth/base"));
    check("model: kept in the URL", new URLSearchParams(new URL(page.url()).hash.split("?")[1] || "").get("model") === "hearth/base", page.url());
    await page.selectOption("#status-filter", "failed");
    await page.waitForFunction(() => /No prediction with this status of hearth\/base/.test(document.getElementById("predictions-body").textContent), null, { timeout: WAIT });
    check("model: with the status filter at once", requests.some((r) => { const q = new URL(r.url).searchParams; return q.get("model") === "hearth/base" && q.get("status") === "failed"; }));
    await page.selectOption("#status-filter", "");
    await page.waitForFunction(() => document.querySelectorAll("#predictions-body tr[data-id]").length >= 2, null, { timeout: WAIT });
    await shot("predictions-by-model");
  });

  // The front's operations: local vs upstream for hearth/base, hearth/demo upstream only.
  await part("ops", async () => {
    await login(front);
    for (let i = 0; i < 12; i++) await create(front, "hearth/base", { prompt: `canary ${i}`, max_tokens: 4 }, true);
    for (let i = 0; i < 2; i++) await create(front, "hearth/demo", { prompt: `upstream ${i}`, max_tokens: 4 }, true);
    await page.goto(front + "/ui#/ops");
    const served = (model, side) => `.ops-sides[data-model="${model}"] tr[data-side="${side}"] [data-served]`;
    await page.waitForFunction(([l, u, d]) => Number(document.querySelector(l)?.textContent) + Number(document.querySelector(u)?.textContent) >= 12
      && Number(document.querySelector(d)?.textContent) >= 2,
    [served("hearth/base", "local"), served("hearth/base", "upstream"), served("hearth/demo", "upstream")], { timeout: WAIT })
      .catch(() => {});
    const sides = await page.evaluate(([l, u, d]) => [l, u, d].map((s) => Number(document.querySelector(s)?.textContent ?? -1)),
      [served("hearth/base", "local"), served("hearth/base", "upstream"), served("hearth/demo", "upstream")]);
    check("ops: hearth/base's local and upstream sides both served (a 50% canary of 12)", sides[0] > 0 && sides[1] > 0 && sides[0] + sides[1] === 12, JSON.stringify(sides));
    // The chat check's turns ran there too.
    check("ops: the upstream-only model's upstream side, no engine", sides[2] >= 2
      && /upstream only/.test(await page.textContent('.ops-model[data-model="hearth/demo"] .state')));
    const charts = await page.$$eval('.ops-sides[data-model="hearth/base"] svg.chart', (s) => s.length);
    check("ops: side-by-side charts drawn", charts === 4, String(charts));
    const bars = await page.$$eval('.ops-sides[data-model="hearth/base"] rect[data-side]', (rs) => rs.filter((r) => Number(r.getAttribute("height")) > 0).map((r) => r.dataset.side));
    check("ops: latency percentiles drawn for both sides", bars.includes("local") && bars.includes("upstream"), JSON.stringify(bars));
    await page.waitForSelector('.ops-upstream[data-upstream="up"]', { timeout: WAIT });
    const up = await page.evaluate(() => ({
      circuit: document.querySelector('.ops-upstream[data-upstream="up"] [data-circuit]').dataset.circuit,
      ok: Number(document.querySelector('.ops-upstream[data-upstream="up"] [data-stat="ok"]').textContent),
    }));
    check("ops: the upstream's panel, its circuit closed and calls counted", up.circuit === "closed" && up.ok > 0, JSON.stringify(up));
    const html = await page.content();
    check("ops: neither the upstream's URL nor the token in the page", !html.includes(new URL(base).host) && !html.includes(token));
    await shot("ops-upstream");
  });

  check("token never in a URL", requests.every((r) => !r.url.includes(token)));
  check("no script errors (CSP included)", errors.length === 0, errors.join(" | "));
} catch (e) {
  failed++;
  console.log("FAIL console-live: " + (e && e.message ? e.message.split("\n").slice(0, 6).join(" | ") : e));
  try { await browser.contexts()[0]?.pages()[0]?.screenshot({ path: `${outDir}/console-live-failure.png`, fullPage: true }); } catch { /* the page may be gone */ }
} finally {
  await browser.close();
}
console.log(`console-live: ${failed ? "FAILED" : "passed"}; screenshots in ${outDir}`);
process.exit(failed ? 1 : 0);
