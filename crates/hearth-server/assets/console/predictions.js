// The predictions list: newest first, a page at a time (the API's cursor), filtered
// by status on the server (hearth's `status` parameter of GET /v1/predictions, so a
// filtered page is full and "More" reaches every match), with a search by id (a
// prefix of MIN_PREFIX or more characters: the server's `id_prefix`, with the status
// filter and paging; a shorter one is looked up whole); each row links to the
// prediction's page and a running one can be canceled from here.

import { api, el, localPath, statusBadge, terminal } from "./api.js";
import { toJSON } from "./json.js";

/** The server's shortest `id_prefix` (store::MIN_ID_PREFIX). */
const MIN_PREFIX = 4;
/** How often running rows are asked for, and how many at most each time. */
const LIVE_MS = 2000;
const LIVE_MAX = 20;

/** [value of `status`, label]: "running" is both in-flight statuses. */
const FILTERS = [["", "all statuses"], ["starting,processing", "running"], ["starting", "starting"],
  ["processing", "processing"], ["succeeded", "succeeded"], ["failed", "failed"], ["canceled", "canceled"]];

function duration(p) {
  const m = p.metrics || {};
  if (typeof m.predict_time === "number") return m.predict_time.toFixed(2) + " s";
  if (p.started_at && !p.completed_at) return ((Date.now() - Date.parse(p.started_at)) / 1000).toFixed(0) + " s…";
  return "";
}

function preview(p) {
  const i = p.input || {};
  const s = typeof i.prompt === "string" ? i.prompt : (Array.isArray(i.messages) ? "(chat)" : toJSON(i));
  return s.length > 80 ? s.slice(0, 79) + "…" : s;
}

/** Every model with predictions here: those served, then those routed upstream only. */
async function modelNames() {
  const [list, routes] = await Promise.all([api("/v1/models"), api("/v1/console/routes")]);
  const names = (list.results || []).map((m) => `${m.owner}/${m.name}`)
    .concat((routes.routes || []).map((r) => r.model));
  return [...new Set(names)].sort();
}

