// The chat page: a gateway client like any other (docs/protocol.md). No build step.
// The transcript is the session's history from the server plus the live runs' text; after
// a run ends, the history is read again, so the page always shows what a reload shows.
"use strict";

const DEFAULT_SESSION = "agent:main:main";  // if hello-ok names no main session
const TOKEN_KEY = "trio-agent-token";
const STOP_NOTES = {
  rpc: "Stopped by user.",
  stop: "Stopped by user.",
  "stop-command": "Stopped by user.",
  interrupted: "Interrupted by a newer message.",
  shutdown: "Stopped: the gateway shut down.",
  timeout: "Stopped: the reply took too long.",
  disconnect: "Stopped: its client disconnected.",
};
const QUEUED_NOTES = {
  enqueue: "Queued: your message runs when the current reply ends.",
  interrupt: "Your message interrupts the current reply.",
  rollback: "Your message replaces the current reply, which is rolled back.",
};
const TOOL_WORDS = {
  running: "running…", finished: "done", failed: "error",
  cancelled: "cancelled (stopped while running)", not_started: "never started",
};
const TOOL_CAPABILITY = "runtime.tool:";  // hello-ok lists each tool as runtime.tool:NAME

const $ = (id) => document.getElementById(id);
const ui = {
  sessions: $("sessions"), title: $("session-title"), transcript: $("transcript"),
  status: $("status"), box: $("message"), send: $("send"), composer: $("composer"),
  stopPolicy: $("stop-policy"), concurrency: $("concurrency"), thinking: $("thinking"),
  connection: $("connection"), tokenForm: $("token-form"), token: $("token"),
  tools: $("tools"),
};

const LIST_EVERY_MS = 5000;  // how often the session list is read again

const state = {
  ws: null, nextId: 1, pending: new Map(), connected: false, needToken: false, retries: 0,
  session: sessionFromHash(),  // null until hello-ok names the main session
  sessions: [], messages: [], settings: null,
  mainSession: DEFAULT_SESSION,
  prefix: "",              // what this token's session keys and run ids must begin with
  runs: new Map(),         // runId -> live run of the current session
  ended: new Set(),        // runs seen ending: a late history read must not revive them
  mine: new Set(),         // runs this page started
  subscribed: null,        // the session this connection follows (sessions.messages.subscribe)
  // From stop receipts, keyed "runId toolCallId" (a provider may reuse a call id in
  // another run): the call's status, and whether its server was told of the stop.
  toolStatus: new Map(),
  toolTold: new Set(),
  stopping: false, reloadSoon: null, listSoon: null,
};

function sessionFromHash() {
  const match = /^#session=(.+)$/.exec(location.hash);
  return match ? decodeURIComponent(match[1]) : null;
}

// docs/protocol.md "Access": the namespace is what hello-ok's mainSessionKey puts before
// agent:<defaultAgentId>:<mainKey>; "" for the single tenant or a gateway that says nothing.
function learnSessionDefaults(defaults) {
  const main = defaults ? defaults.mainSessionKey : DEFAULT_SESSION;
  const plain = defaults ? `agent:${defaults.defaultAgentId}:${defaults.mainKey}` : main;
  state.mainSession = main;
  state.prefix = main.endsWith(plain) ? main.slice(0, main.length - plain.length) : "";
}

function setStatus(text) { ui.status.textContent = text; }

