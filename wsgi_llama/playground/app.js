// wsgi-llama playground: POSTs with fetch, reads the Server-Sent Events as they
// arrive, and shows every error as the API words it. No dependencies, no build.
// Every URL is relative to the page, so the playground works wherever the API
// is mounted (a blueprint prefix, SCRIPT_NAME, a proxy's path).
"use strict";

// One key per mount: two APIs in one app may have different keys.
const KEY_STORAGE = `wsgi-llama.api-key:${location.pathname}`;

const $ = (id) => document.getElementById(id);

const state = {
  models: {}, // id -> {chat_template, n_ctx}, from playground/info.json
  history: [], // the chat so far, without the system prompt
  controller: null, // the running request's AbortController
  heartbeats: 0,
};

/** An error the API reported, in its own words (error.message). */
class APIError extends Error {}

/**
 * A Server-Sent Events parser after the WHATWG specification: lines end in
 * CRLF, LF or CR (a CRLF may be split across reads), a line starting with ":"
 * is a comment (the server's ": ping" heartbeats), a blank line ends an event,
 * and "data" lines of one event are joined with LF.
 */
class SSEParser {
  constructor(onEvent, onComment) {
    this.onEvent = onEvent;
    this.onComment = onComment;
    this.buffer = "";
    this.data = [];
    this.type = "";
  }

  feed(text) {
    this.buffer += text;
    const breaks = /\r\n|\r|\n/g;
    let start = 0;
    let match;
    while ((match = breaks.exec(this.buffer)) !== null) {
      // A CR at the very end may be the first half of a CRLF: wait for more.
      if (match[0] === "\r" && breaks.lastIndex === this.buffer.length) break;
      const line = this.buffer.slice(start, match.index);
      start = breaks.lastIndex;
      this.line(line);
    }
    this.buffer = this.buffer.slice(start);
  }

  /** The stream ended: a pending CR ends its line; an unfinished event is dropped. */
  end() {
    if (this.buffer.endsWith("\r")) this.line(this.buffer.slice(0, -1));
    this.buffer = "";
  }

  line(line) {
    if (line === "") {
      const data = this.data;
      const type = this.type || "message";
      this.data = [];
      this.type = "";
      if (data.length) this.onEvent(data.join("\n"), type);
      return;
    }
    if (line[0] === ":") {
      this.onComment(line.slice(1).replace(/^ /, ""));
      return;
    }
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.type = value;
    // "id" and "retry" mean nothing to a stream that is not reconnected.
  }
}

function apiKey() {
  return $("api-key").value.trim();
}

function headers() {
  const result = { "Content-Type": "application/json" };
  if (apiKey()) result.Authorization = `Bearer ${apiKey()}`;
  return result;
}

/** The message of an error response: error.message when it is OpenAI-shaped. */
async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error && typeof body.error.message === "string") {
      return body.error.message;
    }
  } catch (_) {
    // not JSON: fall through to the status line
  }
  return `${response.status} ${response.statusText}`.trim();
}

function setStatus(stateName, text) {
  const status = $("status");
  status.dataset.state = stateName;
  status.textContent = text;
}

function option(value, label) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = label;
  return element;
}

// Models and modes

async function loadModels() {
  const select = $("model");
  const previous = select.value;
  let response;
  try {
    response = await fetch("v1/models", { headers: headers() });
  } catch (error) {
    setStatus("error", `Cannot reach the server: ${error.message}`);
    return;
  }
  if (!response.ok) {
    select.replaceChildren(option("", "(no models: see below)"));
    setStatus("error", await errorMessage(response));
    $("settings").open = true;
    return;
  }
  const list = await response.json();
  const ids = (list.data || []).map((model) => model.id);
  state.models = {};
  try {
    const info = await fetch("playground/info.json", { headers: headers() });
    if (info.ok) state.models = (await info.json()).models || {};
  } catch (_) {
    // Without it every model is taken to have a chat template.
  }
  select.replaceChildren(...ids.map((id) => option(id, id)));
  if (ids.includes(previous)) select.value = previous;
  applyModelMode();
  if ($("status").dataset.state === "error") setStatus("idle", "");
}

