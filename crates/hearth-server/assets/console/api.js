// The console's way to the server: the API token (entered once, kept in
// sessionStorage, sent only as an Authorization header, never in a URL), JSON calls,
// server-sent events read from a fetch body, and a small DOM builder that only ever
// sets text (model output is data, never markup).

import { parseJSON, toJSON } from "./json.js";

const KEY = "hearth.console.token";

export const token = {
  get: () => sessionStorage.getItem(KEY) || "",
  set: (t) => (t ? sessionStorage.setItem(KEY, t) : sessionStorage.removeItem(KEY)),
};

export class AuthError extends Error {}
export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

let onAuth = () => {};
/** Called when the server answers 401: the page asks for a token. */
export function onUnauthorized(f) { onAuth = f; }

function headers(extra) {
  const h = new Headers(extra || {});
  const t = token.get();
  if (t) h.set("Authorization", "Bearer " + t);
  return h;
}

/** A same-origin path from one of the API's absolute URLs (which name the Host). */
export function localPath(url) {
  const u = new URL(url, location.href);
  return u.pathname + u.search;
}

/** Calls the API; `json` is sent as the body. Throws AuthError on 401, ApiError otherwise. */
export async function api(path, { method = "GET", json, body, signal, extraHeaders } = {}) {
  const h = headers(extraHeaders);
  if (json !== undefined) {
    h.set("Content-Type", "application/json");
    body = toJSON(json);
  }
  const r = await fetch(path, { method, headers: h, body, signal, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" });
  if (r.status === 401) {
    onAuth();
    throw new AuthError("this server needs an API token");
  }
  const text = await r.text();
  let data = null;
  try { data = text ? parseJSON(text) : null; } catch { data = null; }
  if (!r.ok) throw new ApiError(r.status, problemText(r.status, data, text), data);
  return data;
}

/** What a problem document (or Cog's 422, or OpenAI's error) says, field names included. */
export function problemText(status, data, text) {
  if (data && Array.isArray(data.detail)) {
    return data.detail.map((d) => (Array.isArray(d.loc) ? d.loc.join(".") + ": " : "") + d.msg).join("; ");
  }
  if (data && data.error && typeof data.error === "object") return data.error.message || toJSON(data.error);
  if (data && (data.detail || data.title)) return String(data.detail || data.title);
  return `HTTP ${status}${text ? ": " + String(text).slice(0, 300) : ""}`;
}

/** POSTs and yields each server-sent event ({event, data}) of the response body. */
export async function* postEvents(path, json, signal) {
  const h = headers({ "Content-Type": "application/json", Accept: "text/event-stream" });
  const r = await fetch(path, { method: "POST", headers: h, body: toJSON(json), signal, cache: "no-store", credentials: "omit" });
  if (r.status === 401) { onAuth(); throw new AuthError("this server needs an API token"); }
  if (!r.ok) {
    const text = await r.text();
    let data = null;
    try { data = parseJSON(text); } catch { data = null; }
    throw new ApiError(r.status, problemText(r.status, data, text), data);
  }
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

/** el("div", {class: "x", onclick: f}, "text", child…): text children become text nodes. */
export function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "class") e.className = v;
    else if (k in e && typeof v !== "string") e[k] = v;
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

/**
 * A chat model: the model document's `hearth.chat`. For a model served here, its
 * tokenizer has a chat template of its own (a base model gets no chat view: its
 * replies through the generic ChatML wrapping would be noise); for one that runs
 * upstream only, the server decides from the upstream's schema and card
 * (upstream/chat_shape.rs).
 */
export function isChatModel(model) {
  return Boolean(model && model.hearth && model.hearth.chat === true);
}

/** A model page's tabs: Playground, and Chat for a chat model only. */
export function modelTabs(model, active) {
  const base = `#/models/${model.owner}/${model.name}`;
  const tabs = [el("a", { href: base, class: active === "playground" ? "active" : null, id: "tab-playground" }, "Playground")];
  if (isChatModel(model)) tabs.push(el("a", { href: base + "/chat", class: active === "chat" ? "active" : null, id: "tab-chat" }, "Chat"));
  return el("nav", { class: "tabs" }, tabs);
}

export const terminal = (s) => s === "succeeded" || s === "failed" || s === "canceled";

export function statusBadge(status) {
  return el("span", { class: "status " + status, "data-status": status }, status);
}

export function outputText(p) {
  if (Array.isArray(p.output)) return p.output.join("");
  if (p.output === null || p.output === undefined) return "";
  return typeof p.output === "string" ? p.output : toJSON(p.output, 2);
}
