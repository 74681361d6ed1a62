import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { createApp } from "../../src/app";
import { fixedClock, systemClock } from "../../src/lib/clock";
import { effectRefOf, requestFingerprint } from "../../src/lib/idempotency";
import { placeOrder } from "../../src/orders/place-order";
import { adminToken, call, expectProblem, tokenFor } from "../helpers/api";
import { all, fund, grantCoupon, one, walletInvariant } from "../helpers/db";
import { makeProduct, makeUser } from "../helpers/factories";
import { inject } from "../helpers/faults";

async function buyer(balance: number) {
  const user = await makeUser();
  if (balance > 0) await fund(user.id, balance);
  return { ...user, token: await tokenFor(user.id) };
}

/** Everything a failed order must leave untouched. */
async function footprint(userId: number, productIds: number[], userCouponId?: number) {
  return {
    balance: (await one<{ balance: number }>("SELECT balance FROM users WHERE id = ?", userId)).balance,
    ledger: (await one<{ n: number }>("SELECT count(*) AS n FROM wallet_transactions WHERE user_id = ?", userId)).n,
    orders: (await one<{ n: number }>("SELECT count(*) AS n FROM orders WHERE user_id = ?", userId)).n,
    stock: await all("SELECT id, stock FROM products WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id", JSON.stringify(productIds)),
    coupon: userCouponId ? await one("SELECT status, used_at, order_id FROM user_coupons WHERE id = ?", userCouponId) : null,
  };
}

describe("POST /api/orders: happy paths", () => {
  it("pays from the wallet, takes stock, writes ledger, items, outbox and export rows together", async () => {
    const user = await buyer(100_000);
    const mug = await makeProduct({ price: 12_000, stock: 5 });
    const beans = await makeProduct({ price: 32_000, stock: 3 });

    const res = await call("POST", "/api/orders", {
      token: user.token,
      body: { items: [{ productId: mug.id, quantity: 2 }, { productId: beans.id, quantity: 1 }] },
    });
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({
      userId: user.id,
      status: "COMPLETED",
      totalAmount: 56_000,
      discountAmount: 0,
      paidAmount: 56_000,
      userCouponId: null,
      items: [
        { productId: mug.id, name: mug.name, unitPrice: 12_000, quantity: 2, amount: 24_000 },
        { productId: beans.id, name: beans.name, unitPrice: 32_000, quantity: 1, amount: 32_000 },
      ],
    });
    const orderId = res.body.id;

    expect(await walletInvariant(user.id)).toEqual({ balance: 44_000, ledger: 44_000, newest: 44_000 });
    const payment = await one("SELECT type, amount, balance_after, order_id FROM wallet_transactions WHERE user_id = ? AND type = 'PAYMENT'", user.id);
    expect(payment).toEqual({ type: "PAYMENT", amount: -56_000, balance_after: 44_000, order_id: orderId });
    expect(await all("SELECT id, stock FROM products WHERE id IN (?, ?) ORDER BY id", mug.id, beans.id)).toEqual([
      { id: mug.id, stock: 3 },
      { id: beans.id, stock: 2 },
    ]);
    expect((await one<{ n: number }>("SELECT count(*) AS n FROM order_items WHERE order_id = ?", orderId)).n).toBe(2);
    const outbox = await all<{ topic: string; payload: string }>("SELECT topic, payload FROM outbox WHERE order_id = ? ORDER BY topic", orderId);
    expect(outbox.map((r) => r.topic)).toEqual(["export", "stats"]);
    expect(JSON.parse(outbox[0]!.payload)).toMatchObject({ orderId, userId: user.id, paidAmount: 56_000, completedAt: res.body.createdAt });
    expect(JSON.parse(outbox[1]!.payload)).toEqual({
      event: "PLACED",
      requestId: res.headers.get("X-Request-Id"),
      orderId,
      date: res.body.createdAt.slice(0, 10),
      items: [
        { productId: mug.id, quantity: 2 },
        { productId: beans.id, quantity: 1 },
      ],
    });
    expect(await one("SELECT status, attempts FROM order_exports WHERE order_id = ?", orderId)).toEqual({ status: "PENDING", attempts: 0 });

    const fetched = await call("GET", `/api/orders/${orderId}`, { token: user.token });
    expect(fetched.status).toBe(200);
    expect(fetched.body).toEqual(res.body);
  });

  it("applies a FIXED coupon as min(value, total) and marks it used by the order", async () => {
    const user = await buyer(50_000);
    const product = await makeProduct({ price: 3_000, stock: 10 });
    const userCouponId = await grantCoupon(user.id, { discountType: "FIXED", discountValue: 5_000 });

    const res = await call("POST", "/api/orders", {
      token: user.token,
      body: { items: [{ productId: product.id, quantity: 1 }], userCouponId },
    });
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({ totalAmount: 3_000, discountAmount: 3_000, paidAmount: 0, userCouponId });
    expect(await one("SELECT status, order_id FROM user_coupons WHERE id = ?", userCouponId)).toEqual({ status: "USED", order_id: res.body.id });
    // Nothing was paid, so no PAYMENT row: the ledger still sums to the balance.
    expect(await walletInvariant(user.id)).toEqual({ balance: 50_000, ledger: 50_000, newest: 50_000 });
  });

  it("applies a PERCENT coupon as floor(total * value / 100)", async () => {
    const user = await buyer(50_000);
    const product = await makeProduct({ price: 9_999, stock: 10 });
    const userCouponId = await grantCoupon(user.id, { discountType: "PERCENT", discountValue: 15 });
    const res = await call("POST", "/api/orders", {
      token: user.token,
      body: { items: [{ productId: product.id, quantity: 1 }], userCouponId },
    });
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({ totalAmount: 9_999, discountAmount: 1_499, paidAmount: 8_500 });
    expect(await walletInvariant(user.id)).toEqual({ balance: 41_500, ledger: 41_500, newest: 41_500 });
  });

  it("lets an admin order for a named user", async () => {
    const user = await buyer(10_000);
    const product = await makeProduct({ price: 1_000 });
    const res = await call("POST", "/api/orders", {
      token: await adminToken(),
      body: { userId: user.id, items: [{ productId: product.id, quantity: 1 }] },
    });
    expect(res.status).toBe(200);
    expect(res.body.userId).toBe(user.id);
  });
});

