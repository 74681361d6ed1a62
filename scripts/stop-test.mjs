// npm run test:stop: `npm start` stops cleanly (../shared/docs/api.md, Operations). On a throw-away state and free
// ports it starts `npm start` with its output piped, creates a product, sends SIGTERM to npm's pid (what a process
// manager does) and expects, within 10 s, both ports refusing connections and no process left of the groups npm
// start created (npm's, wrangler dev's with workerd). Then it starts again on the same state, finds the product,
// and stops it as a Ctrl-C in a terminal piped to `| cat` does: the reader goes away and the whole foreground group
// gets SIGINT; same checks, and the exit code must be 130. Exits 1 on any failure. Linux/macOS (uses `ps`).
import { execFileSync, spawn } from "node:child_process";
import { rmSync } from "node:fs";
import { connect, createServer } from "node:net";
import { join } from "node:path";
import { onShutdown, QUIET_ENV, readDevVars, signalGroup, tokenFor, waitForHealth } from "./local.mjs";

const STOP_WITHIN_MS = 10_000;
const STATE = join(".wrangler", `stop-test-${Date.now()}`);
const PORT = await freePort();
const PLATFORM_PORT = await freePort(PORT);
const BASE = `http://127.0.0.1:${PORT}`;

let failures = 0;
const check = (pass, what) => {
  if (!pass) failures++;
  console.log(`${pass ? "PASS" : "FAIL"}  ${what}`);
  return pass;
};

/** A port the OS hands out as free (not `not`). */
async function freePort(not) {
  for (;;) {
    const port = await new Promise((resolve) => {
      const server = createServer().listen(0, "127.0.0.1", () => {
        const { port } = server.address();
        server.close(() => resolve(port));
      });
    });
    if (port !== not) return port;
  }
}

const refused = (port) =>
  new Promise((resolve) => {
    const socket = connect(port, "127.0.0.1");
    socket.once("connect", () => {
      socket.destroy();
      resolve(false);
    });
    socket.once("error", () => resolve(true));
  });

function processTable() {
  const out = execFileSync("ps", ["-eo", "pid=,ppid=,pgid=,stat=,args="], { encoding: "utf8" });
  return out
    .split("\n")
    .map((line) => /^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\S+)\s+(.*)$/.exec(line))
    .filter(Boolean)
    .map(([, pid, ppid, pgid, stat, args]) => ({ pid: +pid, ppid: +ppid, pgid: +pgid, stat, args }))
    .filter((p) => !p.stat.startsWith("Z"));
}

/** The process `root` and all its descendants. */
function tree(root) {
  const table = processTable();
  const found = table.filter((p) => p.pid === root);
  for (let i = 0; i < found.length; i++) found.push(...table.filter((p) => p.ppid === found[i].pid));
  return found;
}

const short = (p) => `${p.pid} (group ${p.pgid}) ${p.args.slice(0, 110)}`;

/** Runs `npm start` detached (its own group, as a terminal's foreground job), output piped into a buffer. */
let current = null;
async function start(label) {
  const npm = spawn("npm", ["start"], {
    env: { ...QUIET_ENV, PORT: String(PORT), DATA_PLATFORM_PORT: String(PLATFORM_PORT), PERSIST_TO: STATE },
    detached: true,
    stdio: ["ignore", "pipe", "pipe"],
  });
  const run = { npm, label, output: "", groups: new Set([npm.pid]), pids: new Set([npm.pid]) };
  current = run;
  const keep = (chunk) => (run.output = (run.output + chunk).slice(-20_000));
  npm.stdout.on("data", keep);
  npm.stderr.on("data", keep);
  run.exited = new Promise((resolve) => npm.on("exit", (code, signal) => resolve({ code, signal })));
  const t0 = Date.now();
  const outcome = await Promise.race([
    waitForHealth(BASE, 90_000).then(() => "up", (error) => error.message),
    run.exited.then(({ code, signal }) => `npm start exited (${signal ?? code}) before /health answered`),
  ]);
  if (!check(outcome === "up", `${label}: npm start answers ${BASE}/health (${((Date.now() - t0) / 1000).toFixed(1)} s)`)) {
    console.log(`  ${outcome}\n--- npm start output (tail) ---\n${run.output.slice(-3_000)}`);
    kill(run);
    return null;
  }
  for (const p of tree(npm.pid)) {
    run.groups.add(p.pgid);
    run.pids.add(p.pid);
  }
  const workerd = tree(npm.pid).filter((p) => /workerd/.test(p.args));
  check(workerd.length > 0, `${label}: workerd runs under npm start (groups ${[...run.groups].join(", ")})`);
  return run;
}

