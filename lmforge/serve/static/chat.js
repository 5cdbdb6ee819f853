// lmforge web chat: plain JavaScript against the server's OpenAI API, relative URLs (so it works under a prefix).
//
// The page's state is on <body data-state="...">: loading, idle, streaming, done, stopped, error or needs-key
// (tests and styles read it). Model output is only ever inserted as text (Text nodes), never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "lmforge.api_key";
  const STATUS = { loading: "loading…", idle: "ready", streaming: "generating…", done: "done",
                   stopped: "stopped", error: "error", "needs-key": "API key needed" };

  const history = [];  // the conversation sent with each request: {role, content}
  let models = [];  // the ids /v1/models listed
  let controller = null;  // the AbortController of the reply being streamed, null when idle
  let sidebarForKey = false;  // the settings were opened to ask for the key (closed again once it works)
  let chatNumber = 0;  // "New chat" counts up: a reply that ends after it belongs to a conversation now gone

  function setState(state) {
    document.body.dataset.state = state;
    $("status").textContent = STATUS[state];
    const busy = state === "streaming";
    $("send").hidden = busy;
    $("stop").hidden = !busy;
  }

  function requestHeaders() {
    const headers = { "Content-Type": "application/json" };
    const key = $("api_key").value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    return headers;
  }

  // A message row: its role label, its content (text only) and a meta line; returned as {element, content, meta}.
  function addMessage(kind, label, text) {
    $("empty").hidden = true;
    const element = document.createElement("div");
    element.className = `message ${kind}`;
    const role = document.createElement("div");
    role.className = "role";
    role.textContent = label;
    const content = document.createElement("div");
    content.className = "content";
    content.textContent = text;
    const meta = document.createElement("div");
    meta.className = "meta";
    element.append(role, content, meta);
    $("conversation").append(element);
    scrollToEnd(true);
    return { element, content, meta };
  }

  function scrollToEnd(force) {
    const box = $("conversation");
    // follow the reply only when the reader is already at the bottom: scrolling up to read is not undone
    if (force || box.scrollHeight - box.scrollTop - box.clientHeight < 80) box.scrollTop = box.scrollHeight;
  }

  // The message of a non-200 answer: OpenAI's {"error": {"message": ...}}, else the status line.
  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (_) { /* not JSON: fall back to the status */ }
    return `the server answered ${response.status} ${response.statusText}`;
  }

  async function loadModels() {
    // a reply being streamed keeps its state (the key may change meanwhile); the list is refreshed all the same
    const settle = (state) => { if (!controller) setState(state); };
    settle("loading");
    models = [];
    const select = $("model");
    let response;
    try {
      response = await fetch("v1/models", { headers: requestHeaders() });
    } catch (err) {
      select.replaceChildren(new Option("(server unreachable)"));
      addMessage("error", "error", `could not reach the server: ${err.message}`);
      settle("error");
      return;
    }
    if (response.status === 401) {
      select.replaceChildren(new Option("(API key needed)"));
      if (getComputedStyle($("sidebar")).display === "none") {
        showSidebar(true);
        sidebarForKey = true;
      }
      $("api_key").focus();
      settle("needs-key");
      return;
    }
    if (!response.ok) {
      addMessage("error", "error", `listing the models failed: ${await errorMessage(response)}`);
      settle("error");
      return;
    }
    models = (await response.json()).data.map((m) => m.id);
    const previous = select.value;
    select.replaceChildren(...models.map((id) => new Option(id, id)));
    if (models.includes(previous)) select.value = previous;
    select.disabled = models.length < 2;  // one model: a label, several: a selector
    showTitle();
    if (sidebarForKey) showSidebar(false);
    sidebarForKey = false;
    settle("idle");
  }

  function showTitle() {
    $("title").textContent = $("model").value || "Chat";
  }

  // The sampling fields of the request; an empty field is left out (the server's default).
  function samplingFields() {
    const fields = {};
    for (const [name, parse] of [["temperature", parseFloat], ["top_p", parseFloat],
                                 ["max_tokens", (v) => parseInt(v, 10)], ["seed", (v) => parseInt(v, 10)]]) {
      const raw = $(name).value.trim();
      if (raw !== "") fields[name] = parse(raw);
    }
    return fields;
  }

  // The JSON events of a server-sent event stream, until `data: [DONE]`; a body that ends before it is an error.
  async function* sseEvents(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    while (true) {
      const { value, done } = await reader.read();
      if (done) throw new Error("the server closed the stream before its end");
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r?\n/);
      buffer = lines.pop();  // a line cut by the chunk boundary waits for the rest
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }

  // The reply's meta line. Without the server's usage the tokens are the deltas with text (the stop token is not
  // counted): exact for ASCII text, a lower bound otherwise (a token ending inside a character comes with the next).
  function describe(tokens, exact, seconds, finish, outcome) {
    const about = exact ? "" : "~";
    const parts = [`${about}${tokens} token${tokens === 1 ? "" : "s"}`, `${seconds.toFixed(1)} s`];
    if (seconds > 0 && tokens > 0) parts.push(`${about}${(tokens / seconds).toFixed(1)} tokens/s`);
    if (outcome === "stopped") parts.push("stopped");
    else if (finish === "length") parts.push("cut at max tokens");
    return parts.join(" · ");
  }

  async function send() {
    const text = $("input").value;
    const model = $("model").value;
    if (controller || !text.trim() || !models.includes(model)) return;
    const chat = chatNumber;
    $("input").value = "";
    fitInput();
    const asked = addMessage("user", "You", text);
    history.push({ role: "user", content: text });
    const reply = addMessage("assistant streaming", model, "");
    const system = $("system").value.trim();
    const messages = system ? [{ role: "system", content: system }, ...history] : [...history];

    controller = new AbortController();
    setState("streaming");
    const started = performance.now();
    let tokens = 0;  // deltas with text
    let usage = null;
    let finish = null;
    let outcome = "done";
    let failure = "";
    try {
      const response = await fetch("v1/chat/completions", {
        method: "POST", headers: requestHeaders(), signal: controller.signal,
        body: JSON.stringify({ model, messages, stream: true, ...samplingFields() }),
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      for await (const event of sseEvents(response)) {
        if (event.error) throw new Error(event.error.message || "the server failed");
        if (event.usage) usage = event.usage;
        const choice = (event.choices || [])[0];
        if (!choice) continue;
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          reply.content.append(delta);  // a Text node: the model's output is never parsed as HTML
          tokens += 1;
          scrollToEnd(false);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    } catch (err) {
      if (err.name === "AbortError") outcome = "stopped";
      else {
        outcome = "error";
        failure = err instanceof TypeError ? `could not reach the server: ${err.message}` : err.message;
      }
    }
    controller = null;
    if (chat !== chatNumber) return;  // "New chat" was pressed: that conversation and its rows are gone
    reply.element.classList.remove("streaming");
    reply.content.normalize();
    const answer = reply.content.textContent;
    const seconds = (performance.now() - started) / 1000;

    if (outcome === "error" || (outcome === "stopped" && !answer)) {
      // an exchange without a reply leaves the history; its text goes back to the box to be sent again
      history.pop();
      if (!$("input").value) { $("input").value = text; fitInput(); }
      if (outcome === "error") {
        reply.element.remove();
        asked.element.classList.add("failed");
        addMessage("error", "error", failure);
      } else {
        reply.element.remove();
        asked.element.remove();
        if (!$("conversation").querySelector(".message")) $("empty").hidden = false;
      }
    } else {
      history.push({ role: "assistant", content: answer });
      const exact = usage !== null || /^[\x00-\x7f]*$/.test(answer);
      reply.meta.textContent = describe(usage ? usage.completion_tokens : tokens, exact, seconds, finish, outcome);
    }
    setState(outcome);
    $("input").focus();
  }

  function stop() {
    // aborting the fetch closes the connection; the server then aborts the request and frees its sequence
    if (controller) controller.abort();
  }

  function newChat() {
    stop();
    chatNumber += 1;
    history.length = 0;
    $("conversation").replaceChildren($("empty"));
    $("empty").hidden = false;
    if (models.length) setState("idle");
    $("input").focus();
  }

  function showSidebar(visible) {
    document.body.classList.toggle("sidebar-hidden", !visible);
    document.body.classList.toggle("sidebar-shown", visible);
  }

  function fitInput() {
    const input = $("input");
    input.style.height = "auto";
    input.style.height = `${Math.min(input.scrollHeight + 2, 200)}px`;
  }

  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("input").addEventListener("input", fitInput);
  $("stop").addEventListener("click", stop);
  $("new_chat").addEventListener("click", newChat);
  $("model").addEventListener("change", showTitle);
  $("toggle_sidebar").addEventListener("click", () => {
    showSidebar(getComputedStyle($("sidebar")).display === "none");
  });
  $("api_key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("api_key").addEventListener("change", () => {
    const key = $("api_key").value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    loadModels();
  });

  loadModels();
  $("input").focus();
})();
