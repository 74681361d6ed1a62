// Purchase limits: a product's maxPerUser, enforced exactly by its stock object, with D1's CHECK behind it.
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { adminToken, call, expectProblem, tokenFor, type ApiResponse } from "../helpers/api";
import { all, fund, grantCoupon, one, walletInvariant } from "../helpers/db";
import { makeProduct, makeUser } from "../helpers/factories";

const stockObject = (productId: number) => env.PRODUCT_STOCK.get(env.PRODUCT_STOCK.idFromName(String(productId)));

type Line = { productId: number; quantity: number };

async function order(userId: number, items: Line[], extra: object = {}): Promise<ApiResponse> {
  return call("POST", "/api/orders", { token: await tokenFor(userId), body: { items, ...extra } });
}

async function buyer(balance = 100_000) {
  const user = await makeUser();
  await fund(user.id, balance);
  return user;
}

const setLimit = async (productId: number, maxPerUser: number | null) =>
  call("PATCH", `/api/admin/products/${productId}`, { token: await adminToken(), body: { maxPerUser } });

/** What D1 says `userId` bought of `productId`, and what is left of it. */
async function d1State(userId: number, productId: number) {
  const orders = await one<{ orders: number; units: number | null }>(
    `SELECT count(DISTINCT o.id) AS orders, sum(i.quantity) AS units
     FROM orders o JOIN order_items i ON i.order_id = o.id WHERE o.user_id = ? AND i.product_id = ?`,
    userId,
    productId,
  );
  const purchases = await all<{ quantity: number; max_per_user: number | null }>(
    "SELECT quantity, max_per_user FROM user_product_purchases WHERE user_id = ? AND product_id = ?",
    userId,
    productId,
  );
  const { stock } = await one<{ stock: number }>("SELECT stock FROM products WHERE id = ?", productId);
  return { orders: orders.orders, units: orders.units ?? 0, purchased: purchases[0]?.quantity ?? 0, stock };
}

/** Nothing of the order happened: no order, no units, no payment, and the object holds nothing for them. */
async function expectUntouched(userId: number, productId: number, stock: number, balance: number) {
  expect(await d1State(userId, productId)).toEqual({ orders: 0, units: 0, purchased: 0, stock });
  expect(await walletInvariant(userId)).toEqual({ balance, ledger: balance, newest: balance });
  expect(await stockObject(productId).heldBy(productId, userId)).toBe(0);
  expect(await stockObject(productId).snapshot(productId)).toEqual({ stock, reserved: 0, available: stock });
}

describe("20 parallel orders from one user for maxPerUser 2", () => {
  it("exactly 2 succeed and 18 are PURCHASE_LIMIT_EXCEEDED; D1 and the stock object agree", async () => {
    const product = await makeProduct({ price: 1000, stock: 100, maxPerUser: 2 });
    const user = await buyer(100_000);
    const token = await tokenFor(user.id);
    const body = { items: [{ productId: product.id, quantity: 1 }] };

    const answers = await Promise.all(Array.from({ length: 20 }, () => call("POST", "/api/orders", { token, body })));

    const placed = answers.filter((a) => a.status === 200);
    expect(placed).toHaveLength(2);
    const refused = answers.filter((a) => a.status !== 200);
    expect(refused).toHaveLength(18);
    for (const answer of refused) expectProblem(answer, 400, "PURCHASE_LIMIT_EXCEEDED");

    expect(await d1State(user.id, product.id)).toEqual({ orders: 2, units: 2, purchased: 2, stock: 98 });
    const limitRow = await one("SELECT quantity, max_per_user FROM user_product_purchases WHERE user_id = ? AND product_id = ?", user.id, product.id);
    expect(limitRow).toEqual({ quantity: 2, max_per_user: 2 });
    const payments = await one<{ n: number }>("SELECT count(*) AS n FROM wallet_transactions WHERE user_id = ? AND type = 'PAYMENT'", user.id);
    expect(payments.n).toBe(2);
    expect(await walletInvariant(user.id)).toEqual({ balance: 98_000, ledger: 98_000, newest: 98_000 });

    await expect.poll(() => stockObject(product.id).snapshot(product.id)).toEqual({ stock: 98, reserved: 0, available: 98 });
    expect(await stockObject(product.id).heldBy(product.id, user.id)).toBe(2);

    // The limit is per user: someone else may still buy their 2.
    const other = await buyer();
    expect((await order(other.id, [{ productId: product.id, quantity: 2 }])).status).toBe(200);
  });
});

