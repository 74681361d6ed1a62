// The bench's own throw-away server: a fresh persistence folder, migrations, `wrangler dev` on a free port,
// a stand-in data platform that accepts every export, and D1 queries against that folder.
//
// `wrangler dev` rebuilds and restarts the Worker whenever a source file changes, and in a shared working
// tree files change all the time: a restart mid-storm fails requests in flight and resets the objects'
// memory. So the bench bundles the Worker once, as `npm run build` does, and serves that bundle with
// `wrangler dev --no-bundle` and a copy of wrangler.toml and .dev.vars taken at the same moment (wrangler dev
// also reloads when its config changes): the code under test is frozen for the whole run.
import { spawn, spawnSync } from "node:child_process";
import {
  accessSync,
  constants,
  copyFileSync,
  cpSync,
  createWriteStream,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statfsSync,
  writeFileSync,
} from "node:fs";
import { createServer } from "node:http";
import { isAbsolute, join } from "node:path";
import { driveCron, killDevServers, QUIET_ENV, startWranglerDev, stopGroup, waitForHealth } from "../scripts/local.mjs";

async function isPortFree(port) {
  return new Promise((resolve) => {
    const probe = createServer();
    probe.once("error", () => resolve(false));
    probe.listen(port, "127.0.0.1", () => probe.close(() => resolve(true)));
  });
}

export async function freePort(from) {
  for (let port = from; port < from + 50; port++) if (await isPortFree(port)) return port;
  throw new Error(`no free port in ${from}..${from + 49}`);
}

// Export deliveries run in the background after every order; a sink that answers 200 keeps them from
// retrying against a closed port, which would add load that is not part of any scenario. (The stand-in of
// scripts/data-platform.mjs logs a line per order and obeys the outage switch of `npm start`'s session.)
async function startDataPlatformSink(port) {
  let received = 0;
  const sink = createServer((req, res) => {
    req.resume();
    req.on("end", () => {
      received++;
      res.writeHead(200, { "content-type": "application/json" }).end('{"ok":true}');
    });
  });
  await new Promise((resolve) => sink.listen(port, "127.0.0.1", resolve));
  return {
    received: () => received,
    closeAllConnections: () => sink.closeAllConnections(),
    close: () => new Promise((resolve) => sink.close(resolve)),
  };
}