// -- the connection ------------------------------------------------------------------

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}/`);
  state.ws = ws;
  ws.onmessage = (event) => onFrame(JSON.parse(event.data));
  ws.onclose = () => {
    if (state.ws !== ws) return;
    state.ws = null;
    state.connected = false;
    state.subscribed = null;  // a new connection follows nothing until it subscribes
    for (const { reject } of state.pending.values()) reject(gatewayError("Not connected to the gateway."));
    state.pending.clear();
    if (state.needToken) return;  // wait for the token form
    const delay = Math.min(3000, 250 * 2 ** state.retries++);
    ui.connection.textContent = "Disconnected; reconnecting…";
    setTimeout(connect, delay);
  };
}

function gatewayError(message, code = "UNAVAILABLE", details = null) {
  const error = new Error(message);
  error.code = code;
  error.details = details;
  return error;
}

function request(method, params) {
  return new Promise((resolve, reject) => {
    const ws = state.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN || (!state.connected && method !== "connect")) {
      reject(gatewayError("Not connected to the gateway; the page is reconnecting."));
      return;
    }
    const id = String(state.nextId++);
    state.pending.set(id, { resolve, reject });
    ws.send(JSON.stringify({ type: "req", id, method, params }));
  });
}

function onFrame(frame) {
  if (frame.type === "res") {
    const waiter = state.pending.get(frame.id);
    if (!waiter) return;
    state.pending.delete(frame.id);
    if (frame.ok) waiter.resolve(frame.payload);
    else waiter.reject(gatewayError(frame.error.message, frame.error.code, frame.error.details));
  } else if (frame.type === "event") {
    if (frame.event === "connect.challenge") hello();
    else if (frame.event === "chat") onChat(frame.payload);
    else if (frame.event === "agent") onAgent(frame.payload);
    else if (frame.event === "runtime.stopped") onStopped(frame.payload);
  }
}

async function hello() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const params = {
    minProtocol: 4, maxProtocol: 4, role: "operator",
    client: { id: "webchat-ui", displayName: "trio-agent chat page", version: "1", platform: "web", mode: "webchat" },
    scopes: ["operator.read", "operator.write"], caps: ["tool-events"],
  };
  if (token) params.auth = { token };
  let welcome;
  try {
    welcome = await request("connect", params);
  } catch (error) {
    const code = error.details && error.details.code;
    if (code === "AUTH_TOKEN_MISSING" || code === "AUTH_TOKEN_MISMATCH") {
      state.needToken = true;
      sessionStorage.removeItem(TOKEN_KEY);
      ui.tokenForm.hidden = false;
      ui.connection.textContent = "This gateway needs a token.";
      setStatus(code === "AUTH_TOKEN_MISSING" ? "Enter the gateway's token to connect." : "That token is wrong; try again.");
      ui.token.focus();
    }
    return;
  }
  state.connected = true;
  state.retries = 0;
  ui.connection.textContent = "Connected";
  ui.tokenForm.hidden = true;
  learnSessionDefaults(welcome.snapshot && welcome.snapshot.sessionDefaults);
  showTools((welcome.features && welcome.features.capabilities) || []);
  if (!sessionFromHash()) showSession(state.mainSession);
  // other sessions' events no longer reach a subscribed page: their list is read again
  clearInterval(state.listTimer);
  state.listTimer = setInterval(() => { if (state.connected) loadSessions(); }, LIST_EVERY_MS);
  await Promise.all([loadSessions(), loadSession()]);
}

function showTools(capabilities) {
  const names = capabilities.filter((c) => c.startsWith(TOOL_CAPABILITY)).map((c) => c.slice(TOOL_CAPABILITY.length));
  ui.tools.textContent = names.length ? `Tools: ${names.join(", ")}` : "";
  ui.tools.hidden = !names.length;
}

// -- sessions and history --------------------------------------------------------------

async function loadSessions() {
  try {
    const listed = await request("sessions.list", {});
    state.sessions = listed.sessions;
  } catch (error) {
    return;  // the list is a convenience; the chat still works
  }
  renderSessions();
}

function renderSessions() {
  const rows = state.sessions.slice();
  if (state.session && !rows.some((row) => row.key === state.session)) rows.unshift({ key: state.session });
  ui.sessions.replaceChildren(...rows.map((row) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = row.key;
    if (row.status) {
      const live = document.createElement("span");
      live.className = "live";
      live.textContent = row.status === "running" ? " (replying)" : " (queued)";
      button.append(live);
    }
    if (row.key === state.session) button.setAttribute("aria-current", "true");
    button.addEventListener("click", () => switchSession(row.key));
    item.append(button);
    return item;
  }));
}

function switchSession(key) {
  if (key === state.session) return;
  history.replaceState(null, "", `#session=${encodeURIComponent(key)}`);
  showSession(key);
  loadSession();
}