describe("orders over the limit are refused whole", () => {
  it("an order of 3 with maxPerUser 2 is 400 PURCHASE_LIMIT_EXCEEDED and changes nothing", async () => {
    const product = await makeProduct({ price: 1000, stock: 10, maxPerUser: 2 });
    const user = await buyer(50_000);
    expectProblem(await order(user.id, [{ productId: product.id, quantity: 3 }]), 400, "PURCHASE_LIMIT_EXCEEDED");
    await expectUntouched(user.id, product.id, 10, 50_000);
  });

  it("a multi-line order with one line over its limit gives back what the other lines reserved", async () => {
    const free = await makeProduct({ price: 1000, stock: 5 });
    const limited = await makeProduct({ price: 1000, stock: 5, maxPerUser: 1 });
    const user = await buyer(50_000);
    const res = await order(user.id, [
      { productId: free.id, quantity: 2 },
      { productId: limited.id, quantity: 2 },
    ]);
    expectProblem(res, 400, "PURCHASE_LIMIT_EXCEEDED");
    await expectUntouched(user.id, free.id, 5, 50_000);
    await expectUntouched(user.id, limited.id, 5, 50_000);
  });

  it("counts earlier orders: up to the limit, then refused", async () => {
    const product = await makeProduct({ price: 1000, stock: 10, maxPerUser: 2 });
    const user = await buyer();
    expect((await order(user.id, [{ productId: product.id, quantity: 1 }])).status).toBe(200);
    expectProblem(await order(user.id, [{ productId: product.id, quantity: 2 }]), 400, "PURCHASE_LIMIT_EXCEEDED");
    expect((await order(user.id, [{ productId: product.id, quantity: 1 }])).status).toBe(200);
    expectProblem(await order(user.id, [{ productId: product.id, quantity: 1 }]), 400, "PURCHASE_LIMIT_EXCEEDED");
    expect(await d1State(user.id, product.id)).toEqual({ orders: 2, units: 2, purchased: 2, stock: 8 });
  });
});

describe("changing the limit with PATCH", () => {
  it("takes effect at once: lowered, raised, then removed", async () => {
    const product = await makeProduct({ price: 100, stock: 50, maxPerUser: 5 });
    const user = await buyer();
    expect((await order(user.id, [{ productId: product.id, quantity: 2 }])).status).toBe(200);

    expect((await setLimit(product.id, 2)).body).toMatchObject({ maxPerUser: 2, stock: 48 });
    expectProblem(await order(user.id, [{ productId: product.id, quantity: 1 }]), 400, "PURCHASE_LIMIT_EXCEEDED");

    expect((await setLimit(product.id, 3)).body.maxPerUser).toBe(3);
    expect((await order(user.id, [{ productId: product.id, quantity: 1 }])).status).toBe(200);
    expectProblem(await order(user.id, [{ productId: product.id, quantity: 1 }]), 400, "PURCHASE_LIMIT_EXCEEDED");

    expect((await setLimit(product.id, null)).body.maxPerUser).toBeNull();
    expect((await order(user.id, [{ productId: product.id, quantity: 10 }])).status).toBe(200);
    expect(await d1State(user.id, product.id)).toEqual({ orders: 3, units: 13, purchased: 13, stock: 37 });
    await expect.poll(() => stockObject(product.id).heldBy(product.id, user.id)).toBe(13);
  });

  it("a limit set on a product without one applies to the units already bought", async () => {
    const product = await makeProduct({ price: 100, stock: 20 });
    const user = await buyer();
    expect((await order(user.id, [{ productId: product.id, quantity: 3 }])).status).toBe(200);
    await setLimit(product.id, 3);
    expectProblem(await order(user.id, [{ productId: product.id, quantity: 1 }]), 400, "PURCHASE_LIMIT_EXCEEDED");
    expect(await d1State(user.id, product.id)).toEqual({ orders: 1, units: 3, purchased: 3, stock: 17 });
  });
});

