// A chat with a model: the conversation stays in the page, each reply arrives token
// by token, Stop ends it. A model served here goes over the OpenAI chat endpoint
// (/v1/chat/completions, streamed; closing the stream cancels the request). A model
// that runs upstream only goes through the Replicate API as any prediction (create,
// its stream URL, cancel), its conversation sent as the server's `hearth.chat_input`
// says (upstream/chat_shape.rs): `messages` as they are, or one `prompt` holding the
// earlier turns as a transcript.

import { api, el, isChatModel, localPath, modelTabs, postEvents, terminal } from "./api.js";

/** The input properties of the model's latest version. */
function inputProps(model) {
  const s = ((model.latest_version || {}).openapi_schema || {}).components || {};
  return ((s.schemas || {}).Input || {}).properties || {};
}

/** One prompt for a model that takes no turns: earlier ones as a transcript. */
function transcript(messages) {
  if (messages.length === 1) return messages[0].content;
  return messages.map((m) => `${m.role === "user" ? "User" : "Assistant"}: ${m.content}`).join("\n\n");
}

/**
 * Runs one turn as a prediction of an upstream-only model and calls `onText` with each
 * output chunk; resolves with the ended prediction. Aborting `signal` cancels it.
 */
async function predictionTurn(model, input, signal, onText) {
  const p = await api(`/v1/models/${encodeURIComponent(model.owner)}/${encodeURIComponent(model.name)}/predictions`,
    { method: "POST", json: { input, stream: true } });
  const ended = () => api(`/v1/predictions/${encodeURIComponent(p.id)}`);
  const cancel = () => api(`/v1/predictions/${encodeURIComponent(p.id)}/cancel`, { method: "POST" }).catch(() => {});
  if (signal.aborted) { await cancel(); return ended(); }
  return new Promise((resolve, reject) => {
    // The stream URL is a capability URL: EventSource needs no header for it.
    const src = new EventSource(localPath(p.urls.stream));
    let over = false;
    const end = (f) => { if (over) return; over = true; src.close(); signal.removeEventListener("abort", onAbort); f(); };
    const settle = async () => {
      // The stream has ended; the record may lag it by a write: read it until it has.
      for (let i = 0; i < 20; i++) {
        const now = await ended();
        if (terminal(now.status)) return now;
        await new Promise((r) => setTimeout(r, 250));
      }
      return ended();
    };
    const onAbort = () => end(() => cancel().then(settle).then(resolve, reject));
    signal.addEventListener("abort", onAbort);
    src.addEventListener("output", (e) => onText(e.data));
    src.addEventListener("error", (e) => { if (e.data) end(() => settle().then(resolve, reject)); });
    src.addEventListener("done", () => end(() => settle().then(resolve, reject)));
  });
}

