// Drive a gateway with the official OpenClaw client (@openclaw/gateway-client@2026.9.1).
//
//   node tests/node/drive.mjs <scenario> --url ws://127.0.0.1:PORT [--token T]
//        [--session KEY] [--message TEXT] [--timeout-ms N] [--subscribe]
//   node tests/node/drive.mjs --check      (imports the packages, prints one line, exits 0)
//
// Scenarios: send-abort, send-final, resume, bad-token (see usage below).
//
// stdout: one JSON object per line:
//   {"kind":"event","frame":<event frame exactly as received>}   every event the client
//       hands on (all but connect.challenge, which the client consumes itself)
//   {"kind":"step","name":<step>,"result":<value>}                 a step that succeeded
//   {"kind":"error","name":<step>,"code":<gateway code|null>,"message":<text>,"details":<any>}
// Exit 0 when the scenario completed; non-zero with a message on stderr otherwise (including
// the overall timeout, default 30 s).

import { randomUUID } from "node:crypto";

const USAGE = `usage: node drive.mjs <scenario> --url ws://127.0.0.1:PORT [--token T] [--session KEY]
                     [--message TEXT] [--run RUN_ID] [--timeout-ms N] [--subscribe]
       node drive.mjs --check
scenarios:
  send-abort  connect; chat.send; wait for 3 'delta' chat events of the run; chat.abort {sessionKey, runId};
              wait for the 'aborted' chat event; chat.history {sessionKey}; stop.
              default --message "Tell me something.\\n#sim words=400 rate=50"
  send-final  connect; chat.send; wait for the 'final' chat event; chat.history {sessionKey}; stop.
              default --message "Hi.\\n#sim words=5 rate=100"
  resume      pick up the live run --run that another client started: connect (and
              sessions.messages.subscribe {key} when hello-ok lists it); chat.history; from
              its inFlightRun {text, seq} apply only the run's chat deltas with a higher seq
              (deltaText alone) until its terminal event; report the text rebuilt
              ('rebuilt' step); chat.history again; stop.
  bad-token   connect with --token (default: a wrong token); report the connect error and the
              close, stop after the first failure (no reconnect loop). Exit 0 if the gateway
              refused the connection, 1 if it accepted it.
--subscribe: (send-abort, send-final) call sessions.messages.subscribe {key: --session} first
output: one JSON object per line on stdout: {"kind":"event","frame":…} | {"kind":"step","name":…,"result":…}
        | {"kind":"error","name":…,"code":…,"message":…,"details":…}`;

const DEFAULT_MESSAGES = {
  "send-abort": "Tell me something.\n#sim words=400 rate=50",
  "send-final": "Hi.\n#sim words=5 rate=100",
};
const SCENARIOS = new Set(["send-abort", "send-final", "resume", "bad-token"]);

function parseArgs(argv) {
  const opts = { session: "agent:main:main", timeoutMs: 30000 };
  const positional = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) fail(`${a} needs a value`, 2);
      return argv[++i];
    };
    if (a === "--help" || a === "-h") opts.help = true;
    else if (a === "--check") opts.check = true;
    else if (a === "--url") opts.url = value();
    else if (a === "--token") opts.token = value();
    else if (a === "--session") opts.session = value();
    else if (a === "--message") opts.message = value();
    else if (a === "--run") opts.run = value();
    else if (a === "--timeout-ms") opts.timeoutMs = Number(value());
    else if (a === "--subscribe") opts.subscribe = true;
    else if (a.startsWith("--")) fail(`unknown option ${a}\n${USAGE}`, 2);
    else positional.push(a);
  }
  opts.scenario = positional[0];
  return opts;
}

