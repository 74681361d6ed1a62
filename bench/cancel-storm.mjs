// The cancel storm: completed orders are cancelled by their own users while other funded buyers race for
// the same product, whose stock is what was left plus what the cancellations give back. The product has a
// purchase limit per user, and some buyers try to order more than it.
import { oneEach, runLoad, seededRandom } from "./load.mjs";
import { balancesCheck, d1Check, invariant, ledgerCheck } from "./invariants.mjs";
import { mapLimit } from "./seed.mjs";

const PRICE = 1_000;
const MAX_PER_USER = 2;
const COUPON_DISCOUNT = 300;
/** Every COUPON_EVERY-th order to be cancelled was paid with a coupon (so paidAmount < totalAmount). */
const COUPON_EVERY = 4;
/** Every DUPLICATE_EVERY-th order to be cancelled gets a second cancel, sent right after the first. */
const DUPLICATE_EVERY = 10;
/**
 * What each buyer sends, as quantities, by buyer index: within, at and over the limit of 2. Up to 2 units per
 * buyer, so the demand (1.25 units per request) is more than the cancels and the leftover give: stock runs out.
 */
const BUYER_PATTERNS = [[2], [2], [2], [1, 1, 1], [2, 1]];
const CANCELLER_FUNDING = 2 * PRICE;
const BUYER_FUNDING = 3 * MAX_PER_USER * PRICE;
const SEED_PARALLELISM = 50;
const SETTLE_WAIT_MS = 2_000;

const CANCEL_ANSWERS = ["200", "409 ORDER_NOT_CANCELLABLE"];
const ORDER_ANSWERS = ["200", "400 OUT_OF_STOCK", "400 PURCHASE_LIMIT_EXCEEDED"];

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));


function shuffle(items, random) {
  for (let i = items.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [items[i], items[j]] = [items[j], items[i]];
  }
  return items;
}

const outcomeOf = (status, body) => (status < 300 ? String(status) : `${status} ${body?.code ?? "?"}`);
const tally = (counts, key) => counts.set(key, (counts.get(key) ?? 0) + 1);
const describeCounts = (counts) =>
  [...counts.entries()]
    .sort(([, a], [, b]) => b - a)
    .map(([k, v]) => `${v} × ${k}`)
    .join(", ") || "none";
const sum = (values) => values.reduce((a, b) => a + b, 0);
const idList = (ids) => (ids.length ? ids.join(",") : "NULL");

/** A product with the limit: on create if the API takes it there, else by PATCH. */
async function createLimitedProduct(api, name, stock) {
  let product;
  try {
    product = await api.createProduct(name, PRICE, stock, { maxPerUser: MAX_PER_USER });
  } catch {
    product = await api.createProduct(name, PRICE, stock);
  }
  if (product.maxPerUser !== MAX_PER_USER) {
    product = await api.admin("PATCH", `/api/admin/products/${product.id}`, { maxPerUser: MAX_PER_USER });
  }
  if (product.maxPerUser !== MAX_PER_USER) {
    throw new Error(`product ${product.id} does not carry maxPerUser ${MAX_PER_USER} (got ${JSON.stringify(product.maxPerUser)})`);
  }
  return product;
}

/**
 * Whether the product's stock object offers exactly D1's stock `stock`, once settled: an admin decrease goes
 * through the object, which refuses what it does not have. Taking `stock + 1` must be refused and taking
 * `stock` must succeed (then it is given back), so the object holds no lost or doubled restock.
 */