export async function chatPage(main, owner, name) {
  const model = await api(`/v1/models/${encodeURIComponent(owner)}/${encodeURIComponent(name)}`);
  const full = `${model.owner}/${model.name}`;
  if (!isChatModel(model)) {
    main.replaceChildren(el("div", { class: "page-head" }, el("h1", {}, full), modelTabs(model, "chat")),
      el("div", { class: "panel", id: "chat-unavailable" }, model.hearth && model.hearth.route
        ? `${full} runs upstream (${model.hearth.route}) and its schema and card do not make it a chat model (no messages input, or no prompt and system_prompt with a name or description that says instruct or chat). `
        : `${full} has no chat template: it is not a chat model. `,
        el("a", { href: `#/models/${model.owner}/${model.name}` }, "Use its playground"), " to send it a prompt."));
    return;
  }
  const upstream = model.hearth && typeof model.hearth.route === "string" && model.hearth.route.startsWith("upstream:");
  const via = upstream ? (model.hearth.chat_input === "messages" ? "messages" : "prompt") : "openai";
  const props = inputProps(model);
  const messages = [];
  const log = el("div", { id: "chat-log", class: "chat-log", "aria-live": "polite" });
  const system = el("input", { id: "chat-system", type: "text", placeholder: "System prompt (optional)" });
  const maxTokens = el("input", { id: "chat-max-tokens", type: "number", min: "1", step: "1", value: "256" });
  const temperature = el("input", { id: "chat-temperature", type: "number", min: "0", max: "2", step: "any", value: "0.7" });
  const text = el("textarea", { id: "chat-input", rows: 3, placeholder: "Message (Enter sends, Shift+Enter for a new line)" });
  const send = el("button", { type: "submit", id: "chat-send", class: "primary" }, "Send");
  const stop = el("button", { type: "button", id: "chat-stop", disabled: true }, "Stop");
  const clear = el("button", { type: "button", id: "chat-clear" }, "Clear");
  const info = el("div", { class: "sub", id: "chat-info" });
  let abort = null;

  function bubble(role, content) {
    const body = el("div", { class: "content" }, content);
    const b = el("div", { class: "msg " + role }, el("div", { class: "role" }, role), body);
    log.append(b);
    log.scrollTop = log.scrollHeight;
    return body;
  }

  async function submit() {
    const content = text.value;
    if (!content.trim() || abort) return;
    text.value = "";
    info.textContent = "";
    messages.push({ role: "user", content });
    bubble("user", content);
    const reply = bubble("assistant", "");
    reply.classList.add("typing");
    const mt = parseInt(maxTokens.value, 10);
    const temp = parseFloat(temperature.value);
    abort = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    let answer = "";
    const started = performance.now();
    let first = null, usage = null, finish = null;
    const onText = (d) => {
      if (!d) return;
      if (first === null) first = performance.now();
      answer += d;
      reply.textContent = answer;
      log.scrollTop = log.scrollHeight;
    };
    try {
      if (via === "openai") {
        const body = {
          model: full, stream: true, stream_options: { include_usage: true },
          messages: (system.value ? [{ role: "system", content: system.value }] : []).concat(messages),
        };
        if (Number.isFinite(mt)) body.max_tokens = mt;
        if (Number.isFinite(temp)) body.temperature = temp;
        for await (const ev of postEvents("/v1/chat/completions", body, abort.signal)) {
          if (ev.data === "[DONE]") break;
          const chunk = JSON.parse(ev.data);
          if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
          if (chunk.usage) usage = chunk.usage;
          for (const c of chunk.choices || []) {
            onText((c.delta && c.delta.content) || "");
            if (c.finish_reason) finish = c.finish_reason;
          }
        }
      } else {
        // Only the inputs this model's schema has: an upstream may refuse others.
        const input = {};
        if (via === "messages") {
          input.messages = (system.value ? [{ role: "system", content: system.value }] : []).concat(messages);
        } else {
          input.prompt = transcript(messages);
          if (system.value && "system_prompt" in props) input.system_prompt = system.value;
        }
        const mtName = ["max_tokens", "max_new_tokens"].find((k) => k in props);
        if (mtName && Number.isFinite(mt)) input[mtName] = mt;
        if ("temperature" in props && Number.isFinite(temp)) input.temperature = temp;
        const p = await predictionTurn(model, input, abort.signal, onText);
        if (p.status === "failed") throw new Error(String(p.error || "the prediction failed"));
        // The record's output is the whole reply: the stream may have been cut short.
        const whole = Array.isArray(p.output) ? p.output.join("") : (typeof p.output === "string" ? p.output : null);
        if (whole !== null && whole.length >= answer.length) { answer = ""; onText(whole); }
        finish = p.status === "canceled" ? "stopped" : p.status;
        const m = p.metrics || {};
        if (typeof m.output_token_count === "number") usage = { completion_tokens: m.output_token_count };
      }
    } catch (e) {
      if (e.name === "AbortError") finish = "stopped";
      else { reply.parentElement.classList.add("failed"); reply.textContent = answer + (answer ? "\n" : "") + "⚠ " + e.message; }
    } finally {
      abort = null;
      send.disabled = false;
      stop.disabled = true;
      reply.classList.remove("typing");
    }
    messages.push({ role: "assistant", content: answer });
    const secs = (performance.now() - started) / 1000;
    const parts = [];
    if (first !== null) parts.push(`first token ${((first - started) / 1000).toFixed(2)} s`);
    if (usage) parts.push(`${usage.completion_tokens} tokens, ${(usage.completion_tokens / secs).toFixed(1)} tokens/s`);
    if (finish) parts.push(`finish: ${finish}`);
    info.textContent = parts.join(" · ");
  }

  const form = el("form", { class: "chat-form", novalidate: true, onsubmit: (e) => { e.preventDefault(); submit(); } },
    text, el("div", { class: "actions" }, clear, stop, send));
  text.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); submit(); }
  });
  stop.addEventListener("click", () => abort && abort.abort());
  clear.addEventListener("click", () => { if (!abort) { messages.length = 0; log.replaceChildren(); info.textContent = ""; } });

  main.replaceChildren(
    el("div", { class: "page-head" },
      el("h1", {}, full),
      modelTabs(model, "chat")),
    el("p", { class: "sub", id: "chat-via" }, via === "openai" ? "OpenAI chat endpoint, streamed: POST /v1/chat/completions"
      : `Runs on ${model.hearth.route.slice("upstream:".length)} (${model.hearth.route}), as predictions through the Replicate API, streamed; `
        + (via === "messages" ? "the conversation goes as its messages input." : "it takes one prompt: earlier turns go in it as a transcript.")),
    el("section", { class: "panel chat" },
      el("div", { class: "chat-settings" },
        el("label", {}, "System ", system), el("label", {}, "Max tokens ", maxTokens), el("label", {}, "Temperature ", temperature)),
      log, form, info));
}