function showSession(key) {  // an empty transcript until the history read fills it
  if (key === state.session) return;
  state.session = key;
  state.messages = [];
  state.runs.clear();
  state.stopping = false;
  setStatus("");
  render();
  renderSessions();
}

async function follow(key) {
  // Only the shown session's events (and this page's own runs) reach this connection;
  // subscribed before the history read, so no event falls between the two.
  if (state.subscribed === key) return;
  const previous = state.subscribed;
  state.subscribed = key;
  try {
    await request("sessions.messages.subscribe", { key });
    if (previous) await request("sessions.messages.unsubscribe", { key: previous });
  } catch (error) {
    // an older gateway, or a dropped connection: it broadcasts, or the reconnect retries
  }
}

async function loadSession() {
  const key = state.session;
  await follow(key);
  if (key !== state.session) return;
  const asked = performance.now();
  let read;
  try {
    read = await request("chat.history", { sessionKey: key });
  } catch (error) {
    setStatus(`Could not read the history: ${error.message}`);
    return;
  }
  if (key !== state.session) return;
  state.messages = read.messages;
  state.settings = read.settings;
  ui.stopPolicy.value = read.settings.stopPolicy;
  ui.concurrency.value = read.settings.concurrency;
  const runs = new Map();
  const flight = read.inFlightRun;
  for (const live of read.liveRuns) {
    if (state.ended.has(live.runId)) continue;
    const known = state.runs.get(live.runId);
    const run = known || newRun(live.runId);
    if (flight && flight.runId === live.runId) adopt(run, flight.text, flight.seq);
    else if (!run.based) adopt(run, "", -1);  // queued: nothing said yet
    run.phase = live.phase;
    run.allowCancel = live.allowCancel !== false;
    runs.set(live.runId, run);
  }
  for (const [runId, run] of state.runs) {  // started after we asked: its events came first
    if (run.born > asked && !runs.has(runId)) runs.set(runId, run);
  }
  state.runs = runs;
  if (state.stopping && !runs.size) state.stopping = false;
  render();
}

function reloadSoon() {  // one history read for a burst of endings
  clearTimeout(state.reloadSoon);
  state.reloadSoon = setTimeout(loadSession, 30);
}

function listSoon() {
  clearTimeout(state.listSoon);
  state.listSoon = setTimeout(loadSessions, 200);
}

// -- runs ---------------------------------------------------------------------------

function newRun(runId, based = false) {
  // allowCancel: false when the run was started so that no client may stop it.
  // The resume rule (docs/protocol.md, "Reconnect and resume"): `seq` is the run's seq
  // that `text` reflects; events at or below it are in the text already. A run first
  // seen mid-stream has no base until a delta with the whole `message` or the history's
  // `inFlightRun` gives one; its deltas wait in `early` until then.
  return { runId, text: "", seq: -1, based, early: [], thinking: "", phase: "running", allowCancel: true, tools: new Map(), born: performance.now(), el: null };
}

// The history's snapshot of a run: taken unless the page already holds a later one; the
// deltas that came before it and are newer than it are applied on top, in order.
function adopt(run, text, seq) {
  if (run.based && run.seq >= seq) return;
  run.text = text;
  run.seq = seq;
  run.based = true;
  for (const [early, delta] of run.early) {
    if (early > run.seq) { run.text += delta; run.seq = early; }
  }
  run.early = [];
}

function applyDelta(run, payload) {
  if (payload.seq <= run.seq) return false;  // already in the text
  if (payload.message) {  // the whole text so far
    run.text = textOf(payload.message);
    run.based = true;
    run.early = [];
  } else if (run.based) {
    run.text += payload.deltaText;
  } else {
    run.early.push([payload.seq, payload.deltaText]);  // until the history read gives a base
    return false;
  }
  run.seq = payload.seq;
  return true;
}

