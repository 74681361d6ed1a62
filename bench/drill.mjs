// npm run drill: the restart drill. Buyers stampede a coupon and a product, and one in five cancels the
// order it got; mid-drop the server is killed (SIGKILL, no graceful shutdown, landing just after a cancel
// was sent); it is started again on the same local state, clients retry what got no answer (orders and
// cancels with the same Idempotency-Key), and then every invariant is checked in D1 and at the data-platform
// stand-in: every order and every cancellation must reach the platform and the sales statistics exactly
// once, and every cancellation must be refunded and restocked exactly once.
//
//   npm run drill [-- --buyers 400 --stock 150]
import { mkdirSync, openSync } from "node:fs";
import { join } from "node:path";
import { spawnSync } from "node:child_process";
import { describeAudit, fetchAudit } from "../scripts/audit-client.mjs";
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
import { freePort, freezeConfig, queryD1, removeState } from "./server.mjs";

const arg = (name, fallback) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : fallback;
};
const BUYERS = arg("buyers", 400);
const STOCK = arg("stock", 150);
// Mid-drop: once 40% of the stock was sold (and a few cancels answered, to time them), the next cancel sent
// is followed by the SIGKILL half a typical cancel's time later, so it lands while that cancellation (and the
// orders in flight) are running; if no cancel comes, it lands anyway KILL_FALLBACK buyers later.
const KILL_AFTER_SOLD = Math.max(1, Math.floor(Math.min(STOCK, BUYERS) * 0.4));
const KILL_FALLBACK = 40;
/** Every CANCEL_EVERY-th buyer cancels the order it got (with its own Idempotency-Key). */
const CANCEL_EVERY = 5;
const FUNDING = 50_000;
/** How long the consumers and the relay get to deliver and count everything after the retries. */
const DRAIN_S = 180;
// Free ports, so a drill never talks to someone else's server or stand-in.
const PORT = await freePort(8795);
const PLATFORM_PORT = await freePort(PORT + 1);
const BASE = `http://127.0.0.1:${PORT}`;
const PLATFORM = `http://127.0.0.1:${PLATFORM_PORT}/orders`;
const STATE = join(".wrangler", `drill-${Date.now()}`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const sum = (values) => values.reduce((a, b) => a + b, 0);

function sh(args) {
  const r = spawnSync("npx", ["wrangler", ...args], { env: QUIET_ENV, encoding: "utf8" });
  if (r.status !== 0) throw new Error(`wrangler ${args.join(" ")}: ${r.stderr}`);
}

let lives = 0;
let config;
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
      config,
      "--var",
      `DATA_PLATFORM_URL:${PLATFORM}`,
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
    const replayed = res.headers.get("idempotent-replayed") === "true";
    try {
      return { status: res.status, body: text ? JSON.parse(text) : null, replayed };
    } catch {
      return { status: res.status, body: text, replayed };
    }
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
// wrangler dev reloads on a config change: the drill serves copies of wrangler.toml and .dev.vars taken now
// (the stand-in verifies with the signing secret of the same copy).
config = freezeConfig(join(STATE, "worker"));
const signingSecret = readDevVars(join(STATE, "worker", ".dev.vars")).EXPORT_SIGNING_SECRET;
// The stand-in logs one JSON line per delivery: count them per key instead of printing them (a redelivery after
// the kill is allowed, the platform keeps each key once); refused deliveries are counted and the first printed.
const deliveries = new Map();
let refusedDeliveries = 0;
const consoleLog = console.log;
console.log = (...args) => {
  const line = args[0];
  if (typeof line === "string" && line.startsWith('{"msg":"data platform received')) {
    const { key } = JSON.parse(line);
    deliveries.set(key, (deliveries.get(key) ?? 0) + 1);
  } else if (typeof line === "string" && line.startsWith('{"msg":"data platform refused')) {
    if (refusedDeliveries++ === 0) consoleLog(...args);
  } else consoleLog(...args);
};
const platform = startDataPlatform(PLATFORM_PORT, { secret: signingSecret });
let dev = start();
let cron;
let killTimer;
const stopAll = async () => {
  clearInterval(cron);
  clearTimeout(killTimer);
  await stopGroup(dev.pid);
  platform.closeAllConnections();
  platform.close();
  console.log = consoleLog;
};
// Interrupted (Ctrl-C, SIGTERM, the parent gone): stop the server as the end of the drill does, exit 128 + signal.
onShutdown(stopAll);
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
    await request("POST", "/api/balance/charge", admin, { userId: user.id, amount: FUNDING });
    return { id: user.id, token: await tokenFor(secret, user.id) };
  });
  console.log(`seeded: product ${product.id} (stock ${STOCK}), coupon ${coupon.id} (${STOCK} pieces), ${BUYERS} buyers, 1 in ${CANCEL_EVERY} cancels`);

  const issue = (b) => request("POST", `/api/coupons/${coupon.id}/issue`, b.token, {});
  const order = (b) =>
    request("POST", "/api/orders", b.token, { items: [{ productId: product.id, quantity: 1 }] }, {
      "Idempotency-Key": `drill-order-${b.id}`,
    });

  // The drop, with the server killed once 40% of the stock was sold, just after a cancel was sent.
  let answered = 0;
  let sold = 0;
  let armedAt = null;
  let killing = null;
  const kill = (why) => {
    killing ??= (async () => {
      const [n, m] = [answered, sold];
      await stopGroup(dev.pid, { signal: "SIGKILL" }); // the whole group: npx, wrangler, workerd
      console.log(`server killed (SIGKILL) after ${n} buyers were answered and ${m} orders placed, ${why}`);
    })();
  };
  const cancelMs = [];
  const cancel = async (b, orderId) => {
    if (armedAt !== null && !killing && !killTimer) {
      const typical = cancelMs.sort((x, y) => x - y)[Math.floor(cancelMs.length / 2)];
      const delay = Math.max(10, Math.round(typical / 2));
      killTimer = setTimeout(() => kill(`${delay} ms after a cancel was sent (cancels took ${Math.round(typical)} ms at the median)`), delay);
    }
    const sent = performance.now();
    const answer = await request("POST", `/api/orders/${orderId}/cancel`, b.token, { reason: "drill" }, { "Idempotency-Key": `drill-cancel-${b.id}` });
    if (!killing && answer.status === 200) cancelMs.push(performance.now() - sent);
    return answer;
  };
  const cancels = (i) => i % CANCEL_EVERY === 0;

  const first = await mapLimit(buyers, 40, async (b, i) => {
    const outcome = { issue: await issue(b), order: await order(b), cancel: null };
    if (outcome.order.status === 200) sold++;
    if (sold >= KILL_AFTER_SOLD && cancelMs.length >= 3 && armedAt === null) armedAt = answered;
    if (cancels(i) && outcome.order.status === 200) outcome.cancel = await cancel(b, outcome.order.body.id);
    if (++answered >= (armedAt ?? Infinity) + KILL_FALLBACK && !killing) kill("no cancel came");
    return outcome;
  });
  if (!killing) kill("at the end of the drop");
  await killing;
  const unanswered = first.filter((o) => o.issue.status === 0 || o.order.status === 0 || o.cancel?.status === 0).length;
  const cancelsCut = first.filter((o) => o.cancel?.status === 0).length;
  console.log(`${unanswered} buyers got no answer for at least one request (${cancelsCut} of them for a cancel)`);

  dev = start();
  await waitForHealth(BASE);
  console.log("server restarted on the same local state; clients retry what got no answer");
  const lost = (r) => !r || r.status === 0;
  const final = await mapLimit(buyers, 40, async (b, i) => {
    const o = {
      issue: first[i].issue.status === 0 ? await issue(b) : first[i].issue,
      order: first[i].order.status === 0 ? await order(b) : first[i].order,
      cancel: first[i].cancel,
    };
    if (cancels(i) && o.order.status === 200 && lost(o.cancel)) o.cancel = await cancel(b, o.order.body.id);
    return o;
  });
  // Orders and cancels the killed server was running hold their idempotency claim until its lock (60 s) runs
  // out; their retries answer 409 until then. Retry those after the lock, as a client would: this takes the
  // claim over and must find (or finish) the very same order or cancellation.
  const busy = (r) => r?.body?.code === "IDEMPOTENCY_IN_PROGRESS";
  const inProgress = () => final.filter((o) => busy(o.order) || busy(o.cancel)).length;
  const waiting = inProgress();
  if (waiting > 0) {
    console.log(`${waiting} orders or cancels answered 409 IDEMPOTENCY_IN_PROGRESS; retrying them after the 60 s lock`);
    await sleep(62_000);
    await mapLimit(buyers, 40, async (b, i) => {
      const o = final[i];
      if (busy(o.order)) o.order = await order(b);
      if (cancels(i) && o.order.status === 200 && (lost(o.cancel) || busy(o.cancel))) o.cancel = await cancel(b, o.order.body.id);
    });
  }
  const cut = final.filter((o, i) => first[i].cancel?.status === 0 && o.cancel);
  const cutReplayed = cut.filter((o) => o.cancel.replayed).length;
  console.log(
    `cancels cut by the kill: ${cut.length}; on retry ${cutReplayed} replayed (committed before the kill), ` +
      `${cut.length - cutReplayed} done by the retry`,
  );
  check("every idempotent retry reached a final answer (no 409 IDEMPOTENCY_IN_PROGRESS left)", inProgress() === 0, `${waiting} needed a takeover`);
  const stillDown = final.filter((o) => o.issue.status === 0 || o.order.status === 0 || o.cancel?.status === 0).length;
  check("every retry got an answer", stillDown === 0, `${stillDown} without`);
  const errors = final.filter((o) => o.issue.status >= 500 || o.order.status >= 500 || o.cancel?.status >= 500).length;
  check("no 5xx after the restart", errors === 0, `${errors}`);

  const ordered = final.filter((o) => o.order.status === 200);
  const winners = final.filter((o) => o.issue.status === 200).length;
  const cancelAttempts = final.filter((o) => o.cancel);
  const cancelledIds = new Set(cancelAttempts.filter((o) => o.cancel.status === 200).map((o) => o.order.body.id));
  const cancelRight = cancelAttempts.filter(
    (o) => o.cancel.status === 200 && o.cancel.body?.status === "CANCELLED" && o.cancel.body?.id === o.order.body.id,
  );
  const cancelWrong = cancelAttempts.find((o) => !cancelRight.includes(o));
  check(
    "cancel: every cancel answered 200 with its order CANCELLED (a retry replays the first answer)",
    cancelRight.length === cancelAttempts.length,
    `${cancelRight.length} of ${cancelAttempts.length}${cancelWrong ? `; e.g. ${JSON.stringify(cancelWrong.cancel).slice(0, 200)}` : ""}`,
  );

  // Let the queues, consumers and the relay finish (both events of every order), then check.
  const ids = buyers.map((b) => b.id).join(",");
  let drained = null;
  for (let waited = 5; waited <= DRAIN_S; waited += 5) {
    await sleep(5_000);
    const [[d], exports] = queryD1(
      STATE,
      `SELECT count(*) AS orders, coalesce(sum(status = 'CANCELLED'), 0) AS cancelled,
         (SELECT coalesce(sum(oi.quantity), 0) FROM order_items oi JOIN orders x ON x.id = oi.order_id WHERE oi.product_id = ${product.id} AND x.status = 'COMPLETED') AS netSold,
         (SELECT coalesce(sum(quantity), 0) FROM product_sales_daily WHERE product_id = ${product.id}) AS counted
       FROM orders WHERE user_id IN (${ids});
       SELECT event, count(*) AS n FROM order_exports WHERE status = 'SENT' AND order_id IN (SELECT id FROM orders WHERE user_id IN (${ids})) GROUP BY event`,
    );
    const sent = Object.fromEntries(exports.map((e) => [e.event, e.n]));
    const atPlatform = (await (await fetch(PLATFORM)).json()).count;
    drained = { waited, done: false };
    if ((sent.PLACED ?? 0) === d.orders && (sent.CANCELLED ?? 0) === d.cancelled && d.counted === d.netSold && atPlatform === d.orders + d.cancelled) {
      drained.done = true;
      break;
    }
  }
  console.log(drained.done ? `exports and statistics settled ${drained.waited} s after the retries` : `still not settled after ${DRAIN_S} s`);

  const [[c], [holders], [dupes], [p], orderRows, [ledger], [twice], balances] = queryD1(
    STATE,
    `SELECT issued_count, total_quantity FROM coupons WHERE id = ${coupon.id};
     SELECT count(*) AS n FROM user_coupons WHERE coupon_id = ${coupon.id};
     SELECT count(*) AS n FROM (SELECT user_id FROM user_coupons WHERE coupon_id = ${coupon.id} GROUP BY user_id HAVING count(*) > 1);
     SELECT stock,
       (SELECT coalesce(sum(oi.quantity), 0) FROM order_items oi JOIN orders o ON o.id = oi.order_id WHERE oi.product_id = ${product.id} AND o.status = 'COMPLETED') AS netSold,
       (SELECT coalesce(sum(quantity), 0) FROM product_sales_daily WHERE product_id = ${product.id}) AS counted
       FROM products WHERE id = ${product.id};
     SELECT o.id, o.status,
       (SELECT count(*) FROM wallet_transactions t WHERE t.order_id = o.id AND t.type = 'PAYMENT' AND t.amount = -o.paid_amount) AS payments,
       (SELECT count(*) FROM wallet_transactions t WHERE t.order_id = o.id AND t.type = 'REFUND') AS refunds,
       (SELECT count(*) FROM wallet_transactions t WHERE t.order_id = o.id AND t.type = 'REFUND' AND t.amount = o.paid_amount AND t.user_id = o.user_id) AS exactRefunds,
       (SELECT count(*) FROM order_exports e WHERE e.order_id = o.id AND e.event = 'PLACED' AND e.status = 'SENT') AS placedSent,
       (SELECT count(*) FROM order_exports e WHERE e.order_id = o.id AND e.event = 'CANCELLED' AND e.status = 'SENT') AS cancelSent,
       (SELECT count(*) FROM order_exports e WHERE e.order_id = o.id AND e.event = 'CANCELLED') AS cancelExports,
       (SELECT count(*) FROM stats_counted_orders s WHERE s.order_id = o.id) AS statsPlaced,
       (SELECT count(*) FROM stats_counted_cancellations s WHERE s.order_id = o.id) AS statsCancelled
       FROM orders o WHERE o.user_id IN (${ids});
     SELECT count(*) AS n FROM users u WHERE u.id IN (${ids}) AND (u.balance <> (SELECT coalesce(sum(amount), 0) FROM wallet_transactions t WHERE t.user_id = u.id)
        OR u.balance <> (SELECT balance_after FROM wallet_transactions t WHERE t.user_id = u.id ORDER BY created_at DESC, id DESC LIMIT 1));
     SELECT count(*) AS n FROM (SELECT user_id FROM orders WHERE user_id IN (${ids}) GROUP BY user_id HAVING count(*) > 1);
     SELECT id, balance FROM users WHERE id IN (${ids})`,
  );
  const cancelledRows = orderRows.filter((o) => o.status === "CANCELLED");
  const completedRows = orderRows.filter((o) => o.status === "COMPLETED");
  const answeredIds = new Set(ordered.map((o) => o.order.body.id));

  check("coupon: issued_count == user coupons <= total", c.issued_count === holders.n && holders.n <= c.total_quantity, `${c.issued_count} issued, ${holders.n} rows, total ${c.total_quantity}`);
  check("coupon: every piece went (more buyers than pieces)", holders.n === Math.min(STOCK, BUYERS), `${holders.n}`);
  check("coupon: nobody holds it twice", dupes.n === 0, `${dupes.n}`);
  check("coupon: holders >= buyers answered 200", holders.n >= winners, `${winners} answered 200; the rest got ALREADY_ISSUED on a retry`);
  check("orders: no buyer ordered twice (one Idempotency-Key each)", twice.n === 0, `${twice.n} buyers with two orders`);
  check(
    "orders: D1's orders == the orders answered 200",
    orderRows.length === answeredIds.size && orderRows.every((o) => answeredIds.has(o.id)),
    `${orderRows.length} in D1, ${answeredIds.size} answered 200`,
  );
  check(
    "cancel: D1's CANCELLED orders == the cancels answered 200",
    cancelledRows.length === cancelledIds.size && cancelledRows.every((o) => cancelledIds.has(o.id)),
    `${cancelledRows.length} in D1, ${cancelledIds.size} answered 200`,
  );
  check(
    "stock: never negative, restocked once: stock == initial - net sold (units of COMPLETED orders)",
    p.stock >= 0 && p.stock === STOCK - p.netSold && p.netSold === completedRows.length,
    `stock ${p.stock}, net sold ${p.netSold} = ${orderRows.length} sold - ${cancelledRows.length} cancelled`,
  );
  const badRefunds = cancelledRows.filter((o) => o.refunds !== 1 || o.exactRefunds !== 1).length;
  check("wallet: every cancelled order refunded exactly once, amount == paidAmount", badRefunds === 0, `${cancelledRows.length - badRefunds} of ${cancelledRows.length}`);
  const refundedCompleted = completedRows.filter((o) => o.refunds !== 0).length;
  check("wallet: no REFUND for a completed order", refundedCompleted === 0, `${refundedCompleted} of ${completedRows.length}`);
  const unpaid = orderRows.filter((o) => o.payments !== 1).length;
  check("wallet: each order paid by exactly one PAYMENT row", unpaid === 0, `${unpaid} off`);
  check("wallet: balance == sum(ledger) == newest balanceAfter for every buyer", ledger.n === 0, `${ledger.n} off`);
  const expected = new Map(buyers.map((b) => [b.id, FUNDING]));
  for (const { order: o } of ordered) {
    expected.set(o.body.userId, FUNDING - o.body.paidAmount + (cancelledIds.has(o.body.id) ? o.body.paidAmount : 0));
  }
  const wrongBalances = balances.filter((u) => u.balance !== expected.get(u.id)).length;
  check("wallet: balance == funding - payment + refund, per the answers", balances.length === BUYERS && wrongBalances === 0, `${wrongBalances} of ${balances.length} differ`);

  const received = await (await fetch(PLATFORM)).json();
  const keys = new Set(received.keys);
  const wanted = new Set([...orderRows.map((o) => `order-${o.id}`), ...cancelledRows.map((o) => `order-${o.id}-cancel`)]);
  const missing = [...wanted].filter((k) => !keys.has(k));
  const extra = received.keys.filter((k) => !wanted.has(k));
  const redelivered = [...deliveries.values()].filter((n) => n > 1).length;
  check(
    "export: every order SENT once (one PLACED export row each)",
    orderRows.every((o) => o.placedSent === 1),
    `${sum(orderRows.map((o) => o.placedSent))} of ${orderRows.length}`,
  );
  check(
    "export: every cancellation SENT once (one CANCELLED export row each), none for a completed order",
    cancelledRows.every((o) => o.cancelSent === 1) && completedRows.every((o) => o.cancelExports === 0),
    `${sum(cancelledRows.map((o) => o.cancelSent))} of ${cancelledRows.length}; ${sum(completedRows.map((o) => o.cancelExports))} for completed orders`,
  );
  check(
    "export: the platform holds order-<id> once per order and order-<id>-cancel once per cancellation, nothing else",
    missing.length === 0 && extra.length === 0 && received.count === wanted.size,
    `${received.orders} + ${received.cancellations} keys for ${orderRows.length} orders + ${cancelledRows.length} cancellations; ` +
      `${missing.length} missing${missing.length ? ` (${missing.slice(0, 3).join(", ")})` : ""}, ${extra.length} extra; ` +
      `${redelivered} keys redelivered (kept once), ${refusedDeliveries} deliveries refused`,
  );
  const uncounted = orderRows.filter((o) => o.statsPlaced !== 1).length;
  const cancelUncounted = orderRows.filter((o) => o.statsCancelled !== (o.status === "CANCELLED" ? 1 : 0)).length;
  check(
    "stats: product_sales_daily == net units sold (each order counted once, each cancellation once)",
    p.counted === p.netSold && uncounted === 0 && cancelUncounted === 0,
    `${p.counted} counted, ${p.netSold} net sold; ${uncounted} orders and ${cancelUncounted} cancellations not counted once`,
  );
  // The service's own audit must agree: every invariant it knows, on the data the drill left.
  const audit = await fetchAudit(BASE, admin);
  check("audit: GET /api/admin/audit is ok", audit.ok, describeAudit(audit).replaceAll("\n", "; "));
} finally {
  await stopAll();
}
const failed = results.filter((r) => !r.pass).length;
if (failed) console.log(`state and wrangler logs kept in ${STATE}`);
else removeState(STATE);
console.log(failed ? `\n${failed} invariant(s) FAILED` : "\nall invariants hold");
process.exit(failed ? 1 : 0);
