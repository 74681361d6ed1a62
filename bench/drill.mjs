// npm run drill: the restart drill. Buyers stampede a coupon and a product; mid-drop the server is killed
// (SIGKILL, no graceful shutdown); it is started again on the same local state, clients retry what got no
// answer (orders with the same Idempotency-Key), and then every invariant is checked in D1 and every
// order must reach the data platform and the sales statistics exactly once.
//
//   npm run drill [-- --buyers 400 --stock 150]
import { mkdirSync, openSync } from "node:fs";
import { join } from "node:path";
import { spawnSync } from "node:child_process";
import { startDataPlatform } from "../scripts/data-platform.mjs";
import {
  ensureDevVars,
  onShutdown,
  QUIET_ENV,
  readDevVars,
  startWranglerDev,
  stopGroup,
  tokenFor,
  waitForHealth,
} from "../scripts/local.mjs";
import { mapLimit } from "./seed.mjs";
import { queryD1, removeState } from "./server.mjs";

const arg = (name, fallback) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : fallback;
};
const BUYERS = arg("buyers", 400);
const STOCK = arg("stock", 150);
const KILL_AFTER = Math.floor(BUYERS * 0.4);
const PORT = 8795;
const PLATFORM_PORT = 8796;
const BASE = `http://127.0.0.1:${PORT}`;
const STATE = join(".wrangler", `drill-${Date.now()}`);

function sh(args) {
  const r = spawnSync("npx", ["wrangler", ...args], { env: QUIET_ENV, encoding: "utf8" });
  if (r.status !== 0) throw new Error(`wrangler ${args.join(" ")}: ${r.stderr}`);
}

let lives = 0;
function start() {
  const log = openSync(join(STATE, `wrangler-${++lives}.log`), "w");
  const dev = startWranglerDev({
    port: PORT,
    persistTo: STATE,
    stdio: ["ignore", log, log],
    extraArgs: [
      join(STATE, "worker", "index.js"),
      "--no-bundle",
      "--config",
      "wrangler.toml",
      "--var",
      `DATA_PLATFORM_URL:http://127.0.0.1:${PLATFORM_PORT}/orders`,
      // Short windows so the drill sees the relay recover lost messages within a minute.
      "--var",
      "OUTBOX_RELAY_AFTER_SECONDS:5",
      "--var",
      "OUTBOX_REDELIVER_AFTER_SECONDS:20",
    ],
  });
  return dev;
}