export async function predictionsPage(main, params, ctx) {
  const filter = el("select", { id: "status-filter", "aria-label": "status" },
    FILTERS.map(([v, label]) => el("option", { value: v }, label)));
  const wanted = params.get("status") || "";
  filter.value = FILTERS.some(([v]) => v === wanted) ? wanted : "";
  const modelFilter = el("select", { id: "model-filter", "aria-label": "model" }, el("option", { value: "" }, "all models"));
  const wantedModel = params.get("model") || "";
  const search = el("input", { id: "id-search", type: "search", placeholder: "Id or its start", "aria-label": "prediction id or its start" });
  const searchBtn = el("button", { type: "submit" }, "Find");
  const body = el("tbody", { id: "predictions-body" });
  const more = el("button", { type: "button", id: "more", hidden: true }, "More");
  const note = el("div", { class: "sub", id: "list-note" });
  let next = null, rows = [], loading = 0, liveTimer = null;

  /** While a shown row is running, asks for it again in LIVE_MS. */
  function scheduleLive() {
    if (liveTimer !== null || !ctx.alive() || !rows.some((p) => !terminal(p.status))) return;
    liveTimer = setTimeout(refreshLive, LIVE_MS);
  }

  async function refreshLive() {
    liveTimer = null;
    if (!ctx.alive()) return;
    const mine = loading;
    const running = rows.filter((p) => !terminal(p.status)).slice(0, LIVE_MAX);
    const fresh = await Promise.all(running.map((p) => api(`/v1/predictions/${encodeURIComponent(p.id)}`).catch(() => null)));
    // A reload meanwhile has its own rows (and its own timer).
    if (mine !== loading || !ctx.alive()) return;
    for (const p of fresh) {
      const i = p ? rows.findIndex((r) => r.id === p.id) : -1;
      if (i < 0) continue;
      rows[i] = p;
      const tr = [...body.querySelectorAll("tr[data-id]")].find((r) => r.dataset.id === p.id);
      if (tr) tr.replaceWith(row(p));
    }
    body.dataset.live = String(rows.filter((p) => !terminal(p.status)).length);
    scheduleLive();
  }

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
    body.replaceChildren(...rows.map(row));
    const prefix = body.dataset.prefix || "";
    if (!rows.length) {
      body.append(el("tr", {}, el("td", { colspan: 7, class: "muted" }, prefix ? `No prediction id starts with ${prefix}${filter.value ? " with this status" : ""}.`
        : filter.value ? `No prediction with this status${modelFilter.value ? " of " + modelFilter.value : ""}.`
          : modelFilter.value ? `No prediction of ${modelFilter.value}.` : "No predictions yet.")));
    }
    more.hidden = !next;
    const which = filter.value ? FILTERS.find(([v]) => v === filter.value)[1] + " " : "";
    const of = modelFilter.value ? ` of ${modelFilter.value}` : "";
    note.textContent = `${rows.length} ${which}shown${of}${prefix ? ` with ids starting ${prefix}` : ""}${next ? " (more on the server)" : ""}`;
    body.dataset.filter = filter.value;
    body.dataset.model = modelFilter.value;
    body.dataset.live = String(rows.filter((p) => !terminal(p.status)).length);
    scheduleLive();
  }

  /** Appends the page at `url`; a page that arrives after the view changed is dropped. */
  async function load(url, mine) {
    const page = await api(url);
    if (mine !== loading) return;
    rows = rows.concat(page.results || []);
    next = page.next ? localPath(page.next) : null;
    render();
  }

  /** The list for the status filter and the search box (a prefix of MIN_PREFIX or more). */
  async function reload() {
    const mine = ++loading;
    rows = [];
    next = null;
    clearTimeout(liveTimer);
    liveTimer = null;
    const q = new URLSearchParams();
    if (filter.value) q.set("status", filter.value);
    if (modelFilter.value) q.set("model", modelFilter.value);
    const id = search.value.trim();
    if (id.length >= MIN_PREFIX) q.set("id_prefix", id);
    body.dataset.prefix = q.get("id_prefix") || "";
    const qs = q.toString();
    await load("/v1/predictions" + (qs ? "?" + qs : ""), mine);
  }

  /** The filters in the URL (kept across a reload of the page), then the list. */
  function filtersChanged() {
    const q = new URLSearchParams();
    if (filter.value) q.set("status", filter.value);
    if (modelFilter.value) q.set("model", modelFilter.value);
    const qs = q.toString();
    history.replaceState(null, "", "#/predictions" + (qs ? "?" + qs : ""));
    reload().catch((e) => { note.textContent = e.message; });
  }
  filter.addEventListener("change", filtersChanged);
  modelFilter.addEventListener("change", filtersChanged);
  more.addEventListener("click", () => {
    if (next) load(next, loading).catch((e) => { note.textContent = e.message; });
  });
  const searchForm = el("form", {
    class: "inline", novalidate: true, onsubmit: async (e) => {
      e.preventDefault();
      const id = search.value.trim();
      if (!id || id.length >= MIN_PREFIX) return reload().catch((err) => { note.textContent = err.message; });
      // Shorter than a prefix search takes: this exact id, whatever its status.
      const mine = ++loading;
      try {
        const p = await api(`/v1/predictions/${encodeURIComponent(id)}`);
        if (mine !== loading) return;
        rows = [p];
        next = null;
        filter.value = "";
        modelFilter.value = "";
        body.dataset.prefix = "";
        render();
      } catch (err) {
        body.replaceChildren(el("tr", {}, el("td", { colspan: 7, class: "error" }, err.status === 404
          ? `No prediction ${id} (a search by the start of an id takes ${MIN_PREFIX} characters or more).` : err.message)));
        note.textContent = "";
      }
    },
  }, search, searchBtn);

  main.replaceChildren(
    el("div", { class: "page-head" }, el("h1", {}, "Predictions"),
      el("div", { class: "toolbar" }, filter, modelFilter, searchForm, el("button", { type: "button", onclick: () => reload() }, "Refresh"))),
    el("table", { class: "list" },
      el("thead", {}, el("tr", {}, ["Id", "Model", "Status", "Input", "Created (UTC)", "Time", ""].map((h) => el("th", {}, h)))),
      body),
    el("div", { class: "actions left" }, more, note));
  // The models to filter by; one named in the URL is kept even when no longer served.
  const names = await modelNames().catch(() => []);
  if (wantedModel && !names.includes(wantedModel)) names.push(wantedModel);
  modelFilter.append(...names.map((n) => el("option", { value: n }, n)));
  modelFilter.value = wantedModel;
  await reload();
}
