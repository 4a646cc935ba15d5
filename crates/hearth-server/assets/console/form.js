// A form generated from a version's OpenAPI `Input` schema: one control per property
// in `x-order` order, typed by the schema (numbers with their bounds, booleans,
// enums as choices, URIs as file uploads to /v1/files, JSON for structured output),
// defaults filled in, descriptions shown. `read()` gives the prediction's input or
// the fields' errors.

import { api, el, localPath } from "./api.js";
import { parseJSON, toJSON } from "./json.js";

/** Follows `$ref` and Cog's `allOf: [{$ref}]` wrapper for enums. */
function resolve(prop, doc) {
  let p = prop;
  for (let i = 0; i < 8 && p; i++) {
    const ref = p.$ref || (Array.isArray(p.allOf) && p.allOf.length === 1 && p.allOf[0].$ref);
    if (!ref || !ref.startsWith("#/")) break;
    const target = ref.slice(2).split("/").reduce((o, k) => (o ? o[k] : undefined), doc);
    p = { ...target, ...p, $ref: undefined, allOf: undefined };
  }
  return p || {};
}

const LONG_TEXT = new Set(["prompt", "system_prompt", "prompt_template", "grammar", "json_schema"]);

function isStructured(name, p) {
  return /^structured output/i.test(p.description || "") || ["json_schema", "regex", "grammar"].includes(name);
}

function control(name, p) {
  const id = "in-" + name;
  const dflt = p.default;
  if (Array.isArray(p.enum)) {
    const s = el("select", { id, name });
    if (p.nullable || dflt === null || dflt === undefined) s.append(el("option", { value: "" }, "(none)"));
    for (const v of p.enum) s.append(el("option", { value: toJSON(v) }, String(v)));
    if (dflt !== undefined && dflt !== null) s.value = toJSON(dflt);
    return { input: s, read: () => (s.value === "" ? undefined : parseJSON(s.value)) };
  }
  switch (p.type) {
    case "boolean": {
      const c = el("input", { id, name, type: "checkbox", checked: dflt === true });
      return { input: c, read: () => c.checked };
    }
    case "integer":
      return integerControl(id, name, p);
    case "number": {
      const n = el("input", { id, name, type: "number", step: p.type === "integer" ? "1" : "any", inputmode: "decimal" });
      if (p.minimum !== undefined) n.min = String(p.minimum);
      if (p.maximum !== undefined) n.max = String(p.maximum);
      if (typeof dflt === "number") n.value = String(dflt);
      if (dflt === null || dflt === undefined) n.placeholder = "(unset)";
      return {
        input: n,
        read: () => {
          const t = n.value.trim();
          if (t === "") return undefined;
          const v = Number(t);
          if (!Number.isFinite(v)) throw new Error("not a number");
          if (p.type === "integer" && !Number.isInteger(v)) throw new Error("expected an integer");
          if (p.minimum !== undefined && v < p.minimum) throw new Error(`must be at least ${p.minimum}`);
          if (p.maximum !== undefined && v > p.maximum) throw new Error(`must be at most ${p.maximum}`);
          return v;
        },
      };
    }
    default:
      break;
  }
  if (p.format === "uri") return fileControl(id, name, dflt);
  const long = LONG_TEXT.has(name) || (typeof dflt === "string" && dflt.length > 60);
  const t = long ? el("textarea", { id, name, rows: name === "prompt" ? 5 : 3 }) : el("input", { id, name, type: "text" });
  if (typeof dflt === "string") t.value = dflt;
  if (name === "json_schema") t.placeholder = '{"type": "object", "properties": {…}}';
  return {
    input: t,
    read: () => {
      const v = t.value;
      if (v === "" && (dflt === "" || dflt === null || dflt === undefined)) return undefined;
      if (name === "json_schema" && v.trim() !== "") {
        try { return parseJSON(v); } catch (e) { throw new Error("not valid JSON: " + e.message); }
      }
      return v;
    },
  };
}

const isNum = (v) => typeof v === "number" || typeof v === "bigint";

/**
 * An integer field, exact at any size: the text typed is read as a BigInt, checked
 * against the schema's bounds (BigInts from json.js when past 2^53, as the seed's
 * 2^63 - 1) and sent as a number when it fits one exactly, else as its digits.
 */