async function probeStockObject(api, productId, stock) {
  const patch = (stockDelta) => api.call("PATCH", `/api/admin/products/${productId}`, { body: { stockDelta } });
  let detail = "";
  for (let attempt = 0; attempt < 5; attempt++) {
    const over = await patch(-(stock + 1));
    if (over.status === 200) {
      await patch(stock + 1);
      return { pass: false, detail: `the object let ${stock + 1} units go with ${stock} in D1` };
    }
    if (over.body?.code !== "OUT_OF_STOCK") return { pass: false, detail: `taking ${stock + 1}: ${over.status} ${over.body?.code}` };
    if (stock === 0) return { pass: true, detail: "D1 stock 0; the object refused 1 unit" };
    const exact = await patch(-stock);
    if (exact.status === 200) {
      const back = await patch(stock);
      const pass = exact.body.stock === 0 && back.status === 200 && back.body.stock === stock;
      return {
        pass,
        detail: `D1 stock ${stock}: the object refused ${stock + 1}, gave ${stock}${attempt ? ` (after ${attempt} settling waits)` : ""}, stock back to ${back.body?.stock}`,
      };
    }
    detail = `taking ${stock}: ${exact.status} ${exact.body?.code}`;
    await sleep(SETTLE_WAIT_MS);
  }
  return { pass: false, detail: `${detail}: the object holds less than D1 after ${(5 * SETTLE_WAIT_MS) / 1000} s` };
}

