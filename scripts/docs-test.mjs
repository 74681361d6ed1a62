// npm run test:docs: the API reference works offline (../shared/docs/api.md, Operations). Copies the docs
// assets, starts `wrangler dev` on a free port with a throw-away state, and loads /docs in headless Chromium
// (Debian's `chromium`; installed with apt-get when missing) whose every request to another origin fails: it
// goes to a proxy that does not exist (127.0.0.1:1); only the local server is bypassed. Through the DevTools
// protocol (Node's own WebSocket, no dependency) it checks that the operations of /openapi.json render, that
// no request went to another origin, that every same-origin request succeeded, and that the page logged no
// Content-Security-Policy violation or uncaught exception. Exits 1 on any failure; stops what it started.
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { copyDocsAssets } from "./docs-assets.mjs";
import { onShutdown, signalGroup, startWranglerDev, stopGroup, waitForHealth } from "./local.mjs";

const RENDER_TIMEOUT_MS = 60_000;
const STATE = join(".wrangler", `docs-test-${Date.now()}`);
const PROFILE = mkdtempSync(join(tmpdir(), "docs-test-chromium-"));

let failures = 0;
const check = (pass, what, detail = []) => {
  if (!pass) failures++;
  console.log(`${pass ? "PASS" : "FAIL"}  ${what}`);
  for (const line of pass ? [] : detail) console.log(`        ${line}`);
  return pass;
};

