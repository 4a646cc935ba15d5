// The console (/ui) in headless Chromium: the token asked for and kept out of URLs,
// the form generated from the demo model's schema (the seed's bound exact), a run
// streaming before it ends, a long one canceled, the chat for the demo (a chat model)
// and none for hearth/base (no chat template), the predictions list filtered on the
// server and searched by the start of an id, model output shown as text, and the operations charts moving
// under a short load.
// With FRONT_URL (a hearth routing hearth/demo to BASE_URL only): that model listed as
// upstream and chat, and its chat view running turns through the Replicate API.
// Usage: node check-console.mjs BASE_URL API_TOKEN OUT_DIR [FRONT_URL]
import { chromium } from "playwright-core";

const [base, token, outDir, front] = process.argv.slice(2);
let failed = 0;
const check = (name, ok, detail = "") => {
  console.log(`${ok ? "ok  " : "FAIL"} console: ${name}${ok ? "" : "  " + detail}`);
  if (!ok) failed++;
};
// Generous: CI shares its cores; every wait ends as soon as its condition holds.
const WAIT = 90000;
const auth = { Authorization: `Bearer ${token}` };

async function create(input) {
  const r = await fetch(`${base}/v1/models/hearth/demo/predictions`, {
    method: "POST", headers: { ...auth, "Content-Type": "application/json" }, body: JSON.stringify({ input }),
  });
  if (r.status !== 201) throw new Error(`create: ${r.status} ${await r.text()}`);
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
  page.on("request", (r) => requests.push(r));
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  // Chromium logs every 4xx; the two the check provokes (no token, an unknown id) are expected.
  page.on("console", (m) => {
    const expected = /status of 401/.test(m.text()) || (/status of 404/.test(m.text()) && /\/v1\/predictions\/zz9$/.test(m.location().url));
    if (m.type() === "error" && !expected) errors.push(m.text() + " " + m.location().url);
  });
  const shot = (name) => page.screenshot({ path: `${outDir}/console-${name}.png`, fullPage: true });
  const text = (sel) => page.textContent(sel);

  // `/` from a browser lands on the console, which asks for the token.
  await page.goto(base + "/");
  check("/ sends a browser to /ui", new URL(page.url()).pathname === "/ui", page.url());
  await page.waitForSelector("#token-panel:not([hidden])", { timeout: WAIT });
  await page.waitForSelector("#page-error", { timeout: WAIT });
  check("without a token nothing is shown but the prompt", (await page.$$(".card")).length === 0);
  await shot("token");
  await page.fill("#token-input", "not-the-token");
  await page.click("#token-form button[type=submit]");
  await page.waitForSelector("#token-panel:not([hidden])", { timeout: WAIT });
  check("a wrong token is refused", (await text("#token-note")).includes("refused"), await text("#token-note"));
  await page.fill("#token-input", token);
  await page.click("#token-form button[type=submit]");
  await page.waitForSelector('.card[data-model="hearth/demo"]', { timeout: WAIT });
  const tags = await page.$$eval(".card[data-model]", (cs) => Object.fromEntries(cs.map((c) => [c.dataset.model, !!c.querySelector("[data-chat]")])));
  check("models: the demo tagged chat, the base model not", tags["hearth/demo"] === true && tags["hearth/base"] === false, JSON.stringify(tags));
  check("token kept in sessionStorage only", await page.evaluate((t) =>
    sessionStorage.getItem("hearth.console.token") === t && localStorage.length === 0 && document.cookie === "", token));
  await shot("models");

  // The form, from the version's schema.
  await page.click('.card[data-model="hearth/demo"]');
  await page.waitForSelector("#in-prompt", { timeout: WAIT });
  const form = await page.evaluate(() => {
    const q = (id) => document.getElementById(id);
    return {
      prompt: q("in-prompt").tagName, maxType: q("in-max_tokens").type, maxMin: q("in-max_tokens").min,
      maxMax: q("in-max_tokens").max, temp: q("in-temperature").value, tempMax: q("in-temperature").max,
      eos: q("in-ignore_eos").type, structured: !!document.querySelector("details.structured #in-json_schema"),
      desc: document.querySelector('[data-field="temperature"] .desc').textContent,
    };
  });
  check("form: prompt is a text area", form.prompt === "TEXTAREA", JSON.stringify(form));
  check("form: integer with its bounds", form.maxType === "number" && form.maxMin === "1" && Number(form.maxMax) > 1, JSON.stringify(form));
  check("form: defaults and maxima from the schema", form.temp === "0.6" && form.tempMax === "5", JSON.stringify(form));
  check("form: boolean as a checkbox", form.eos === "checkbox");
  check("form: structured-output inputs grouped", form.structured);
  check("form: descriptions shown", form.desc.includes("greedy"), form.desc);
  // The seed's maximum is 2^63 - 1: shown and checked exactly, not as a JS number.
  const I64_MAX = "9223372036854775807";
  const seed = await page.evaluate(() => ({
    max: document.getElementById("in-seed").max,
    range: document.querySelector('[data-field="seed"] .range').textContent,
  }));
  check("form: the seed's maximum exact", seed.max === I64_MAX && seed.range.includes(I64_MAX) && !seed.range.includes("6000"), JSON.stringify(seed));
  await page.fill("#in-seed", "9223372036854775808");
  await page.click("#run");
  check("form: a seed past 2^63 - 1 refused in the page", (await text("#err-seed")).includes("at most " + I64_MAX), await text("#err-seed"));
  await page.fill("#in-seed", I64_MAX);
  await page.fill("#in-temperature", "9");
  await page.click("#run");
  check("form: a value past its maximum is refused in the page", (await text("#err-temperature")).includes("at most 5"));
  await page.fill("#in-temperature", "0.6");

  // Run: text arrives while the prediction is still running.
  await page.evaluate(() => {
    window.__seen = [];
    new MutationObserver(() => window.__seen.push({
      len: document.getElementById("run-output").textContent.length,
      status: document.getElementById("run-status").textContent,
    })).observe(document.getElementById("run-output"), { childList: true, characterData: true, subtree: true });
  });
  await page.fill("#in-prompt", "<b>bold?</b> Tell me a story");
  await page.fill("#in-max_tokens", "2000");
  await page.check("#in-ignore_eos");
  await page.click("#run");
  await page.waitForFunction(() => document.getElementById("run-output").textContent.length > 0, null, { timeout: WAIT });
  await shot("running");
  await page.waitForFunction(() => document.querySelector("#run-status .status")?.dataset.status === "succeeded", null, { timeout: WAIT });
  const seen = await page.evaluate(() => window.__seen);
  check("run: streamed text before completion", seen.some((s) => s.len > 0 && !/succeeded/.test(s.status)), JSON.stringify(seen.slice(0, 3)));
  check("run: output updated several times", seen.length > 2, String(seen.length));
  const runId = await text("#run-id");
  const storedText = await (await fetch(`${base}/v1/predictions/${runId}`, { headers: auth })).text();
  check("run: the seed sent digit for digit", storedText.includes(`"seed":${I64_MAX}`), storedText.slice(0, 300));
  const stored = JSON.parse(storedText);
  check("run: the page ends with the stored output", (await text("#run-output")) === stored.output.join(""));
  check("run: link to the prediction page", (await page.getAttribute("#run-link", "href")) === new URL(stored.urls.web).pathname);
  check("run: metrics shown", (await text("#run-metrics")).includes("predict_time"));
  await shot("finished");

  // A long one, canceled.
  await page.fill("#in-seed", "");
  await page.fill("#in-max_tokens", "6000");
  await page.click("#run");
  await page.waitForFunction(() => document.getElementById("run-output").textContent.length > 0, null, { timeout: WAIT });
  await page.click("#cancel");
  await page.waitForFunction(() => document.querySelector("#run-status .status")?.dataset.status === "canceled", null, { timeout: WAIT });
  const canceledId = await text("#run-id");
  const c = await (await fetch(`${base}/v1/predictions/${canceledId}`, { headers: auth })).json();
  check("cancel: the server canceled it", c.status === "canceled", c.status);

  // Chat over the OpenAI endpoint.
  await page.goto(base + "/ui#/models/hearth/demo/chat");
  await page.waitForSelector("#chat-input", { timeout: WAIT });
  await page.fill("#chat-max-tokens", "40");
  await page.fill("#chat-input", "<script>alert(1)</script> hello");
  await page.click("#chat-send");
  await page.waitForFunction(() => /first token/.test(document.getElementById("chat-info").textContent), null, { timeout: WAIT });
  const chat = await page.evaluate(() => ({
    user: document.querySelector(".msg.user .content").textContent,
    userChildren: document.querySelector(".msg.user .content").childElementCount,
    reply: document.querySelector(".msg.assistant .content").textContent,
    scripts: document.querySelectorAll("main script").length,
  }));
  check("chat: the message shown as text", chat.user === "<script>alert(1)</script> hello" && chat.userChildren === 0 && chat.scripts === 0, JSON.stringify(chat));
  check("chat: a streamed reply", chat.reply.length > 0, JSON.stringify(chat));
  await shot("chat");
  check("chat: the demo's playground has a Chat tab", (await page.$("#tab-chat")) !== null);

  // A base model (no chat template): no Chat tab, and its chat URL says why.
  await page.goto(base + "/ui#/models/hearth/base");
  await page.waitForSelector("#in-prompt", { timeout: WAIT });
  check("chat: no Chat tab for a model without a chat template", (await page.$("#tab-playground")) !== null && (await page.$("#tab-chat")) === null);
  await page.goto(base + "/ui#/models/hearth/base/chat");
  await page.waitForSelector("#chat-unavailable", { timeout: WAIT });
  check("chat: the base model's chat URL says it is not a chat model", (await page.$("#chat-input")) === null && /not a chat model/.test(await text("#chat-unavailable")));
  await shot("chat-absent");

  // Output that looks like markup stays text on every page (the demo's output is
  // random tokens, so the markup goes in through the input the list previews).
  const marked = await create({ prompt: '<img src=x id="injected">', max_tokens: 4 });
  await page.goto(base + "/ui#/predictions");
  await page.waitForSelector(`tr[data-id="${marked.id}"]`, { timeout: WAIT });
  check("list: markup shown as text", (await page.$("#injected")) === null && (await text(`tr[data-id="${marked.id}"]`)).includes("<img"));
  // The filter is the server's: the page asks GET /v1/predictions?status=… and shows
  // what comes back, so the canceled run is found behind 100 newer ones.
  for (let i = 0; i < 100; i++) await create({ prompt: `filler ${i}`, max_tokens: 1 });
  for (const s of ["canceled", "succeeded"]) {
    await page.selectOption("#status-filter", s);
    await page.waitForFunction((st) => document.getElementById("predictions-body").dataset.filter === st
      && [...document.querySelectorAll("#predictions-body tr[data-id]")].every((r) => r.dataset.status === st), s, { timeout: WAIT });
    const rows = await page.$$eval("#predictions-body tr[data-id]", (rs) => rs.map((r) => r.dataset.status));
    check(`list: filter ${s}`, rows.length > 0 && rows.every((x) => x === s), JSON.stringify(rows));
    check(`list: filter ${s} asked of the server`, requests.some((r) => new URL(r.url()).pathname === "/v1/predictions" && new URL(r.url()).searchParams.get("status") === s));
    if (s === "canceled") {
      check("list: the canceled run found behind 100 newer predictions", (await page.$(`tr[data-id="${canceledId}"]`)) !== null);
      await shot("predictions-canceled");
    } else {
      check("list: a full page of succeeded ones, and More", rows.length === 100 && !(await page.$eval("#more", (b) => b.hidden)), String(rows.length));
    }
  }
  await page.selectOption("#status-filter", "");
  // The search is by the start of an id, asked of the server (`id_prefix`) with the
  // status filter and paging.
    const prefix = canceledId.slice(0, 8);
  await page.fill("#id-search", prefix);
  await page.click("form.inline button[type=submit]");
  await page.waitForFunction((id) => {
    const rows = document.querySelectorAll("#predictions-body tr[data-id]");
    return rows.length === 1 && rows[0].dataset.id === id;
  }, canceledId, { timeout: WAIT });
  check("list: search by the start of an id, on the server",
    requests.some((r) => new URL(r.url()).pathname === "/v1/predictions" && new URL(r.url()).searchParams.get("id_prefix") === prefix));
  await page.selectOption("#status-filter", "succeeded");
  await page.waitForFunction(() => /No prediction id starts with .* with this status/.test(document.getElementById("predictions-body").textContent), null, { timeout: WAIT });
  check("list: the search and the status filter together",
    requests.some((r) => { const q = new URL(r.url()).searchParams; return q.get("id_prefix") === prefix && q.get("status") === "succeeded"; }));
  await page.selectOption("#status-filter", "");
  await page.fill("#id-search", "nosuchpredictionid");
  await page.click("form.inline button[type=submit]");
  await page.waitForFunction(() => /No prediction id starts with nosuchpredictionid/.test(document.getElementById("predictions-body").textContent), null, { timeout: WAIT });
  check("list: an unknown id says so", true);
  // Shorter than a prefix search takes: looked up whole.
  await page.fill("#id-search", "zz9");
  await page.click("form.inline button[type=submit]");
  await page.waitForFunction(() => /No prediction zz9 /.test(document.getElementById("predictions-body").textContent), null, { timeout: WAIT });
  check("list: a short id is looked up whole", true);
  await page.fill("#id-search", "");
  await page.click("form.inline button[type=submit]");
  // Back to the whole list: a full first page (the marked one is behind the fillers now).
  await page.waitForFunction(() => document.querySelectorAll("#predictions-body tr[data-id]").length === 100, null, { timeout: WAIT });
  await shot("predictions");

  // Operations: charts present, and moving under a short load (the demo's: the base
  // model has its own panel, idle).
  await page.goto(base + "/ui#/ops");
  await page.waitForSelector('.ops-model[data-model="hearth/demo"] svg.chart', { timeout: WAIT });
  const charts = await page.$$eval(".ops-model svg.chart", (s) => s.length);
  check("ops: charts drawn", charts >= 5, String(charts));
  const tps = () => page.$eval('.ops-model[data-model="hearth/demo"] [data-series="tokens/s"]', (p) => p.getAttribute("d"));
  const before = await tps();
  const load = [];
  for (let i = 0; i < 4; i++) load.push(create({ prompt: `load ${i}`, max_tokens: 800, ignore_eos: true }));
  await Promise.all(load);
  await page.waitForFunction(() => {
    const v = document.querySelector('.ops-model[data-model="hearth/demo"] [data-stat="tps"]');
    return v && v.textContent !== "0" && v.textContent !== "–";
  }, null, { timeout: WAIT });
  await page.waitForFunction(() => Number(document.querySelector('.ops-model[data-model="hearth/demo"] [data-stat="running"]').textContent) > 0, null, { timeout: WAIT }).catch(() => {});
  // The tokens/s figure can already be non-zero from the runs above, so wait for the
  // chart itself to redraw with a new sample (one a second) rather than reading it once.
  const after = await page
    .waitForFunction((b) => {
      const d = document.querySelector('.ops-model[data-model="hearth/demo"] [data-series="tokens/s"]')?.getAttribute("d");
      return d && d !== b && /L/.test(d) ? d : null;
    }, before, { timeout: WAIT })
    .then((h) => h.jsonValue())
    .catch(async () => tps());
  await shot("ops");
  check("ops: tokens/s chart moved under load", before !== after && /L/.test(after), `${before} -> ${after}`);
  check("ops: state shown", (await text('.ops-model[data-model="hearth/demo"] .state')) === "READY");
  await page.waitForFunction(() => !/no requests/.test(document.querySelector('.ops-model[data-model="hearth/demo"] figure:nth-of-type(6) figcaption')?.textContent || "no requests"), null, { timeout: WAIT });
  check("ops: TTFT distribution has the requests", /p50/.test(await page.textContent('.ops-model[data-model="hearth/demo"] figure:nth-of-type(6) figcaption')));

  // A chat model that runs upstream only, on the front (another origin: the token is
  // asked for again there). The chat view runs turns as predictions, streamed.
  if (front) {
    await page.goto(front + "/ui");
    await page.waitForSelector("#token-panel:not([hidden])", { timeout: WAIT });
    await page.fill("#token-input", token);
    await page.click("#token-form button[type=submit]");
    await page.waitForSelector('.card[data-model="hearth/demo"]', { timeout: WAIT });
    const card = await page.$eval('.card[data-model="hearth/demo"]', (c) => ({
      route: c.dataset.route, chat: !!c.querySelector("[data-chat]"), upstream: c.querySelector("[data-upstream]")?.textContent,
    }));
    check("upstream: the upstream-only model listed, tagged chat and with its route",
      card.chat && card.route === "upstream:up" && card.upstream === "upstream:up", JSON.stringify(card));
    await page.goto(front + "/ui#/models/hearth/demo/chat");
    await page.waitForSelector("#chat-input", { timeout: WAIT });
    check("upstream: the chat view says how it runs", /upstream:up/.test(await text("#chat-via")), await text("#chat-via"));
    await page.fill("#chat-max-tokens", "24");
    for (const [i, msg] of ["hello upstream", "and a second turn"].entries()) {
      await page.fill("#chat-input", msg);
      await page.click("#chat-send");
      await page.waitForFunction((n) => document.querySelectorAll("#chat-log .msg.assistant").length === n
        && !document.querySelector("#chat-log .typing")
        && /finish: succeeded/.test(document.getElementById("chat-info").textContent), i + 1, { timeout: WAIT });
    }
    const up = await page.evaluate(() => ({
      replies: [...document.querySelectorAll("#chat-log .msg.assistant .content")].map((c) => c.textContent),
      failed: document.querySelectorAll("#chat-log .msg.failed").length,
    }));
    // Each turn ended "succeeded" (waited for above); the demo's random tokens may end
    // one at once with its end-of-sequence token, so one non-empty reply is asked for.
    check("upstream: two turns answered, streamed", up.replies.length === 2 && up.replies.some((r) => r.length > 0) && up.failed === 0, JSON.stringify(up));
    const sent = requests.filter((r) => r.method() === "POST" && r.url().startsWith(front) && new URL(r.url()).pathname === "/v1/models/hearth/demo/predictions").map((r) => JSON.parse(r.postData()));
    check("upstream: turns sent through the Replicate API, the second with the first as a transcript",
      sent.length === 2 && sent[1].input.prompt.includes("User: hello upstream") && sent[1].input.prompt.includes("and a second turn") && sent[1].stream === true,
      JSON.stringify(sent));
    check("upstream: each turn streamed over its stream URL", requests.filter((r) => r.url().startsWith(front) && new URL(r.url()).pathname.startsWith("/streams/")).length >= 2,
      requests.filter((r) => r.url().startsWith(front)).map((r) => `${r.resourceType()} ${new URL(r.url()).pathname}`).join(" "));
    await shot("chat-upstream");
  }

  // The token: only ever in a header, and only to this origin.
  const all = await Promise.all(requests.map(async (r) => ({ url: r.url(), h: await r.allHeaders() })));
  check("token never in a URL", all.every((r) => !r.url.includes(token)));
  const ours = (u) => u.startsWith(base) || (front && u.startsWith(front)) || u.startsWith("data:");
  check("every request to these servers", all.every((r) => ours(r.url)), all.map((r) => r.url).filter((u) => !ours(u)).join(" "));
  check("API calls carry the token header", all.filter((r) => new URL(r.url).pathname.startsWith("/v1/")).every((r) => !r.h.authorization || r.h.authorization === `Bearer ${token}` || r.h.authorization === "Bearer not-the-token"));
  check("no script errors (CSP included)", errors.length === 0, errors.join(" | "));
} catch (e) {
  failed++;
  console.log("FAIL console: " + (e && e.message ? e.message.split("\n").slice(0, 6).join(" | ") : e));
  try { await browser.contexts()[0]?.pages()[0]?.screenshot({ path: `${outDir}/console-failure.png`, fullPage: true }); } catch { /* the page may be gone */ }
} finally {
  await browser.close();
}
console.log(`console: ${failed ? "FAILED" : "passed"}; screenshots in ${outDir}`);
process.exit(failed ? 1 : 0);