/** What is left of a run: its processes (by group or pid) and its ports still accepting connections. */
async function leftovers(run) {
  const processes = processTable().filter((p) => run.groups.has(p.pgid) || run.pids.has(p.pid));
  const listening = [];
  for (const port of [PORT, PLATFORM_PORT]) if (!(await refused(port))) listening.push(port);
  return { processes, listening };
}

async function expectStopped(run, how) {
  const t0 = Date.now();
  let left;
  do {
    await new Promise((r) => setTimeout(r, 200));
    left = await leftovers(run);
  } while ((left.processes.length > 0 || left.listening.length > 0) && Date.now() - t0 < STOP_WITHIN_MS);
  const seconds = ((Date.now() - t0) / 1000).toFixed(1);
  const clean = left.processes.length === 0 && left.listening.length === 0;
  check(
    clean,
    clean
      ? `${run.label}: ${how} → ports ${PORT} and ${PLATFORM_PORT} refused, no process left, in ${seconds} s`
      : `${run.label}: ${how} → still there after ${seconds} s`,
  );
  if (!clean) {
    if (left.listening.length) console.log(`  listening: ${left.listening.join(", ")}`);
    for (const p of left.processes) console.log(`  running:   ${short(p)}`);
    console.log(`--- npm start output (tail) ---\n${run.output.slice(-2_000)}`);
    kill(run);
  }
  return clean;
}

/** SIGKILLs every group a run created (the test's own cleanup; npm start itself is what is under test). */
function kill(run) {
  if (!run) return;
  for (const p of tree(run.npm.pid)) run.groups.add(p.pgid);
  for (const group of run.groups) signalGroup(group, "SIGKILL");
}

async function main() {
  console.log(`stop test: npm start on port ${PORT} (data platform stand-in ${PLATFORM_PORT}), state ${STATE}`);

  const first = await start("run 1");
  if (!first) return;
  const admin = await tokenFor(readDevVars().JWT_SECRET, "admin"); // npm start created .dev.vars if it was missing
  const name = `stop-test ${new Date().toISOString()}`;
  const created = await fetch(`${BASE}/api/admin/products`, {
    method: "POST",
    headers: { authorization: `Bearer ${admin}`, "content-type": "application/json" },
    body: JSON.stringify({ name, price: 1_000, stock: 3 }),
  });
  const product = await created.json();
  if (!check(created.status === 201, `run 1: created product ${product.id} through the admin API`)) return kill(first);

  process.kill(first.npm.pid, "SIGTERM");
  if (!(await expectStopped(first, "SIGTERM to npm's pid"))) console.log("  (cleaned up by the test; going on)");

  const second = await start("run 2");
  if (!second) return;
  const res = await fetch(`${BASE}/api/products/${product.id}`);
  const again = res.ok ? await res.json() : null;
  check(again?.name === name, `run 2: product ${product.id} from run 1 is still there (${res.status})`);

  // Ctrl-C with the output piped: the reader (`| cat`) dies with the same SIGINT, then npm start writes to a
  // closed pipe while it stops.
  second.npm.stdout.destroy();
  second.npm.stderr.destroy();
  process.kill(-second.npm.pid, "SIGINT");
  await expectStopped(second, "Ctrl-C (SIGINT to the group, output pipe closed)");
  const { code, signal } = await Promise.race([second.exited, new Promise((r) => setTimeout(() => r({}), 2_000))]);
  check(code === 130 || signal === "SIGINT", `run 2: npm start exited with ${signal ?? code} (130 expected after SIGINT)`);
}

// Interrupted (or its parent gone): leave nothing behind.
onShutdown(() => kill(current));
try {
  await main();
} catch (error) {
  failures++;
  console.log(`FAIL  ${error.stack}`);
  kill(current);
}
if (failures === 0) rmSync(STATE, { recursive: true, force: true });
console.log(failures ? `\n${failures} check(s) FAILED (state kept in ${STATE})` : "\nnpm start stops cleanly");
process.exit(failures ? 1 : 0);
