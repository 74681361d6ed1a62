import { runDurableObjectAlarm, runInDurableObject } from "cloudflare:test";
import { env, exports } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import type { ProductStock } from "../../src/inventory/product-stock";
import { call, tokenFor } from "../helpers/api";
import { all, fund, one } from "../helpers/db";
import { makeProduct, makeUser } from "../helpers/factories";
import { gate, inject } from "../helpers/faults";

// The failure paths of the stock objects, each with its fault injected here and the invariant then
// checked in D1 and in the object.

const stockObject = (productId: number) => env.PRODUCT_STOCK.get(env.PRODUCT_STOCK.idFromName(String(productId)));

async function buyer(balance = 100_000) {
  const user = await makeUser();
  await fund(user.id, balance);
  return { id: user.id, token: await tokenFor(user.id) };
}

const orderOne = (token: string, productId: number, init: RequestInit = {}) =>
  exports.default.fetch(
    new Request("http://shop.test/api/orders", {
      method: "POST",
      headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
      body: JSON.stringify({ items: [{ productId, quantity: 1 }] }),
      ...init,
    }),
  );

async function soldUnits(productId: number) {
  return one<{ stock: number; units: number }>(
    `SELECT stock, (SELECT coalesce(sum(quantity), 0) FROM order_items WHERE product_id = p.id) AS units
     FROM products p WHERE id = ?`,
    productId,
  );
}

describe("a client that hangs up mid-order", () => {
  it("does not strand its reservation: the order runs to its end and the rest sells out at once", async () => {
    const product = await makeProduct({ price: 100, stock: 3 });
    const [quitter, ...others] = await Promise.all([buyer(), buyer(), buyer()]);
    const stub = stockObject(product.id);
    await stub.snapshot(product.id);

    // D1 stalls: every batch waits until the test opens the gate.
    const stall = gate();
    const restore = inject(env.DB, "batch", (batch) => async (statements) => {
      await stall.opened;
      return batch(statements);
    });
    const hangUp = new AbortController();
    const abandoned = orderOne(quitter!.token, product.id, { signal: hangUp.signal }).catch((error: unknown) => error);
    // The reservation is taken (the object needs no D1 for it); the order then waits for D1.
    await expect.poll(() => stub.snapshot(product.id), { interval: 5 }).toMatchObject({ reserved: 1 });
    hangUp.abort();
    expect(await abandoned).toBeInstanceOf(Error);
    restore();
    stall.open();

    const startedAt = Date.now();
    const results = await Promise.all(others.map((b) => call("POST", "/api/orders", { token: b.token, body: { items: [{ productId: product.id, quantity: 1 }] } })));
    expect(results.map((r) => r.status)).toEqual([200, 200]);
    await expect.poll(() => soldUnits(product.id), { timeout: 1_000 }).toEqual({ stock: 0, units: 3 });
    expect(Date.now() - startedAt).toBeLessThan(1_000);
    await expect.poll(() => stub.snapshot(product.id)).toEqual({ stock: 0, reserved: 0, available: 0 });
    expect(await all("SELECT user_id FROM orders WHERE user_id = ?", quitter!.id)).toHaveLength(1);
  });
});