export const cancelStorm = {
  name: "cancel-storm",
  describe: "POST /api/orders/{id}/cancel by their users while other buyers order the same limited product",
  write: true,
  async run(ctx) {
    const { cancels: cancelCount, cancelStormOrders: orderRequests, cancelLeftover: leftover } = ctx.sizes;
    const buyerQuantities = [];
    for (let b = 0, sent = 0; sent < orderRequests; b++) {
      const pattern = BUYER_PATTERNS[b % BUYER_PATTERNS.length].slice(0, orderRequests - sent);
      buyerQuantities.push(pattern);
      sent += pattern.length;
    }
    const cancellers = await ctx.pool.reserve(cancelCount);
    const buyers = await ctx.pool.reserve(buyerQuantities.length);
    const funded = new Map([
      ...(await ctx.api.fund(cancellers, CANCELLER_FUNDING)),
      ...(await ctx.api.fund(buyers, BUYER_FUNDING)),
    ]);
    const initialStock = cancelCount + leftover;
    const product = await createLimitedProduct(ctx.api, `bench cancel product x${initialStock}`, initialStock);
    const coupon = await ctx.api.admin("POST", "/api/admin/coupons", {
      name: "bench cancel coupon",
      discountType: "FIXED",
      discountValue: COUPON_DISCOUNT,
      totalQuantity: Math.ceil(cancelCount / COUPON_EVERY),
      validDays: 7,
    });

    // The orders to be cancelled: one unit each, every COUPON_EVERY-th paid with a coupon.
    const placed = await mapLimit(cancellers, SEED_PARALLELISM, async (user, i) => {
      let userCouponId;
      if (i % COUPON_EVERY === 0) {
        const issued = await ctx.api.call("POST", `/api/coupons/${coupon.id}/issue`, { token: user.token, body: {} });
        if (issued.status !== 200) throw new Error(`seeding: coupon issue → ${issued.status} ${JSON.stringify(issued.body)}`);
        userCouponId = issued.body.id;
      }
      const res = await ctx.api.call("POST", "/api/orders", {
        token: user.token,
        body: { items: [{ productId: product.id, quantity: 1 }], ...(userCouponId ? { userCouponId } : {}) },
      });
      if (res.status !== 200) throw new Error(`seeding: order → ${res.status} ${JSON.stringify(res.body)}`);
      return { user, order: res.body };
    });
    const before = await ctx.api.getProduct(product.id);
    if (before.stock !== leftover) throw new Error(`seeding: stock ${before.stock} after ${cancelCount} orders, expected ${leftover}`);

    // The storm: each cancel (with its duplicate right after it) and each order request, interleaved at random.
    const cancelAnswers = new Map();
    const orderAnswers = new Map();
    const cancelledIds = new Set();
    const wrongCancelBodies = [];
    const soldTo = new Map(buyers.map((b) => [b.id, { units: 0, paid: 0, orderIds: [] }]));
    const units = [];
    placed.forEach(({ user, order }, i) => {
      const cancel = {
        method: "POST",
        path: `/api/orders/${order.id}/cancel`,
        token: user.token,
        body: { reason: "bench cancel storm" },
        kind: "cancel",
        onAnswer: (status, body) => {
          tally(cancelAnswers, outcomeOf(status, body));
          if (status !== 200) return;
          if (body?.id !== order.id || body?.status !== "CANCELLED" || cancelledIds.has(order.id)) wrongCancelBodies.push(order.id);
          cancelledIds.add(order.id);
        },
      };
      units.push(i % DUPLICATE_EVERY === DUPLICATE_EVERY / 2 ? [cancel, { ...cancel }] : [cancel]);
    });
    buyers.forEach((buyer, b) => {
      for (const quantity of buyerQuantities[b]) {
        units.push([
          {
            method: "POST",
            path: "/api/orders",
            token: buyer.token,
            body: { items: [{ productId: product.id, quantity }] },
            kind: "order",
            onAnswer: (status, body) => {
              tally(orderAnswers, outcomeOf(status, body));
              if (status !== 200) return;
              const sold = soldTo.get(buyer.id);
              sold.units += quantity;
              sold.paid += body.paidAmount;
              sold.orderIds.push(body.id);
            },
          },
        ]);
      }
    });
    const jobs = shuffle(units, seededRandom(20261125)).flat();
    const duplicates = jobs.length - cancelCount - orderRequests;
    let overflow = 0;
    const resyncsBefore = ctx.logCount(/stock object re-synced/g);
    const load = await runLoad({
      baseUrl: ctx.baseUrl,
      concurrency: ctx.concurrency,
      amount: jobs.length,
      nextJob: oneEach(jobs, () => overflow++),
      expected: [...new Set([...CANCEL_ANSWERS, ...ORDER_ANSWERS])],
    });

    const cancelledOrders = placed.filter(({ order }) => cancelledIds.has(order.id));
    const cancelledUnits = cancelledOrders.length;
    const newUnits = sum([...soldTo.values()].map((s) => s.units));
    const netSold = cancelCount - cancelledUnits + newUnits;
    const overLimit = [...soldTo.entries()].filter(([, s]) => s.units > MAX_PER_USER);
    const count = (answers, key) => answers.get(key) ?? 0;
    const unexpected = (answers, allowed) => [...answers.entries()].filter(([k]) => !allowed.includes(k));

    await sleep(SETTLE_WAIT_MS);
    const after = await ctx.api.getProduct(product.id);
    const probe = await probeStockObject(ctx.api, product.id, after.stock);
    const resyncs = ctx.logCount(/stock object re-synced/g) - resyncsBefore;

    const expectedBalances = new Map();
    for (const { user, order } of placed) {
      expectedBalances.set(user.id, funded.get(user.id) - order.paidAmount + (cancelledIds.has(order.id) ? order.paidAmount : 0));
    }
    for (const buyer of buyers) expectedBalances.set(buyer.id, funded.get(buyer.id) - soldTo.get(buyer.id).paid);
    const placedById = new Map(placed.map(({ order }) => [order.id, order]));
    const newOrderIds = [...soldTo.values()].flatMap((s) => s.orderIds);

    return {
      load,
      facts: {
        productId: product.id,
        initialStock,
        leftover,
        maxPerUser: MAX_PER_USER,
        cancels: cancelCount,
        duplicateCancels: duplicates,
        cancelled: cancelledUnits,
        orderRequests,
        buyers: buyers.length,
        newOrders: newOrderIds.length,
        newUnits,
        outOfStock: count(orderAnswers, "400 OUT_OF_STOCK"),
        overLimit: count(orderAnswers, "400 PURCHASE_LIMIT_EXCEEDED"),
        finalStock: after.stock,
      },
      invariants: [
        invariant("each request sent exactly once", overflow === 0, `${overflow} extra requests`),
        invariant(
          `cancels: ${cancelCount} × 200 (one per order), ${duplicates} × 409 ORDER_NOT_CANCELLABLE`,
          count(cancelAnswers, "200") === cancelCount &&
            count(cancelAnswers, "409 ORDER_NOT_CANCELLABLE") === duplicates &&
            cancelledIds.size === cancelCount &&
            wrongCancelBodies.length === 0,
          `${describeCounts(cancelAnswers)}; ${wrongCancelBodies.length} 200s not the order CANCELLED once`,
        ),
        invariant(
          `orders: only ${ORDER_ANSWERS.join(" / ")}`,
          sum([...orderAnswers.values()]) === orderRequests && unexpected(orderAnswers, ORDER_ANSWERS).length === 0,
          describeCounts(orderAnswers),
        ),
        invariant("no 5xx, no socket error", load.errors === 0, `${load.errors} errors; socket: ${JSON.stringify(load.socketErrors)}`),
        invariant(
          `nobody above maxPerUser ${MAX_PER_USER} (per answers)`,
          overLimit.length === 0,
          `${buyers.length} buyers, ${overLimit.length} above${overLimit.length ? `: ${overLimit.slice(0, 3).map(([id, s]) => `user ${id} ${s.units}`).join(", ")}` : ""}`,
        ),
        invariant(
          "stock >= 0 and stock == initial - net sold (API product detail)",
          after.stock >= 0 && after.stock === initialStock - netSold,
          `stock ${after.stock}, initial ${initialStock}, net sold ${netSold} = ${cancelCount} - ${cancelledUnits} cancelled + ${newUnits} new`,
        ),
        invariant("the stock object agrees with D1 once settled (admin stock probe)", probe.pass, probe.detail),
        invariant("the stock object never offered stock D1 lacked (no re-sync logged)", resyncs === 0, `${resyncs} re-syncs`),
      ],
      d1Checks: [
        netStockCheck(product.id, { initialStock, netSold, apiStock: after.stock }),
        refundsCheck(product.id, { cancelledIds, placedById, newOrderIds }),
        purchaseLimitCheck(product.id, [...cancellers, ...buyers].map((u) => u.id)),
        couponsBackCheck(product.id),
        ledgerCheck([...expectedBalances.keys()]),
        balancesCheck(expectedBalances, "balance == funding - payments + refunds per answers"),
      ],
    };
  },
};

