// npm run bench:cost [-- --requests N] [-- --only NAME[,NAME]] [-- --local-observability] [-- --state-on-disk]
// The CPU one request of each kind costs the local server, in microseconds of workerd time: the main process
// (the Worker, its objects and Miniflare's simulators, on one thread: what limits throughput) and wrangler's
// proxy apart. Far steadier than requests per second on a shared machine, so a change to the hot path can be
// judged by a few runs of this instead of full benches. Each kind runs N requests (default 3,000) at the
// bench's concurrency after a short warm-up, on one fresh server set up as the bench's.
import { runLoad } from "./load.mjs";
import { workerdCpu, workerdCpuUsed } from "./processes.mjs";
import { CONCURRENCY, scenarioContext } from "./seed.mjs";
import { benchStateDir, removeState, startBenchServer } from "./server.mjs";
import { SIZES } from "./sizes.mjs";
import { ensureDevVars, readDevVars } from "../scripts/local.mjs";

const USAGE = "usage: npm run bench:cost -- [--requests N] [--only NAME,...] [--local-observability] [--state-on-disk]";

function parseArgs(argv) {
  const options = { requests: 3_000, only: null, localObservability: process.env.X_LOCAL_OBSERVABILITY === "true", stateOnDisk: false };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--requests") options.requests = Number(argv[++i]);
    else if (argv[i] === "--only") options.only = (argv[++i] ?? "").split(",");
    else if (argv[i] === "--local-observability") options.localObservability = true;
    else if (argv[i] === "--state-on-disk") options.stateOnDisk = true;
    else fail(`unknown argument ${argv[i]}; ${USAGE}`);
  }
  if (!Number.isInteger(options.requests) || options.requests < 1) fail(`--requests must be a positive integer; ${USAGE}`);
  return options;
}

function fail(message) {
  console.error(message);
  process.exit(2);
}

/** Microseconds per request of the main workerd and of the rest (wrangler's proxy), between two readings. */
function perRequest(before, after, requests) {
  const { main, rest } = workerdCpuUsed(before, after);
  const micros = (seconds) => ((seconds * 1e6) / requests).toFixed(0).padStart(8);
  return { main: micros(main), rest: micros(rest) };
}

/** A job maker: POSTs of `body` to `path`, each from the next of `users` in turn (one user per request, if enough). */
function postsFrom(users, path, body, { cycle = true } = {}) {
  let i = 0;
  return () => ({ method: "POST", path, token: users[cycle ? i++ % users.length : i++].token, body });
}

/** The kinds of request measured; `prepare` seeds what they need and returns the job maker. */
const KINDS = [
  { name: "health", expected: ["200"], prepare: async () => () => ({ path: "/health" }) },
  {
    name: "product-list",
    expected: ["200"],
    async prepare(ctx) {
      await ctx.api.createProduct("cost list", 1_000, 10);
      return () => ({ path: "/api/products" });
    },
  },
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
      return postsFrom(users, "/api/orders", { items: [{ productId: product.id, quantity: 1 }] });
    },
  },
  {
    name: "order-refused-by-object",
    expected: ["400 OUT_OF_STOCK"],
    async prepare(ctx, users) {
      // One unit left, two asked: refused by the stock object on every request (a sold-out mark needs 0 left).
      const product = await ctx.api.createProduct("cost one left", 1_000, 1);
      return postsFrom(users, "/api/orders", { items: [{ productId: product.id, quantity: 2 }] });
    },
  },
  {
    name: "coupon-sold-out",
    expected: ["200", "400 COUPON_SOLD_OUT"],
    async prepare(ctx, users) {
      const coupon = await ctx.api.createCoupon("cost sold out", 1);
      return postsFrom(users, `/api/coupons/${coupon.id}/issue`, {});
    },
  },
  {
    name: "charge",
    expected: ["200"],
    async prepare(ctx, users) {
      return postsFrom(users, "/api/balance/charge", { amount: 1_000 });
    },
  },
  {
    name: "coupon-issued",
    expected: ["200"],
    users: (requests) => requests + 200,
    async prepare(ctx, users, requests) {
      // One piece per user: each user asks once.
      const coupon = await ctx.api.createCoupon("cost issued", requests + 200);
      return postsFrom(users, `/api/coupons/${coupon.id}/issue`, {}, { cycle: false });
    },
  },
  {
    name: "order-placed",
    expected: ["200"],
    async prepare(ctx, users, requests) {
      const product = await ctx.api.createProduct("cost placed", 1, requests + 200);
      await ctx.api.fund(users, 1_000_000);
      return postsFrom(users, "/api/orders", { items: [{ productId: product.id, quantity: 1 }] });
    },
  },
];

/** The same orders with an Idempotency-Key each, as a careful client sends them. */
const keyed = (kind) => ({
  ...kind,
  name: `${kind.name}-keyed`,
  async prepare(...args) {
    const nextJob = await kind.prepare(...args);
    let n = 0;
    const run = Date.now();
    return () => ({ ...nextJob(), headers: { "Idempotency-Key": `cost-${run}-${n++}` } });
  },
});
KINDS.push(...KINDS.filter((k) => k.name.startsWith("order-")).map(keyed));

async function main() {
  const { requests, only, localObservability, stateOnDisk } = parseArgs(process.argv.slice(2));
  const unknown = (only ?? []).filter((name) => !KINDS.some((k) => k.name === name));
  if (unknown.length > 0) fail(`unknown kind ${unknown.join(", ")}; one of ${KINDS.map((k) => k.name).join(", ")}`);
  ensureDevVars();
  const { JWT_SECRET: secret } = readDevVars();
  const stateDir = benchStateDir(`cost-${Date.now()}`, { onDisk: stateOnDisk });
  const server = await startBenchServer({ port: 8799, stateDir, localObservability });
  try {
    const ctx = await scenarioContext(server, secret, SIZES.default);
    console.log("kind              req/s   µs/request: main workerd, proxy");
    for (const kind of KINDS.filter((k) => !only || only.includes(k.name))) {
      // Users send at most 20 writes per 10 s: each kind has its own users, enough that none is rate limited.
      const users = await ctx.pool.reserve(kind.users?.(requests) ?? Math.ceil((requests + 200) / 12));
      const nextJob = await kind.prepare(ctx, users, requests);
      await runLoad({ baseUrl: ctx.baseUrl, concurrency: CONCURRENCY, amount: 200, nextJob, expected: kind.expected });
      // Let the queues and the objects' alarms finish what the warm-up left before measuring.
      await new Promise((resolve) => setTimeout(resolve, 2_000));
      const before = workerdCpu(server.group);
      const load = await runLoad({ baseUrl: ctx.baseUrl, concurrency: CONCURRENCY, amount: requests, nextJob, expected: kind.expected });
      await new Promise((resolve) => setTimeout(resolve, 3_000));
      const { main, rest } = perRequest(before, workerdCpu(server.group), requests);
      const errors = load.errors ? `  ${load.errors} errors: ${JSON.stringify(load.outcomes)}` : "";
      console.log(`${kind.name.padEnd(16)} ${String(load.rps).padStart(6)}   ${main}   ${rest}${errors}`);
    }
  } finally {
    await server.stop();
    removeState(stateDir);
  }
}

await main();
