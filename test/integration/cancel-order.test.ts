import { env } from "cloudflare:workers";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { createApp } from "../../src/app";
import { fixedClock } from "../../src/lib/clock";
import { adminToken, call, expectProblem, tokenFor } from "../helpers/api";
import { all, fund, grantCoupon, one, walletInvariant } from "../helpers/db";
import { makeProduct, makeUser } from "../helpers/factories";

// POST /api/orders/{orderId}/cancel: the order runs backwards, all or nothing, exactly once.

const stockObject = (productId: number) => env.PRODUCT_STOCK.get(env.PRODUCT_STOCK.idFromName(String(productId)));

async function buyer(balance = 100_000) {
  const user = await makeUser();
  if (balance > 0) await fund(user.id, balance);
  return { id: user.id, token: await tokenFor(user.id) };
}

async function order(token: string, items: { productId: number; quantity: number }[], extra: Record<string, unknown> = {}) {
  const res = await call("POST", "/api/orders", { token, body: { items, ...extra } });
  if (res.status !== 200) throw new Error(`order failed: ${res.status} ${res.text}`);
  return res.body as { id: number; paidAmount: number; createdAt: string };
}

const cancel = (token: string, orderId: number, body?: unknown, headers?: Record<string, string>) =>
  call("POST", `/api/orders/${orderId}/cancel`, { token, body, headers });

async function stockOf(productId: number) {
  return (await one<{ stock: number }>("SELECT stock FROM products WHERE id = ?", productId)).stock;
}

async function refunds(orderId: number) {
  return all<{ amount: number }>("SELECT amount FROM wallet_transactions WHERE order_id = ? AND type = 'REFUND'", orderId);
}

