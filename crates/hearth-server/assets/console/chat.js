// A chat with a model over the OpenAI chat endpoint (/v1/chat/completions, streamed):
// the conversation stays in the page, each reply arrives token by token, Stop ends it
// (closing the stream cancels the request on the server).

import { api, el, isChatModel, modelTabs, postEvents } from "./api.js";

export async function chatPage(main, owner, name) {
  const model = await api(`/v1/models/${encodeURIComponent(owner)}/${encodeURIComponent(name)}`);
  const full = `${model.owner}/${model.name}`;
  if (!isChatModel(model)) {
    main.replaceChildren(el("div", { class: "page-head" }, el("h1", {}, full), modelTabs(model, "chat")),
      el("div", { class: "panel", id: "chat-unavailable" }, `${full} has no chat template: it is not a chat model. `,
        el("a", { href: `#/models/${model.owner}/${model.name}` }, "Use its playground"), " to send it a prompt."));
    return;
  }
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
    messages.push({ role: "user", content });
    bubble("user", content);
    const reply = bubble("assistant", "");
    reply.classList.add("typing");
    const body = {
      model: full, stream: true, stream_options: { include_usage: true },
      messages: (system.value ? [{ role: "system", content: system.value }] : []).concat(messages),
    };
    const mt = parseInt(maxTokens.value, 10);
    if (Number.isFinite(mt)) body.max_tokens = mt;
    const temp = parseFloat(temperature.value);
    if (Number.isFinite(temp)) body.temperature = temp;
    abort = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    let answer = "";
    const started = performance.now();
    let first = null, usage = null, finish = null;
    try {
      for await (const ev of postEvents("/v1/chat/completions", body, abort.signal)) {
        if (ev.data === "[DONE]") break;
        const chunk = JSON.parse(ev.data);
        if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
        if (chunk.usage) usage = chunk.usage;
        for (const c of chunk.choices || []) {
          const d = (c.delta && c.delta.content) || "";
          if (d) {
            if (first === null) first = performance.now();
            answer += d;
            reply.textContent = answer;
            log.scrollTop = log.scrollHeight;
          }
          if (c.finish_reason) finish = c.finish_reason;
        }
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
    el("p", { class: "sub" }, "OpenAI chat endpoint, streamed: POST /v1/chat/completions"),
    el("section", { class: "panel chat" },
      el("div", { class: "chat-settings" },
        el("label", {}, "System ", system), el("label", {}, "Max tokens ", maxTokens), el("label", {}, "Temperature ", temperature)),
      log, form, info));
}