function runFor(runId, from = null) {
  let run = state.runs.get(runId);
  if (!run && !state.ended.has(runId)) {
    // seen from its first event (options, queued, start): it has said nothing before it
    run = newRun(runId, from !== null);
    if (from !== null) run.seq = from;
    state.runs.set(runId, run);
    if (!state.mine.has(runId)) reloadSoon();  // another client's message: read its prompt
    render();
  }
  return run;
}

function endRun(runId, message) {
  state.ended.add(runId);
  state.runs.delete(runId);
  if (message) state.messages.push(message);  // shown until the history read replaces it
  render();
  reloadSoon();
  listSoon();
}

function onAgent(payload) {
  const data = payload.data || {};
  if (data.sessionKey !== state.session) {
    if (payload.stream === "lifecycle") listSoon();
    return;
  }
  const first = payload.stream === "lifecycle" && ["options", "queued", "start"].includes(data.phase);
  const run = runFor(payload.runId, first ? payload.seq : null);
  if (!run) return;
  if (payload.stream === "lifecycle") {
    if (data.phase === "queued") run.phase = "queued";
    else if (data.phase === "start") run.phase = "running";
    else if (data.phase === "options") run.allowCancel = data.allowCancel !== false;
    else return;
  } else if (payload.stream === "thinking") {
    if (!run.text) run.thinking = data.text !== undefined ? data.text : run.thinking + data.delta;
  } else if (payload.stream === "tool") {
    const known = run.tools.get(data.toolCallId);
    if (data.phase === "progress") {
      if (!known || known.status !== "running") return;
      known.progress = progressText(data);
    } else {
      const status = data.phase === "start" ? "running" : data.isError ? "failed" : "finished";
      run.tools.set(data.toolCallId, { id: data.toolCallId, name: data.name, status });
    }
  } else {
    return;
  }
  paintRun(run);
  updateControls();
}

function onChat(payload) {
  if (payload.sessionKey !== state.session) {
    if (payload.state !== "delta") listSoon();
    return;
  }
  const runId = payload.runId;
  if (payload.state === "delta") {
    const run = runFor(runId);
    if (!run || !applyDelta(run, payload)) return;
    run.thinking = "";
    paintRun(run);
    return;
  }
  if (payload.state === "final") {
    if (state.stopping) setStatus("The reply had already finished when the stop arrived.");
    else if (state.mine.has(runId)) setStatus("");
  } else if (payload.state === "aborted") {
    setStatus(STOP_NOTES[payload.stopReason] || "Stopped.");
  } else if (payload.state === "error") {
    setStatus(`The reply failed: ${payload.errorMessage || "the model's provider gave an error."}`);
  }
  state.stopping = false;
  endRun(runId, payload.message);
}

function onStopped(payload) {
  for (const item of payload.receipt) {
    state.toolStatus.set(`${payload.runId} ${item.toolCallId}`, item.status);
    if (item.cancelDelivered) state.toolTold.add(`${payload.runId} ${item.toolCallId}`);
  }
  if (payload.sessionKey !== state.session) return;
  const cancelled = payload.receipt.filter((item) => item.status === "cancelled");
  if (cancelled.length) {
    const names = cancelled.map((item) => item.cancelDelivered ? `${item.name} (its server was told)` : item.name);
    setStatus(`${STOP_NOTES[payload.reason] || "Stopped."} Cancelled: ${names.join(", ")}.`);
    render();
  }
  if (!payload.restoredPrompt) return;
  if (payload.reason === "interrupted") return;  // the user replaced it on purpose
  if (!state.mine.has(payload.runId) && ui.box.value) return;  // never clobber typing
  const typed = ui.box.value;
  ui.box.value = typed ? `${payload.restoredPrompt}\n${typed}` : payload.restoredPrompt;
  ui.box.focus();
  ui.box.setSelectionRange(ui.box.value.length, ui.box.value.length);
  if (STOP_NOTES[payload.reason] === "Stopped by user.") {
    setStatus("Stopped by user. Your message is back in the box.");
  }
}

// -- actions ------------------------------------------------------------------------