function emit(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

function fail(message, code = 1) {
  process.stderr.write(`drive.mjs: ${message}\n`);
  process.exit(code);
}

function errorLine(name, err) {
  return {
    kind: "error",
    name,
    code: err?.gatewayCode ?? err?.code ?? null,
    message: String(err?.message ?? err),
    ...(err?.details !== undefined ? { details: err.details } : {}),
  };
}

const opts = parseArgs(process.argv.slice(2));
if (opts.help) {
  process.stdout.write(`${USAGE}\n`);
  process.exit(0);
}

// Import after argument parsing so that --help works even without node_modules.
let GatewayClient, PROTOCOL_VERSION;
try {
  ({ GatewayClient } = await import("@openclaw/gateway-client"));
  ({ PROTOCOL_VERSION } = await import("@openclaw/gateway-protocol/version"));
} catch (err) {
  fail(`cannot load @openclaw packages (run: npm ci --prefix tests/node): ${err.message}`, 3);
}

if (opts.check) {
  // package.json is not an exported subpath: read it next to the resolved entry point.
  const { readFileSync } = await import("node:fs");
  const version = (name) => {
    const url = new URL(`./node_modules/${name}/package.json`, import.meta.url);
    return JSON.parse(readFileSync(url, "utf8")).version;
  };
  emit({
    kind: "check",
    node: process.version,
    client: version("@openclaw/gateway-client"),
    protocol: version("@openclaw/gateway-protocol"),
    protocolVersion: PROTOCOL_VERSION,
    gatewayClient: typeof GatewayClient,
  });
  process.exit(0);
}

if (!SCENARIOS.has(opts.scenario)) fail(`unknown or missing scenario ${JSON.stringify(opts.scenario)}\n${USAGE}`, 2);
if (!opts.url) fail(`--url is required\n${USAGE}`, 2);
if (!Number.isFinite(opts.timeoutMs) || opts.timeoutMs <= 0) fail("--timeout-ms must be a positive number", 2);

// ---------------------------------------------------------------------------------------------
// Event buffer with waiters: events may arrive before the response that announces them
// (e.g. the 'aborted' chat event before chat.abort's response), so every wait first looks at
// what has already been received.

const chatEvents = []; // payloads of 'chat' events, in arrival order
const waiters = new Set();
let waitingFor = "connect";
let closedError = null; // set when the gateway closes the connection after hello-ok

function onChat(payload) {
  chatEvents.push(payload);
  for (const w of [...waiters]) w.check();
}

function waitChat(description, match, { count = 1, failIf } = {}) {
  waitingFor = description;
  return new Promise((resolve, reject) => {
    const w = {
      check() {
        const hits = chatEvents.filter(match);
        if (hits.length >= count) {
          waiters.delete(w);
          resolve(count === 1 ? hits[0] : hits.slice(0, count));
          return;
        }
        const bad = failIf && chatEvents.find(failIf);
        if (bad) {
          waiters.delete(w);
          reject(new Error(`while waiting for ${description}: the run ended with state ${JSON.stringify(bad.state)}: ${JSON.stringify(bad)}`));
        }
      },
      abandon(err) {
        waiters.delete(w);
        reject(err);
      },
    };
    if (closedError) return reject(closedError);
    waiters.add(w);
    w.check();
  });
}

// ---------------------------------------------------------------------------------------------

let client;
let helloResolve, helloReject;
const hello = new Promise((res, rej) => { helloResolve = res; helloReject = rej; });
hello.catch(() => {});
let closeResolve;
const firstClose = new Promise((res) => { closeResolve = res; });
let connectError = null;
let reconnectPaused = null;
let stopping = false;

const isBadToken = opts.scenario === "bad-token";
const token = isBadToken ? (opts.token ?? `wrong-${randomUUID()}`) : opts.token;

const overall = setTimeout(async () => {
  const message = `scenario ${opts.scenario} timed out after ${opts.timeoutMs} ms waiting for ${waitingFor}`;
  emit({ kind: "error", name: "timeout", code: null, message });
  process.stderr.write(`drive.mjs: ${message}\n`);
  try { client?.stop(); } catch {}
  process.exit(4);
}, opts.timeoutMs);

client = new GatewayClient({
  url: opts.url,
  ...(token !== undefined ? { token } : {}),
  minProtocol: PROTOCOL_VERSION,
  maxProtocol: PROTOCOL_VERSION,
  clientName: "gateway-client",
  clientVersion: "0.0.0-drive",
  mode: "backend",
  platform: "linux",
  role: "operator",
  scopes: ["operator.read", "operator.write"],
  caps: [],
  deviceIdentity: null,
  onHelloOk: (h) => helloResolve(h),
  onConnectError: (err) => {
    if (!connectError) connectError = err;
    helloReject(err);
  },
  onReconnectPaused: (info) => { reconnectPaused = info; },
  onClose: (code, reason, info) => {
    closeResolve({ code, reason, phase: info?.phase ?? null });
    if (info?.phase === "pre-hello") {
      // The client would reconnect after a backoff of at least 1 s; bad-token stops it here.
      if (isBadToken) client.stop();
      helloReject(new Error(`gateway closed before hello-ok (${code}): ${reason}`));
    } else if (!stopping) {
      closedError = new Error(`gateway closed the connection (${code}): ${reason}`);
      for (const w of [...waiters]) w.abandon(closedError);
    }
  },
  onEvent: (frame) => {
    emit({ kind: "event", frame });
    if (frame?.event === "chat" && frame.payload && typeof frame.payload === "object") onChat(frame.payload);
  },
  onGap: (g) => process.stderr.write(`drive.mjs: event seq gap: expected ${g.expected}, received ${g.received}\n`),
});

async function step(name, fn) {
  waitingFor = name;
  try {
    const result = await fn();
    emit({ kind: "step", name, result: result === undefined ? null : result });
    return result;
  } catch (err) {
    emit(errorLine(name, err));
    throw Object.assign(new Error(`step ${name} failed: ${err?.message ?? err}`), { reported: true });
  }
}

async function stop() {
  stopping = true;
  await step("stop", async () => {
    await client.stopAndWait({ timeoutMs: 5000 });
    return { stopped: true };
  });
}

async function sendAndWait(terminal) {
  const sessionKey = opts.session;
  const message = opts.message ?? DEFAULT_MESSAGES[opts.scenario];
  await step("connect", () => hello);
  if (opts.subscribe) {
    await step("sessions.messages.subscribe", () =>
      client.request("sessions.messages.subscribe", { key: sessionKey }));
  }
  const idempotencyKey = randomUUID();
  const sent = await step("chat.send", () =>
    client.request("chat.send", { sessionKey, message, idempotencyKey }));
  const runId = typeof sent?.runId === "string" ? sent.runId : idempotencyKey;
  const ofRun = (p) => p.runId === runId;
  const ended = (p) => ofRun(p) && ["final", "aborted", "error"].includes(p.state);
  if (terminal === "aborted") {
    await step("wait.deltas", async () => {
      const deltas = await waitChat("3 delta chat events",
        (p) => ofRun(p) && p.state === "delta", { count: 3, failIf: ended });
      return { runId, count: deltas.length, seqs: deltas.map((d) => d.seq) };
    });
    await step("chat.abort", () => client.request("chat.abort", { sessionKey, runId }));
    await step("wait.aborted", () =>
      waitChat("the aborted chat event", (p) => ofRun(p) && p.state === "aborted",
        { failIf: (p) => ofRun(p) && (p.state === "final" || p.state === "error") }));
  } else {
    await step("wait.final", () =>
      waitChat("the final chat event", (p) => ofRun(p) && p.state === "final",
        { failIf: (p) => ofRun(p) && (p.state === "aborted" || p.state === "error") }));
  }
  await step("chat.history", () => client.request("chat.history", { sessionKey }));
  await stop();
}

async function resume() {
  const sessionKey = opts.session;
  const runId = opts.run;
  if (!runId) fail("resume needs --run RUN_ID", 2);
  const helloOk = await step("connect", () => hello);
  // Subscribe first, then read history (docs/protocol.md, "Reconnect and resume").
  if (helloOk?.features?.methods?.includes("sessions.messages.subscribe")) {
    await step("subscribe", () => client.request("sessions.messages.subscribe", { key: sessionKey }));
  }
  const read = await step("chat.history", () => client.request("chat.history", { sessionKey }));
  const flight = read?.inFlightRun;
  if (!flight || flight.runId !== runId) throw new Error(`no inFlightRun for ${runId}: ${JSON.stringify(read?.sessionInfo)}`);
  const ofRun = (p) => p.runId === runId;
  const end = await step("wait.end", () =>
    waitChat("the run's terminal chat event", (p) => ofRun(p) && ["final", "aborted", "error"].includes(p.state)));
  const later = chatEvents.filter((p) => ofRun(p) && p.state === "delta" && p.seq > flight.seq);
  await step("rebuilt", async () => ({
    runId,
    base: flight.text,
    seq: flight.seq,
    deltas: later.length,
    text: flight.text + later.map((p) => p.deltaText).join(""),
    state: end.state,
  }));
  await step("chat.history.after", () => client.request("chat.history", { sessionKey }));
  await stop();
}

async function badToken() {
  waitingFor = "the connect failure";
  let accepted = null;
  try {
    accepted = await hello;
  } catch {
    // expected: rejected
  }
  if (accepted) {
    emit({ kind: "step", name: "connect", result: accepted });
    await stop();
    throw new Error("the gateway accepted a wrong token");
  }
  waitingFor = "the close after the connect failure";
  // The close normally follows the error response at once; do not wait long for it.
  const close = await Promise.race([firstClose, new Promise((r) => setTimeout(() => r(null), 2000))]);
  if (connectError) emit(errorLine("connect", connectError));
  emit({
    kind: "step",
    name: "connect-rejected",
    result: {
      errorResponse: Boolean(connectError && connectError.gatewayCode !== undefined),
      code: connectError?.gatewayCode ?? null,
      message: connectError ? String(connectError.message) : null,
      details: connectError?.details ?? null,
      close,
      reconnectPaused,
    },
  });
  await stop();
}

client.start();
try {
  if (isBadToken) await badToken();
  else if (opts.scenario === "resume") await resume();
  else await sendAndWait(opts.scenario === "send-abort" ? "aborted" : "final");
} catch (err) {
  try { client.stop(); } catch {}
  clearTimeout(overall);
  fail(err?.message ?? String(err), 1);
}
clearTimeout(overall);
process.exit(0);