describe("POST /api/orders: refusals change nothing", () => {
  it("validation: empty, too many lines, duplicate products, quantity bounds, unknown fields", async () => {
    const user = await buyer(0);
    const lines = (n: number) => Array.from({ length: n }, (_, i) => ({ productId: i + 1, quantity: 1 }));
    const bodies = [
      { items: [] },
      { items: lines(51) },
      { items: [{ productId: 1, quantity: 1 }, { productId: 1, quantity: 2 }] },
      { items: [{ productId: 1, quantity: 0 }] },
      { items: [{ productId: 1, quantity: 101 }] },
      { items: [{ productId: 1, quantity: 1.5 }] },
      { items: [{ productId: 1, quantity: 1, price: 1 }] },
      { items: [{ productId: 1, quantity: 1 }], discount: 100 },
      { items: [{ productId: "1", quantity: 1 }] },
    ];
    for (const body of bodies) {
      expectProblem(await call("POST", "/api/orders", { token: user.token, body }), 400, "VALIDATION_FAILED");
    }
  });

  it("404 PRODUCT_NOT_FOUND", async () => {
    const user = await buyer(10_000);
    const product = await makeProduct({ stock: 5 });
    const before = await footprint(user.id, [product.id]);
    const res = await call("POST", "/api/orders", {
      token: user.token,
      body: { items: [{ productId: product.id, quantity: 1 }, { productId: 99_999_999, quantity: 1 }] },
    });
    expectProblem(res, 404, "PRODUCT_NOT_FOUND");
    expect(await footprint(user.id, [product.id])).toEqual(before);
  });

  it("400 OUT_OF_STOCK releases what was reserved for the other lines", async () => {
    const user = await buyer(1_000_000);
    const plenty = await makeProduct({ price: 100, stock: 10 });
    const scarce = await makeProduct({ price: 100, stock: 1 });
    const before = await footprint(user.id, [plenty.id, scarce.id]);
    const res = await call("POST", "/api/orders", {
      token: user.token,
      body: { items: [{ productId: plenty.id, quantity: 5 }, { productId: scarce.id, quantity: 2 }] },
    });
    expectProblem(res, 400, "OUT_OF_STOCK");
    expect(await footprint(user.id, [plenty.id, scarce.id])).toEqual(before);
    // The released reservation is really free again: all 10 can still be bought.
    const again = await call("POST", "/api/orders", { token: user.token, body: { items: [{ productId: plenty.id, quantity: 10 }] } });
    expect(again.status).toBe(200);
  });

  it("400 INSUFFICIENT_BALANCE", async () => {
    const user = await buyer(999);
    const product = await makeProduct({ price: 1_000, stock: 5 });
    const before = await footprint(user.id, [product.id]);
    const res = await call("POST", "/api/orders", { token: user.token, body: { items: [{ productId: product.id, quantity: 1 }] } });
    expectProblem(res, 400, "INSUFFICIENT_BALANCE");
    expect(await footprint(user.id, [product.id])).toEqual(before);
  });

  it("400 COUPON_NOT_USABLE: another user's, used, expired, under its minimum, missing", async () => {
    const user = await buyer(100_000);
    const other = await buyer(0);
    const product = await makeProduct({ price: 10_000, stock: 50 });
    const order = (userCouponId: number) =>
      call("POST", "/api/orders", { token: user.token, body: { items: [{ productId: product.id, quantity: 1 }], userCouponId } });

    const othersCoupon = await grantCoupon(other.id);
    const expired = await grantCoupon(user.id, { expiresAt: new Date(Date.now() - 1000).toISOString() });
    const underMinimum = await grantCoupon(user.id, { minOrderAmount: 10_001 });
    const used = await grantCoupon(user.id);
    expect((await order(used)).status).toBe(200);

    for (const userCouponId of [othersCoupon, expired, underMinimum, used, 99_999_999]) {
      const before = await footprint(user.id, [product.id], userCouponId === 99_999_999 ? undefined : userCouponId);
      expectProblem(await order(userCouponId), 400, "COUPON_NOT_USABLE");
      expect(await footprint(user.id, [product.id], userCouponId === 99_999_999 ? undefined : userCouponId)).toEqual(before);
    }
  });
});

