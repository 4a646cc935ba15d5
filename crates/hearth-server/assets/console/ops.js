// The operations view: per model, the engine's state and the last minutes of its
// numbers (requests running and waiting, KV-cache use, tokens/s, TTFT and TPOT, how
// predictions ended) from /v1/console/ops, redrawn every second, plus the latest
// failed predictions and their errors. A model routed to an upstream also gets its
// local and upstream sides compared, and each upstream a panel (ops_upstream.js).

import { api, el, localPath } from "./api.js";
import { barChart, fmt, lineChart } from "./chart.js";
import { sidesPanel, upstreamPanel } from "./ops_upstream.js";

const POLL_MS = 1000;
const ERRORS_EVERY = 5;

function stat(label, value, id) {
  return el("div", { class: "stat" }, el("div", { class: "stat-label" }, label), el("div", { class: "stat-value", "data-stat": id }, value));
}

function ms(s) { return s === null || s === undefined ? "–" : fmt(s * 1000) + " ms"; }

function modelCard(m) {
  if (!m.engine) {
    return el("section", { class: "panel ops-model", "data-model": m.model },
      el("h2", {}, m.model, " ", el("span", { class: "state " + m.state, "data-state": m.state }, "upstream only")),
      el("p", { class: "sub" }, "No engine here: every prediction runs upstream (route " + (m.route || "?") + ")."),
      m.sides ? sidesPanel(m) : null);
  }
  const s = m.samples || [];
  const last = s[s.length - 1] || {};
  const pts = (f) => s.map((x) => [x.t, f(x)]);
  const kv = last.kv_total ? last.kv_used / last.kv_total : 0;
  const pct = (d) => (d && d.count ? `p50 ≤${ms(d.p50)} · p90 ≤${ms(d.p90)} · p99 ≤${ms(d.p99)} (${d.count})` : "no requests in the window");
  const charts = el("div", { class: "charts" },
    el("figure", {}, lineChart("Requests", [
      { name: "running", points: pts((x) => x.running) },
      { name: "waiting", points: pts((x) => x.waiting) }]), el("figcaption", {}, "Requests running / waiting")),
    el("figure", {}, lineChart("KV cache", [{ name: "KV use", points: pts((x) => (x.kv_total ? x.kv_used / x.kv_total : 0)) }], { yMax: 1 }),
      el("figcaption", {}, "KV-cache use (fraction of blocks)")),
    el("figure", {}, lineChart("Throughput", [{ name: "tokens/s", points: pts((x) => x.tokens_per_s) }]), el("figcaption", {}, "Generated tokens per second")),
    el("figure", {}, lineChart("Latency", [
      { name: "TTFT", points: pts((x) => (x.ttft_mean_s === null ? null : x.ttft_mean_s * 1000)) },
      { name: "TPOT", points: pts((x) => (x.tpot_mean_s === null ? null : x.tpot_mean_s * 1000)) }], { unit: "" }),
      el("figcaption", {}, "Mean TTFT and TPOT per second (ms)")),
    el("figure", {}, lineChart("Finished", [
      { name: "succeeded", points: pts((x) => x.succeeded) },
      { name: "failed", points: pts((x) => x.failed) },
      { name: "canceled", points: pts((x) => x.canceled) }]), el("figcaption", {}, "Predictions ended per second")),
    m.ttft ? el("figure", {}, barChart("TTFT distribution", m.ttft.bounds, m.ttft.counts, m.ttft.over),
      el("figcaption", {}, "TTFT: " + pct(m.ttft))) : null,
    m.tpot ? el("figure", {}, barChart("TPOT distribution", m.tpot.bounds, m.tpot.counts, m.tpot.over),
      el("figcaption", {}, "TPOT: " + pct(m.tpot))) : null);
  return el("section", { class: "panel ops-model", "data-model": m.model },
    el("h2", {}, m.model, " ", el("span", { class: "state " + m.state, "data-state": m.state }, m.state)),
    el("div", { class: "stats" },
      stat("running", String(last.running ?? "–"), "running"), stat("waiting", String(last.waiting ?? "–"), "waiting"),
      stat("KV cache", last.kv_total ? `${(kv * 100).toFixed(1)}% of ${last.kv_total}` : "–", "kv"),
      stat("tokens/s", fmt(last.tokens_per_s), "tps"),
      stat("TTFT p50", ms(m.ttft && m.ttft.p50), "ttft"), stat("TPOT p50", ms(m.tpot && m.tpot.p50), "tpot")),
    charts, m.sides ? sidesPanel(m) : null);
}

export async function opsPage(main, ctx) {
  const models = el("div", { id: "ops-models" });
  const upstreams = el("div", { id: "ops-upstreams" });
  const errors = el("tbody", { id: "ops-errors" });
  const updated = el("span", { class: "sub", id: "ops-updated" });
  main.replaceChildren(
    el("div", { class: "page-head" }, el("h1", {}, "Operations"), updated),
    models, upstreams,
    el("section", { class: "panel" }, el("h2", {}, "Recent errors"),
      el("table", { class: "list" }, el("thead", {}, el("tr", {}, ["Id", "Model", "Created (UTC)", "Error"].map((h) => el("th", {}, h)))), errors)));
  let n = 0;
  const tick = async () => {
    if (!ctx.alive()) return;
    try {
      const ops = await api("/v1/console/ops");
      models.replaceChildren(...(ops.models || []).map(modelCard));
      upstreams.replaceChildren(...(ops.upstreams || []).map(upstreamPanel));
      updated.textContent = `updated ${new Date().toLocaleTimeString()} · ${ops.keep} samples of ${ops.interval_s} s kept`;
      if (n++ % ERRORS_EVERY === 0) {
        // The store's status filter (its index): the latest failures however many
        // predictions succeeded since.
        const page = await api("/v1/predictions?status=failed");
        const failed = (page.results || []).filter((p) => p.status === "failed").slice(0, 8);
        errors.replaceChildren(...(failed.length ? failed.map((p) => el("tr", {},
          el("td", {}, el("code", {}, p.urls && p.urls.web ? el("a", { href: localPath(p.urls.web), target: "_blank", rel: "noopener noreferrer" }, p.id) : p.id)),
          el("td", {}, p.model || ""), el("td", {}, (p.created_at || "").replace("T", " ").slice(0, 19)),
          el("td", { class: "error" }, String(p.error || "")))) : [el("tr", {}, el("td", { colspan: 4, class: "muted" }, "No failed predictions."))]));
      }
    } catch (e) {
      updated.textContent = "update failed: " + e.message;
    }
    setTimeout(tick, POLL_MS);
  };
  await tick();
}