/** Runs wrangler in the background (so two preparation steps can share the wait); rejects with its stderr. */
function wranglerAsync(args) {
  return new Promise((resolve, reject) => {
    const child = spawn("npx", ["wrangler", ...args], { env: QUIET_ENV, stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    child.stderr.on("data", (chunk) => (stderr += chunk));
    child.on("error", reject);
    child.on("exit", (code) =>
      code === 0 ? resolve() : reject(new Error(`wrangler ${args.join(" ")} failed with ${code}:\n${stderr}`)),
    );
  });
}

/**
 * Copies wrangler.toml, .dev.vars and the static assets directory next to the bundle in `bundleDir`; returns
 * the config copy's path, for `--config`. The config's other relative paths then point into `bundleDir`: fine
 * for `wrangler dev <bundle> --no-bundle` (the bundle is the script; migrations are applied with the original).
 */
export function freezeConfig(bundleDir) {
  const config = join(bundleDir, "wrangler.toml");
  const text = readFileSync("wrangler.toml", "utf8");
  copyFileSync("wrangler.toml", config);
  if (existsSync(".dev.vars")) copyFileSync(".dev.vars", join(bundleDir, ".dev.vars"));
  for (const [, dir] of text.matchAll(/^\s*directory\s*=\s*"([^"]+)"/gm)) {
    if (!isAbsolute(dir) && existsSync(dir)) cpSync(dir, join(bundleDir, dir), { recursive: true });
  }
  return config;
}

const MEMORY_DIR = "/dev/shm";
/** A full bench run keeps well under this in its state (D1, objects, the bundle, the log). */
const MEMORY_NEEDED_BYTES = 1024 ** 3;

/**
 * Where a bench server keeps its throw-away state: in memory (tmpfs) when the machine has one with room
 * to spare, unless asked for the disk. Every SQLite write of Miniflare's simulators (D1, the objects, the
 * rate limiter, which writes on every call) ends in an fsync on the same workerd thread as the Worker; on
 * this machine's disk one costs about 0.45 ms, as much as a fifth of a whole request, and says nothing of
 * D1 or Durable Objects on Cloudflare. A state that is deleted at the end of the run needs no durability.
 * The folder in memory is made private (0700, unpredictable name): it holds a copy of .dev.vars.
 */
export function benchStateDir(name, { onDisk = false } = {}) {
  if (!onDisk && roomInMemory()) return mkdtempSync(join(MEMORY_DIR, `edge-shop-${name}-`));
  return join(".wrangler", name);
}

function roomInMemory() {
  try {
    accessSync(MEMORY_DIR, constants.W_OK);
    const { bavail, bsize } = statfsSync(MEMORY_DIR);
    return bavail * bsize >= MEMORY_NEEDED_BYTES;
  } catch {
    return false;
  }
}

/**
 * `localObservability`: wrangler dev's local traces (X_LOCAL_OBSERVABILITY, on by default in wrangler 4)
 * stream every invocation's events to a collector Worker that writes them to a SQLite Durable Object, on the same workerd thread as the Worker under test, at a cost that grows with
 * each binding call (measured by `npm run bench:cost`: about 0.5 ms of a /health request and 4.5 ms of a
 * placed order). On Cloudflare, logs and traces are collected outside the Worker. So the bench turns it off
 * unless asked.
 */
export async function startBenchServer({ port: wantedPort, stateDir, localObservability = false }) {
  mkdirSync(stateDir, { recursive: true });
  const bundleDir = join(stateDir, "worker");
  await Promise.all([
    wranglerAsync(["d1", "migrations", "apply", "DB", "--local", "--persist-to", stateDir]),
    wranglerAsync(["deploy", "--dry-run", "--outdir", bundleDir]),
  ]);
  const config = freezeConfig(bundleDir);

  const port = await freePort(wantedPort);
  const sinkPort = await freePort(port + 1);
  const sink = await startDataPlatformSink(sinkPort);
  const sinkUrl = `http://127.0.0.1:${sinkPort}/orders`;
  const logFile = join(stateDir, "wrangler-dev.log");
  const log = createWriteStream(logFile);
  const dev = startWranglerDev({
    port,
    persistTo: stateDir,
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...QUIET_ENV, X_LOCAL_OBSERVABILITY: String(localObservability) },
    extraArgs: [
      join(bundleDir, "index.js"),
      "--no-bundle",
      "--config",
      config,
      "--var",
      `DATA_PLATFORM_URL:${sinkUrl}`,
    ],
  });
  dev.stdout.pipe(log);
  dev.stderr.pipe(log);

  const baseUrl = `http://127.0.0.1:${port}`;
  let cron = null;
  try {
    await waitForHealth(baseUrl, 120_000);
  } catch (error) {
    await stop();
    throw new Error(`${error.message}\n--- wrangler dev log ---\n${tail(logFile)}`);
  }

  // As under npm start: the minute cron (outbox relay, idempotency-key purge) runs during the scenarios;
  // its ticks are counted, so a load phase it fell into can be told apart.
  let cronTicks = 0;
  cron = driveCron(baseUrl, 60_000, () => cronTicks++);

  async function stop() {
    clearInterval(cron);
    await stopGroup(dev.pid); // the whole group (npx, wrangler, workerd): SIGINT, SIGKILL after 5 s
    sink.closeAllConnections();
    await sink.close();
    log.end();
  }

  /** How many times `pattern` (a /g regexp) occurs in the wrangler dev log so far. */
  const logCount = (pattern) => {
    try {
      return (readFileSync(logFile, "utf8").match(pattern) ?? []).length;
    } catch {
      return 0;
    }
  };
  // Code and config are frozen, so nothing should restart the Worker; if something does, the report says so.
  const reloads = () => logCount(/Reloading local server/g);

  // `group`: the process group of wrangler dev, its proxy and its workerd (what bench:profile and bench:cost measure).
  const ticks = () => cronTicks;
  return { baseUrl, port, stateDir, group: dev.pid, exportsReceived: sink.received, reloads, logCount, cronTicks: ticks, logTail: () => tail(logFile), stop };
}

/** For an interrupt, just before the process exits: SIGKILLs every dev server started here. */
export const signalRunningServers = killDevServers;

function tail(file, lines = 15) {
  try {
    return readFileSync(file, "utf8").split("\n").slice(-lines).join("\n");
  } catch {
    return "(no log)";
  }
}

export function removeState(stateDir) {
  rmSync(stateDir, { recursive: true, force: true });
}

/** Runs SQL statements (separated by `;`) against the bench's local D1; returns one array of rows per statement. */
export function queryD1(stateDir, sql) {
  // Through a file: the checks' SQL (ids of thousands of users) outgrows one command-line argument (128 KiB).
  const file = join(stateDir, "bench-query.sql");
  writeFileSync(file, sql);
  const result = spawnSync(
    "npx",
    ["wrangler", "d1", "execute", "DB", "--local", "--persist-to", stateDir, "--json", "--file", file],
    { env: QUIET_ENV, encoding: "utf8", maxBuffer: 64 * 1024 * 1024 },
  );
  if (result.status !== 0) {
    throw new Error(`wrangler d1 execute failed (${result.status ?? result.error}): ${result.stderr || result.stdout}`);
  }
  const start = result.stdout.indexOf("[");
  const parsed = JSON.parse(result.stdout.slice(start));
  return parsed.map((statement) => statement.results);
}