describe("orders: authentication and ownership", () => {
  it("401 without a token, 403 ordering for someone else, 400 for an admin who names nobody", async () => {
    const user = await buyer(10_000);
    const other = await buyer(10_000);
    const product = await makeProduct();
    const body = { items: [{ productId: product.id, quantity: 1 }] };
    expectProblem(await call("POST", "/api/orders", { body }), 401, "UNAUTHENTICATED");
    expectProblem(await call("POST", "/api/orders", { token: user.token, body: { ...body, userId: other.id } }), 403, "FORBIDDEN");
    expectProblem(await call("POST", "/api/orders", { token: await adminToken(), body }), 400, "VALIDATION_FAILED");
  });

  it("another user's order is 404; an admin reads any; bad ids are 400", async () => {
    const owner = await buyer(10_000);
    const stranger = await buyer(0);
    const product = await makeProduct({ price: 500 });
    const placed = await call("POST", "/api/orders", { token: owner.token, body: { items: [{ productId: product.id, quantity: 1 }] } });
    expectProblem(await call("GET", `/api/orders/${placed.body.id}`, { token: stranger.token }), 404, "ORDER_NOT_FOUND");
    expect((await call("GET", `/api/orders/${placed.body.id}`, { token: await adminToken() })).body).toEqual(placed.body);
    expectProblem(await call("GET", "/api/orders/99999999", { token: owner.token }), 404, "ORDER_NOT_FOUND");
    expectProblem(await call("GET", "/api/orders/abc", { token: owner.token }), 400, "VALIDATION_FAILED");
    expectProblem(await call("GET", `/api/orders/${placed.body.id}`), 401, "UNAUTHENTICATED");
  });
});

