// The two first-come-first-served storms: many users racing for a coupon, many buyers racing for stock.
import { oneEach, runLoad } from "./load.mjs";
import { balancesCheck, couponCheck, invariant, ledgerCheck, paymentsCheck, stockCheck } from "./invariants.mjs";

function answersInvariant(load, expectedOutcomes, total) {
  const got = Object.entries(load.outcomes)
    .map(([k, v]) => `${v} × ${k}`)
    .join(", ");
  const pass =
    load.requests === total &&
    Object.entries(expectedOutcomes).every(([outcome, n]) => (load.outcomes[outcome] ?? 0) === n) &&
    load.errors === 0;
  const want = Object.entries(expectedOutcomes)
    .map(([k, v]) => `${v} × ${k}`)
    .join(", ");
  return invariant(`answers: ${want}`, pass, got + (load.errors ? `; ${load.errors} errors` : ""));
}

/** One issue request for `user`; a 200 adds the user to `winners`. */
export const issueJob = (couponId, user, winners) => ({
  method: "POST",
  path: `/api/coupons/${couponId}/issue`,
  token: user.token,
  body: {},
  onAnswer: (status) => {
    if (status === 200) winners.push(user.id);
  },
});

/**
 * Every user asks once for `coupon`, which has `quantity` pieces: the load, the winners, and what both coupon
 * storms check (each user sent once, the answers, issuedCount, and in D1 the holders).
 */
export async function issueStorm(ctx, coupon, users, quantity) {
  const winners = [];
  let overflow = 0;
  const load = await runLoad({
    baseUrl: ctx.baseUrl,
    concurrency: ctx.concurrency,
    amount: users.length,
    nextJob: oneEach(
      users.map((user) => issueJob(coupon.id, user, winners)),
      () => overflow++,
    ),
    expected: ["200", "400 COUPON_SOLD_OUT"],
  });
  const after = await ctx.api.getCoupon(coupon.id);
  return {
    load,
    winners,
    invariants: [
      invariant("each user sent exactly once", overflow === 0, `${overflow} extra requests`),
      answersInvariant(load, { 200: quantity, "400 COUPON_SOLD_OUT": users.length - quantity }, users.length),
      invariant(
        `exactly ${quantity} issued (API issuedCount)`,
        after.issuedCount === quantity,
        `issuedCount ${after.issuedCount} of ${after.totalQuantity}`,
      ),
    ],
    d1Checks: [couponCheck(coupon.id, { issued: quantity, winners })],
  };
}

export const couponStorm = {
  name: "coupon-storm",
  describe: "POST /api/coupons/{id}/issue, one per user",
  write: true,
  async run(ctx) {
    const { couponUsers, couponQuantity } = ctx.sizes;
    const users = await ctx.pool.take(couponUsers);
    const coupon = await ctx.api.createCoupon(`bench storm coupon x${couponQuantity}`, couponQuantity);
    const { load, winners, invariants, d1Checks } = await issueStorm(ctx, coupon, users, couponQuantity);
    return {
      load,
      facts: { couponId: coupon.id, users: couponUsers, quantity: couponQuantity, issued: winners.length },
      invariants,
      d1Checks,
    };
  },
};

const STORM_PRICE = 1_000;
const STORM_FUNDING = 2 * STORM_PRICE;

/**
 * One unit per buyer for a stock a third of the buyers can have. `keyed`: every order carries its own
 * Idempotency-Key, as a careful client sends it. D1 write transactions are counted from the stock
 * object's "order group committed" log lines (one per group batch).
 */
function orderStormScenario({ name, keyed }) {
  return {
    name,
    describe: `POST /api/orders, one unit per buyer${keyed ? ", each with an Idempotency-Key" : ""}`,
    write: true,
    async run(ctx) {
      const { buyers: buyerCount, stock } = ctx.sizes;
      const buyers = await ctx.pool.reserve(buyerCount);
      const funded = await ctx.api.fund(buyers, STORM_FUNDING);
      const product = await ctx.api.createProduct(`bench ${name} product x${stock}`, STORM_PRICE, stock);
      const groupsBefore = ctx.logCount(groupLinePattern(product.id));
      const orderIds = [];
      const paidBy = new Map();
      let overflow = 0;
      const jobs = buyers.map((buyer) => ({
        method: "POST",
        path: "/api/orders",
        token: buyer.token,
        headers: keyed ? { "Idempotency-Key": `bench-${name}-${buyer.id}` } : undefined,
        body: { items: [{ productId: product.id, quantity: 1 }] },
        onAnswer: (status, order) => {
          if (status !== 200) return;
          orderIds.push(order.id);
          paidBy.set(buyer.id, order.paidAmount);
        },
      }));
      const load = await runLoad({
        baseUrl: ctx.baseUrl,
        concurrency: ctx.concurrency,
        amount: jobs.length,
        nextJob: oneEach(jobs, () => overflow++),
        expected: ["200", "400 OUT_OF_STOCK"],
      });

      const after = await ctx.api.getProduct(product.id);
      const d1WriteBatches = ctx.logCount(groupLinePattern(product.id)) - groupsBefore;
      const expectedBalances = new Map(buyers.map((b) => [b.id, funded.get(b.id) - (paidBy.get(b.id) ?? 0)]));
      return {
        load,
        facts: {
          productId: product.id,
          buyers: buyerCount,
          stock,
          sold: orderIds.length,
          keyed,
          d1WriteBatches,
          d1WriteBatchesPer1000Sold: orderIds.length ? Math.round((d1WriteBatches * 1000) / orderIds.length) : null,
        },
        invariants: [
          invariant("each buyer sent exactly once", overflow === 0, `${overflow} extra requests`),
          answersInvariant(load, { 200: stock, "400 OUT_OF_STOCK": buyerCount - stock }, buyerCount),
          invariant(
            "stock >= 0 and stock == initial - successful orders (API product detail)",
            after.stock >= 0 && after.stock === stock - orderIds.length,
            `stock ${after.stock}, initial ${stock}, ${orderIds.length} orders answered 200`,
          ),
        ],
        d1Checks: [
          stockCheck(product, { initialStock: stock, soldQuantity: orderIds.length, orderIds }),
          paymentsCheck(product.id),
          ledgerCheck(buyers.map((b) => b.id)),
          balancesCheck(expectedBalances, "money conserved: balance == funding - paid, losers untouched"),
        ],
      };
    },
  };
}

/** The stock object's log line for one committed group of this product's orders. */
const groupLinePattern = (productId) => new RegExp(`"msg":"order group committed"[^\n]*"productId":${productId}[,}]`, "g");

export const orderStorm = orderStormScenario({ name: "order-storm", keyed: false });
export const orderStormKeyed = orderStormScenario({ name: "order-storm-keyed", keyed: true });
