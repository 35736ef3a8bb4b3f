// The chat page: conversations in localStorage, streamed answers from this server's /v1/chat/completions.
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const KEYS = { conversations: "lightllm.conversations", current: "lightllm.current", settings: "lightllm.settings", apiKey: "lightllm.apiKey" };
const SETTINGS_FIELDS = { system: "system-prompt", temperature: "temperature", maxTokens: "max-tokens", tools: "tools", toolChoice: "tool-choice", toolName: "tool-name" };
const PHONE = window.matchMedia("(max-width: 760px)");

let conversations = load(KEYS.conversations, []);
let currentId = localStorage.getItem(KEYS.current);
let modelName = null;
let running = null; // {controller, conversation, message} while an answer streams

function load(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value ?? fallback;
  } catch (err) {
    return fallback;
  }
}

function save() {
  localStorage.setItem(KEYS.conversations, JSON.stringify(conversations));
  if (currentId) localStorage.setItem(KEYS.current, currentId);
  else localStorage.removeItem(KEYS.current);
}

function current() {
  return conversations.find((c) => c.id === currentId) || null;
}

function newId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
}

// ---- API access (the key, when the server has one, goes as a Bearer token) ----

class ServerError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEYS.apiKey);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorFrom(response) {
  const text = await response.text();
  let message = text || response.statusText;
  try {
    const body = JSON.parse(text);
    message = body?.error?.message ?? body?.message ?? (typeof body?.detail === "string" ? body.detail : JSON.stringify(body));
  } catch (err) { /* not JSON: the text itself */ }
  return new ServerError(response.status, message);
}

function askForKey(message) {
  const dialog = $("key-dialog");
  $("key-error").hidden = !message;
  $("key-error").textContent = message || "";
  $("key-input").value = localStorage.getItem(KEYS.apiKey) || "";
  if (!dialog.open) dialog.showModal();
}

async function fetchModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) {
    const err = await errorFrom(response);
    askForKey(localStorage.getItem(KEYS.apiKey) ? err.message : "");
    return false;
  }
  if (!response.ok) throw await errorFrom(response);
  const body = await response.json();
  modelName = body.data?.[0]?.id ?? null;
  $("model-name").textContent = modelName || "";
  return true;
}

// ---- settings ----

function readSettings() {
  const s = {};
  for (const [name, id] of Object.entries(SETTINGS_FIELDS)) s[name] = $(id).value;
  return s;
}

function restoreSettings() {
  const s = load(KEYS.settings, {});
  for (const [name, id] of Object.entries(SETTINGS_FIELDS)) if (s[name] !== undefined) $(id).value = s[name];
  syncToolName();
}

function syncToolName() {
  $("tool-name").disabled = $("tool-choice").value !== "named";
}

// Tools as pasted: an array of tool definitions, one definition, or bare function objects.
function parseTools(text) {
  if (!text.trim()) return null;
  let tools = JSON.parse(text);
  if (!Array.isArray(tools)) tools = [tools];
  return tools.map((t) => {
    if (t && t.type === "function" && t.function) return t;
    if (t && typeof t.name === "string") return { type: "function", function: t };
    throw new Error("each tool needs {\"type\": \"function\", \"function\": {\"name\": ...}}");
  });
}

function requestBody(conversation) {
  const s = readSettings();
  const messages = [];
  if (s.system.trim()) messages.push({ role: "system", content: s.system });
  for (const m of conversation.messages) {
    if (m.role === "user") messages.push({ role: "user", content: m.content });
    else if (m.role === "tool") messages.push({ role: "tool", tool_call_id: m.tool_call_id, content: m.content });
    else if (m.role === "assistant" && (m.content || m.tool_calls?.length)) {
      const out = { role: "assistant", content: m.content || null };
      if (m.tool_calls?.length) out.tool_calls = m.tool_calls.map((c) => ({ id: c.id, type: "function", function: { name: c.name, arguments: c.arguments } }));
      messages.push(out);
    }
  }
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  if (modelName) body.model = modelName;
  if (s.temperature !== "") body.temperature = Number(s.temperature);
  if (s.maxTokens !== "") body.max_tokens = Number(s.maxTokens);
  const tools = parseTools(s.tools);
  if (tools) {
    body.tools = tools;
    body.tool_choice = s.toolChoice === "named" ? { type: "function", function: { name: s.toolName.trim() } } : s.toolChoice;
  }
  return body;
}

// ---- streaming one answer ----

async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

