// The console's entry: the token prompt, the models list and a router over the URL
// fragment (#/models/owner/name, #/models/owner/name/chat, #/predictions, #/ops),
// so every view is one shell the server serves without data.

import { AuthError, api, el, isChatModel, onUnauthorized, token } from "./api.js";
import { chatPage } from "./chat.js";
import { comparePage } from "./compare.js";
import { opsPage } from "./ops.js";
import { modelPage } from "./playground.js";
import { predictionsPage } from "./predictions.js";

const main = document.getElementById("main");
const panel = document.getElementById("token-panel");
const tokenForm = document.getElementById("token-form");
const tokenInput = document.getElementById("token-input");
const tokenNote = document.getElementById("token-note");
const tokenButton = document.getElementById("token-button");
let generation = 0;

function askForToken(why) {
  panel.hidden = false;
  tokenNote.textContent = why || "";
  tokenInput.focus();
}

onUnauthorized(() => askForToken(token.get() ? "The server refused this token." : "This server needs an API token."));

tokenForm.addEventListener("submit", (e) => {
  e.preventDefault();
  token.set(tokenInput.value.trim());
  tokenInput.value = "";
  panel.hidden = true;
  render();
});
tokenButton.addEventListener("click", () => {
  if (panel.hidden) askForToken(token.get() ? "A token is set for this tab." : "");
  else panel.hidden = true;
});
document.getElementById("token-forget").addEventListener("click", () => {
  token.set("");
  tokenNote.textContent = "Forgotten.";
});

function modelCard(m, route) {
  return el("a", { class: "card", href: `#/models/${m.owner}/${m.name}`, "data-model": `${m.owner}/${m.name}`, "data-route": route || null },
    el("h2", {}, `${m.owner}/${m.name}`, isChatModel(m) ? el("span", { class: "tag", "data-chat": "" }, "chat") : null,
      route ? el("span", { class: "tag", "data-upstream": "" }, route) : null),
    el("p", {}, m.description || ""),
    el("p", { class: "sub" }, "version ", el("code", {}, String((m.latest_version || {}).id || "").slice(0, 12)),
      m.max_model_len ? ` · context ${m.max_model_len}` : ""));
}

/** The models served here, then those that run upstream only (their documents from the upstream). */
async function modelsPage() {
  const [list, routes] = await Promise.all([api("/v1/models"), api("/v1/console/routes")]);
  const cards = (list.results || []).map((m) => modelCard(m, null));
  const remote = (routes.routes || []).filter((r) => !r.served_here);
  cards.push(...await Promise.all(remote.map(async (r) => {
    const [owner, name] = r.model.split("/");
    try {
      return modelCard(await api(`/v1/models/${encodeURIComponent(owner)}/${encodeURIComponent(name)}`), r.route);
    } catch (e) {
      return el("a", { class: "card", href: `#/models/${owner}/${name}`, "data-model": r.model, "data-route": r.route },
        el("h2", {}, r.model, el("span", { class: "tag", "data-upstream": "" }, r.route)),
        el("p", { class: "error" }, "The upstream did not describe it: " + e.message));
    }
  })));
  main.replaceChildren(el("div", { class: "page-head" }, el("h1", {}, "Models")),
    cards.length ? el("div", { class: "cards" }, cards) : el("p", {}, "No models are served."));
}

function highlight(route) {
  for (const a of document.querySelectorAll("header nav a")) {
    a.classList.toggle("active", a.dataset.route === route);
  }
}

async function render() {
  const mine = ++generation;
  const ctx = { alive: () => mine === generation, rerender: render };
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query || "");
  main.replaceChildren(el("p", { class: "sub" }, "Loading…"));
  try {
    if (parts[0] === "models" && parts.length >= 3) {
      highlight("models");
      if (parts[3] === "chat") await chatPage(main, parts[1], parts[2]);
      else await modelPage(main, parts[1], parts[2], ctx);
    } else if (parts[0] === "predictions") {
      highlight("predictions");
      await predictionsPage(main, params, ctx);
    } else if (parts[0] === "ops") {
      highlight("ops");
      await opsPage(main, ctx);
    } else if (parts[0] === "compare") {
      highlight("compare");
      await comparePage(main, ctx);
    } else {
      highlight("models");
      await modelsPage();
    }
  } catch (e) {
    if (!ctx.alive()) return;
    main.replaceChildren(el("div", { class: "panel error", id: "page-error" },
      e instanceof AuthError ? "Enter the API token above to continue." : "Could not load this page: " + e.message));
  }
}

window.addEventListener("hashchange", render);
render();