describe("GET /api/users/orders", () => {
  it("lists the caller's orders newest first across pages", async () => {
    const user = await buyer(100_000);
    const product = await makeProduct({ price: 100, stock: 100 });
    const ids: number[] = [];
    for (let i = 0; i < 5; i++) {
      const res = await call("POST", "/api/orders", { token: user.token, body: { items: [{ productId: product.id, quantity: 1 }] } });
      ids.push(res.body.id);
    }
    const seen: number[] = [];
    let cursor: string | null = null;
    do {
      const page: { status: number; body: { items: { id: number; userId: number; items: unknown[] }[]; nextCursor: string | null } } =
        await call("GET", `/api/users/orders?limit=2${cursor ? `&cursor=${cursor}` : ""}`, { token: user.token });
      expect(page.status).toBe(200);
      for (const order of page.body.items) {
        expect(order.userId).toBe(user.id);
        expect(order.items).toHaveLength(1);
      }
      seen.push(...page.body.items.map((o) => o.id));
      cursor = page.body.nextCursor;
    } while (cursor);
    expect(seen).toEqual([...ids].reverse());
  });

  it("an order that read an earlier clock but committed later still sorts as the newest", async () => {
    const user = await buyer(100_000);
    const product = await makeProduct({ price: 100, stock: 10 });
    const body = { items: [{ productId: product.id, quantity: 1 }] };
    const first = await call("POST", "/api/orders", { app: createApp({ clock: fixedClock("2026-11-20T10:00:00.000Z") }), token: user.token, body });
    const late = await call("POST", "/api/orders", { app: createApp({ clock: fixedClock("2026-11-20T09:59:59.000Z") }), token: user.token, body });
    expect(late.body.createdAt >= first.body.createdAt).toBe(true);
    const mine = await call("GET", "/api/users/orders", { token: user.token });
    expect(mine.body.items.map((o: { id: number }) => o.id)).toEqual([late.body.id, first.body.id]);
    const exports = await call("GET", "/api/admin/exports?limit=100", { token: await adminToken() });
    const ours = exports.body.items.filter((e: { orderId: number }) => e.orderId === first.body.id || e.orderId === late.body.id);
    expect(ours.map((e: { orderId: number }) => e.orderId)).toEqual([late.body.id, first.body.id]);
    const outbox = await one<{ payload: string }>("SELECT payload FROM outbox WHERE order_id = ? AND topic = 'export'", late.body.id);
    expect(JSON.parse(outbox.payload).completedAt).toBe(late.body.createdAt);
  });

  it("a user cannot list another user's orders; an admin can with ?userId=", async () => {
    const user = await buyer(0);
    const other = await buyer(0);
    expectProblem(await call("GET", `/api/users/orders?userId=${other.id}`, { token: user.token }), 403, "FORBIDDEN");
    const res = await call("GET", `/api/users/orders?userId=${other.id}`, { token: await adminToken() });
    expect(res.status).toBe(200);
    expect(res.body).toEqual({ items: [], nextCursor: null });
  });
});

