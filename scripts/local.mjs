// Shared by the local scripts (start, token, bench, drill): the .dev.vars file, token signing, wrangler, and
// starting and stopping `wrangler dev` as a process group.
import { randomBytes } from "node:crypto";
import { appendFileSync, existsSync, readFileSync, writeFileSync } from "node:fs";
import { spawn, spawnSync } from "node:child_process";
import { constants } from "node:os";
import { sign } from "hono/jwt";

export const DEV_VARS = ".dev.vars";
export const QUIET_ENV = {
  ...process.env,
  CLOUDFLARE_CF_FETCH_ENABLED: "false",
  WRANGLER_SEND_METRICS: "false",
  CI: process.env.CI ?? "true",
};

/** A Standard Webhooks secret for signing exports: whsec_ and the base64 of 32 random bytes. */
export const newSigningSecret = () => `whsec_${randomBytes(32).toString("base64")}`;

/**
 * Creates .dev.vars from the example with a fresh JWT_SECRET and EXPORT_SIGNING_SECRET, unless it exists; an
 * existing one that lacks EXPORT_SIGNING_SECRET gains one at its end (nothing else in it changes). Returns
 * what it did, for the caller to print, or null.
 */
export function ensureDevVars() {
  if (!existsSync(DEV_VARS)) {
    const example = readFileSync(".dev.vars.example", "utf8")
      .replace(/^JWT_SECRET=.*$/m, `JWT_SECRET=${randomBytes(32).toString("base64url")}`)
      .replace(/^EXPORT_SIGNING_SECRET=.*$/m, `EXPORT_SIGNING_SECRET=${newSigningSecret()}`);
    writeFileSync(DEV_VARS, example, { mode: 0o600 });
    return "Created .dev.vars with a fresh JWT_SECRET and EXPORT_SIGNING_SECRET (kept out of git).";
  }
  if ("EXPORT_SIGNING_SECRET" in readDevVars()) return null;
  const text = readFileSync(DEV_VARS, "utf8");
  const separator = text === "" || text.endsWith("\n") ? "" : "\n";
  appendFileSync(DEV_VARS, `${separator}# Signs every export to the data platform (see .dev.vars.example).\nEXPORT_SIGNING_SECRET=${newSigningSecret()}\n`);
  return "Added a fresh EXPORT_SIGNING_SECRET to .dev.vars.";
}

export function readDevVars(file = DEV_VARS) {
  const vars = {};
  for (const line of readFileSync(file, "utf8").split("\n")) {
    const m = /^\s*([A-Z0-9_]+)\s*=\s*(.*?)\s*$/.exec(line);
    if (m) vars[m[1]] = m[2].replace(/^"(.*)"$/, "$1");
  }
  return vars;
}

const DAY = 86_400;

/** `who` is a user id or "admin". */
export async function tokenFor(secret, who, expiresInSeconds = DAY) {
  const admin = who === "admin";
  if (!admin && !/^[1-9][0-9]*$/.test(String(who))) throw new Error(`not a user id or "admin": ${who}`);
  const claims = { sub: admin ? "0" : String(who), role: admin ? "admin" : "user" };
  return sign({ ...claims, exp: Math.floor(Date.now() / 1000) + expiresInSeconds }, secret, "HS256");
}

/** Runs wrangler synchronously (offline, quiet) and fails loudly. */
export function wrangler(args, options = {}) {
  const result = spawnSync("npx", ["wrangler", ...args], { stdio: "inherit", env: QUIET_ENV, ...options });
  if (result.status !== 0) throw new Error(`wrangler ${args.join(" ")} failed with ${result.status}`);
}

// Process groups of the dev servers started here and not yet seen gone; whatever is left dies with the script.
const groups = new Set();
process.on("exit", () => killDevServers());

/** SIGKILLs every dev server started here that stopGroup() has not seen gone (no waiting). */
export function killDevServers() {
  for (const pid of groups) signalGroup(pid, "SIGKILL");
  groups.clear();
}

