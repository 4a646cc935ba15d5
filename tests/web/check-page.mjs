// The prediction page (`urls.web`) in headless Chromium: loaded with no API token, it
// must show a finished prediction whole and a running one as it streams.
// Usage: node check-page.mjs BASE_URL API_TOKEN OUT_DIR
import { chromium } from "playwright-core";

const [base, token, outDir] = process.argv.slice(2);
let failed = 0;
const check = (name, ok, detail = "") => {
  console.log(`${ok ? "ok  " : "FAIL"} ${name}${ok ? "" : "  " + detail}`);
  if (!ok) failed++;
};

async function create(input, wait) {
  const r = await fetch(`${base}/v1/models/hearth/demo/predictions`, {
    method: "POST",
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json", ...(wait ? { Prefer: "wait" } : {}) },
    body: JSON.stringify({ input }),
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
  const page = await browser.newPage({ viewport: { width: 1000, height: 900 } });
  const requests = [];
  page.on("request", (r) => requests.push(r));
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });

  // A finished prediction.
  const done = await create({ prompt: "Show me on a page", max_tokens: 24, seed: 1 }, true);
  await page.goto(done.urls.web);
  await page.waitForFunction(() => document.getElementById("status").textContent === "succeeded", null, { timeout: 10000 });
  check("finished: status", true);
  const out = await page.textContent("#output");
  check("finished: the whole output", out === done.output.join(""), JSON.stringify(out));
  check("finished: metrics listed", (await page.textContent("#metrics")).includes("predict_time"));
  check("finished: input shown", (await page.textContent("#input")).includes("Show me on a page"));
  check("no request carried an Authorization header",
    (await Promise.all(requests.map((r) => r.allHeaders()))).every((h) => !("authorization" in h)));
  await page.screenshot({ path: `${outDir}/finished.png`, fullPage: true });

  // A running one: output appears over the stream while the status says so.
  const live = await create({ prompt: "stream to the page", max_tokens: 6000, ignore_eos: true });
  await page.goto(live.urls.web);
  await page.waitForFunction(() => document.getElementById("output").textContent.length > 0, null, { timeout: 10000 });
  const status = await page.textContent("#status");
  const first = (await page.textContent("#output")).length;
  check("running: status while streaming", status === "processing" || status === "starting", status);
  await page.screenshot({ path: `${outDir}/running.png` });
  await page.waitForTimeout(700);
  const later = (await page.textContent("#output")).length;
  check("running: output grows without a reload", later > first, `${first} -> ${later}`);
  await page.waitForFunction(() => document.getElementById("status").textContent === "succeeded", null, { timeout: 30000 });
  const final = await (await fetch(`${base}/v1/predictions/${live.id}`, { headers: { Authorization: `Bearer ${token}` } })).json();
  check("running: ends with the stored output", (await page.textContent("#output")) === final.output.join(""));
  check("no script errors (CSP included)", errors.length === 0, errors.join(" | "));
} finally {
  await browser.close();
}
console.log(`web page: ${failed ? "FAILED" : "passed"}; screenshots in ${outDir}`);
process.exit(failed ? 1 : 0);
