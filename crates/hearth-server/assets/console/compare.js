// The comparison view: for every model with a canary or shadow route, the two sides
// side by side from /v1/hearth/compare (counts, failures by kind, latency, time to
// first output, tokens/s), the latency percentiles drawn per side, and for shadow
// routes the copies (sent, skipped and why) and how the pairs' outputs agreed.

import { api, el } from "./api.js";
import { fmt } from "./chart.js";

const POLL_MS = 2000;
const NS = "http://www.w3.org/2000/svg";
const W = 320, H = 120, L = 40, B = 18, T = 8;

function svgEl(tag, attrs, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function secs(v) { return v === null || v === undefined ? "–" : fmt(v * 1000) + " ms"; }
function pct(v) { return v === null || v === undefined ? "–" : (v * 100).toFixed(1) + "%"; }

// Latency p50/p95/p99 of each side as grouped bars (local, upstream).
function latencyChart(local, upstream) {
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" });
  svg.append(svgEl("title", {}, "Latency percentiles by side"));
  const qs = ["p50", "p95", "p99"];
  const vals = qs.flatMap((q) => [local[q], upstream[q]]).filter((v) => v !== null && v !== undefined);
  const max = Math.max(1e-9, ...vals);
  const gw = (W - L - 8) / qs.length;
  svg.append(svgEl("text", { x: L - 4, y: T + 8, class: "tick end" }, secs(max)));
  qs.forEach((q, i) => {
    [[local, "bar"], [upstream, "bar alt"]].forEach(([s, cls], j) => {
      const v = s[q];
      const h = v ? (v / max) * (H - T - B) : 0;
      const r = svgEl("rect", { x: L + i * gw + 4 + j * (gw / 2 - 4), y: H - B - h, width: gw / 2 - 6, height: h, class: cls });
      r.append(svgEl("title", {}, `${j ? "upstream" : "local"} ${q}: ${secs(v)}`));
      svg.append(r);
    });
    svg.append(svgEl("text", { x: L + i * gw + gw / 2, y: H - 4, class: "tick" }, q));
  });
  return svg;
}

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
    el("figure", {}, latencyChart(m.sides.local.latency_seconds, m.sides.upstream.latency_seconds),
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