/**
 * Spawns `wrangler dev` detached: npx, wrangler, esbuild and both workerd processes form their own process group
 * (its id is `dev.pid`), which stopGroup() ends as a whole. A script that exits without stopping it (an exception,
 * process.exit) SIGKILLs the group on its way out, so no server outlives the script that started it.
 */
export function startWranglerDev({ port, persistTo, stdio = "inherit", extraArgs = [], env = QUIET_ENV }) {
  const dev = spawn(
    "npx",
    ["wrangler", "dev", "--ip", "127.0.0.1", "--port", String(port), "--persist-to", persistTo, "--test-scheduled", ...extraArgs],
    { stdio, env, detached: process.platform !== "win32" },
  );
  if (dev.pid !== undefined) groups.add(dev.pid);
  return dev;
}

/** Sends `signal` to every process of the group led by `pid`; false if none is left (0 only asks). */
export function signalGroup(pid, signal) {
  try {
    process.kill(-pid, signal);
    return true;
  } catch {
    return false;
  }
}

/**
 * Stops the process group led by `pid` (a child spawned detached, e.g. by startWranglerDev): `signal` to every
 * member, SIGKILL to what is left after `graceMs`. Resolves true once no member is left (false if some still were
 * 2 s after the SIGKILL).
 */
export async function stopGroup(pid, { signal = "SIGINT", graceMs = 5_000 } = {}) {
  if (signalGroup(pid, signal) && !(await groupGone(pid, graceMs))) {
    signalGroup(pid, "SIGKILL");
    return groupGone(pid, 2_000);
  }
  return groupGone(pid, 0);
}

async function groupGone(pid, ms) {
  const deadline = Date.now() + ms;
  while (signalGroup(pid, 0)) {
    if (Date.now() >= deadline) return false;
    await new Promise((r) => setTimeout(r, 100));
  }
  groups.delete(pid);
  return true;
}

/**
 * Calls `stop(signal)` once, on SIGINT, SIGTERM or SIGHUP, or with "SIGHUP" when the parent process dies, then exits
 * 128 + the signal's number. (`npm start` is npm → sh → node: a SIGTERM to npm's pid ends npm and its shell without
 * reaching node, which is only re-parented; a Ctrl-C reaches node itself.) Another signal while stopping exits at
 * once, and that exit SIGKILLs the dev servers' groups. Returns `shutdown(signal, exitCode)`, for other reasons.
 */
export function onShutdown(stop) {
  const parent = process.ppid;
  let stopping = false;
  const shutdown = async (signal, code = 128 + constants.signals[signal]) => {
    if (stopping) return;
    stopping = true;
    clearInterval(watch);
    try {
      await stop(signal);
    } finally {
      process.exit(code);
    }
  };
  for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"]) {
    process.on(signal, () => (stopping ? process.exit(128 + constants.signals[signal]) : shutdown(signal)));
  }
  const watch = setInterval(() => process.ppid !== parent && shutdown("SIGHUP"), 500).unref();
  return shutdown;
}

export async function waitForHealth(baseUrl, timeoutMs = 120_000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    try {
      const res = await fetch(`${baseUrl}/health`);
      if (res.ok) return;
    } catch {
      // not up yet
    }
    await new Promise((r) => setTimeout(r, 300));
  }
  throw new Error(`${baseUrl} did not become healthy within ${timeoutMs} ms`);
}

/** Fires the Worker's scheduled handler every `everyMs` through Miniflare's trigger endpoint (bundled or not). */
export function driveCron(baseUrl, everyMs = 60_000, onTick = () => {}) {
  return setInterval(() => {
    onTick();
    fetch(`${baseUrl}/cdn-cgi/local/scheduled?cron=*+*+*+*+*`).catch(() => {
      // the server may be starting or restarting; the next tick tries again
    });
  }, everyMs);
}