function chatTemplate(model) {
  const info = state.models[model];
  return info ? Boolean(info.chat_template) : true;
}

/** The mode that suits the chosen model: completion for base models. */
function applyModelMode() {
  const model = $("model").value;
  const chat = chatTemplate(model);
  $(chat ? "mode-chat" : "mode-completion").checked = true;
  $("mode-hint").textContent = model
    ? chat
      ? "This model has a chat template."
      : "This model has no chat template (a base model): completion suits it; " +
        "chat requests get a generic format."
    : "";
  updateMode();
}

function mode() {
  return $("mode-chat").checked ? "chat" : "completion";
}

function updateMode() {
  const chat = mode() === "chat";
  $("system").disabled = !chat;
  $("system-label").classList.toggle("off", !chat);
  $("prompt").placeholder = chat ? "Name three rivers." : "The capital of France is";
}

// The transcript

function transcript() {
  return $("transcript");
}

function nearBottom() {
  const box = transcript();
  return box.scrollHeight - box.scrollTop - box.clientHeight < 48;
}

function addMessage(kind, role) {
  $("empty")?.remove();
  const element = document.createElement("div");
  element.className = `message ${kind}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  element.append(label);
  transcript().append(element);
  return element;
}

/** A message the model writes into as chunks arrive. */
function addOutput(kind, role, prefix) {
  const element = addMessage(kind, role);
  if (prefix !== undefined) {
    const prompt = document.createElement("span");
    prompt.className = "prompt";
    prompt.textContent = prefix;
    element.append(prompt);
  }
  const output = document.createElement("span");
  output.className = "output generated";
  const text = document.createTextNode("");
  output.append(text);
  element.append(output);
  element.dataset.state = "streaming";
  transcript().scrollTop = transcript().scrollHeight;
  return {
    element,
    output,
    append(piece) {
      const follow = nearBottom();
      text.appendData(piece);
      if (follow) transcript().scrollTop = transcript().scrollHeight;
    },
    note(words) {
      const note = document.createElement("span");
      note.className = "note";
      note.textContent = words;
      element.append(note);
    },
  };
}

function showError(message) {
  const element = addMessage("error", "Error");
  element.append(document.createTextNode(message));
  transcript().scrollTop = transcript().scrollHeight;
}

// Heartbeats

function resetHeartbeats() {
  state.heartbeats = 0;
  showHeartbeats();
}

function heartbeat() {
  state.heartbeats += 1;
  showHeartbeats();
  const mark = $("heartbeats");
  mark.classList.remove("beat");
  void mark.offsetWidth; // restart the animation
  mark.classList.add("beat");
}

function pings(count) {
  return `${count} ${count === 1 ? "ping" : "pings"}`;
}

function showHeartbeats() {
  $("heartbeats").dataset.count = String(state.heartbeats);
  $("heartbeat-count").textContent = pings(state.heartbeats);
}

// Sending

function number(id, fallback) {
  const value = Number($(id).value);
  return $(id).value !== "" && Number.isFinite(value) ? value : fallback;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(event) {
  event.preventDefault();
  if (state.controller) return;
  const text = $("prompt").value;
  if (!text.trim()) {
    $("prompt").focus();
    return;
  }
  const chat = mode() === "chat";
  const body = {
    temperature: number("temperature", 0.8),
    max_tokens: Math.max(1, Math.round(number("max-tokens", 256))),
    stream: true,
    stream_options: { include_usage: true },
  };
  if ($("model").value) body.model = $("model").value;
  let view;
  let url;
  if (chat) {
    const system = $("system").value.trim();
    body.messages = [
      ...(system ? [{ role: "system", content: system }] : []),
      ...state.history,
      { role: "user", content: text },
    ];
    url = "v1/chat/completions";
    addMessage("user", "You").append(document.createTextNode(text));
    view = addOutput("assistant", "Assistant");
    $("prompt").value = "";
  } else {
    body.prompt = text;
    url = "v1/completions";
    view = addOutput("completion", "Completion", text);
  }
  const answer = await stream(url, body, view, chat);
  if (chat && answer !== null) {
    state.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
  }
}

/** Run one streamed request into *view*; the text produced, or null on error. */
async function stream(url, body, view, chat) {
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  resetHeartbeats();
  const started = performance.now();
  let firstAt = null;
  let produced = "";
  let chunks = 0;
  let usage = null;
  let finished = false;
  let shownAt = 0;
  setStatus("waiting", "Waiting for the model…");

  const onEvent = (data) => {
    if (data === "[DONE]") {
      finished = true;
      return;
    }
    let chunk;
    try {
      chunk = JSON.parse(data);
    } catch (_) {
      throw new APIError(`The server sent an event that is not JSON: ${data.slice(0, 200)}`);
    }
    if (chunk.error) throw new APIError(chunk.error.message || JSON.stringify(chunk.error));
    if (chunk.usage) usage = chunk.usage;
    const choice = (chunk.choices || [])[0];
    if (!choice) return;
    const piece = chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
    if (!piece) return;
    if (firstAt === null) firstAt = performance.now();
    chunks += 1;
    produced += piece;
    view.append(piece);
    const now = performance.now();
    if (now - shownAt > 100) {
      shownAt = now;
      setStatus("streaming", `Streaming… ${chunks} chunks in ${seconds(now - started)} s`);
    }
  };
  const onComment = () => {
    heartbeat();
    if (firstAt === null) {
      setStatus("waiting", `Waiting for the model… (alive: ${pings(state.heartbeats)})`);
    }
  };

  let reader = null;
  try {
    const response = await fetch(url, {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw new APIError(await errorMessage(response));
    reader = response.body.getReader();
    const decoder = new TextDecoder();
    const parser = new SSEParser(onEvent, onComment);
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.feed(decoder.decode(value, { stream: true }));
    }
    parser.feed(decoder.decode());
    parser.end();
    if (!finished) throw new APIError("The stream ended before [DONE]: the server went away.");
    view.element.dataset.state = "done";
    const tokens = usage ? usage.completion_tokens : chunks;
    const elapsed = performance.now() - started;
    const rate = firstAt === null ? "" : `, ${(tokens / Math.max(0.001, (performance.now() - firstAt) / 1000)).toFixed(1)} tokens/s`;
    const first = firstAt === null ? "" : `; first token after ${seconds(firstAt - started)} s`;
    setStatus("done", `Done: ${tokens} tokens in ${seconds(elapsed)} s${rate}${first}.`);
    return produced;
  } catch (error) {
    if (controller.signal.aborted) {
      view.element.dataset.state = "stopped";
      view.note("Stopped.");
      setStatus("stopped", `Stopped after ${chunks} chunks; the server frees the model.`);
      return produced || null; // an empty answer is not worth keeping in the chat
    }
    // Our own parse errors leave the body unread: stop the download too.
    controller.abort();
    view.element.dataset.state = "error";
    if (!produced) view.element.remove();
    const message = error instanceof APIError ? error.message : `Network error: ${error.message}`;
    showError(message);
    setStatus("error", message);
    return null;
  } finally {
    if (reader) reader.releaseLock?.();
    state.controller = null;
    setBusy(false);
  }
}

function seconds(milliseconds) {
  return (milliseconds / 1000).toFixed(1);
}

function stop() {
  if (state.controller) state.controller.abort();
}

function clear() {
  stop();
  state.history = [];
  transcript().replaceChildren();
  setStatus("idle", "");
}

function init() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("input", () => {
    if (apiKey()) sessionStorage.setItem(KEY_STORAGE, apiKey());
    else sessionStorage.removeItem(KEY_STORAGE);
  });
  key.addEventListener("change", loadModels);
  $("model").addEventListener("change", applyModelMode);
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", updateMode);
  }
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", clear);
  if (window.matchMedia("(max-width: 720px)").matches) $("settings").open = false;
  $("mode-chat").checked = true;
  updateMode();
  loadModels();
}

init();
