// Shared by the local scripts (start, token, bench): the .dev.vars file, token signing, wrangler.
import { randomBytes } from "node:crypto";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { spawn, spawnSync } from "node:child_process";
import { sign } from "hono/jwt";

export const DEV_VARS = ".dev.vars";
export const QUIET_ENV = {
  ...process.env,
  CLOUDFLARE_CF_FETCH_ENABLED: "false",
  WRANGLER_SEND_METRICS: "false",
  CI: process.env.CI ?? "true",
};

/** Creates .dev.vars from the example with a fresh JWT_SECRET, unless it already exists. */
export function ensureDevVars() {
  if (existsSync(DEV_VARS)) return false;
  const example = readFileSync(".dev.vars.example", "utf8");
  const secret = randomBytes(32).toString("base64url");
  writeFileSync(DEV_VARS, example.replace(/^JWT_SECRET=.*$/m, `JWT_SECRET=${secret}`), { mode: 0o600 });
  return true;
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

export function startWranglerDev({ port, persistTo, stdio = "inherit", extraArgs = [] }) {
  return spawn(
    "npx",
    ["wrangler", "dev", "--ip", "127.0.0.1", "--port", String(port), "--persist-to", persistTo, "--test-scheduled", ...extraArgs],
    { stdio, env: QUIET_ENV, detached: process.platform !== "win32" },
  );
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
export function driveCron(baseUrl, everyMs = 60_000) {
  return setInterval(() => {
    fetch(`${baseUrl}/cdn-cgi/local/scheduled?cron=*+*+*+*+*`).catch(() => {
      // the server may be starting or restarting; the next tick tries again
    });
  }, everyMs);
}
