import { runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { DEFAULT_LIMITS, type AuditLimits, type CheckName, type CheckResult, type ShardedCouponFigures } from "../../src/audit/check";
import { runAudit, type AuditReport } from "../../src/audit/service";
import { shardOf } from "../../src/coupons/shards";
import { systemClock } from "../../src/lib/clock";
import { adminToken, call, expectProblem, tokenFor } from "../helpers/api";
import { placeHeldOrder } from "../helpers/cancellations";
import { bulkUsers, codes, gateOf, issueAll, makeShardedCoupon, shardGateOf } from "../helpers/coupon-gate";
import { all, one } from "../helpers/db";
import { chargeUser, makeCoupon, makeProduct, makeUser } from "../helpers/factories";

// GET /api/admin/audit: the service checks its own invariants on the live data. A healthy service after a
// storm audits clean; every tamper test breaks one invariant behind the service's back, expects the audit
// to name it, and puts it back (the file's tests share one database, and the audit reads all of it).

const stockObject = (productId: number) => env.PRODUCT_STOCK.getByName(String(productId));

async function audit(): Promise<AuditReport> {
  const res = await call<AuditReport>("GET", "/api/admin/audit", { token: await adminToken() });
  if (res.status !== 200) throw new Error(`audit failed: ${res.status} ${res.text}`);
  return res.body;
}

const checkOf = (report: AuditReport, name: CheckName) => report.checks.find((c) => c.name === name)!;

/** Every check but `name` is clean. */
function othersClean(report: AuditReport, name: CheckName) {
  expect(report.checks.filter((c) => c.name !== name && !c.ok)).toEqual([]);
}

async function order(userId: number, items: { productId: number; quantity: number }[], userCouponId?: number) {
  return call("POST", "/api/orders", { token: await tokenFor(userId), body: { items, ...(userCouponId && { userCouponId }) } });
}

/** A user with `balance` charged through the API. */
async function fundedUser(balance: number) {
  const user = await makeUser();
  await chargeUser(user.id, balance);
  return user;
}

/** A product whose stock object is live and settled: one order of it placed and committed. */
async function liveProduct(stock = 10) {
  const product = await makeProduct({ price: 1_000, stock });
  const buyer = await fundedUser(10_000);
  expect((await order(buyer.id, [{ productId: product.id, quantity: 1 }])).status).toBe(200);
  await expect.poll(() => stockObject(product.id).auditView(product.id)).toEqual({ stock: stock - 1, reserved: 0, openEntries: 0 });
  return product;
}

describe("GET /api/admin/audit", () => {
  it("is for admins only", async () => {
    expectProblem(await call("GET", "/api/admin/audit"), 401, "UNAUTHENTICATED");
    const user = await makeUser();
    expectProblem(await call("GET", "/api/admin/audit", { token: await tokenFor(user.id) }), 403, "FORBIDDEN");
  });

  it("audits clean after a storm of charges, issues, orders and cancels", async () => {
    const users = await Promise.all(Array.from({ length: 12 }, () => fundedUser(20_000)));
    const mug = await makeProduct({ price: 3_000, stock: 8 });
    const pen = await makeProduct({ price: 1_000, stock: 20 });
    const coupon = await makeCoupon({ discountValue: 1_000, totalQuantity: 6 });
    const admin = await adminToken();

    // Everyone at once: a charge, an issue of the 6-piece coupon, and an order of the 8-piece mug.
    const [, issues, mugOrders] = await Promise.all([
      Promise.all(users.map((u) => call("POST", "/api/balance/charge", { token: admin, body: { userId: u.id, amount: 500 } }))),
      Promise.all(users.map(async (u) => call("POST", `/api/coupons/${coupon.id}/issue`, { token: await tokenFor(u.id), body: {} }))),
      Promise.all(users.map((u) => order(u.id, [{ productId: mug.id, quantity: 1 }]))),
    ]);
    expect(issues.filter((r) => r.status === 200)).toHaveLength(6);
    expect(mugOrders.filter((r) => r.status === 200)).toHaveLength(8);
    // Coupon holders buy a pen with it: free (the discount covers the price), so no PAYMENT row.
    const penOrders = await Promise.all(
      issues.filter((r) => r.status === 200).map((r) => order(r.body.userId, [{ productId: pen.id, quantity: 1 }], r.body.id)),
    );
    expect(penOrders.map((r) => [r.status, r.body.paidAmount])).toEqual(Array(6).fill([200, 0]));
    // Half the paid orders and two free ones are cancelled, all at once.
    const cancelled = [...mugOrders.filter((r) => r.status === 200).slice(0, 4), ...penOrders.slice(0, 2)];
    const cancels = await Promise.all(cancelled.map((r) => call("POST", `/api/orders/${r.body.id}/cancel`, { token: admin, body: {} })));
    expect(cancels.map((r) => r.status)).toEqual(Array(6).fill(200));

    // The objects settle their commits right after answering: wait until both are compared, not skipped.
    await expect
      .poll(async () => {
        const stock = checkOf(await audit(), "stock");
        return stock.details.objectsAgreed ?? 0;
      })
      .toBeGreaterThanOrEqual(2);
    const report = await audit();
    expect(report.ok).toBe(true);
    expect(report.checkedAt).toMatch(/Z$/);
    expect(report.checks.map((c) => c.name)).toEqual(["wallet", "coupons", "stock", "orders", "exports"]);
    for (const check of report.checks) expect(check).toMatchObject({ ok: true, violations: 0, samples: [] });
    expect(checkOf(report, "wallet").checked).toBeGreaterThanOrEqual(12);
    expect(checkOf(report, "orders").checked).toBeGreaterThanOrEqual(14);
    expect(checkOf(report, "coupons").details.objectsAgreed).toBeGreaterThanOrEqual(1);
    expect(checkOf(report, "exports").checked).toBeGreaterThanOrEqual(20);
  });

  it("finds a balance changed behind the service's back", async () => {
    const victim = await fundedUser(5_000);
    await env.DB.prepare("UPDATE users SET balance = balance + 7 WHERE id = ?").bind(victim.id).run();
    try {
      const report = await audit();
      expect(report.ok).toBe(false);
      const wallet = checkOf(report, "wallet");
      expect(wallet).toMatchObject({ ok: false, violations: 1 });
      expect(wallet.samples).toEqual([{ userId: victim.id, balance: 5_007, ledger: 5_000, newest: 5_000 }]);
      othersClean(report, "wallet");
    } finally {
      await env.DB.prepare("UPDATE users SET balance = balance - 7 WHERE id = ?").bind(victim.id).run();
    }
    expect((await audit()).ok).toBe(true);
  });

  it("finds an issued count changed behind the gate's back, in D1 and against the gate", async () => {
    const coupon = await makeCoupon({ totalQuantity: 5 });
    for (const user of [await makeUser(), await makeUser()]) {
      expect((await call("POST", `/api/coupons/${coupon.id}/issue`, { token: await tokenFor(user.id), body: {} })).status).toBe(200);
    }
    await env.DB.prepare("UPDATE coupons SET issued_count = 3 WHERE id = ?").bind(coupon.id).run();
    try {
      const report = await audit();
      expect(report.ok).toBe(false);
      const coupons = checkOf(report, "coupons");
      expect(coupons.violations).toBe(2);
      expect(coupons.samples).toEqual([
        { couponId: coupon.id, kind: "COUNT_NOT_ROWS", issuedCount: 3, rows: 2, totalQuantity: 5 },
        { couponId: coupon.id, kind: "GATE_DISAGREES", issuedCount: 3, gateIssuedCount: 2 },
      ]);
      othersClean(report, "coupons");
    } finally {
      await env.DB.prepare("UPDATE coupons SET issued_count = 2 WHERE id = ?").bind(coupon.id).run();
    }
    expect((await audit()).ok).toBe(true);
  });

  it("finds a gate whose own count drifted from D1", async () => {
    const coupon = await makeCoupon({ totalQuantity: 5 });
    const user = await makeUser();
    expect((await call("POST", `/api/coupons/${coupon.id}/issue`, { token: await tokenFor(user.id), body: {} })).status).toBe(200);
    const shift = (delta: number) =>
      runInDurableObject(gateOf(coupon.id), (_instance, state) => {
        state.storage.sql.exec("UPDATE coupon SET issued_count = issued_count + ?", delta);
      });
    await shift(1);
    try {
      const report = await audit();
      expect(report.ok).toBe(false);
      expect(checkOf(report, "coupons").samples).toEqual([
        { couponId: coupon.id, kind: "GATE_DISAGREES", issuedCount: 1, gateIssuedCount: 2 },
      ]);
      othersClean(report, "coupons");
    } finally {
      await shift(-1);
    }
    expect((await audit()).ok).toBe(true);
  });

  it("asks every shard of a sharded coupon: clean after a storm, then a drifted shard and a changed D1 count are found", async () => {
    const coupon = await makeShardedCoupon(4, 12);
    // 5 users on each shard for its 3 pieces: every shard is live and sells out.
    const pool = await bulkUsers(100);
    const users = [0, 1, 2, 3].flatMap((shard) => pool.filter((id) => shardOf(id, 4) === shard).slice(0, 5));
    expect(users).toHaveLength(20);
    expect(codes(await issueAll(coupon.id, users))).toEqual({ OK: 12, COUPON_SOLD_OUT: 8 });
    const figuresOf = (report: AuditReport) =>
      (checkOf(report, "coupons").details.shardedCoupons as ShardedCouponFigures[] | undefined)?.find((f) => f.couponId === coupon.id);
    const sum = (figures: (number | null)[]) => figures.reduce<number>((n, x) => n + (x ?? 0), 0);

    // Its shards settle their batches right after answering: wait until they are compared, not skipped.
    await expect.poll(async () => figuresOf(await audit())?.gate).toBe("agrees");
    const clean = await audit();
    expect(clean.ok).toBe(true);
    const figures = figuresOf(clean)!;
    expect(figures).toMatchObject({ shards: 4, issuedCount: 12, gate: "agrees", issued: [3, 3, 3, 3], pending: [0, 0, 0, 0], openIntents: [0, 0, 0, 0] });
    expect(sum(figures.quota)).toBe(12);
    expect(figures.requests.every((n) => n !== null && n >= 3)).toBe(true);

    // One shard's own count drifts (shard 0 alone would be all the audit asked before).
    const shift = (delta: number) =>
      runInDurableObject(shardGateOf(coupon.id, 2), (_instance, state) => {
        state.storage.sql.exec("UPDATE coupon SET issued_count = issued_count + ?", delta);
      });
    await shift(-1);
    try {
      const report = await audit();
      expect(report.ok).toBe(false);
      expect(checkOf(report, "coupons").samples).toEqual([{ couponId: coupon.id, kind: "GATE_DISAGREES", issuedCount: 12, gateIssuedCount: 11 }]);
      expect(figuresOf(report)).toMatchObject({ gate: "disagrees", issued: [3, 3, 2, 3] });
      othersClean(report, "coupons");
    } finally {
      await shift(1);
    }

    // D1's count changed behind the shards' back.
    await env.DB.prepare("UPDATE coupons SET issued_count = 11 WHERE id = ?").bind(coupon.id).run();
    try {
      const report = await audit();
      expect(report.ok).toBe(false);
      expect(checkOf(report, "coupons").samples).toEqual([
        { couponId: coupon.id, kind: "COUNT_NOT_ROWS", issuedCount: 11, rows: 12, totalQuantity: 12 },
        { couponId: coupon.id, kind: "SHARD_COUNTS_NOT_COUNT", issuedCount: 11, shardCounts: 12 },
        { couponId: coupon.id, kind: "GATE_DISAGREES", issuedCount: 11, gateIssuedCount: 12 },
      ]);
      othersClean(report, "coupons");
    } finally {
      await env.DB.prepare("UPDATE coupons SET issued_count = 12 WHERE id = ?").bind(coupon.id).run();
    }
    expect((await audit()).ok).toBe(true);

    // One shard's own count in D1 changed behind its back.
    const shardCount = (delta: number) =>
      env.DB.prepare("UPDATE coupon_shard_counts SET issued_count = issued_count + ? WHERE coupon_id = ? AND shard = 1")
        .bind(delta, coupon.id)
        .run();
    await shardCount(1);
    try {
      const report = await audit();
      expect(report.ok).toBe(false);
      expect(checkOf(report, "coupons").samples).toEqual([
        { couponId: coupon.id, kind: "SHARD_COUNTS_NOT_COUNT", issuedCount: 12, shardCounts: 13 },
      ]);
      othersClean(report, "coupons");
    } finally {
      await shardCount(-1);
    }
    expect((await audit()).ok).toBe(true);
  });

  it("finds a stock object that disagrees with D1", async () => {
    const product = await liveProduct(10);
    const shift = (delta: number) =>
      runInDurableObject(stockObject(product.id), (instance) => {
        (instance as unknown as { stock: number }).stock += delta;
      });
    await shift(3);
    try {
      const report = await audit();
      expect(report.ok).toBe(false);
      expect(checkOf(report, "stock").samples).toEqual([
        { productId: product.id, kind: "OBJECT_DISAGREES", stock: 9, objectStock: 12, reserved: 0, openEntries: 0 },
      ]);
      othersClean(report, "stock");
    } finally {
      await shift(-3);
    }
    expect((await audit()).ok).toBe(true);
  });

  it("finds D1's stock changed behind its object's back", async () => {
    const product = await liveProduct(10);
    await env.DB.prepare("UPDATE products SET stock = stock + 5 WHERE id = ?").bind(product.id).run();
    try {
      const report = await audit();
      expect(report.ok).toBe(false);
      expect(checkOf(report, "stock").samples).toEqual([
        { productId: product.id, kind: "OBJECT_DISAGREES", stock: 14, objectStock: 9, reserved: 0, openEntries: 0 },
      ]);
    } finally {
      await env.DB.prepare("UPDATE products SET stock = stock - 5 WHERE id = ?").bind(product.id).run();
    }
    expect((await audit()).ok).toBe(true);
  });

  it("skips a stock object with an open reservation rather than judge it (busy, not a violation)", async () => {
    const product = await liveProduct(10);
    const buyer = await makeUser();
    const stub = stockObject(product.id);
    expect(await stub.reserve(product.id, "audit-open-reservation", 2, buyer.id)).toMatchObject({ ok: true });
    try {
      const report = await audit();
      expect(report.ok).toBe(true);
      expect(checkOf(report, "stock").details.objectsBusy).toBeGreaterThanOrEqual(1);
    } finally {
      await stub.release(product.id, "audit-open-reservation");
    }
  });

  it("finds an order paid or refunded other than exactly once", async () => {
    const buyer = await fundedUser(10_000);
    const product = await makeProduct({ price: 2_000, stock: 5 });
    const placed = (await order(buyer.id, [{ productId: product.id, quantity: 1 }])).body as { id: number };
    // A REFUND on a completed order (the wallet breaks too: nothing changed its balance).
    const refund = await one<{ id: number }>(
      `INSERT INTO wallet_transactions (user_id, type, amount, balance_after, order_id, created_at)
       VALUES (?, 'REFUND', 2000, 10000, ?, ?) RETURNING id`,
      buyer.id,
      placed.id,
      new Date().toISOString(),
    );
    try {
      const report = await audit();
      expect(checkOf(report, "orders").samples).toEqual([
        { orderId: placed.id, status: "COMPLETED", paidAmount: 2_000, payments: 1, paid: -2_000, refunds: 1, refunded: 2_000 },
      ]);
      expect(checkOf(report, "wallet").samples).toEqual([{ userId: buyer.id, balance: 8_000, ledger: 10_000, newest: 10_000 }]);
    } finally {
      await env.DB.prepare("DELETE FROM wallet_transactions WHERE id = ?").bind(refund.id).run();
    }
    // A cancelled order never refunded.
    await env.DB.prepare("UPDATE orders SET status = 'CANCELLED', cancelled_at = ? WHERE id = ?").bind(new Date().toISOString(), placed.id).run();
    try {
      const report = await audit();
      expect(report.ok).toBe(false);
      expect(checkOf(report, "orders").samples).toEqual([
        { orderId: placed.id, status: "CANCELLED", paidAmount: 2_000, payments: 1, paid: -2_000, refunds: 0, refunded: 0 },
      ]);
      othersClean(report, "orders");
    } finally {
      await env.DB.prepare("UPDATE orders SET status = 'COMPLETED', cancelled_at = NULL WHERE id = ?").bind(placed.id).run();
    }
    expect((await audit()).ok).toBe(true);
  });

  it("finds an export pending past its retries; counts failed ones without judging them", async () => {
    // Orders whose export messages are held, so no delivery attempt touches the rows this test arranges.
    const [{ order: first }, { order: second }] = [await placeHeldOrder(1), await placeHeldOrder(1)];
    const exportOf = (orderId: number) =>
      one<{ id: number; status: string; updated_at: string }>("SELECT id, status, updated_at FROM order_exports WHERE order_id = ?", orderId);
    const [stuck, failed] = [await exportOf(first.id), await exportOf(second.id)];
    const put = (e: { id: number; status: string; updated_at: string }) =>
      env.DB.prepare("UPDATE order_exports SET status = ?, updated_at = ? WHERE id = ?").bind(e.status, e.updated_at, e.id).run();
    // Untouched for three hours: past the relay's redelivery (30 min) and any backoff.
    await put({ ...stuck, status: "PENDING", updated_at: new Date(Date.now() - 3 * 3_600_000).toISOString() });
    const before = Number(checkOf(await audit(), "exports").details.failed ?? 0);
    await put({ ...failed, status: "FAILED" });
    try {
      const report = await audit();
      expect(report.ok).toBe(false);
      const exports = checkOf(report, "exports");
      expect(exports.violations).toBe(1);
      expect(exports.samples).toEqual([expect.objectContaining({ exportId: stuck.id, orderId: first.id, event: "PLACED" })]);
      expect(exports.details.failed).toBe(before + 1);
      othersClean(report, "exports");
    } finally {
      await put(stuck);
      await put(failed);
    }
    expect((await audit()).ok).toBe(true);
  });
});

describe("runAudit's budget", () => {
  const deps = () => ({
    db: env.DB,
    gates: env.COUPON_GATE,
    stocks: env.PRODUCT_STOCK,
    clock: systemClock,
    redeliverAfterSeconds: 1800,
  });
  const run = (limits: Partial<AuditLimits>) => runAudit(deps(), { ...DEFAULT_LIMITS, ...limits });
  const wallet = (report: AuditReport): CheckResult => checkOf(report, "wallet");

  it("pages through every row in keyset pages and finds a user on a late page", async () => {
    const users = await Promise.all(Array.from({ length: 5 }, () => makeUser()));
    const last = users.at(-1)!;
    const total = (await one<{ n: number }>("SELECT count(*) AS n FROM users")).n;
    await env.DB.prepare("UPDATE users SET balance = balance + 1 WHERE id = ?").bind(last.id).run();
    try {
      const report = await run({ pageSize: 2 });
      expect(wallet(report)).toMatchObject({ checked: total, violations: 1, samples: [{ userId: last.id, balance: 1, ledger: 0, newest: null }] });
      expect(wallet(report).details.notReached).toBeUndefined();
    } finally {
      await env.DB.prepare("UPDATE users SET balance = balance - 1 WHERE id = ?").bind(last.id).run();
    }
  });

  it("says how many rows and objects a call's budget did not reach", async () => {
    await Promise.all([makeUser(), makeUser(), makeUser(), liveProduct(5), liveProduct(5)]);
    const users = (await one<{ n: number }>("SELECT count(*) AS n FROM users")).n;
    const products = (await all("SELECT id FROM products")).length;
    const report = await run({ pageSize: 2, maxPages: 1, maxObjects: 1 });
    expect(wallet(report)).toMatchObject({ checked: 2, details: { notReached: users - 2 } });
    const stock = checkOf(report, "stock");
    expect(stock.checked).toBe(2);
    expect(stock.details).toMatchObject({ notReached: products - 2, objectsNotAsked: 1 });
  });
});