async function send(text, fromBox) {
  if (!text.trim()) return;
  const busy = state.runs.size > 0;
  const runId = state.prefix + newId();  // the run id is the idempotency key
  state.mine.add(runId);
  if (fromBox) ui.box.value = "";
  const sent = { role: "user", content: [{ type: "text", text }], timestamp: Date.now() };
  state.messages.push(sent);
  const run = newRun(runId, true);  // ours: every event of it reaches us
  if (busy) run.phase = "queued";
  state.runs.set(runId, run);
  render();
  setStatus(busy ? QUEUED_NOTES[ui.concurrency.value] || "" : "");
  const params = { sessionKey: state.session, message: text, idempotencyKey: runId };
  if (ui.thinking.checked) params.thinking = "on";
  try {
    await request("chat.send", params);
  } catch (error) {
    state.messages = state.messages.filter((message) => message !== sent);
    state.runs.delete(runId);
    state.ended.add(runId);
    if (fromBox && !ui.box.value) ui.box.value = text;
    render();
    setStatus(`Not sent: ${error.message}`);
    return;
  }
  if (!state.sessions.some((row) => row.key === state.session)) listSoon();
}

async function stop() {
  state.stopping = true;
  setStatus("Stopping…");
  try {
    const result = await request("chat.abort", { sessionKey: state.session });
    if (!result.aborted && state.stopping) {
      state.stopping = false;
      setStatus("Nothing to stop: the reply had already ended.");
    }
  } catch (error) {
    state.stopping = false;
    setStatus(`Could not stop: ${error.message}`);
  }
}

async function configure(field, value) {
  try {
    const settings = await request("runtime.sessions.configure", { sessionKey: state.session, [field]: value });
    state.settings = { stopPolicy: settings.stopPolicy, concurrency: settings.concurrency };
    listSoon();
  } catch (error) {
    setStatus(`Could not change the setting: ${error.message}`);
    if (state.settings) {
      ui.stopPolicy.value = state.settings.stopPolicy;
      ui.concurrency.value = state.settings.concurrency;
    }
  }
}

function newId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();  // secure contexts only
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

// -- rendering ------------------------------------------------------------------------

function textOf(message) {
  if (!message || !Array.isArray(message.content)) return "";
  return message.content.filter((b) => b.type === "text").map((b) => b.text).join("");
}

function progressText(data) {
  const share = data.total ? `${Math.round((100 * data.progress) / data.total)}%` : `${data.progress}`;
  return data.message ? `${share}, ${data.message}` : share;
}