/** Stock never below 0 and == initial - units of COMPLETED orders, == what the API said after the storm. */
function netStockCheck(productId, { initialStock, netSold, apiStock }) {
  return d1Check(
    [
      `SELECT p.stock, (SELECT coalesce(sum(oi.quantity), 0) FROM order_items oi JOIN orders o ON o.id = oi.order_id WHERE oi.product_id = p.id AND o.status = 'COMPLETED') AS netSold FROM products p WHERE p.id = ${productId}`,
    ],
    ([[row]]) => [
      invariant(
        `stock >= 0 and stock == ${initialStock} - net sold (units of COMPLETED orders, D1)`,
        row.stock >= 0 && row.stock === initialStock - row.netSold && row.netSold === netSold,
        `stock ${row.stock}, net sold ${row.netSold} in D1, ${netSold} per answers`,
      ),
      invariant("D1 stock == the API's stock after the storm", row.stock === apiStock, `D1 ${row.stock}, API ${apiStock}`),
    ],
  );
}

/** Exactly the orders answered 200 are CANCELLED, each refunded once for its paidAmount; no refund for the rest. */
function refundsCheck(productId, { cancelledIds, placedById, newOrderIds }) {
  return d1Check(
    [
      `SELECT o.id, o.status, o.paid_amount AS paid, (SELECT count(*) FROM wallet_transactions w WHERE w.order_id = o.id AND w.type = 'REFUND') AS refunds, (SELECT count(*) FROM wallet_transactions w WHERE w.order_id = o.id AND w.type = 'REFUND' AND w.amount = o.paid_amount AND w.user_id = o.user_id) AS exact, (SELECT count(*) FROM wallet_transactions w WHERE w.order_id = o.id AND w.type = 'PAYMENT' AND w.amount = -o.paid_amount) AS payments FROM orders o WHERE o.id IN (SELECT order_id FROM order_items WHERE product_id = ${productId})`,
    ],
    ([rows]) => {
      const cancelled = rows.filter((r) => r.status === "CANCELLED");
      const completed = rows.filter((r) => r.status === "COMPLETED");
      const known = new Set([...placedById.keys(), ...newOrderIds]);
      const statusWrong = rows.filter((r) => (r.status === "CANCELLED") !== cancelledIds.has(r.id)).length;
      const badRefund = cancelled.filter((r) => r.paid > 0 ? r.refunds !== 1 || r.exact !== 1 : r.refunds !== 0);
      const refundedCompleted = completed.filter((r) => r.refunds !== 0).length;
      const unpaid = rows.filter((r) => r.payments !== 1).length;
      return [
        invariant(
          "CANCELLED in D1 == cancels answered 200; every order in D1 was answered 200",
          statusWrong === 0 && cancelled.length === cancelledIds.size && rows.length === known.size && rows.every((r) => known.has(r.id)),
          `${cancelled.length} cancelled, ${completed.length} completed in D1; ${cancelledIds.size} cancels and ${newOrderIds.length} new orders answered 200; ${statusWrong} differ`,
        ),
        invariant(
          "exactly one REFUND per cancelled order, amount == paidAmount (D1)",
          badRefund.length === 0,
          `${cancelled.length - badRefund.length} of ${cancelled.length}${badRefund.length ? `; e.g. order ${badRefund[0].id}: ${badRefund[0].refunds} refunds` : ""}`,
        ),
        invariant("no REFUND for a completed order (D1)", refundedCompleted === 0, `${refundedCompleted} of ${completed.length}`),
        invariant("each order paid by exactly one PAYMENT row (D1)", unpaid === 0, `${unpaid} of ${rows.length} off`),
      ];
    },
  );
}

