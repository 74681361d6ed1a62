// A realistic blend from many users: mostly browsing, some charging, coupon issuing and ordering.
import { runLoad, seededRandom } from "./load.mjs";
import { balancesCheck, couponCheck, invariant, ledgerCheck, paymentsCheck, stockCheck } from "./invariants.mjs";
import { catalogProducts } from "./reads.mjs";
import { issueJob } from "./storms.mjs";

const BLEND = [
  ["list", 0.3],
  ["detail", 0.3],
  ["charge", 0.15],
  ["issue", 0.1],
  ["order", 0.15],
];
const FUNDING = 100_000;
const CHARGE_AMOUNT = 1_000;
const PRODUCTS = 5;
const PRODUCT_STOCK = 100_000;


function pickKind(r) {
  let acc = 0;
  for (const [kind, share] of BLEND) if (r < (acc += share)) return kind;
  return BLEND[BLEND.length - 1][0];
}

export const mixed = {
  name: "mixed",
  describe: "30% list, 30% detail, 15% charge, 10% coupon issue, 15% order",
  write: true,
  async run(ctx) {
    const { mixedUsers, mixedRequests } = ctx.sizes;
    const catalog = await catalogProducts(ctx);
    const users = await ctx.pool.reserve(mixedUsers);
    const funded = await ctx.api.fund(users, FUNDING);
    const products = [];
    for (let i = 1; i <= PRODUCTS; i++) {
      products.push(await ctx.api.createProduct(`bench mixed ${i}`, 1_000 * i, PRODUCT_STOCK));
    }
    // Fewer coupons than users, so the blend also meets sold-out and already-issued answers.
    const coupon = await ctx.api.createCoupon("bench mixed coupon", Math.max(1, Math.floor(mixedUsers / 5)));
    const browsable = [...catalog, ...products];

    const balances = new Map(funded);
    const winners = [];
    const sold = new Map(products.map((p) => [p.id, { quantity: 0, orderIds: [] }]));
    const random = seededRandom(20261124);
    const pick = (list) => list[Math.floor(random() * list.length)];

    const jobFor = (kind) => {
      const user = pick(users);
      switch (kind) {
        case "list":
          return { path: "/api/products" };
        case "detail":
          return { path: `/api/products/${pick(browsable).id}` };
        case "charge":
          return {
            method: "POST",
            path: "/api/balance/charge",
            token: user.token,
            body: { amount: CHARGE_AMOUNT },
            onAnswer: (status) => {
              if (status === 200) balances.set(user.id, balances.get(user.id) + CHARGE_AMOUNT);
            },
          };
        case "issue":
          return issueJob(coupon.id, user, winners);
        default: {
          const product = pick(products);
          const quantity = 1 + Math.floor(random() * 3);
          return {
            method: "POST",
            path: "/api/orders",
            token: user.token,
            body: { items: [{ productId: product.id, quantity }] },
            onAnswer: (status, order) => {
              if (status !== 200) return;
              balances.set(user.id, balances.get(user.id) - order.paidAmount);
              const line = sold.get(product.id);
              line.quantity += quantity;
              line.orderIds.push(order.id);
            },
          };
        }
      }
    };

    const nextJob = () => {
      const kind = pickKind(random());
      return { kind, ...jobFor(kind) };
    };

    const load = await runLoad({
      baseUrl: ctx.baseUrl,
      concurrency: ctx.concurrency,
      amount: mixedRequests,
      nextJob,
      expected: [
        "200",
        "400 COUPON_SOLD_OUT",
        "400 COUPON_ALREADY_ISSUED",
        "400 OUT_OF_STOCK",
        "400 INSUFFICIENT_BALANCE",
      ],
    });

    const afterCoupon = await ctx.api.getCoupon(coupon.id);
    const afterProducts = await Promise.all(products.map((p) => ctx.api.getProduct(p.id)));
    const stockWrong = afterProducts.filter((p) => p.stock < 0 || p.stock !== PRODUCT_STOCK - sold.get(p.id).quantity);
    return {
      load,
      facts: {
        users: mixedUsers,
        couponsIssued: winners.length,
        orders: [...sold.values()].reduce((n, s) => n + s.orderIds.length, 0),
      },
      invariants: [
        invariant(
          "issuedCount == coupons answered 200, <= total (API)",
          afterCoupon.issuedCount === winners.length && afterCoupon.issuedCount <= afterCoupon.totalQuantity,
          `issuedCount ${afterCoupon.issuedCount}, ${winners.length} answered 200, total ${afterCoupon.totalQuantity}`,
        ),
        invariant(
          "every product: stock >= 0 and stock == initial - sold (API product detail)",
          stockWrong.length === 0,
          stockWrong.length ? stockWrong.map((p) => `product ${p.id}: ${p.stock}`).join(", ") : `${products.length} products`,
        ),
      ],
      d1Checks: [
        couponCheck(coupon.id, { issued: winners.length, winners }),
        ...products.flatMap((p) => [
          stockCheck(p, { initialStock: PRODUCT_STOCK, soldQuantity: sold.get(p.id).quantity, orderIds: sold.get(p.id).orderIds }),
          paymentsCheck(p.id),
        ]),
        ledgerCheck(users.map((u) => u.id)),
        balancesCheck(balances, "balance == funding + charges - payments per answers"),
      ],
    };
  },
};