describe("POST /api/orders: Idempotency-Key", () => {
  it("replays the first order byte for byte and places it once", async () => {
    const user = await buyer(50_000);
    const product = await makeProduct({ price: 4_000, stock: 10 });
    const body = { items: [{ productId: product.id, quantity: 2 }] };
    const headers = { "Idempotency-Key": `order-${crypto.randomUUID()}` };
    const first = await call("POST", "/api/orders", { token: user.token, body, headers });
    const second = await call("POST", "/api/orders", { token: user.token, body, headers });
    expect(first.status).toBe(200);
    expect(second.status).toBe(200);
    expect(second.text).toBe(first.text);
    expect(second.headers.get("Idempotent-Replayed")).toBe("true");
    expect((await one<{ n: number }>("SELECT count(*) AS n FROM orders WHERE user_id = ?", user.id)).n).toBe(1);
    expect(await walletInvariant(user.id)).toEqual({ balance: 42_000, ledger: 42_000, newest: 42_000 });

    const reused = await call("POST", "/api/orders", { token: user.token, body: { items: [{ productId: product.id, quantity: 1 }] }, headers });
    expectProblem(reused, 422, "IDEMPOTENCY_KEY_REUSED");
  });

  it("replays a business refusal too, without re-running it", async () => {
    const user = await buyer(100);
    const product = await makeProduct({ price: 4_000, stock: 10 });
    const body = { items: [{ productId: product.id, quantity: 1 }] };
    const headers = { "Idempotency-Key": crypto.randomUUID() };
    const first = await call("POST", "/api/orders", { token: user.token, body, headers });
    expectProblem(first, 400, "INSUFFICIENT_BALANCE");
    await fund(user.id, 100_000);
    const second = await call("POST", "/api/orders", { token: user.token, body, headers });
    expect(second.text).toBe(first.text);
    expect(second.headers.get("Idempotent-Replayed")).toBe("true");
  });

  it("10 parallel requests with one key place exactly one order", async () => {
    const user = await buyer(100_000);
    const product = await makeProduct({ price: 1_000, stock: 100 });
    const body = { items: [{ productId: product.id, quantity: 1 }] };
    const headers = { "Idempotency-Key": crypto.randomUUID() };
    const results = await Promise.all(Array.from({ length: 10 }, () => call("POST", "/api/orders", { token: user.token, body, headers })));
    for (const r of results) {
      if (r.status !== 200) expectProblem(r, 409, "IDEMPOTENCY_IN_PROGRESS");
    }
    expect(results.some((r) => r.status === 200)).toBe(true);
    expect((await one<{ n: number }>("SELECT count(*) AS n FROM orders WHERE user_id = ?", user.id)).n).toBe(1);
    expect((await one<{ stock: number }>("SELECT stock FROM products WHERE id = ?", product.id)).stock).toBe(99);
    expect(await walletInvariant(user.id)).toEqual({ balance: 99_000, ledger: 99_000, newest: 99_000 });
  });
});