/** Per user: units of COMPLETED orders <= max_per_user, and user_product_purchases says the same. */
function purchaseLimitCheck(productId, userIds) {
  const ids = idList(userIds);
  return d1Check(
    [
      `SELECT max_per_user AS max FROM products WHERE id = ${productId}`,
      `SELECT o.user_id AS userId, sum(oi.quantity) AS units FROM orders o JOIN order_items oi ON oi.order_id = o.id WHERE oi.product_id = ${productId} AND o.status = 'COMPLETED' AND o.user_id IN (${ids}) GROUP BY o.user_id`,
      `SELECT user_id AS userId, quantity FROM user_product_purchases WHERE product_id = ${productId} AND user_id IN (${ids})`,
    ],
    ([[product], units, purchases]) => {
      const held = new Map(units.map((u) => [u.userId, u.units]));
      const counted = new Map(purchases.map((p) => [p.userId, p.quantity]));
      const over = units.filter((u) => u.units > product.max);
      const overCounted = purchases.filter((p) => p.quantity > product.max).length;
      const differ = userIds.filter((id) => (held.get(id) ?? 0) !== (counted.get(id) ?? 0));
      return [
        invariant(
          `nobody above maxPerUser ${product.max}: units of COMPLETED orders per user (D1)`,
          over.length === 0,
          `${units.length} users hold units, ${over.length} above${over.length ? `: user ${over[0].userId} ${over[0].units}` : ""}`,
        ),
        invariant(
          "user_product_purchases == units of COMPLETED orders, within the limit (D1)",
          differ.length === 0 && overCounted === 0,
          `${userIds.length} users, ${differ.length} differ${differ.length ? ` (user ${differ[0]}: ${counted.get(differ[0]) ?? 0} counted, ${held.get(differ[0]) ?? 0} held)` : ""}, ${overCounted} above`,
        ),
      ];
    },
  );
}

/** A cancelled order's coupon is AVAILABLE again and free; a completed order's is USED by it. */
function couponsBackCheck(productId) {
  return d1Check(
    [
      `SELECT o.status, count(*) AS orders, sum(CASE WHEN (o.status = 'CANCELLED' AND uc.status = 'AVAILABLE' AND uc.order_id IS NULL AND uc.used_at IS NULL) OR (o.status = 'COMPLETED' AND uc.status = 'USED' AND uc.order_id = o.id) THEN 1 ELSE 0 END) AS restored FROM orders o JOIN user_coupons uc ON uc.id = o.user_coupon_id WHERE o.id IN (SELECT order_id FROM order_items WHERE product_id = ${productId}) GROUP BY o.status`,
    ],
    ([rows]) => {
      const wrong = sum(rows.map((r) => r.orders - r.restored));
      return [
        invariant(
          "coupon of each cancelled order AVAILABLE again, of each completed one USED (D1)",
          wrong === 0,
          rows.map((r) => `${r.restored} of ${r.orders} ${r.status}`).join(", ") || "no coupon orders",
        ),
      ];
    },
  );
}