function integerControl(id, name, p) {
  const dflt = p.default;
  // A number input keeps the digits typed as they are (its value is a string); only
  // its spinner would round past 2^53.
  const n = el("input", { id, name, type: "number", step: "1", inputmode: "numeric" });
  if (isNum(dflt)) n.value = String(dflt);
  const bound = (b, up) => (typeof b === "bigint" ? b : BigInt(up ? Math.floor(b) : Math.ceil(b)));
  const min = isNum(p.minimum) ? bound(p.minimum, false) : null;
  const max = isNum(p.maximum) ? bound(p.maximum, true) : null;
  if (min !== null) n.min = String(min);
  if (max !== null) n.max = String(max);
  n.placeholder = dflt === null || dflt === undefined ? "(unset)" : "";
  return {
    input: n,
    read: () => {
      const t = n.value.trim();
      if (t === "") return undefined;
      if (!/^[-+]?\d+$/.test(t)) throw new Error(/^[-+]?[\d.eE+-]+$/.test(t) ? "expected an integer" : "not a number");
      const v = BigInt(t);
      if (min !== null && v < min) throw new Error(`must be at least ${min}`);
      if (max !== null && v > max) throw new Error(`must be at most ${max}`);
      return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
    },
  };
}

/** A URL, or a file uploaded to /v1/files whose download URL becomes the value. */
function fileControl(id, name, dflt) {
  const url = el("input", { id, name, type: "url", placeholder: "https://… or upload a file" });
  if (typeof dflt === "string") url.value = dflt;
  const note = el("span", { class: "hint" });
  const file = el("input", {
    type: "file", "aria-label": name + " file",
    onchange: async () => {
      const f = file.files && file.files[0];
      if (!f) return;
      note.textContent = "uploading " + f.name + "…";
      try {
        const body = new FormData();
        body.append("content", f, f.name);
        const r = await api("/v1/files", { method: "POST", body });
        url.value = r.urls.get;
        note.textContent = "uploaded " + f.name + " (" + localPath(r.urls.get) + ")";
      } catch (e) {
        note.textContent = "upload failed: " + e.message;
      }
    },
  });
  return { input: el("div", { class: "file" }, url, file, note), read: () => (url.value === "" ? undefined : url.value) };
}

/** Builds the form for `doc` (an OpenAPI document); `onSubmit(input)` runs it. */
export function schemaForm(doc, onSubmit) {
  const schema = resolve((((doc || {}).components || {}).schemas || {}).Input || {}, doc);
  const props = Object.entries(schema.properties || {}).map(([name, prop]) => [name, resolve(prop, doc)]);
  props.sort((a, b) => (a[1]["x-order"] ?? 1e9) - (b[1]["x-order"] ?? 1e9));
  const required = new Set(schema.required || []);
  const fields = [];
  const main = el("div", { class: "fields" });
  const structured = el("div", { class: "fields" });
  for (const [name, p] of props) {
    const c = control(name, p);
    const err = el("div", { class: "field-error", id: "err-" + name });
    const label = el("label", { for: "in-" + name }, p.title || name, required.has(name) ? " *" : "");
    const range = p.minimum !== undefined || p.maximum !== undefined
      ? el("span", { class: "range" }, `${p.minimum ?? "−∞"} … ${p.maximum ?? "∞"}`) : null;
    const row = el("div", { class: "field field-" + (p.type || "string"), "data-field": name },
      el("div", { class: "label-row" }, label, range, el("code", { class: "name" }, name)),
      c.input, p.description ? el("div", { class: "desc" }, p.description) : null, err);
    (isStructured(name, p) ? structured : main).append(row);
    fields.push({ name, c, err, required: required.has(name) });
  }
  const form = el("form", { class: "schema-form", novalidate: true });
  form.append(main);
  if (structured.childElementCount) form.append(el("details", { class: "structured" }, el("summary", {}, "Structured output"), structured));

  /** The input, or null after marking each field that is wrong. */
  function read() {
    const input = {};
    let ok = true;
    for (const f of fields) {
      f.err.textContent = "";
      try {
        const v = f.c.read();
        if (v === undefined && f.required) throw new Error("required");
        if (v !== undefined) input[f.name] = v;
      } catch (e) {
        f.err.textContent = e.message;
        ok = false;
      }
    }
    return ok ? input : null;
  }
  /** Shows the server's 422 field errors next to their fields. */
  function showErrors(body) {
    // Cog's 422 lists {loc, msg}; Replicate's problem joins them: "input.top_p: why; …".
    let detail = body && Array.isArray(body.detail) ? body.detail : [];
    if (body && typeof body.detail === "string") {
      detail = [...body.detail.matchAll(/(?:^|; )input\.([A-Za-z0-9_]+): ((?:(?!; input\.).)*)/g)]
        .map((m) => ({ loc: ["input", m[1]], msg: m[2] }));
    }
    let shown = 0;
    for (const d of detail) {
      const name = Array.isArray(d.loc) ? d.loc[d.loc.length - 1] : null;
      const f = fields.find((x) => x.name === name);
      if (f) { f.err.textContent = d.msg; shown++; }
    }
    return shown;
  }
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const input = read();
    if (input) onSubmit(input);
  });
  return { form, read, showErrors, fieldNames: fields.map((f) => f.name) };
}