describe("POST /api/orders: runs of one idempotent request that overlap", () => {
  /** A claim left IN_PROGRESS by a first run whose lock has run out (it crashed, or is still running). */
  async function staleClaim(userId: number, body: string) {
    const key = crypto.randomUUID();
    const scope = `user:${userId}`;
    const createdAt = new Date(Date.now() - 120_000).toISOString();
    const claim = {
      scope,
      key,
      requestHash: await requestFingerprint("POST", "/api/orders", body),
      lockedUntil: new Date(Date.now() - 60_000).toISOString(),
      effectRef: await effectRefOf(scope, key, createdAt),
    };
    await env.DB.prepare(
      `INSERT INTO idempotency_keys (scope, key, request_hash, state, locked_until, created_at, expires_at)
       VALUES (?, ?, ?, 'IN_PROGRESS', ?, ?, ?)`,
    )
      .bind(scope, key, claim.requestHash, claim.lockedUntil, createdAt, new Date(Date.now() + 86_400_000).toISOString())
      .run();
    return claim;
  }
  const noQueues = { stats: {} as Queue, export: {} as Queue };

  it("a takeover of a crashed run, refused on another product, leaves the crashed run's units to D1, not given back", async () => {
    const user = await buyer(50_000);
    const first = await makeProduct({ price: 1_000, stock: 10 });
    const soldOut = await makeProduct({ price: 1_000, stock: 0 });
    const body = JSON.stringify({ items: [{ productId: first.id, quantity: 1 }, { productId: soldOut.id, quantity: 1 }] });
    const claim = await staleClaim(user.id, body);
    // The crashed run had reserved the first product under the key's order key, and may still commit.
    const stub = env.PRODUCT_STOCK.get(env.PRODUCT_STOCK.idFromName(String(first.id)));
    expect(await stub.reserve(first.id, `idem:${claim.effectRef}`, 1, user.id)).toMatchObject({ ok: true });
    const retry = await call("POST", "/api/orders", { token: user.token, body, headers: { "Idempotency-Key": claim.key } });
    expectProblem(retry, 400, "OUT_OF_STOCK");
    // Kept for the object to settle against D1 within seconds (sold if that run commits), not dropped now.
    expect(await stub.snapshot(first.id)).toEqual({ stock: 10, reserved: 1, available: 9 });
  });

  it("a retry after the Worker died past its commit replays the order instead of placing it again", async () => {
    const user = await buyer(50_000);
    const product = await makeProduct({ price: 1_000, stock: 10 });
    const body = JSON.stringify({ items: [{ productId: product.id, quantity: 1 }] });
    const claim = await staleClaim(user.id, body);
    // The first run gets as far as its commit, then the Worker dies: nothing after the batch runs.
    const committed = await placeOrder({ env, clock: systemClock, queues: noQueues, defer: () => {}, claim }, user.id, JSON.parse(body));

    const retry = await call("POST", "/api/orders", { token: user.token, body, headers: { "Idempotency-Key": claim.key } });
    expect(retry.status).toBe(200);
    expect(retry.text).toBe(committed);
    expect(retry.headers.get("Idempotent-Replayed")).toBe("true");
    expect((await one<{ n: number }>("SELECT count(*) AS n FROM orders WHERE user_id = ?", user.id)).n).toBe(1);
    expect(await walletInvariant(user.id)).toEqual({ balance: 49_000, ledger: 49_000, newest: 49_000 });
  });

  it("a retry that took over and failed with a 503 keeps the key's life: the slow first run's order is replayed, not placed again", async () => {
    const user = await buyer(50_000);
    const product = await makeProduct({ price: 1_000, stock: 10 });
    const body = JSON.stringify({ items: [{ productId: product.id, quantity: 1 }] });
    const claim = await staleClaim(user.id, body);
    const headers = { "Idempotency-Key": claim.key };
    // The retry takes the claim over and meets an overloaded stock object: a plain 503.
    const overloaded = inject(env.PRODUCT_STOCK, "get", () => () => {
      throw Object.assign(new Error("Durable Object is overloaded (injected)"), { overloaded: true });
    });
    let failed;
    try {
      failed = await call("POST", "/api/orders", { token: user.token, body, headers });
    } finally {
      overloaded();
    }
    expect(failed.status).toBe(503);
    // The key keeps its life (same created_at, so the same effect), unlocked for the next retry.
    const row = await one<{ state: string; created_at: string }>(
      "SELECT state, created_at FROM idempotency_keys WHERE scope = ? AND key = ?",
      claim.scope,
      claim.key,
    );
    expect(row.state).toBe("IN_PROGRESS");
    // Meanwhile the slow first run commits its order.
    const committed = await placeOrder({ env, clock: systemClock, queues: noQueues, defer: () => {}, claim }, user.id, JSON.parse(body));
    // The client's next retry continues that life and finds that order: one order, one payment.
    const retry = await call("POST", "/api/orders", { token: user.token, body, headers });
    expect(retry.status).toBe(200);
    expect(retry.text).toBe(committed);
    expect((await one<{ n: number }>("SELECT count(*) AS n FROM orders WHERE user_id = ?", user.id)).n).toBe(1);
    expect(await walletInvariant(user.id)).toEqual({ balance: 49_000, ledger: 49_000, newest: 49_000 });
  });

  /**
   * A keyed order of two products with a coupon whose first run crashed (its claim's lock ran out). `retry()`
   * sends it again: the retry takes the key over and reads (no order yet), and the slow first run's batch
   * lands just before the retry's own (then `landed` runs). The retry's duplicate breaks two UNIQUE indexes,
   * and SQLite names the coupon's, not the key's.
   */
  async function slowFirstRunWithCoupon(landed: () => void = () => {}) {
    const user = await buyer(50_000);
    const [one_, two] = await Promise.all([makeProduct({ price: 1_000, stock: 10 }), makeProduct({ price: 2_000, stock: 10 })]);
    const couponId = await grantCoupon(user.id, { discountValue: 500 });
    const input = { items: [{ productId: one_.id, quantity: 1 }, { productId: two.id, quantity: 1 }], userCouponId: couponId };
    const body = JSON.stringify(input);
    const claim = await staleClaim(user.id, body);
    let late: Promise<string> | null = null;
    const send = () => call("POST", "/api/orders", { token: user.token, body, headers: { "Idempotency-Key": claim.key } });
    const retry = async () => {
      const restore = inject(env.DB, "batch", (batch) =>
        (async (statements: D1PreparedStatement[]) => {
          const writes = statements.some((st) => /^\s*INSERT INTO orders /.test((st as unknown as { statement?: string }).statement ?? ""));
          if (!writes || late !== null) return batch(statements);
          late = placeOrder({ env, clock: systemClock, queues: noQueues, defer: () => {}, claim }, user.id, input);
          await late;
          landed();
          return batch(statements);
        }) as typeof batch,
      );
      try {
        return await send();
      } finally {
        restore();
      }
    };
    return { user, claim, send, retry, late: () => late! };
  }

  it("a slow first run with a coupon that commits between a retry's read and its write: the retry replays it", async () => {
    const run = await slowFirstRunWithCoupon();
    const retry = await run.retry();
    // Before: 400 COUPON_NOT_USABLE, stored under the key for 24 h, while the order was placed and paid.
    expect(retry.status).toBe(200);
    expect(retry.text).toBe(await run.late());
    expect((await one<{ n: number }>("SELECT count(*) AS n FROM orders WHERE user_id = ?", run.user.id)).n).toBe(1);
    expect(await walletInvariant(run.user.id)).toEqual({ balance: 47_500, ledger: 47_500, newest: 47_500 });
    expect((await run.send()).text).toBe(retry.text);
  });

  it("the same, when the lookup that would tell the two apart fails: 503 with the claim kept, never a stored refusal", async () => {
    // The retry's own write now fails on the duplicate, and its lookup of the order key fails next.
    let lookupFails = false;
    const run = await slowFirstRunWithCoupon(() => (lookupFails = true));
    const restore = inject(env.DB, "prepare", (prepare) =>
      ((sql: string) => {
        if (!lookupFails || !sql.includes("AS body FROM orders o WHERE o.order_key = ?")) return prepare(sql);
        lookupFails = false;
        return { bind: () => ({ first: async () => Promise.reject(new Error("D1_ERROR: Network connection lost (injected)")) }) };
      }) as typeof prepare,
    );
    let retry;
    try {
      retry = await run.retry();
    } finally {
      restore();
    }
    expectProblem(retry, 503, "SERVICE_UNAVAILABLE");
    expect(retry.body.detail).toBe("The order may or may not have been placed; retry with the same Idempotency-Key");
    // Kept for a retry to find the order (not DONE with a COUPON_NOT_USABLE to replay for 24 h).
    expect(await one("SELECT state FROM idempotency_keys WHERE scope = ? AND key = ?", run.claim.scope, run.claim.key)).toEqual({
      state: "IN_PROGRESS",
    });
    expect((await one<{ n: number }>("SELECT count(*) AS n FROM orders WHERE user_id = ?", run.user.id)).n).toBe(1);
  });

  it("a slow first run that finishes after a retry took over does not place a second order", async () => {
    const user = await buyer(50_000);
    const product = await makeProduct({ price: 1_000, stock: 10 });
    const body = JSON.stringify({ items: [{ productId: product.id, quantity: 1 }] });
    const claim = await staleClaim(user.id, body);
    // The retry takes the claim over (the lock ran out) and places the order...
    const retry = await call("POST", "/api/orders", { token: user.token, body, headers: { "Idempotency-Key": claim.key } });
    expect(retry.status).toBe(200);
    // ...then the slow first run reaches its own write, with its own (older) claim.
    const late = await placeOrder({ env, clock: systemClock, queues: noQueues, defer: () => {}, claim }, user.id, JSON.parse(body));
    expect(late).toBe(retry.text);
    expect((await one<{ n: number }>("SELECT count(*) AS n FROM orders WHERE user_id = ?", user.id)).n).toBe(1);
    expect((await one<{ stock: number }>("SELECT stock FROM products WHERE id = ?", product.id)).stock).toBe(9);
    expect(await walletInvariant(user.id)).toEqual({ balance: 49_000, ledger: 49_000, newest: 49_000 });
  });
});
