import { runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { adminToken, call, tokenFor } from "../helpers/api";
import { all, fund, grantCoupon, one, walletInvariant } from "../helpers/db";
import { makeProduct, makeUser } from "../helpers/factories";
import { inject } from "../helpers/faults";
import type { ProductStock } from "../../src/inventory/product-stock";
import { systemClock } from "../../src/lib/clock";
import { placeOrder } from "../../src/orders/place-order";
import { OutcomeUnknownError } from "../../src/lib/errors";

const stockObject = (productId: number) => env.PRODUCT_STOCK.get(env.PRODUCT_STOCK.idFromName(String(productId)));

async function buyers(count: number, balance: number) {
  return Promise.all(
    Array.from({ length: count }, async () => {
      const user = await makeUser();
      await fund(user.id, balance);
      return { id: user.id, token: await tokenFor(user.id) };
    }),
  );
}

describe("order storms", () => {
  it("20 buyers on 3 units: exactly 3 orders, stock 0, money taken only from the winners", async () => {
    const product = await makeProduct({ price: 7_000, stock: 3 });
    const crowd = await buyers(20, 10_000);
    const results = await Promise.all(
      crowd.map((b) => call("POST", "/api/orders", { token: b.token, body: { items: [{ productId: product.id, quantity: 1 }] } })),
    );
    const winners = crowd.filter((_, i) => results[i]!.status === 200);
    expect(winners).toHaveLength(3);
    expect(results.filter((r) => r.status === 400 && r.body.code === "OUT_OF_STOCK")).toHaveLength(17);

    expect((await one<{ stock: number }>("SELECT stock FROM products WHERE id = ?", product.id)).stock).toBe(0);
    const sold = await one<{ orders: number; units: number }>(
      "SELECT count(DISTINCT order_id) AS orders, sum(quantity) AS units FROM order_items WHERE product_id = ?",
      product.id,
    );
    expect(sold).toEqual({ orders: 3, units: 3 });
    for (const b of crowd) {
      const wallet = await walletInvariant(b.id);
      const won = winners.includes(b);
      expect(wallet.balance).toBe(won ? 3_000 : 10_000);
      expect(wallet.ledger).toBe(wallet.balance);
      expect(wallet.newest).toBe(wallet.balance);
    }
    // The object agrees with D1 once the commits have landed.
    await expect.poll(() => stockObject(product.id).snapshot(product.id)).toEqual({ stock: 0, reserved: 0, available: 0 });
  });

  it("a multi-product storm never oversells any product and never half-applies an order", async () => {
    const a = await makeProduct({ price: 1_000, stock: 4 });
    const b = await makeProduct({ price: 1_000, stock: 6 });
    const crowd = await buyers(12, 5_000);
    const results = await Promise.all(
      crowd.map((buyer, i) =>
        call("POST", "/api/orders", {
          token: buyer.token,
          // Alternate line order so reservations are attempted in both orders.
          body: { items: i % 2 ? [{ productId: a.id, quantity: 1 }, { productId: b.id, quantity: 1 }] : [{ productId: b.id, quantity: 1 }, { productId: a.id, quantity: 1 }] },
        }),
      ),
    );
    const ok = results.filter((r) => r.status === 200).length;
    expect(ok).toBe(4);
    const stocks = await all<{ id: number; stock: number }>("SELECT id, stock FROM products WHERE id IN (?, ?) ORDER BY id", a.id, b.id);
    expect(stocks).toEqual([
      { id: a.id, stock: 0 },
      { id: b.id, stock: 2 },
    ]);
    const lines = await one<{ n: number }>("SELECT count(*) AS n FROM order_items WHERE product_id IN (?, ?)", a.id, b.id);
    expect(lines.n).toBe(8);
    await expect.poll(() => stockObject(b.id).snapshot(b.id)).toEqual({ stock: 2, reserved: 0, available: 2 });
  });

  it("two parallel orders with one coupon: exactly one uses it", async () => {
    const user = await makeUser();
    await fund(user.id, 100_000);
    const token = await tokenFor(user.id);
    const product = await makeProduct({ price: 10_000, stock: 10 });
    const userCouponId = await grantCoupon(user.id, { discountValue: 2_000 });
    const results = await Promise.all(
      [1, 2].map(() => call("POST", "/api/orders", { token, body: { items: [{ productId: product.id, quantity: 1 }], userCouponId } })),
    );
    expect(results.map((r) => r.status).sort()).toEqual([200, 400]);
    expect(results.find((r) => r.status === 400)!.body.code).toBe("COUPON_NOT_USABLE");
    expect((await one<{ n: number }>("SELECT count(*) AS n FROM orders WHERE user_coupon_id = ?", userCouponId)).n).toBe(1);
    expect(await walletInvariant(user.id)).toEqual({ balance: 92_000, ledger: 92_000, newest: 92_000 });
    await expect.poll(() => stockObject(product.id).snapshot(product.id)).toEqual({ stock: 9, reserved: 0, available: 9 });
  });

  it("parallel orders draining one wallet: the balance never goes negative and the ledger stays exact", async () => {
    const user = await makeUser();
    await fund(user.id, 25_000);
    const token = await tokenFor(user.id);
    const product = await makeProduct({ price: 10_000, stock: 100 });
    const results = await Promise.all(
      Array.from({ length: 6 }, () => call("POST", "/api/orders", { token, body: { items: [{ productId: product.id, quantity: 1 }] } })),
    );
    expect(results.filter((r) => r.status === 200)).toHaveLength(2);
    expect(results.filter((r) => r.body?.code === "INSUFFICIENT_BALANCE")).toHaveLength(4);
    expect(await walletInvariant(user.id)).toEqual({ balance: 5_000, ledger: 5_000, newest: 5_000 });
    expect((await one<{ stock: number }>("SELECT stock FROM products WHERE id = ?", product.id)).stock).toBe(98);
    await expect.poll(() => stockObject(product.id).snapshot(product.id)).toEqual({ stock: 98, reserved: 0, available: 98 });
  });
});

describe("the product's stock object", () => {
  it("admin stock changes go through the object, so it and D1 agree", async () => {
    const product = await makeProduct({ stock: 2 });
    const token = await adminToken();
    const patched = await call("PATCH", `/api/admin/products/${product.id}`, { token, body: { stockDelta: 5 } });
    expect(patched.body.stock).toBe(7);
    expect(await stockObject(product.id).snapshot(product.id)).toEqual({ stock: 7, reserved: 0, available: 7 });
    const refused = await call("PATCH", `/api/admin/products/${product.id}`, { token, body: { stockDelta: -8 } });
    expect(refused.body.code).toBe("OUT_OF_STOCK");
    expect(await stockObject(product.id).snapshot(product.id)).toEqual({ stock: 7, reserved: 0, available: 7 });
  });

  it("an admin cannot take stock already reserved by an order in flight", async () => {
    const product = await makeProduct({ stock: 5 });
    const stub = stockObject(product.id);
    expect(await stub.reserve(product.id, "in-flight-order", 4, 1)).toMatchObject({ ok: true, available: 1 });
    const res = await call("PATCH", `/api/admin/products/${product.id}`, { token: await adminToken(), body: { stockDelta: -2 } });
    expect(res.body.code).toBe("OUT_OF_STOCK");
    await stub.release(product.id, "in-flight-order");
    expect(await stub.snapshot(product.id)).toEqual({ stock: 5, reserved: 0, available: 5 });
  });

  it("after a restart it reloads from D1 and keeps reservations whose order never committed", async () => {
    const product = await makeProduct({ stock: 10 });
    const stub = stockObject(product.id);
    await stub.reserve(product.id, "orphan-order", 3, 1);
    // Simulate a restart: drop in-memory state, keep storage.
    await runInDurableObject(stub, (instance: ProductStock) => {
      (instance as unknown as { productId: number | null }).productId = null;
    });
    expect(await stub.snapshot(product.id)).toEqual({ stock: 10, reserved: 3, available: 7 });
  });

  it("the settlement alarm releases an expired reservation whose order never reached D1", async () => {
    const product = await makeProduct({ stock: 4 });
    const stub = stockObject(product.id);
    await stub.reserve(product.id, "abandoned-order", 4, 1);
    expect(await stub.snapshot(product.id)).toMatchObject({ available: 0 });
    await runInDurableObject(stub, async (instance: ProductStock, state) => {
      state.storage.sql.exec("UPDATE reservations SET expires_at = 0");
      await instance.alarm();
    });
    expect(await stub.snapshot(product.id)).toEqual({ stock: 4, reserved: 0, available: 4 });
  });
});

describe("an order batch whose reply is lost", () => {
  it("over several products: answers 503 and the stock objects settle the order against D1 within seconds", async () => {
    const user = await makeUser();
    await fund(user.id, 10_000);
    const product = await makeProduct({ price: 1_000, stock: 5 });
    const other = await makeProduct({ price: 1_000, stock: 5 });
    // D1 commits the batch, but the Worker sees an error (a connection lost after the commit).
    const lossyDb = {
      prepare: (query: string) => env.DB.prepare(query),
      batch: async (statements: D1PreparedStatement[]) => {
        const results = await env.DB.batch(statements);
        // The first batch is the order's reads (4 statements); the second is its write, whose reply is lost.
        if (statements.length > 4) throw new Error("Network connection lost.");
        return results;
      },
    } as unknown as D1Database;
    const lossyEnv = { DB: lossyDb, PRODUCT_STOCK: env.PRODUCT_STOCK } as unknown as Env;
    const noQueues = { stats: {} as Queue, export: {} as Queue };
    const failure = await placeOrder({ env: lossyEnv, clock: systemClock, queues: noQueues, defer: () => {}, claim: null }, user.id, {
      items: [
        { productId: product.id, quantity: 2 },
        { productId: other.id, quantity: 1 },
      ],
    }).catch((error: unknown) => error);
    expect(failure).toBeInstanceOf(OutcomeUnknownError);
    expect((failure as OutcomeUnknownError).status).toBe(503);
    await expectSettledAsSold(product.id, { before: { stock: 5, reserved: 2, available: 3 }, after: 3 });
  });

  it("of one product (group commit): answers 503 and the object settles the order against D1 within seconds", async () => {
    const user = await makeUser();
    await fund(user.id, 10_000);
    const product = await makeProduct({ price: 1_000, stock: 5 });
    await stockObject(product.id).snapshot(product.id);
    const restore = inject(
      env.DB,
      "batch",
      (batch) =>
        (async (statements: D1PreparedStatement[]) => {
          const results = await batch(statements);
          // The group's read batch has 4 statements; its write many more: that reply is lost.
          if (statements.length > 4) throw new Error("Network connection lost.");
          return results;
        }) as typeof batch,
    );
    let res;
    try {
      res = await call("POST", "/api/orders", { token: await tokenFor(user.id), body: { items: [{ productId: product.id, quantity: 2 }] } });
    } finally {
      restore();
    }
    expect(res.status).toBe(503);
    expect(res.headers.get("Retry-After")).toBe("1");
    await expectSettledAsSold(product.id, { before: { stock: 5, reserved: 2, available: 3 }, after: 3 });
    expect(await walletInvariant(user.id)).toEqual({ balance: 8_000, ledger: 8_000, newest: 8_000 });
  });
});

/** D1 has the order; the object still counts its units as taken, and settles them within seconds. */
async function expectSettledAsSold(productId: number, expected: { before: unknown; after: number }) {
  expect((await one<{ stock: number }>("SELECT stock FROM products WHERE id = ?", productId)).stock).toBe(expected.after);
  const stub = stockObject(productId);
  // Not released: the object never offers more than D1 has...
  expect(await stub.snapshot(productId)).toEqual(expected.before);
  // ...and it settles them within seconds, not at the end of the 120 s reservation.
  await runInDurableObject(stub, async (instance: ProductStock, state) => {
    const { expires_at } = state.storage.sql.exec<{ expires_at: number }>("SELECT expires_at FROM reservations").one();
    expect(expires_at - Date.now()).toBeLessThanOrEqual(5_000);
    state.storage.sql.exec("UPDATE reservations SET expires_at = 0");
    await instance.alarm();
  });
  expect(await stub.snapshot(productId)).toEqual({ stock: expected.after, reserved: 0, available: expected.after });
}