describe("POST /api/orders/{orderId}/cancel", () => {
  it("refunds, restocks, returns the coupon and queues the events, all at once", async () => {
    const user = await buyer(100_000);
    const mug = await makeProduct({ price: 10_000, stock: 5 });
    const couponId = await grantCoupon(user.id, { discountValue: 1_000 });
    const placed = await order(user.token, [{ productId: mug.id, quantity: 2 }], { userCouponId: couponId });
    expect(placed.paidAmount).toBe(19_000);

    const res = await cancel(user.token, placed.id, { reason: "changed my mind" });
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({ id: placed.id, status: "CANCELLED", cancelReason: "changed my mind", paidAmount: 19_000 });
    expect(res.body.cancelledAt).toMatch(/Z$/);
    expect((await call("GET", `/api/orders/${placed.id}`, { token: user.token })).text).toBe(res.text);

    expect(await refunds(placed.id)).toEqual([{ amount: 19_000 }]);
    expect(await walletInvariant(user.id)).toEqual({ balance: 100_000, ledger: 100_000, newest: 100_000 });
    expect(await stockOf(mug.id)).toBe(5);
    await expect.poll(() => stockObject(mug.id).snapshot(mug.id)).toEqual({ stock: 5, reserved: 0, available: 5 });
    expect(await stockObject(mug.id).heldBy(mug.id, user.id)).toBe(0);
    expect(await one("SELECT status, used_at, order_id FROM user_coupons WHERE id = ?", couponId)).toEqual({
      status: "AVAILABLE",
      used_at: null,
      order_id: null,
    });
    expect(await one("SELECT quantity FROM user_product_purchases WHERE user_id = ? AND product_id = ?", user.id, mug.id)).toEqual({
      quantity: 0,
    });
    // The cancelling request's id travels with its messages, so it can be followed to the data platform.
    const requestId = res.headers.get("X-Request-Id");
    const events = await all<{ topic: string; payload: string }>(
      "SELECT topic, payload FROM outbox WHERE order_id = ? AND event = 'CANCELLED' ORDER BY topic",
      placed.id,
    );
    expect(events.map((e) => [e.topic, JSON.parse(e.payload)])).toEqual([
      ["export", { orderId: placed.id, userId: user.id, status: "CANCELLED", refundedAmount: 19_000, cancelledAt: res.body.cancelledAt, requestId }],
      ["stats", { event: "CANCELLED", orderId: placed.id, date: placed.createdAt.slice(0, 10), items: [{ productId: mug.id, quantity: 2 }], requestId }],
    ]);
    expect(await one("SELECT status FROM order_exports WHERE order_id = ? AND event = 'CANCELLED'", placed.id)).toEqual({ status: "PENDING" });

    // The coupon pays for a new order again.
    expect((await order(user.token, [{ productId: mug.id, quantity: 1 }], { userCouponId: couponId })).paidAmount).toBe(9_000);
  });

  it("20 parallel cancels of one order: one 200, the rest 409, one REFUND, stock and coupon restored once", async () => {
    const user = await buyer(100_000);
    const product = await makeProduct({ price: 3_000, stock: 10 });
    const couponId = await grantCoupon(user.id, { discountValue: 500 });
    const placed = await order(user.token, [{ productId: product.id, quantity: 4 }], { userCouponId: couponId });

    const results = await Promise.all(Array.from({ length: 20 }, () => cancel(user.token, placed.id)));
    expect(results.filter((r) => r.status === 200)).toHaveLength(1);
    for (const r of results.filter((r) => r.status !== 200)) expectProblem(r, 409, "ORDER_NOT_CANCELLABLE");

    expect(await refunds(placed.id)).toEqual([{ amount: 11_500 }]);
    expect(await walletInvariant(user.id)).toEqual({ balance: 100_000, ledger: 100_000, newest: 100_000 });
    expect(await stockOf(product.id)).toBe(10);
    await expect.poll(() => stockObject(product.id).snapshot(product.id)).toEqual({ stock: 10, reserved: 0, available: 10 });
    expect(await all("SELECT id FROM outbox WHERE order_id = ? AND event = 'CANCELLED'", placed.id)).toHaveLength(2);
    expect(await one("SELECT status FROM user_coupons WHERE id = ?", couponId)).toEqual({ status: "AVAILABLE" });
  });

  it("a cancel racing new orders for the last units never oversells, in D1 or in the object", async () => {
    const product = await makeProduct({ price: 1_000, stock: 2 });
    const first = await buyer();
    const placed = await order(first.token, [{ productId: product.id, quantity: 2 }]);
    const crowd = await Promise.all(Array.from({ length: 6 }, () => buyer()));

    const [cancelled, ...orders] = await Promise.all([
      cancel(first.token, placed.id),
      ...crowd.map((b) => call("POST", "/api/orders", { token: b.token, body: { items: [{ productId: product.id, quantity: 1 }] } })),
    ]);
    expect(cancelled!.status).toBe(200);
    const sold = orders.filter((r) => r.status === 200).length;
    expect(sold).toBeLessThanOrEqual(2);
    expect(orders.every((r) => r.status === 200 || r.body.code === "OUT_OF_STOCK")).toBe(true);

    // Whatever the race left, the rest sells out exactly once the restock has landed.
    const late = await Promise.all(Array.from({ length: 4 }, () => buyer()));
    await expect.poll(() => stockObject(product.id).snapshot(product.id)).toMatchObject({ reserved: 0 });
    const more = await Promise.all(late.map((b) => call("POST", "/api/orders", { token: b.token, body: { items: [{ productId: product.id, quantity: 1 }] } })));
    expect(sold + more.filter((r) => r.status === 200).length).toBe(2);
    expect(await stockOf(product.id)).toBe(0);
    const net = await one<{ units: number }>(
      `SELECT coalesce(sum(i.quantity), 0) AS units FROM order_items i JOIN orders o ON o.id = i.order_id
       WHERE i.product_id = ? AND o.status = 'COMPLETED'`,
      product.id,
    );
    expect(net.units).toBe(2);
    await expect.poll(() => stockObject(product.id).snapshot(product.id)).toEqual({ stock: 0, reserved: 0, available: 0 });
  });

  it("a user cancels within the window only; an admin any time", async () => {
    const clock = fixedClock("2026-11-20T10:00:00.000Z");
    const app = createApp({ clock });
    const user = await buyer();
    const product = await makeProduct({ price: 1_000, stock: 5 });
    const late = await call("POST", "/api/orders", { app, token: user.token, body: { items: [{ productId: product.id, quantity: 1 }] } });
    const early = await call("POST", "/api/orders", { app, token: user.token, body: { items: [{ productId: product.id, quantity: 1 }] } });
    clock.advance(86_400_000);
    expect((await call("POST", `/api/orders/${early.body.id}/cancel`, { app, token: user.token })).status).toBe(200);
    clock.advance(1);
    const refused = await call("POST", `/api/orders/${late.body.id}/cancel`, { app, token: user.token });
    expectProblem(refused, 409, "ORDER_NOT_CANCELLABLE");
    expect(await refunds(late.body.id)).toEqual([]);
    const byAdmin = await call("POST", `/api/orders/${late.body.id}/cancel`, { app, token: await adminToken(), body: { reason: "goodwill" } });
    expect(byAdmin.body).toMatchObject({ status: "CANCELLED", cancelReason: "goodwill" });
  });

  it("404 for a missing order and for another user's; 401 without a token; 400 for bad ids and reasons", async () => {
    const owner = await buyer();
    const stranger = await buyer();
    const product = await makeProduct({ price: 1_000, stock: 5 });
    const placed = await order(owner.token, [{ productId: product.id, quantity: 1 }]);
    expectProblem(await cancel(stranger.token, placed.id), 404, "ORDER_NOT_FOUND");
    expectProblem(await cancel(owner.token, 99_999_999), 404, "ORDER_NOT_FOUND");
    expectProblem(await call("POST", `/api/orders/${placed.id}/cancel`), 401, "UNAUTHENTICATED");
    expectProblem(await cancel(owner.token, 0), 400, "VALIDATION_FAILED");
    for (const body of [{ reason: "" }, { reason: "x".repeat(201) }, { reason: "bad\u0007bell" }, { reason: 7 }, { why: "x" }]) {
      expectProblem(await cancel(owner.token, placed.id, body), 400, "VALIDATION_FAILED");
    }
    expect(await refunds(placed.id)).toEqual([]);
    expect((await one<{ status: string }>("SELECT status FROM orders WHERE id = ?", placed.id)).status).toBe("COMPLETED");
    expect((await cancel(owner.token, placed.id, { reason: "x".repeat(200) })).status).toBe(200);
    expectProblem(await cancel(owner.token, placed.id), 409, "ORDER_NOT_CANCELLABLE");
  });

  it("a refund is never refused for the balance limit", async () => {
    const user = await buyer(10_000);
    const product = await makeProduct({ price: 5_000, stock: 5 });
    const placed = await order(user.token, [{ productId: product.id, quantity: 1 }]);
    await fund(user.id, 9_995_000);
    expect((await cancel(user.token, placed.id)).status).toBe(200);
    expect(await walletInvariant(user.id)).toEqual({ balance: 10_005_000, ledger: 10_005_000, newest: 10_005_000 });
  });

  it("a coupon past its expiry comes back EXPIRED; a free order refunds nothing", async () => {
    const clock = fixedClock("2026-11-20T10:00:00.000Z");
    const app = createApp({ clock });
    const user = await buyer(10_000);
    const product = await makeProduct({ price: 1_000, stock: 5 });
    const couponId = await grantCoupon(user.id, { discountValue: 1_000, expiresAt: "2026-11-21T00:00:00.000Z" });
    const placed = await call("POST", "/api/orders", { app, token: user.token, body: { items: [{ productId: product.id, quantity: 1 }], userCouponId: couponId } });
    expect(placed.body.paidAmount).toBe(0);
    clock.set("2026-11-21T00:00:00.000Z");
    expect((await call("POST", `/api/orders/${placed.body.id}/cancel`, { app, token: user.token })).status).toBe(200);
    expect(await one("SELECT status, order_id FROM user_coupons WHERE id = ?", couponId)).toEqual({ status: "EXPIRED", order_id: null });
    expect(await refunds(placed.body.id)).toEqual([]);
    expect(await walletInvariant(user.id)).toEqual({ balance: 10_000, ledger: 10_000, newest: 10_000 });
  });

  it("replays a cancellation under the same Idempotency-Key", async () => {
    const user = await buyer();
    const product = await makeProduct({ price: 1_000, stock: 5 });
    const placed = await order(user.token, [{ productId: product.id, quantity: 1 }]);
    const first = await cancel(user.token, placed.id, { reason: "oops" }, { "Idempotency-Key": "cancel-1" });
    const again = await cancel(user.token, placed.id, { reason: "oops" }, { "Idempotency-Key": "cancel-1" });
    expect(first.status).toBe(200);
    expect(again.status).toBe(200);
    expect(again.text).toBe(first.text);
    expect(again.headers.get("Idempotent-Replayed")).toBe("true");
    expect(await refunds(placed.id)).toHaveLength(1);
  });
});

