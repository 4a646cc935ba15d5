// Small SVG charts drawn here (no library): a line chart of time series and a bar
// chart of a histogram. Labels are text nodes; nothing is parsed as markup.

const NS = "http://www.w3.org/2000/svg";
const W = 320, H = 120, L = 40, R = 8, T = 8, B = 18;

function svgEl(tag, attrs, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

export function fmt(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a === 0) return "0";
  if (a >= 1000) return (v / 1000).toFixed(a >= 10000 ? 0 : 1) + "k";
  if (a >= 10) return v.toFixed(0);
  if (a >= 1) return v.toFixed(1);
  if (a >= 0.01) return v.toFixed(2);
  return v.toExponential(0);
}

/**
 * Draws `series` ([{name, cls, points: [[t, v|null], …]}]) into a new <svg>.
 * `yMax` fixes the top (e.g. 1 for a fraction); otherwise the data's maximum.
 */
export function lineChart(title, series, { yMax, unit = "" } = {}) {
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" });
  svg.append(svgEl("title", {}, title));
  const all = series.flatMap((s) => s.points.filter((p) => p[1] !== null && Number.isFinite(p[1])));
  const ts = series.flatMap((s) => s.points.map((p) => p[0]));
  const t0 = Math.min(...ts), t1 = Math.max(...ts);
  const top = yMax !== undefined ? yMax : Math.max(1e-9, ...all.map((p) => p[1])) * 1.1;
  const x = (t) => L + (t1 > t0 ? ((t - t0) / (t1 - t0)) * (W - L - R) : 0);
  const y = (v) => T + (1 - Math.min(v, top) / top) * (H - T - B);
  svg.append(svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  svg.append(svgEl("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  svg.append(svgEl("text", { x: L - 4, y: T + 8, class: "tick end" }, fmt(top) + unit));
  svg.append(svgEl("text", { x: L - 4, y: H - B, class: "tick end" }, "0"));
  if (ts.length) svg.append(svgEl("text", { x: W - R, y: H - 4, class: "tick end" }, `last ${Math.round(t1 - t0)} s`));
  series.forEach((s, i) => {
    // A gap (null) breaks the line: no data is not zero.
    let d = "", pen = false;
    for (const [t, v] of s.points) {
      if (v === null || !Number.isFinite(v)) { pen = false; continue; }
      // A point after a gap starts with a dot (a round cap on a tiny step), so a value
      // standing alone between gaps is seen.
      d += pen ? `L${x(t).toFixed(1)},${y(v).toFixed(1)}` : `M${x(t).toFixed(1)},${y(v).toFixed(1)}h0.1`;
      pen = true;
    }
    svg.append(svgEl("path", { d: d || "M0,0", class: "series s" + i, "data-series": s.name, "data-points": String(s.points.length) }));
    svg.append(svgEl("text", { x: L + 6 + i * 90, y: T + 8, class: "legend s" + i }, s.name));
  });
  return svg;
}

/** Bars for a histogram: `bounds` are upper bounds (seconds), `counts` per bucket. */
export function barChart(title, bounds, counts, over) {
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" });
  svg.append(svgEl("title", {}, title));
  const labels = bounds.map((b) => "≤" + fmt(b)).concat(over ? [">" + fmt(bounds[bounds.length - 1])] : []);
  const values = counts.concat(over ? [over] : []);
  const max = Math.max(1, ...values);
  const bw = (W - L - R) / Math.max(1, values.length);
  values.forEach((v, i) => {
    const h = (v / max) * (H - T - B);
    const rect = svgEl("rect", { x: L + i * bw + 1, y: H - B - h, width: Math.max(1, bw - 2), height: h, class: "bar" });
    rect.append(svgEl("title", {}, `${labels[i]} s: ${v}`));
    svg.append(rect);
  });
  svg.append(svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  svg.append(svgEl("text", { x: L - 4, y: T + 8, class: "tick end" }, String(max)));
  for (const i of [0, Math.floor(values.length / 2), values.length - 1]) {
    if (labels[i]) svg.append(svgEl("text", { x: L + i * bw + bw / 2, y: H - 4, class: "tick mid" }, labels[i]));
  }
  return svg;
}

/**
 * Grouped bars, one pair per quantile in `qs`: side `a` (left, "local") and side `b`
 * (right, "upstream"), each an object of values in seconds (null: none).
 */
export function sideBars(title, qs, a, b, names = ["local", "upstream"]) {
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" });
  svg.append(svgEl("title", {}, title));
  const secs = (v) => (v === null || v === undefined ? "–" : fmt(v * 1000) + " ms");
  const vals = qs.flatMap((q) => [a[q], b[q]]).filter((v) => v !== null && v !== undefined);
  const max = Math.max(1e-9, ...vals);
  const gw = (W - L - R) / qs.length;
  svg.append(svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  svg.append(svgEl("text", { x: L - 4, y: T + 8, class: "tick end" }, secs(max)));
  qs.forEach((q, i) => {
    [[a, "bar"], [b, "bar alt"]].forEach(([s, cls], j) => {
      const v = s[q];
      const h = v ? (v / max) * (H - T - B) : 0;
      const r = svgEl("rect", { x: L + i * gw + 4 + j * (gw / 2 - 4), y: H - B - h, width: gw / 2 - 6, height: h, class: cls, "data-side": names[j], "data-q": q });
      r.append(svgEl("title", {}, `${names[j]} ${q}: ${secs(v)}`));
      svg.append(r);
    });
    svg.append(svgEl("text", { x: L + i * gw + gw / 2, y: H - 4, class: "tick mid" }, q));
  });
  names.forEach((n, j) => svg.append(svgEl("text", { x: L + 6 + j * 90, y: T + 8, class: "legend " + (j ? "s1" : "s0") }, n)));
  return svg;
}
