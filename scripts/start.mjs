// npm start: .dev.vars, local D1 migrations, demo data, then `wrangler dev` on http://localhost:8787, offline.
import { startDataPlatform } from "./data-platform.mjs";
import { driveCron, ensureDevVars, readDevVars, startWranglerDev, tokenFor, wrangler } from "./local.mjs";

const PORT = Number(process.env.PORT ?? 8787);
const PERSIST = ".wrangler/state";

if (ensureDevVars()) console.log("Created .dev.vars with a fresh JWT_SECRET (kept out of git).");
const { JWT_SECRET, DATA_PLATFORM_URL } = readDevVars();

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
const platform = DATA_PLATFORM_URL?.startsWith("http://127.0.0.1:8788/") ? startDataPlatform(8788) : null;

const dev = startWranglerDev({ port: PORT, persistTo: PERSIST });
// wrangler dev does not fire cron triggers by itself: drive the minute cron (outbox relay, key purge).
const cron = driveCron(`http://127.0.0.1:${PORT}`);
const stop = () => {
  clearInterval(cron);
  platform?.close();
  dev.kill("SIGINT");
};
process.on("SIGINT", stop);
process.on("SIGTERM", stop);
dev.on("exit", (code) => process.exit(code ?? 0));
