// The comparison view: for every model with a canary or shadow route, the two sides
// side by side from /v1/hearth/compare (counts, failures by kind, latency, time to
// first output, tokens/s), the latency percentiles drawn per side, and for shadow
// routes the copies (sent, skipped and why) and how the pairs' outputs agreed.

import { api, el } from "./api.js";
import { fmt, sideBars } from "./chart.js";

const POLL_MS = 2000;

function secs(v) { return v === null || v === undefined ? "–" : fmt(v * 1000) + " ms"; }
function pct(v) { return v === null || v === undefined ? "–" : (v * 100).toFixed(1) + "%"; }

function sideRow(name, s) {
  const f = s.failed || {};
  return el("tr", { "data-side": name }, [
    name, s.role, String(s.count), String(s.succeeded), pct(s.failure_rate),
    String(f.validation), String(f.timeout), String(f.upstream_5xx), String(f.engine),
    secs(s.latency_seconds.p50), secs(s.latency_seconds.p95), secs(s.latency_seconds.p99),
    secs(s.time_to_first_output_seconds.p50), fmt(s.output_tokens_per_second.p50),
  ].map((c) => el("td", {}, c)));
}

function modelCard(m) {
  const head = ["Side", "Role", "Count", "Succeeded", "Failed", "Validation", "Timeout", "Upstream 5xx", "Engine",
    "p50", "p95", "p99", "First output p50", "Tokens/s p50"];
  const parts = [
    el("h2", {}, m.model, " ", el("span", { class: "sub" }, "route " + m.route)),
    el("table", { class: "list compare" }, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))),
      el("tbody", {}, sideRow("local", m.sides.local), sideRow("upstream", m.sides.upstream))),
    el("figure", {}, sideBars("Latency percentiles by side", ["p50", "p95", "p99"], m.sides.local.latency_seconds, m.sides.upstream.latency_seconds),
      el("figcaption", {}, "Create to end, p50 / p95 / p99: local (left), upstream (right)")),
  ];
  const sh = m.shadow;
  if (sh) {
    const k = sh.skipped, a = sh.agreement;
    parts.push(el("p", { "data-shadow": "copies" },
      `Shadow copies: ${sh.eligible} eligible = ${sh.copies} sent + ${sh.skipped_total} skipped ` +
      `(concurrency ${k.concurrency}, rate ${k.rate}, circuit ${k.circuit}, throttled ${k.throttled}, draining ${k.draining}, local engine ${k.local_engine}); ${sh.in_flight} in flight.`));
    parts.push(el("p", { "data-shadow": "agreement" },
      `Agreement: ${a.pairs} pairs ended, ${a.compared} compared, exact ${pct(a.exact_rate)}; ` +
      `text similarity mean ${fmt(a.text.similarity_mean)}, p10 ${fmt(a.text.similarity_p10)}, above 0.9 ${pct(a.text.above_0_9_rate)}; ` +
      `files ${a.files.pairs} (${a.files.same_type_size_within_10pct} same type and size within 10%, ${a.files.size_unknown} unknown).`));
  }
  return el("section", { class: "panel compare-model", "data-model": m.model }, parts);
}

export async function comparePage(main, ctx) {
  const models = el("div", { id: "compare-models" });
  const updated = el("span", { class: "sub", id: "compare-updated" });
  main.replaceChildren(el("div", { class: "page-head" }, el("h1", {}, "Comparison"), updated), models);
  const tick = async () => {
    if (!ctx.alive()) return;
    try {
      const c = await api("/v1/hearth/compare");
      const list = c.models || [];
      models.replaceChildren(...(list.length ? list.map(modelCard) : [el("p", {}, "No model has a canary or shadow route.")]));
      updated.textContent = `updated ${new Date().toLocaleTimeString()} · ${c.note || ""}`;
    } catch (e) {
      updated.textContent = "update failed: " + e.message;
    }
    setTimeout(tick, POLL_MS);
  };
  await tick();
}