describe("refusal order: PRODUCT_NOT_FOUND, OUT_OF_STOCK, PURCHASE_LIMIT_EXCEEDED, COUPON_NOT_USABLE, INSUFFICIENT_BALANCE", () => {
  it("out of stock AND over the limit → OUT_OF_STOCK", async () => {
    const product = await makeProduct({ price: 1000, stock: 1, maxPerUser: 1 });
    const user = await buyer();
    expect((await order(user.id, [{ productId: product.id, quantity: 1 }])).status).toBe(200);
    // Sold out, and the user already holds their one.
    expectProblem(await order(user.id, [{ productId: product.id, quantity: 1 }]), 400, "OUT_OF_STOCK");

    const scarce = await makeProduct({ price: 1000, stock: 1, maxPerUser: 1 });
    const fresh = await buyer(50_000);
    expectProblem(await order(fresh.id, [{ productId: scarce.id, quantity: 2 }]), 400, "OUT_OF_STOCK");
    await expectUntouched(fresh.id, scarce.id, 1, 50_000);
  });

  it("over the limit on one line AND out of stock on a later one → OUT_OF_STOCK", async () => {
    const limited = await makeProduct({ price: 1000, stock: 10, maxPerUser: 1 });
    const soldOut = await makeProduct({ price: 1000, stock: 0 });
    const user = await buyer(50_000);
    const res = await order(user.id, [
      { productId: soldOut.id, quantity: 1 },
      { productId: limited.id, quantity: 2 },
    ]);
    expectProblem(res, 400, "OUT_OF_STOCK");
    await expectUntouched(user.id, limited.id, 10, 50_000);
  });

  it("over the limit AND insufficient balance → PURCHASE_LIMIT_EXCEEDED", async () => {
    const product = await makeProduct({ price: 10_000, stock: 10, maxPerUser: 1 });
    const user = await buyer(500);
    expectProblem(await order(user.id, [{ productId: product.id, quantity: 2 }]), 400, "PURCHASE_LIMIT_EXCEEDED");
    await expectUntouched(user.id, product.id, 10, 500);
  });

  it("over the limit AND an unusable coupon (AND insufficient balance) → PURCHASE_LIMIT_EXCEEDED", async () => {
    const product = await makeProduct({ price: 1000, stock: 10, maxPerUser: 1 });
    const [user, owner] = await Promise.all([buyer(50_000), makeUser()]);
    const othersCoupon = await grantCoupon(owner.id);
    const expired = await grantCoupon(user.id, { expiresAt: "2020-01-01T00:00:00.000Z" });
    for (const userCouponId of [othersCoupon, expired]) {
      const res = await order(user.id, [{ productId: product.id, quantity: 2 }], { userCouponId });
      expectProblem(res, 400, "PURCHASE_LIMIT_EXCEEDED");
    }
    const poor = await makeUser();
    const res = await order(poor.id, [{ productId: product.id, quantity: 2 }], { userCouponId: othersCoupon });
    expectProblem(res, 400, "PURCHASE_LIMIT_EXCEEDED");

    await expectUntouched(user.id, product.id, 10, 50_000);
    const coupons = await all("SELECT status, order_id FROM user_coupons WHERE id IN (?, ?)", othersCoupon, expired);
    expect(coupons).toEqual([
      { status: "AVAILABLE", order_id: null },
      { status: "AVAILABLE", order_id: null },
    ]);
  });

  it("within the limit, the coupon and balance refusals come next, as before", async () => {
    const product = await makeProduct({ price: 1000, stock: 10, maxPerUser: 2 });
    const [user, owner] = await Promise.all([buyer(500), makeUser()]);
    const othersCoupon = await grantCoupon(owner.id);
    const res = await order(user.id, [{ productId: product.id, quantity: 2 }], { userCouponId: othersCoupon });
    expectProblem(res, 400, "COUPON_NOT_USABLE");
    expectProblem(await order(user.id, [{ productId: product.id, quantity: 2 }]), 400, "INSUFFICIENT_BALANCE");
    await expectUntouched(user.id, product.id, 10, 500);
  });
});

describe("the product DTO carries maxPerUser everywhere", () => {
  it("in the list, the detail and the popular ranking", async () => {
    const product = await makeProduct({ maxPerUser: 4 });
    const today = new Date().toISOString().slice(0, 10);
    await env.DB.prepare("INSERT INTO product_sales_daily (stat_date, product_id, quantity) VALUES (?, ?, 1000000)")
      .bind(today, product.id)
      .run();

    expect((await call("GET", `/api/products/${product.id}`)).body).toEqual(product);
    const list = await call("GET", "/api/products?limit=100");
    expect(list.body.items.find((p: { id: number }) => p.id === product.id)).toEqual(product);
    const popular = await call("GET", "/api/products/popular");
    expect(popular.body.items[0]).toEqual({ rank: 1, product, quantitySold: 1_000_000 });
  });
});
