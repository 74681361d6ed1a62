// npm start: .dev.vars, local D1 migrations, demo data, then `wrangler dev` on http://localhost:8787, offline.
// PORT, DATA_PLATFORM_PORT (the stand-in, 8788) and PERSIST_TO (.wrangler/state) may be set, e.g. for a second
// instance. SIGINT, SIGTERM, SIGHUP or the death of the parent stop wrangler dev's whole process group (SIGKILL
// after 5 s), the stand-in and the cron driver, then exit 128 + the signal's number.
import { constants } from "node:os";
import { startDataPlatform } from "./data-platform.mjs";
import {
  driveCron,
  ensureDevVars,
  onShutdown,
  readDevVars,
  startWranglerDev,
  stopGroup,
  tokenFor,
  wrangler,
} from "./local.mjs";

const PORT = Number(process.env.PORT ?? 8787);
const PLATFORM_PORT = Number(process.env.DATA_PLATFORM_PORT ?? 8788);
const PERSIST = process.env.PERSIST_TO ?? ".wrangler/state";

// With the output piped (`npm start | cat`), a Ctrl-C ends the reader too: writing must not crash the shutdown.
process.stdout.on("error", () => {});
process.stderr.on("error", () => {});

let dev = null;
let platform = null;
let cron = null;
const shutdown = onShutdown(async (signal) => {
  clearInterval(cron);
  platform?.close();
  if (!dev) return;
  dev.off("exit", onDevExit);
  const t0 = Date.now();
  console.error(`\nnpm start: ${signal}, stopping wrangler dev (process group ${dev.pid})`);
  const gone = await stopGroup(dev.pid, { signal: signal === "SIGINT" ? "SIGINT" : "SIGTERM" });
  console.error(`npm start: ${gone ? "stopped" : "some processes survived SIGKILL"} (${Date.now() - t0} ms)`);
});

const madeDevVars = ensureDevVars();
if (madeDevVars) console.log(madeDevVars);
const { JWT_SECRET, DATA_PLATFORM_URL, EXPORT_SIGNING_SECRET } = readDevVars();

wrangler(["d1", "migrations", "apply", "DB", "--local", "--persist-to", PERSIST]);
wrangler(["d1", "execute", "DB", "--local", "--persist-to", PERSIST, "--file", "scripts/seed.sql"]);

const userToken = await tokenFor(JWT_SECRET, 1);
const adminToken = await tokenFor(JWT_SECRET, "admin");
console.log(`
Demo data is in place (users 1-3, products 1-6, coupons 1-2).
  user 1 token : ${userToken}
  admin token  : ${adminToken}
  try          : curl -H "Authorization: Bearer ${userToken}" http://localhost:${PORT}/api/balance/1
  reference    : http://localhost:${PORT}/docs
`);

// Completed orders are exported to DATA_PLATFORM_URL; locally a stand-in receives them unless the URL
// points elsewhere. `touch .wrangler/data-platform-down` simulates an outage (retries, then dead letters).
const standIn = DATA_PLATFORM_URL?.startsWith("http://127.0.0.1:8788/") ?? false;
if (standIn) {
  // It verifies every delivery's signature with the same secret(s) the Worker signs with.
  platform = startDataPlatform(PLATFORM_PORT, { secret: EXPORT_SIGNING_SECRET });
  platform.on("error", (error) => {
    console.error(`data platform stand-in: ${error.message} (DATA_PLATFORM_PORT=<port> picks another port)`);
    shutdown("SIGTERM", 1);
  });
}
const platformVar = standIn && PLATFORM_PORT !== 8788 ? ["--var", `DATA_PLATFORM_URL:http://127.0.0.1:${PLATFORM_PORT}/orders`] : [];

dev = startWranglerDev({ port: PORT, persistTo: PERSIST, extraArgs: platformVar });
// wrangler dev does not fire cron triggers by itself: drive the minute cron (outbox relay, key purge).
cron = driveCron(`http://127.0.0.1:${PORT}`);
// wrangler ended on its own (a crash, a port in use): end the rest of its group and exit with its code.
function onDevExit(code, signal) {
  console.error(`npm start: wrangler dev exited (${signal ?? code})`);
  shutdown("SIGTERM", code ?? 128 + constants.signals[signal]);
}
dev.on("exit", onDevExit);
