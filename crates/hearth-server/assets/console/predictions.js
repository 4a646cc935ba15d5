// The predictions list: newest first, a page at a time (the API's cursor), filtered
// by status, with a search by id; each row links to the prediction's page and a
// running one can be canceled from here.

import { api, el, localPath, statusBadge, terminal } from "./api.js";

const STATUSES = ["", "starting", "processing", "succeeded", "failed", "canceled"];
/** Pages read ahead to fill a filtered view before asking for "More". */
const READ_AHEAD = 5;

function duration(p) {
  const m = p.metrics || {};
  if (typeof m.predict_time === "number") return m.predict_time.toFixed(2) + " s";
  if (p.started_at && !p.completed_at) return ((Date.now() - Date.parse(p.started_at)) / 1000).toFixed(0) + " s…";
  return "";
}

function preview(p) {
  const i = p.input || {};
  const s = typeof i.prompt === "string" ? i.prompt : (Array.isArray(i.messages) ? "(chat)" : JSON.stringify(i));
  return s.length > 80 ? s.slice(0, 79) + "…" : s;
}

export async function predictionsPage(main, params) {
  const filter = el("select", { id: "status-filter", "aria-label": "status" },
    STATUSES.map((s) => el("option", { value: s }, s || "all statuses")));
  filter.value = STATUSES.includes(params.get("status") || "") ? params.get("status") || "" : "";
  const search = el("input", { id: "id-search", type: "search", placeholder: "Prediction id", "aria-label": "prediction id" });
  const searchBtn = el("button", { type: "submit" }, "Find");
  const body = el("tbody", { id: "predictions-body" });
  const more = el("button", { type: "button", id: "more", hidden: true }, "More");
  const note = el("div", { class: "sub", id: "list-note" });
  let next = null, rows = [];

  function row(p) {
    const cancel = terminal(p.status) ? "" : el("button", {
      type: "button", class: "small", onclick: async (e) => {
        e.target.disabled = true;
        try { await api(`/v1/predictions/${encodeURIComponent(p.id)}/cancel`, { method: "POST" }); } catch (err) { note.textContent = err.message; }
        reload();
      },
    }, "Cancel");
    const link = p.urls && p.urls.web
      ? el("a", { href: localPath(p.urls.web), target: "_blank", rel: "noopener noreferrer" }, p.id) : p.id;
    return el("tr", { "data-id": p.id, "data-status": p.status },
      el("td", {}, el("code", {}, link)), el("td", {}, p.model || ""), el("td", {}, statusBadge(p.status)),
      el("td", { class: "muted" }, preview(p)), el("td", {}, (p.created_at || "").replace("T", " ").slice(0, 19)),
      el("td", {}, duration(p)), el("td", {}, cancel));
  }

  function render() {
    const want = filter.value;
    const shown = rows.filter((p) => !want || p.status === want);
    body.replaceChildren(...shown.map(row));
    if (!shown.length) body.append(el("tr", {}, el("td", { colspan: 7, class: "muted" }, rows.length ? "No prediction with this status among those loaded." : "No predictions yet.")));
    more.hidden = !next;
    note.textContent = `${shown.length} shown of ${rows.length} loaded${next ? " (more on the server)" : ""}`;
  }

  async function load(url) {
    const page = await api(url);
    rows = rows.concat(page.results || []);
    next = page.next ? localPath(page.next) : null;
  }

  /** Reads pages until the filter shows a screenful or READ_AHEAD pages were read. */
  async function fill() {
    for (let i = 0; i < READ_AHEAD && next; i++) {
      if (rows.filter((p) => !filter.value || p.status === filter.value).length >= 25) break;
      await load(next);
    }
    render();
  }

  async function reload() {
    rows = [];
    next = null;
    await load("/v1/predictions");
    await fill();
  }

  filter.addEventListener("change", () => {
    const q = filter.value ? "?status=" + filter.value : "";
    history.replaceState(null, "", "#/predictions" + q);
    fill().catch((e) => { note.textContent = e.message; });
  });
  more.addEventListener("click", async () => {
    if (!next) return;
    await load(next);
    await fill();
  });
  const searchForm = el("form", {
    class: "inline", novalidate: true, onsubmit: async (e) => {
      e.preventDefault();
      const id = search.value.trim();
      if (!id) return reload();
      try {
        const p = await api(`/v1/predictions/${encodeURIComponent(id)}`);
        rows = [p];
        next = null;
        filter.value = "";
        render();
      } catch (err) {
        body.replaceChildren(el("tr", {}, el("td", { colspan: 7, class: "error" }, err.status === 404 ? `No prediction ${id}.` : err.message)));
        note.textContent = "";
      }
    },
  }, search, searchBtn);

  main.replaceChildren(
    el("div", { class: "page-head" }, el("h1", {}, "Predictions"),
      el("div", { class: "toolbar" }, filter, searchForm, el("button", { type: "button", onclick: () => reload() }, "Refresh"))),
    el("table", { class: "list" },
      el("thead", {}, el("tr", {}, ["Id", "Model", "Status", "Input", "Created (UTC)", "Time", ""].map((h) => el("th", {}, h)))),
      body),
    el("div", { class: "actions left" }, more, note));
  await reload();
}