function freePort() {
  return new Promise((resolve) => {
    const server = createServer().listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Debian's chromium, installed when missing (as root, or with password-less sudo). */
function ensureChromium() {
  const found = () => spawnSync("sh", ["-c", "command -v chromium"], { encoding: "utf8" }).stdout.trim();
  if (found()) return found();
  console.log("docs test: chromium is missing; installing Debian's chromium with apt-get");
  const sudo = process.getuid?.() === 0 ? [] : ["sudo", "-n"];
  const apt = (...args) => {
    const [command, ...rest] = [...sudo, "apt-get", ...args];
    return spawnSync(command, rest, { stdio: "inherit", env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" } }).status;
  };
  if (apt("install", "-y", "--no-install-recommends", "chromium") !== 0) {
    apt("update");
    apt("install", "-y", "--no-install-recommends", "chromium");
  }
  if (!found()) throw new Error("chromium could not be installed (apt-get install chromium)");
  return found();
}

/** A DevTools protocol connection with flattened sessions: send(method, params, sessionId), on(event, fn). */
async function connectDevTools(wsUrl) {
  const ws = new WebSocket(wsUrl);
  await new Promise((resolve, reject) => {
    ws.addEventListener("open", resolve, { once: true });
    ws.addEventListener("error", () => reject(new Error(`cannot connect to ${wsUrl}`)), { once: true });
  });
  let nextId = 1;
  const pending = new Map();
  const listeners = new Map();
  ws.addEventListener("message", ({ data }) => {
    const message = JSON.parse(data);
    if (message.id !== undefined) {
      const { resolve, reject } = pending.get(message.id) ?? {};
      pending.delete(message.id);
      if (message.error) reject?.(new Error(`${message.error.message} (${message.error.code})`));
      else resolve?.(message.result);
    } else {
      for (const listener of listeners.get(message.method) ?? []) listener(message.params, message.sessionId);
    }
  });
  return {
    send(method, params = {}, sessionId) {
      const id = nextId++;
      ws.send(JSON.stringify({ id, method, params, ...(sessionId ? { sessionId } : {}) }));
      return new Promise((resolve, reject) => pending.set(id, { resolve, reject }));
    },
    on(method, listener) {
      listeners.set(method, [...(listeners.get(method) ?? []), listener]);
    },
    close: () => ws.close(),
  };
}

async function launchChromium(binary) {
  const args = [
    "--headless",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-extensions",
    "--disable-sync",
    // Every origin but the local server is unreachable: as offline, or behind a strict firewall.
    "--proxy-server=127.0.0.1:1",
    "--proxy-bypass-list=127.0.0.1;localhost",
    `--user-data-dir=${PROFILE}`,
    "--remote-debugging-port=0",
    ...(process.getuid?.() === 0 ? ["--no-sandbox"] : []),
    "about:blank",
  ];
  const browser = spawn(binary, args, { stdio: ["ignore", "ignore", "pipe"], detached: true });
  let output = "";
  browser.stderr.on("data", (chunk) => (output = (output + chunk).slice(-4_000)));
  const portFile = join(PROFILE, "DevToolsActivePort");
  const deadline = Date.now() + 30_000;
  while (!existsSync(portFile) || readFileSync(portFile, "utf8").split("\n").length < 2) {
    if (Date.now() > deadline || browser.exitCode !== null) throw new Error(`chromium did not start:\n${output}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  const [port, path] = readFileSync(portFile, "utf8").split("\n");
  return { browser, wsUrl: `ws://127.0.0.1:${port}${path}` };
}

let dev = null;
let chromium = null;
async function cleanUp() {
  if (chromium) signalGroup(chromium.pid, "SIGKILL");
  if (dev) await stopGroup(dev.pid);
  rmSync(PROFILE, { recursive: true, force: true });
  rmSync(STATE, { recursive: true, force: true });
}
onShutdown(cleanUp);

async function main() {
  if (typeof WebSocket === "undefined") throw new Error("needs Node 22 (run it as `npm run test:docs`)");
  const binary = ensureChromium();
  const version = copyDocsAssets();
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  console.log(`docs test: @scalar/api-reference ${version}, ${binary}, wrangler dev on ${base} (state ${STATE})`);

  let devOutput = "";
  dev = startWranglerDev({ port, persistTo: STATE, stdio: ["ignore", "pipe", "pipe"] });
  for (const stream of [dev.stdout, dev.stderr]) stream.on("data", (chunk) => (devOutput = (devOutput + chunk).slice(-4_000)));
  try {
    await waitForHealth(base, 90_000);
  } catch (error) {
    check(false, "wrangler dev answers /health", [error.message, ...devOutput.split("\n").slice(-20)]);
    return;
  }

  const doc = await (await fetch(`${base}/openapi.json`)).json();
  const summaries = Object.values(doc.paths).flatMap((ops) => Object.values(ops).map((op) => op.summary).filter(Boolean));

  const launched = await launchChromium(binary);
  chromium = launched.browser;
  const cdp = await connectDevTools(launched.wsUrl);
  const { targetId } = await cdp.send("Target.createTarget", { url: "about:blank" });
  const { sessionId } = await cdp.send("Target.attachToTarget", { targetId, flatten: true });

  const requests = new Map(); // requestId → { url, status, failed }
  const problems = [];
  cdp.on("Network.requestWillBeSent", ({ requestId, request }) => requests.set(requestId, { url: request.url }));
  cdp.on("Network.responseReceived", ({ requestId, response }) => {
    const entry = requests.get(requestId);
    if (entry) entry.status = response.status;
  });
  cdp.on("Network.loadingFailed", ({ requestId, errorText, blockedReason }) => {
    const entry = requests.get(requestId);
    if (entry) entry.failed = blockedReason ? `${errorText} (${blockedReason})` : errorText;
  });
  cdp.on("Runtime.exceptionThrown", ({ exceptionDetails }) =>
    problems.push(`uncaught: ${exceptionDetails.exception?.description ?? exceptionDetails.text}`.slice(0, 300)),
  );
  cdp.on("Log.entryAdded", ({ entry }) => {
    if (entry.level === "error" || /Content Security Policy/i.test(entry.text)) problems.push(`${entry.source}: ${entry.text}`.slice(0, 300));
  });
  cdp.on("Runtime.consoleAPICalled", ({ type, args }) => {
    const text = args.map((a) => a.value ?? a.description ?? "").join(" ");
    if (type === "error" || /Content Security Policy/i.test(text)) problems.push(`console.${type}: ${text}`.slice(0, 300));
  });
  for (const domain of ["Network", "Runtime", "Log", "Page"]) await cdp.send(`${domain}.enable`, {}, sessionId);

  const t0 = Date.now();
  await cdp.send("Page.navigate", { url: `${base}/docs` }, sessionId);
  let text = "";
  let found = [];
  while (Date.now() - t0 < RENDER_TIMEOUT_MS) {
    await new Promise((r) => setTimeout(r, 500));
    const { result } = await cdp.send("Runtime.evaluate", { expression: "document.body ? document.body.textContent : ''", returnByValue: true }, sessionId);
    text = result.value ?? "";
    found = summaries.filter((summary) => text.includes(summary));
    if (found.length === summaries.length) break;
  }
  const seconds = ((Date.now() - t0) / 1000).toFixed(1);
  // Let late requests (fonts, telemetry) show themselves before judging the network.
  await new Promise((r) => setTimeout(r, 2_000));

  const all = [...requests.values()];
  const docsPage = all.find((r) => r.url === `${base}/docs`);
  check(docsPage?.status === 200, `GET /docs answered ${docsPage?.status ?? "nothing"}`);
  const bundle = all.find((r) => r.url === `${base}/docs/scalar/standalone.js`);
  check(bundle?.status === 200, `Scalar's bundle loaded from the Worker's origin (${bundle?.status ?? "not requested"})`);
  check(
    found.length === summaries.length,
    `the reference rendered ${found.length} of the ${summaries.length} operations of /openapi.json (${seconds} s)`,
    [`missing: ${summaries.filter((s) => !found.includes(s)).join(" | ")}`, `page text: ${text.slice(0, 300).replace(/\n/g, " ")}`],
  );
  const foreign = all.filter((r) => /^(https?|wss?):/.test(r.url) && new URL(r.url).origin !== base);
  check(foreign.length === 0, `no request left the Worker's origin (${all.length} requests in all)`, foreign.map((r) => `${r.url} → ${r.failed ?? r.status}`));
  const broken = all.filter((r) => !foreign.includes(r) && /^https?:/.test(r.url) && (r.failed || r.status >= 400));
  check(broken.length === 0, "every same-origin request succeeded", broken.map((r) => `${r.url} → ${r.failed ?? r.status}`));
  check(problems.length === 0, "no CSP violation, console error or uncaught exception", problems);

  await cdp.send("Browser.close").catch(() => {});
  cdp.close();
}

try {
  await main();
} catch (error) {
  check(false, error.stack ?? String(error));
}
await cleanUp();
console.log(failures ? `\n${failures} check(s) FAILED` : "\n/docs works offline");
process.exit(failures ? 1 : 0);
