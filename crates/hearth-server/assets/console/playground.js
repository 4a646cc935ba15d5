// A model's page: its form (form.js), Run creating a prediction and following its
// output over the prediction's stream URL as it is generated, Cancel, and the link
// to the prediction's own page.

import { ApiError, api, el, localPath, modelTabs, outputText, statusBadge, terminal } from "./api.js";
import { schemaForm } from "./form.js";

const FLUSH_MS = 50;

function metricsTable(m) {
  const t = el("table", { class: "metrics" });
  for (const [k, v] of Object.entries(m || {})) {
    t.append(el("tr", {}, el("td", {}, k), el("td", {}, typeof v === "number" ? String(Math.round(v * 1000) / 1000) : String(v))));
  }
  return t;
}

export async function modelPage(main, owner, name, ctx) {
  const model = await api(`/v1/models/${encodeURIComponent(owner)}/${encodeURIComponent(name)}`);
  const version = model.latest_version || {};
  const full = `${model.owner}/${model.name}`;
  main.replaceChildren(
    el("div", { class: "page-head" },
      el("h1", {}, full),
      modelTabs(model, "playground")),
    el("p", { class: "sub" }, model.description || "", " · version ", el("code", {}, String(version.id || "").slice(0, 12)),
      model.max_model_len ? ` · context ${model.max_model_len} tokens` : ""));

  const out = el("pre", { id: "run-output", class: "output", "aria-live": "polite" });
  const status = el("span", { id: "run-status" });
  const link = el("a", { id: "run-link", hidden: true, target: "_blank", rel: "noopener noreferrer" }, "prediction page ↗");
  const idText = el("code", { id: "run-id" });
  const errBox = el("pre", { id: "run-error", class: "error", hidden: true });
  const metrics = el("div", { id: "run-metrics" });
  const runBtn = el("button", { type: "submit", id: "run", class: "primary" }, "Run");
  const cancelBtn = el("button", { type: "button", id: "cancel", disabled: true }, "Cancel");
  const resetBtn = el("button", { type: "button", id: "reset" }, "Reset");

  let current = null; // {id, source}
  const f = schemaForm(version.openapi_schema, run);
  f.form.append(el("div", { class: "actions" }, resetBtn, runBtn));
  resetBtn.addEventListener("click", () => ctx.rerender());

  function show(p) {
    status.replaceChildren(statusBadge(p.status));
    idText.textContent = p.id;
    if (p.urls && p.urls.web) { link.href = localPath(p.urls.web); link.hidden = false; }
    errBox.hidden = !p.error;
    errBox.textContent = p.error ? String(p.error) : "";
    metrics.replaceChildren(metricsTable(p.metrics));
    cancelBtn.disabled = terminal(p.status);
    runBtn.disabled = !terminal(p.status);
  }

  async function finish(id) {
    const p = await api(`/v1/predictions/${encodeURIComponent(id)}`);
    if (!current || current.id !== id) return;
    show(p);
    out.textContent = outputText(p);
    if (terminal(p.status)) { if (current.source) current.source.close(); current = null; }
    else setTimeout(() => finish(id).catch(() => {}), 1000);
  }

  async function run(input) {
    if (current) return;
    errBox.hidden = true;
    out.textContent = "";
    metrics.replaceChildren();
    runBtn.disabled = true;
    let p;
    try {
      p = await api(`/v1/models/${encodeURIComponent(model.owner)}/${encodeURIComponent(model.name)}/predictions`,
        { method: "POST", json: { input, stream: true } });
    } catch (e) {
      runBtn.disabled = false;
      if (e instanceof ApiError) f.showErrors(e.body);
      errBox.hidden = false;
      errBox.textContent = e.message;
      return;
    }
    current = { id: p.id, source: null };
    show(p);
    // The stream URL is a capability URL: EventSource needs no header for it.
    const src = new EventSource(localPath(p.urls.stream));
    current.source = src;
    // Chunks are appended at most every FLUSH_MS: one layout per batch, not per token
    // (a long output redrawn per token starves the page).
    let pending = "", timer = null;
    const flush = () => {
      timer = null;
      if (!current || current.id !== p.id || !pending) return;
      out.append(pending);
      pending = "";
      out.scrollTop = out.scrollHeight;
    };
    src.addEventListener("output", (e) => {
      pending += e.data;
      if (timer === null) timer = setTimeout(flush, FLUSH_MS);
    });
    src.addEventListener("error", (e) => { if (e.data) { errBox.hidden = false; errBox.textContent = e.data; } });
    src.addEventListener("done", () => { src.close(); finish(p.id).catch(() => {}); });
    // Status changes (starting → processing) are not events: poll them meanwhile.
    const poll = async () => {
      if (!current || current.id !== p.id) return;
      try {
        const now = await api(`/v1/predictions/${encodeURIComponent(p.id)}`);
        if (!current || current.id !== p.id) return;
        if (terminal(now.status)) return finish(p.id);
        show(now);
      } catch { /* the stream still runs */ }
      setTimeout(poll, 1000);
    };
    setTimeout(poll, 500);
  }

  cancelBtn.addEventListener("click", async () => {
    if (!current) return;
    cancelBtn.disabled = true;
    try {
      await api(`/v1/predictions/${encodeURIComponent(current.id)}/cancel`, { method: "POST" });
      await finish(current.id);
    } catch (e) { errBox.hidden = false; errBox.textContent = e.message; }
  });

  main.append(el("div", { class: "split" },
    el("section", { class: "panel" }, el("h2", {}, "Input"), f.form),
    // Cancel beside the output it stops, where the eye is while it streams.
    el("section", { class: "panel" }, el("div", { class: "output-head" }, el("h2", {}, "Output"), status, cancelBtn),
      el("div", { class: "sub" }, idText, " ", link), errBox, out, metrics)));
}