async function answer() {
  const conversation = current();
  let body;
  try {
    body = requestBody(conversation);
  } catch (err) {
    showToolsError(`Tools: ${err.message}`);
    return;
  }
  showToolsError("");
  const message = { role: "assistant", content: "", reasoning: "", tool_calls: [], status: "streaming" };
  conversation.messages.push(message);
  conversation.updated = Date.now();
  const controller = new AbortController();
  running = { controller, conversation, message };
  setRunning(true);
  renderMessages();
  const started = performance.now();
  let first = null;
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) throw await errorFrom(response);
    for await (const data of sseEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ServerError(chunk.error.status ?? chunk.error.code ?? "", chunk.error.message);
      if (chunk.usage) message.usage = chunk.usage;
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      if (first === null && (delta.content || delta.reasoning_content || delta.tool_calls)) first = performance.now();
      if (delta.reasoning_content) message.reasoning += delta.reasoning_content;
      if (delta.content) message.content += delta.content;
      for (const call of delta.tool_calls || []) {
        const slot = (message.tool_calls[call.index ?? message.tool_calls.length] ??= { id: "", name: "", arguments: "" });
        if (call.id) slot.id = call.id;
        if (call.function?.name) slot.name += call.function.name;
        if (call.function?.arguments) slot.arguments += call.function.arguments;
      }
      if (choice.finish_reason) message.finish_reason = choice.finish_reason;
      scheduleUpdate(message);
    }
    message.status = "done";
  } catch (err) {
    if (err.name === "AbortError") {
      message.status = "stopped";
    } else {
      message.status = "error";
      const status = err.status ? `Error ${err.status}: ` : "Error: ";
      conversation.messages.push({ role: "error", content: status + err.message });
      if (err.status === 401) askForKey(err.message);
    }
  }
  const ended = performance.now();
  message.stats = { ttft_ms: first === null ? null : first - started, ms: ended - (first ?? started) };
  if (!message.content && !message.reasoning && !message.tool_calls.length && message.status !== "done") {
    conversation.messages.splice(conversation.messages.indexOf(message), 1);
  }
  running = null;
  save();
  setRunning(false);
  renderMessages();
}

let pending = null;
function scheduleUpdate(message) {
  if (pending) return;
  pending = requestAnimationFrame(() => {
    pending = null;
    const el = document.querySelector(".msg.assistant.streaming");
    if (el) updateAssistant(el, message);
    scrollToEnd();
  });
}

function setRunning(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  document.body.classList.toggle("running", on);
}

function showToolsError(text) {
  $("tools-error").hidden = !text;
  $("tools-error").textContent = text;
  if (text) document.body.classList.add("settings-open");
}

// ---- rendering ----