describe("the wallet stays exact through charges, orders and cancels", () => {
  it("balance == sum(ledger) == newest balanceAfter under any interleaving (fast-check)", async () => {
    const product = await makeProduct({ price: 700, stock: 1_000_000 });
    const admin = await adminToken();
    const step = fc.oneof(
      fc.record({ kind: fc.constant("charge" as const), amount: fc.integer({ min: 1, max: 5_000 }) }),
      fc.record({ kind: fc.constant("order" as const), quantity: fc.integer({ min: 1, max: 5 }) }),
      fc.record({ kind: fc.constant("cancel" as const), pick: fc.nat() }),
    );
    await fc.assert(
      fc.asyncProperty(fc.array(fc.array(step, { minLength: 1, maxLength: 4 }), { minLength: 1, maxLength: 4 }), async (waves) => {
        const user = await buyer(2_000);
        const placed: number[] = [];
        for (const wave of waves) {
          // Each wave's steps run in parallel: the interleaving is the runtime's.
          await Promise.all(
            wave.map(async (s) => {
              if (s.kind === "charge") await call("POST", "/api/balance/charge", { token: admin, body: { userId: user.id, amount: s.amount } });
              else if (s.kind === "order") {
                const res = await call("POST", "/api/orders", { token: user.token, body: { items: [{ productId: product.id, quantity: s.quantity }] } });
                if (res.status === 200) placed.push(res.body.id);
              } else if (placed.length > 0) await cancel(user.token, placed[s.pick % placed.length]!);
            }),
          );
        }
        const wallet = await walletInvariant(user.id);
        expect(wallet.ledger).toBe(wallet.balance);
        expect(wallet.newest).toBe(wallet.balance);
        const refunded = await one<{ n: number; orders: number }>(
          `SELECT (SELECT count(*) FROM wallet_transactions WHERE user_id = ?1 AND type = 'REFUND') AS n,
                  (SELECT count(*) FROM orders WHERE user_id = ?1 AND status = 'CANCELLED') AS orders`,
          user.id,
        );
        expect(refunded.n).toBe(refunded.orders);
      }),
      { numRuns: 12 },
    );
  });
});

describe("purchase limits count net of cancellations", () => {
  it("a cancelled order's units count no more", async () => {
    const user = await buyer();
    const product = await makeProduct({ price: 1_000, stock: 10 });
    await call("PATCH", `/api/admin/products/${product.id}`, { token: await adminToken(), body: { maxPerUser: 2 } });
    const placed = await order(user.token, [{ productId: product.id, quantity: 2 }]);
    expectProblem(await call("POST", "/api/orders", { token: user.token, body: { items: [{ productId: product.id, quantity: 1 }] } }), 400, "PURCHASE_LIMIT_EXCEEDED");
    expect((await cancel(user.token, placed.id)).status).toBe(200);
    await expect.poll(() => stockObject(product.id).heldBy(product.id, user.id)).toBe(0);
    expect((await order(user.token, [{ productId: product.id, quantity: 2 }])).id).toBeGreaterThan(placed.id);
  });
});