function toolStatusFromHistory(call, result, runId) {
  const known = state.toolStatus.get(`${runId} ${call.id}`);
  if (known) return known;
  if (!result) return "running";
  // the runtime's own words for a tool a stop interrupted (runtime/_state.py)
  if (result.text.startsWith("Not completed:")) return "cancelled";
  if (result.text.startsWith("Not run:")) return "not_started";
  return result.isError ? "failed" : "finished";
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function toolList(entries, runId) {
  const list = element("ul", "tools");
  for (const { id, name, status, progress } of entries) {
    let words = TOOL_WORDS[status] || status;
    if (status === "running" && progress) words += ` ${progress}`;
    if (status === "cancelled" && state.toolTold.has(`${runId} ${id}`)) words += "; its server was told to stop";
    const item = element("li", "tool", `Tool ${name}: ${words}`);
    item.dataset.status = status;
    list.append(item);
  }
  return list;
}

// The results answering the calls of the message at ``index``: those in the tool
// messages right after it (a call id may come back in a later run).
function resultsAfter(index) {
  const results = new Map();
  for (let i = index + 1; i < state.messages.length && state.messages[i].role === "toolResult"; i++) {
    for (const block of state.messages[i].content) if (block.type === "toolResult") results.set(block.toolCallId, block);
  }
  return results;
}

function renderMessage(message, index) {
  const user = message.role === "user";
  const node = element("article", `msg ${user ? "user" : "assistant"}`);
  node.setAttribute("aria-label", user ? "You" : "Assistant");
  node.append(element("div", "who", user ? "You" : "Assistant"));
  const text = textOf(message);
  if (text) node.append(element("div", "text", text));
  const calls = message.content.filter((b) => b.type === "toolCall");
  if (calls.length) {
    // A stop receipt names its run; history names the run of a stopped reply only.
    const runId = message.openclawAbort ? message.openclawAbort.runId : null;
    const results = resultsAfter(index);
    node.append(toolList(calls.map((call) => ({ id: call.id, name: call.name, status: toolStatusFromHistory(call, results.get(call.id), runId) })), runId));
  }
  const abort = message.openclawAbort;
  if (abort || message.errorKind) {
    node.classList.add(abort ? "stopped" : "failed");
    const note = abort ? STOP_NOTES[abort.origin] || "Stopped." : "The reply failed.";
    node.append(element("p", "note", note));
    const prompt = promptBefore(index);
    if (prompt) {
      const retry = element("button", "retry", "Retry");
      retry.type = "button";
      retry.addEventListener("click", () => send(prompt, false));
      node.append(retry);
    }
  }
  return node;
}

function promptBefore(index) {
  for (let i = index - 1; i >= 0; i--) {
    if (state.messages[i].role === "user") return textOf(state.messages[i]);
  }
  return "";
}

function paintRun(run) {
  if (!run.el) return;
  const stick = nearBottom();
  const parts = [element("div", "who", "Assistant")];
  if (run.phase === "queued") parts.push(element("p", "thinking", "Queued…"));
  else if (!run.text) parts.push(element("p", "thinking", run.thinking ? `Thinking… ${run.thinking}` : "Thinking…"));
  if (run.text) parts.push(element("div", "text", run.text));
  if (run.tools.size) parts.push(toolList(run.tools.values(), run.runId));
  if (!run.allowCancel) parts.push(element("p", "note", "This reply cannot be stopped."));
  run.el.replaceChildren(...parts);
  if (stick) scrollDown();
}

function render() {
  const stick = nearBottom();
  const nodes = [];
  state.messages.forEach((message, index) => {
    if (message.role !== "toolResult") nodes.push(renderMessage(message, index));
  });
  for (const run of state.runs.values()) {
    run.el = element("article", "msg assistant live");
    run.el.setAttribute("aria-label", "Assistant");
    run.el.setAttribute("aria-busy", "true");
    paintRun(run);
    nodes.push(run.el);
  }
  ui.transcript.replaceChildren(...nodes);
  ui.title.textContent = state.session || "";
  updateControls();
  if (stick) scrollDown();
}

// Stop is offered while a live run of the session may be stopped; a run started with
// allowCancel false refuses every stop, so for it the button stays Send.
function canStop() {
  for (const run of state.runs.values()) if (run.allowCancel) return true;
  return false;
}

function updateControls() {
  const live = canStop();
  ui.send.textContent = live ? "Stop" : "Send";
  ui.send.classList.toggle("stop", live);
}

function nearBottom() {
  const t = ui.transcript;
  return t.scrollHeight - t.scrollTop - t.clientHeight < 40;
}

function scrollDown() { ui.transcript.scrollTop = ui.transcript.scrollHeight; }

// -- wiring ---------------------------------------------------------------------------

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  if (canStop()) stop();
  else send(ui.box.value, true);
});
ui.box.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send(ui.box.value, true);  // while a run is live, the session's concurrency policy decides
  }
});
ui.stopPolicy.addEventListener("change", () => configure("stopPolicy", ui.stopPolicy.value));
ui.concurrency.addEventListener("change", () => configure("concurrency", ui.concurrency.value));
$("new-session").addEventListener("click", () => {
  switchSession(`${state.prefix}web:${newId().slice(0, 8)}`);
  ui.box.focus();
});
ui.tokenForm.addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, ui.token.value);
  ui.token.value = "";
  state.needToken = false;
  ui.connection.textContent = "Connecting…";
  setStatus("");
  if (state.ws) state.ws.close();
  else connect();
});
window.addEventListener("hashchange", () => switchSession(sessionFromHash() || state.mainSession));

render();
renderSessions();
connect();
