// The operations view's hybrid panels: for a model whose route uses an upstream, its
// local engine and its upstream side by side (predictions served and failed per
// second, create-to-end latency: mean per second and the window's p50/p90/p99), and
// for each upstream its calls by outcome and its circuit breaker. Upstreams appear by
// name only: the server never sends their URLs or tokens.

import { el } from "./api.js";
import { fmt, lineChart, sideBars } from "./chart.js";

function ms(s) { return s === null || s === undefined ? "–" : fmt(s * 1000) + " ms"; }

function served(x) { return x.succeeded + x.failed + x.canceled; }

/** One side's row of the side-by-side table. */
function sideRow(name, s) {
  const w = s.window || { succeeded: 0, failed: 0, canceled: 0 };
  const n = served(w);
  const l = s.latency || {};
  return el("tr", { "data-side": name }, [
    name, String(n), String(w.succeeded), String(w.failed), n ? (100 * w.failed / n).toFixed(1) + "%" : "–",
    l.count ? "≤" + ms(l.p50) : "–", l.count ? "≤" + ms(l.p90) : "–", l.count ? "≤" + ms(l.p99) : "–",
    String(served(s.total || w)),
  ].map((c, i) => el("td", i === 1 ? { "data-served": "" } : {}, c)));
}

/** The local engine and the upstream of a routed model, side by side. */
export function sidesPanel(m) {
  const { local, upstream } = m.sides;
  const pts = (s, f) => (s.samples || []).map((x) => [x.t, f(x)]);
  const mean = (x) => (x.latency_mean_s === null ? null : x.latency_mean_s * 1000);
  const q = (d) => (d && d.count ? d : {});
  return el("div", { class: "ops-sides", "data-model": m.model },
    el("h3", {}, "Local engine vs upstream ", el("span", { class: "sub" }, "route " + m.route)),
    el("table", { class: "list compare" },
      el("thead", {}, el("tr", {}, ["Side", "Served (window)", "Succeeded", "Failed", "Failure rate",
        "Latency p50", "p90", "p99", "Served since start"].map((h) => el("th", {}, h)))),
      el("tbody", {}, sideRow("local", local), sideRow("upstream", upstream))),
    el("div", { class: "charts" },
      el("figure", {}, lineChart("Served", [
        { name: "local", points: pts(local, served) }, { name: "upstream", points: pts(upstream, served) }]),
      el("figcaption", {}, "Predictions ended per second, by side")),
      el("figure", {}, lineChart("Failed", [
        { name: "local", points: pts(local, (x) => x.failed) }, { name: "upstream", points: pts(upstream, (x) => x.failed) }]),
      el("figcaption", {}, "Failed per second, by side")),
      el("figure", {}, lineChart("Latency", [
        { name: "local", points: pts(local, mean) }, { name: "upstream", points: pts(upstream, mean) }]),
      el("figcaption", {}, "Mean create-to-end latency per second (ms), by side")),
      el("figure", {}, sideBars("Latency percentiles by side", ["p50", "p90", "p99"], q(local.latency), q(upstream.latency)),
        el("figcaption", {}, "Create to end over the window (bucket bounds): local (left), upstream (right)"))));
}

function stat(label, value, id) {
  return el("div", { class: "stat" }, el("div", { class: "stat-label" }, label), el("div", { class: "stat-value", "data-stat": id }, value));
}

/** One upstream: its circuit and its calls per second by outcome. */
export function upstreamPanel(u) {
  const s = u.samples || [];
  const pts = (f) => s.map((x) => [x.t, f(x)]);
  const w = u.window || {};
  return el("section", { class: "panel ops-upstream", "data-upstream": u.name },
    el("h2", {}, "upstream " + u.name, " ",
      el("span", { class: "state circuit-" + u.circuit, "data-circuit": u.circuit }, "circuit " + u.circuit)),
    el("div", { class: "stats" },
      stat("calls ok", String(w.ok ?? 0), "ok"), stat("errors", String(w.errors ?? 0), "errors"),
      stat("throttled", String(w.throttled ?? 0), "throttled"), stat("rejected (4xx)", String(w.rejected ?? 0), "rejected"),
      stat("server errors", String(w.server_error ?? 0), "server_error"), stat("network", String(w.network ?? 0), "network"),
      stat("answer lost", String(w.ambiguous ?? 0), "ambiguous"),
      stat("consecutive failures", String(u.consecutive_failures), "consecutive")),
    el("div", { class: "charts" },
      el("figure", {}, lineChart("Upstream calls", [
        { name: "ok", points: pts((x) => x.ok) }, { name: "errors", points: pts((x) => x.errors) }]),
      el("figcaption", {}, "Calls to the upstream per second: answered, and failed or refused"))),
    el("p", { class: "sub" }, "Counts over the window shown; errors are throttled, rejected, server errors, network failures and lost answers."));
}