async function request(method, path, token, body, headers = {}) {
  try {
    const res = await fetch(`${BASE}${path}`, {
      method,
      headers: { authorization: `Bearer ${token}`, "content-type": "application/json", ...headers },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    return { status: res.status, body: text ? JSON.parse(text) : null };
  } catch (error) {
    return { status: 0, error: error.cause?.code ?? error.message };
  }
}

const results = [];
const check = (name, pass, detail) => {
  results.push({ name, pass });
  console.log(`${pass ? "PASS" : "FAIL"}  ${name}${detail ? `  (${detail})` : ""}`);
};

ensureDevVars();
const secret = readDevVars().JWT_SECRET;
const admin = await tokenFor(secret, "admin");
mkdirSync(STATE, { recursive: true });
sh(["d1", "migrations", "apply", "DB", "--local", "--persist-to", STATE]);
sh(["deploy", "--dry-run", "--outdir", join(STATE, "worker")]);
const platform = startDataPlatform(PLATFORM_PORT);
let dev = start();
let cron;
// Interrupted (Ctrl-C, SIGTERM, the parent gone): stop the server as the end of the drill does, exit 128 + signal.
onShutdown(async () => {
  clearInterval(cron);
  await stopGroup(dev.pid);
  platform.close();
});
try {
  await waitForHealth(BASE);
  cron = setInterval(() => fetch(`${BASE}/cdn-cgi/local/scheduled?cron=*+*+*+*+*`).catch(() => {}), 5_000);

  const product = (await request("POST", "/api/admin/products", admin, { name: "Drill mug", price: 1_000, stock: STOCK })).body;
  const coupon = (
    await request("POST", "/api/admin/coupons", admin, {
      name: "Drill coupon",
      discountType: "FIXED",
      discountValue: 100,
      totalQuantity: STOCK,
      validDays: 7,
    })
  ).body;
  const buyers = await mapLimit(Array.from({ length: BUYERS }, (_, i) => i), 25, async (i) => {
    const user = (await request("POST", "/api/admin/users", admin, { name: `drill buyer ${i}` })).body;
    await request("POST", "/api/balance/charge", admin, { userId: user.id, amount: 50_000 });
    return { id: user.id, token: await tokenFor(secret, user.id) };
  });
  console.log(`seeded: product ${product.id} (stock ${STOCK}), coupon ${coupon.id} (${STOCK} pieces), ${BUYERS} buyers`);

  const issue = (b) => request("POST", `/api/coupons/${coupon.id}/issue`, b.token, {});
  const order = (b) =>
    request("POST", "/api/orders", b.token, { items: [{ productId: product.id, quantity: 1 }] }, {
      "Idempotency-Key": `drill-order-${b.id}`,
    });

  // The drop, with the server killed once KILL_AFTER buyers have been answered.
  let answered = 0;
  let killed = false;
  const first = await mapLimit(buyers, 40, async (b) => {
    const outcome = { issue: await issue(b), order: await order(b) };
    if (++answered >= KILL_AFTER && !killed) {
      killed = true;
      const n = answered;
      await stopGroup(dev.pid, { signal: "SIGKILL" }); // the whole group: npx, wrangler, workerd
      console.log(`server killed (SIGKILL) after ${n} buyers were answered`);
    }
    return outcome;
  });
  const unanswered = first.filter((o) => o.issue.status === 0 || o.order.status === 0).length;
  console.log(`${unanswered} buyers got no answer for at least one request`);

  dev = start();
  await waitForHealth(BASE);
  console.log("server restarted on the same local state; clients retry what got no answer");
  const final = await mapLimit(buyers, 40, async (b, i) => ({
    issue: first[i].issue.status === 0 ? await issue(b) : first[i].issue,
    order: first[i].order.status === 0 ? await order(b) : first[i].order,
  }));
  // Orders the killed server was running hold their idempotency claim until its lock (60 s) runs out;
  // their retries answer 409 until then. Retry those after the lock, as a client would: this takes the
  // claim over and must find (or finish) the very same order.
  const inProgress = () => buyers.map((b, i) => [b, i]).filter(([, i]) => final[i].order.body?.code === "IDEMPOTENCY_IN_PROGRESS");
  const waiting = inProgress().length;
  if (waiting > 0) {
    console.log(`${waiting} orders answered 409 IDEMPOTENCY_IN_PROGRESS; retrying them after the 60 s lock`);
    await new Promise((r) => setTimeout(r, 62_000));
    await mapLimit(inProgress(), 40, async ([b, i]) => {
      final[i].order = await order(b);
    });
  }
  check("every idempotent retry reached a final answer (no 409 left)", inProgress().length === 0, `${waiting} needed a takeover`);
  const stillDown = final.filter((o) => o.issue.status === 0 || o.order.status === 0).length;
  check("every retry got an answer", stillDown === 0, `${stillDown} without`);
  const errors = final.filter((o) => o.issue.status >= 500 || o.order.status >= 500).length;
  check("no 5xx after the restart", errors === 0, `${errors}`);

  const ordered = final.filter((o) => o.order.status === 200).length;
  const winners = final.filter((o) => o.issue.status === 200).length;

  // Let the queues, consumers and the relay finish, then check.
  const ids = buyers.map((b) => b.id).join(",");
  let sent = 0;
  let counted = 0;
  let orders = 0;
  for (let waited = 0; waited < 150; waited += 5) {
    await new Promise((r) => setTimeout(r, 5_000));
    const [[o], [e], [s]] = queryD1(
      STATE,
      `SELECT count(*) AS n FROM orders WHERE user_id IN (${ids});
       SELECT count(*) AS n FROM order_exports WHERE status = 'SENT';
       SELECT coalesce(sum(quantity), 0) AS n FROM product_sales_daily WHERE product_id = ${product.id}`,
    );
    orders = o.n;
    sent = e.n;
    counted = s.n;
    if (sent === orders && counted === orders) break;
  }

  const [[c], [holders], [dupes], [p], [sold], [ledger], [payments], [twice]] = queryD1(
    STATE,
    `SELECT issued_count, total_quantity FROM coupons WHERE id = ${coupon.id};
     SELECT count(*) AS n FROM user_coupons WHERE coupon_id = ${coupon.id};
     SELECT count(*) AS n FROM (SELECT user_id FROM user_coupons WHERE coupon_id = ${coupon.id} GROUP BY user_id HAVING count(*) > 1);
     SELECT stock FROM products WHERE id = ${product.id};
     SELECT coalesce(sum(quantity), 0) AS n FROM order_items WHERE product_id = ${product.id};
     SELECT count(*) AS n FROM users u WHERE u.id IN (${ids}) AND (u.balance <> (SELECT coalesce(sum(amount), 0) FROM wallet_transactions t WHERE t.user_id = u.id)
        OR u.balance <> (SELECT balance_after FROM wallet_transactions t WHERE t.user_id = u.id ORDER BY created_at DESC, id DESC LIMIT 1));
     SELECT count(*) AS n FROM orders o WHERE o.user_id IN (${ids}) AND (SELECT count(*) FROM wallet_transactions t WHERE t.order_id = o.id AND t.type = 'PAYMENT') <> 1;
     SELECT count(*) AS n FROM (SELECT user_id FROM orders WHERE user_id IN (${ids}) GROUP BY user_id HAVING count(*) > 1)`,
  );
  check("coupon: issued_count == user coupons <= total", c.issued_count === holders.n && holders.n <= c.total_quantity, `${c.issued_count} issued, ${holders.n} rows, total ${c.total_quantity}`);
  check("coupon: every piece went (more buyers than pieces)", holders.n === Math.min(STOCK, BUYERS), `${holders.n}`);
  check("coupon: nobody holds it twice", dupes.n === 0, `${dupes.n}`);
  check("coupon: holders >= buyers answered 200", holders.n >= winners, `${winners} answered 200; the rest got ALREADY_ISSUED on a retry`);
  check("stock: never negative, stock == initial - sold", p.stock >= 0 && p.stock === STOCK - sold.n, `stock ${p.stock}, sold ${sold.n}`);
  check("orders: no buyer ordered twice (one Idempotency-Key each)", twice.n === 0, `${twice.n} buyers with two orders`);
  check("orders: == units sold", orders === sold.n, `${orders} orders`);
  check("orders: every 200 answer is an order in D1", orders >= ordered, `${ordered} answered 200`);
  check("wallet: balance == sum(ledger) == newest balanceAfter for every buyer", ledger.n === 0, `${ledger.n} off`);
  check("wallet: each order paid by exactly one PAYMENT row", payments.n === 0, `${payments.n} off`);
  check("export: every order SENT to the data platform", sent === orders, `${sent} of ${orders}`);
  const received = await (await fetch(`http://127.0.0.1:${PLATFORM_PORT}/orders`)).json();
  check("export: the platform holds each order exactly once", received.count === orders, `${received.count} distinct keys`);
  check("stats: units counted == units sold", counted === sold.n, `${counted} counted`);
} finally {
  clearInterval(cron);
  await stopGroup(dev.pid);
  platform.close();
}
const failed = results.filter((r) => !r.pass).length;
if (failed) console.log(`state and wrangler logs kept in ${STATE}`);
else removeState(STATE);
console.log(failed ? `\n${failed} invariant(s) FAILED` : "\nall invariants hold");
process.exit(failed ? 1 : 0);
