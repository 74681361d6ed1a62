// npm run bench:cost [-- --requests N] [-- --only NAME[,NAME]] [-- --local-observability]
// The CPU one request of each kind costs the local server, in microseconds of workerd time (the Worker, its
// objects and Miniflare's simulators, plus wrangler's proxy): far steadier than requests per second on a
// shared machine, so a change to the hot path can be judged by a few runs of this instead of full benches.
// Each kind runs N requests (default 3,000) at the bench's concurrency after a short warm-up, on one fresh server.
import { readdirSync, readFileSync } from "node:fs";
import { runLoad } from "./load.mjs";
import { CONCURRENCY, scenarioContext } from "./seed.mjs";
import { benchStateDir, removeState, startBenchServer } from "./server.mjs";
import { SIZES } from "./sizes.mjs";
import { ensureDevVars, readDevVars } from "../scripts/local.mjs";

function parseArgs(argv) {
  const options = { requests: 3_000, only: null, localObservability: false };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--requests") options.requests = Number(argv[++i]);
    else if (argv[i] === "--only") options.only = argv[++i].split(",");
    else if (argv[i] === "--local-observability") options.localObservability = true;
    else {
      console.error(`unknown argument ${argv[i]}; usage: npm run bench:cost -- [--requests N] [--only NAME,...] [--local-observability]`);
      process.exit(2);
    }
  }
  return options;
}

/** CPU seconds (user + system) of the workerd processes. */
function workerdCpu() {
  let total = 0;
  for (const pid of readdirSync("/proc").filter((p) => /^\d+$/.test(p))) {
    try {
      if (!readFileSync(`/proc/${pid}/cmdline`, "utf8").includes("workerd")) continue;
      const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ");
      total += (Number(fields[11]) + Number(fields[12])) / 100;
    } catch {
      // the process ended meanwhile
    }
  }
  return total;
}

/** The kinds of request measured; `prepare` seeds what they need and returns the job maker. */
const KINDS = [
  { name: "health", expected: ["200"], prepare: async () => () => ({ path: "/health" }) },
  {
    name: "product-detail",
    expected: ["200"],
    async prepare(ctx) {
      const product = await ctx.api.createProduct("cost detail", 1_000, 10);
      return () => ({ path: `/api/products/${product.id}` });
    },
  },
  {
    name: "order-sold-out",
    expected: ["400 OUT_OF_STOCK"],
    async prepare(ctx, users) {
      const product = await ctx.api.createProduct("cost sold out", 1_000, 0);
      let i = 0;
      return () => ({ method: "POST", path: "/api/orders", token: users[i++ % users.length].token, body: { items: [{ productId: product.id, quantity: 1 }] } });
    },
  },
  {
    name: "coupon-sold-out",
    expected: ["200", "400 COUPON_SOLD_OUT"],
    async prepare(ctx, users) {
      const coupon = await ctx.api.createCoupon("cost sold out", 1);
      let i = 0;
      return () => ({ method: "POST", path: `/api/coupons/${coupon.id}/issue`, token: users[i++ % users.length].token, body: {} });
    },
  },
  {
    name: "order-placed",
    expected: ["200"],
    async prepare(ctx, users, requests) {
      const product = await ctx.api.createProduct("cost placed", 1, requests + 200);
      await ctx.api.fund(users, 1_000_000);
      let i = 0;
      return () => ({ method: "POST", path: "/api/orders", token: users[i++ % users.length].token, body: { items: [{ productId: product.id, quantity: 1 }] } });
    },
  },
];

async function main() {
  const { requests, only, localObservability } = parseArgs(process.argv.slice(2));
  ensureDevVars();
  const { JWT_SECRET: secret } = readDevVars();
  const stateDir = benchStateDir(`cost-${Date.now()}`);
  const server = await startBenchServer({ port: 8799, stateDir, localObservability });
  try {
    const ctx = await scenarioContext(server, secret, SIZES.default);
    console.log("kind              req/s   workerd µs/request");
    for (const kind of KINDS.filter((k) => !only || only.includes(k.name))) {
      // Users send at most 20 writes per 10 s: each kind has its own users, enough that none is rate limited.
      const users = await ctx.pool.reserve(Math.ceil((requests + 200) / 12));
      const nextJob = await kind.prepare(ctx, users, requests);
      await runLoad({ baseUrl: ctx.baseUrl, concurrency: CONCURRENCY, amount: 200, nextJob, expected: kind.expected });
      // Let the queues and the objects' alarms finish what the warm-up left before measuring.
      await new Promise((resolve) => setTimeout(resolve, 2_000));
      const before = workerdCpu();
      const load = await runLoad({ baseUrl: ctx.baseUrl, concurrency: CONCURRENCY, amount: requests, nextJob, expected: kind.expected });
      await new Promise((resolve) => setTimeout(resolve, 3_000));
      const micros = ((workerdCpu() - before) * 1e6) / requests;
      const errors = load.errors ? `  ${load.errors} errors: ${JSON.stringify(load.outcomes)}` : "";
      console.log(`${kind.name.padEnd(16)} ${String(load.rps).padStart(6)}   ${micros.toFixed(0).padStart(8)}${errors}`);
    }
  } finally {
    await server.stop();
    removeState(stateDir);
  }
}

await main();