function statsLine(message) {
  const parts = [];
  const u = message.usage, t = message.stats;
  if (message.status === "stopped") parts.push("stopped");
  if (u) {
    parts.push(`${u.completion_tokens} tokens`);
    if (t && u.completion_tokens > 1 && t.ms > 0) parts.push(`${((u.completion_tokens - 1) / (t.ms / 1000)).toFixed(1)} tok/s`);
  }
  if (t?.ttft_ms != null) parts.push(`TTFT ${Math.round(t.ttft_ms)} ms`);
  if (u) parts.push(`prompt ${u.prompt_tokens}${u.prompt_tokens_details?.cached_tokens ? ` (${u.prompt_tokens_details.cached_tokens} cached)` : ""}`);
  if (message.finish_reason && message.finish_reason !== "stop") parts.push(`finish: ${message.finish_reason}`);
  return parts.join(" · ");
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

function prettyArguments(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch (err) {
    return text;
  }
}

// Fills an assistant bubble in place (the reasoning <details> keeps the reader's open/closed choice).
function updateAssistant(el, message) {
  let details = el.querySelector("details.reasoning");
  if (message.reasoning && !details) {
    details = element("details", "reasoning");
    details.open = message.reasoningOpen ?? true;
    details.append(element("summary", null, "Reasoning"), element("div", "reasoning-body"));
    details.addEventListener("toggle", () => { message.reasoningOpen = details.open; });
    el.querySelector(".role").after(details);
  }
  if (details) details.querySelector(".reasoning-body").textContent = message.reasoning;
  el.querySelector(".content").innerHTML = renderMarkdown(message.content); // escaped by renderMarkdown
  const calls = el.querySelector(".tool-calls");
  calls.replaceChildren(...message.tool_calls.map((call) => {
    const box = element("div", "tool-call");
    box.dataset.id = call.id;
    box.append(element("div", "tool-name", call.name || "…"), element("pre", "tool-args", prettyArguments(call.arguments)));
    return box;
  }));
  el.querySelector(".stats").textContent = statsLine(message);
}

function assistantElement(message, index, conversation) {
  const el = element("div", `msg assistant${message.status === "streaming" ? " streaming" : ""}`);
  el.append(element("div", "role", "assistant"), element("div", "content"), element("div", "tool-calls"), element("div", "stats"));
  updateAssistant(el, message);
  const answered = new Set(conversation.messages.slice(index + 1).filter((m) => m.role === "tool").map((m) => m.tool_call_id));
  const open = message.tool_calls.filter((c) => !answered.has(c.id));
  if (open.length && message.status === "done" && !running) {
    for (const box of el.querySelectorAll(".tool-call")) {
      if (answered.has(box.dataset.id)) continue;
      const reply = element("textarea", "tool-result");
      reply.rows = 2;
      reply.placeholder = "Result to send back (a tool message)";
      box.append(reply);
    }
    const send = element("button", "send-tool-results", "Send tool results");
    send.type = "button";
    send.addEventListener("click", () => {
      if (settingsProblem()) return;
      for (const box of el.querySelectorAll(".tool-call")) {
        const reply = box.querySelector("textarea.tool-result");
        if (reply) conversation.messages.push({ role: "tool", tool_call_id: box.dataset.id, name: box.querySelector(".tool-name").textContent, content: reply.value });
      }
      save();
      answer();
    });
    const row = element("div", "tool-reply");
    row.append(send);
    el.append(row);
  }
  return el;
}

function renderMessages() {
  const list = $("messages");
  const conversation = current();
  if (!conversation || !conversation.messages.length) {
    list.replaceChildren(element("div", "empty", modelName ? `Chat with ${modelName}` : "Start a conversation"));
    renderConversations();
    return;
  }
  list.replaceChildren(...conversation.messages.map((m, i) => {
    if (m.role === "assistant") return assistantElement(m, i, conversation);
    const el = element("div", `msg ${m.role}`);
    if (m.role === "tool") {
      el.append(element("div", "role", `tool result${m.name ? ` (${m.name})` : ""}`), element("pre", null, m.content));
    } else if (m.role === "error") {
      el.textContent = m.content;
    } else {
      el.textContent = m.content;
    }
    return el;
  }));
  renderConversations();
  scrollToEnd();
}

function scrollToEnd() {
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
}

function renderConversations() {
  const items = [...conversations].sort((a, b) => b.updated - a.updated).map((c) => {
    const li = element("li", c.id === currentId ? "current" : "");
    const title = element("button", "title", c.title || "New chat");
    title.type = "button";
    title.addEventListener("click", () => {
      if (running) return;
      currentId = c.id;
      save();
      document.body.classList.remove("sidebar-open");
      renderMessages();
    });
    const del = element("button", "delete", "×");
    del.type = "button";
    del.title = "Delete conversation";
    del.addEventListener("click", () => {
      if (running?.conversation === c) return;
      conversations = conversations.filter((x) => x !== c);
      if (currentId === c.id) currentId = null;
      save();
      renderMessages();
    });
    li.append(title, del);
    return li;
  });
  $("conversations").replaceChildren(...items);
}

// ---- actions ----

// Settings that cannot be sent (tools that are not JSON) are reported before the message joins the chat.
function settingsProblem() {
  try {
    parseTools(readSettings().tools);
  } catch (err) {
    showToolsError(`Tools: ${err.message}`);
    return true;
  }
  showToolsError("");
  return false;
}

function send(text) {
  if (running || !text.trim() || settingsProblem()) return false;
  let conversation = current();
  if (!conversation) {
    conversation = { id: newId(), title: "", messages: [], updated: Date.now() };
    conversations.push(conversation);
    currentId = conversation.id;
  }
  if (!conversation.title) conversation.title = text.trim().slice(0, 60);
  conversation.messages.push({ role: "user", content: text });
  save();
  answer();
  return true;
}

function wire() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value;
    if (send(text)) $("prompt").value = "";
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => running?.controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (running) return;
    currentId = null;
    save();
    renderMessages();
    $("prompt").focus();
  });
  $("toggle-settings").addEventListener("click", () => document.body.classList.toggle("settings-open"));
  $("toggle-sidebar").addEventListener("click", () => {
    document.body.classList.toggle(PHONE.matches ? "sidebar-open" : "sidebar-closed");
  });
  for (const id of Object.values(SETTINGS_FIELDS)) {
    $(id).addEventListener("input", () => {
      syncToolName();
      localStorage.setItem(KEYS.settings, JSON.stringify(readSettings()));
    });
  }
  $("change-key").addEventListener("click", () => askForKey(""));
  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    localStorage.setItem(KEYS.apiKey, $("key-input").value.trim());
    $("key-dialog").close();
    try {
      if (await fetchModel()) renderMessages();
    } catch (err) {
      showError(err);
    }
  });
  $("messages").addEventListener("click", (e) => {
    const button = e.target.closest("button.copy");
    if (!button) return;
    navigator.clipboard?.writeText(button.closest(".code").querySelector("code").textContent);
    button.textContent = "copied";
    setTimeout(() => { button.textContent = "copy"; }, 1200);
  });
}

function showError(err) {
  const el = element("div", "msg error", `${err.status ? `Error ${err.status}: ` : "Error: "}${err.message}`);
  $("messages").append(el);
}

async function main() {
  wire();
  restoreSettings();
  if (!PHONE.matches && window.innerWidth > 1100) document.body.classList.add("settings-open");
  if (conversations.some((c) => c.messages.some((m) => m.status === "streaming"))) {
    for (const c of conversations) for (const m of c.messages) if (m.status === "streaming") m.status = "stopped";
    save();
  }
  renderMessages();
  try {
    await fetchModel();
  } catch (err) {
    showError(err);
  }
  renderMessages();
  document.body.dataset.ready = "1";
}

main();
