// PERCENT coupons with a cap: discount = min(floor(total * value / 100), maxDiscountAmount).
import { evictDurableObject, runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { adminToken, call, expectProblem, tokenFor } from "../helpers/api";
import { gateOf, gateStorage } from "../helpers/coupon-gate";
import { one, walletInvariant } from "../helpers/db";
import { chargeUser, issueCoupon, makeCoupon, makeProduct, makeUser } from "../helpers/factories";

const percent = { name: "Ten percent", discountType: "PERCENT" as const, discountValue: 10, totalQuantity: 10, validDays: 30 };

const createCoupon = async (body: object) => call("POST", "/api/admin/coupons", { token: await adminToken(), body });
const couponCount = async () => (await one<{ n: number }>("SELECT count(*) AS n FROM coupons")).n;

describe("creating a capped coupon", () => {
  it("a PERCENT coupon takes maxDiscountAmount and shows it on create and read; left out, it is null", async () => {
    const capped = await createCoupon({ ...percent, maxDiscountAmount: 1000 });
    expect(capped.status).toBe(201);
    expect(capped.body).toMatchObject({ discountType: "PERCENT", discountValue: 10, maxDiscountAmount: 1000 });
    const read = await call("GET", `/api/admin/coupons/${capped.body.id}`, { token: await adminToken() });
    expect(read.body).toEqual(capped.body);
    const row = await one("SELECT max_discount_amount FROM coupons WHERE id = ?", capped.body.id);
    expect(row).toEqual({ max_discount_amount: 1000 });

    const largest = await createCoupon({ ...percent, maxDiscountAmount: 10_000_000 });
    expect(largest.body.maxDiscountAmount).toBe(10_000_000);

    for (const coupon of [await makeCoupon({ discountType: "PERCENT", discountValue: 5 }), await makeCoupon()]) {
      expect(coupon.maxDiscountAmount).toBeNull();
      const again = await call("GET", `/api/admin/coupons/${coupon.id}`, { token: await adminToken() });
      expect(again.body.maxDiscountAmount).toBeNull();
    }
  });

  it("400 VALIDATION_FAILED on a FIXED coupon, at the path maxDiscountAmount; nothing is created", async () => {
    const before = await couponCount();
    for (const discountValue of [1000, 10]) {
      const res = await createCoupon({ ...percent, discountType: "FIXED", discountValue, maxDiscountAmount: 500 });
      expectProblem(res, 400, "VALIDATION_FAILED");
      expect(res.body.errors.map((e: { path: string }) => e.path)).toEqual(["maxDiscountAmount"]);
    }
    expect(await couponCount()).toBe(before);
  });

  it("400 VALIDATION_FAILED for 0, a negative, a fraction, a string, null or more than 10,000,000", async () => {
    const before = await couponCount();
    for (const maxDiscountAmount of [0, -1, 1.5, "1000", null, 10_000_001]) {
      const res = await createCoupon({ ...percent, maxDiscountAmount });
      expectProblem(res, 400, "VALIDATION_FAILED");
      expect(res.body.errors.map((e: { path: string }) => e.path), String(maxDiscountAmount)).toEqual(["maxDiscountAmount"]);
    }
    expect(await couponCount()).toBe(before);
  });

  it("the OpenAPI document shows the cap on coupons, user coupons and the create body", async () => {
    const { schemas } = (await call("GET", "/openapi.json")).body.components;
    for (const shown of [schemas.Coupon, schemas.UserCoupon]) {
      expect(shown.required).toContain("maxDiscountAmount");
      expect(shown.properties.maxDiscountAmount.type).toEqual(["integer", "null"]);
    }
    expect(schemas.CreateCoupon.required).not.toContain("maxDiscountAmount");
    expect(schemas.CreateCoupon.properties.maxDiscountAmount).toMatchObject({ type: "integer", minimum: 1, maximum: 10_000_000 });
  });
});

describe("ordering with a capped coupon", () => {
  /** A funded user holding the coupon (issued through its gate) orders `quantity` of a 10,000-won product. */
  async function orderWith(coupon: { id: number }, quantity: number) {
    const user = await makeUser();
    await chargeUser(user.id, 100_000);
    const userCoupon = await issueCoupon(coupon.id, user.id);
    const product = await makeProduct({ price: 10_000, stock: 100 });
    const res = await call("POST", "/api/orders", {
      token: await tokenFor(user.id),
      body: { items: [{ productId: product.id, quantity }], userCouponId: userCoupon.id },
    });
    return { user, userCoupon, res };
  }

  it("10% capped at 1,000 on a 50,000 total: the discount is 1,000 and 49,000 is paid", async () => {
    const coupon = await makeCoupon({ ...percent, maxDiscountAmount: 1000 });
    const { user, userCoupon, res } = await orderWith(coupon, 5);
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({ totalAmount: 50_000, discountAmount: 1000, paidAmount: 49_000, userCouponId: userCoupon.id });

    const order = await one("SELECT total_amount, discount_amount, paid_amount FROM orders WHERE id = ?", res.body.id);
    expect(order).toEqual({ total_amount: 50_000, discount_amount: 1000, paid_amount: 49_000 });
    const payment = await one("SELECT amount FROM wallet_transactions WHERE order_id = ? AND type = 'PAYMENT'", res.body.id);
    expect(payment).toEqual({ amount: -49_000 });
    expect(await walletInvariant(user.id)).toEqual({ balance: 51_000, ledger: 51_000, newest: 51_000 });
    const used = await one("SELECT status, order_id FROM user_coupons WHERE id = ?", userCoupon.id);
    expect(used).toEqual({ status: "USED", order_id: res.body.id });
  });

  it("under the cap the whole percentage applies; at the cap exactly, the cap", async () => {
    const threePercent = await makeCoupon({ ...percent, discountValue: 3, maxDiscountAmount: 1000 });
    const under = await orderWith(threePercent, 2);
    expect(under.res.body).toMatchObject({ totalAmount: 20_000, discountAmount: 600, paidAmount: 19_400 });
    expect(await walletInvariant(under.user.id)).toEqual({ balance: 80_600, ledger: 80_600, newest: 80_600 });

    const tenPercent = await makeCoupon({ ...percent, maxDiscountAmount: 1000 });
    const atCap = await orderWith(tenPercent, 1);
    expect(atCap.res.body).toMatchObject({ totalAmount: 10_000, discountAmount: 1000, paidAmount: 9000 });
  });

  it("an uncapped PERCENT coupon is unchanged: floor(total * value / 100)", async () => {
    const coupon = await makeCoupon({ ...percent });
    const { res } = await orderWith(coupon, 5);
    expect(res.body).toMatchObject({ totalAmount: 50_000, discountAmount: 5000, paidAmount: 45_000 });
  });
});

describe("user coupons show the cap", () => {
  it("on issue and in GET /api/users/coupons; null for an uncapped PERCENT and for a FIXED coupon", async () => {
    const user = await makeUser();
    const capped = await makeCoupon({ ...percent, maxDiscountAmount: 2500 });
    const uncapped = await makeCoupon({ ...percent, discountValue: 20 });
    const fixed = await makeCoupon({ discountType: "FIXED", discountValue: 3000 });

    const issued = {
      capped: await issueCoupon(capped.id, user.id),
      uncapped: await issueCoupon(uncapped.id, user.id),
      fixed: await issueCoupon(fixed.id, user.id),
    };
    expect(issued.capped).toMatchObject({ couponId: capped.id, discountType: "PERCENT", discountValue: 10, maxDiscountAmount: 2500 });
    expect(issued.uncapped.maxDiscountAmount).toBeNull();
    expect(issued.fixed.maxDiscountAmount).toBeNull();

    const listed = await call("GET", "/api/users/coupons", { token: await tokenFor(user.id) });
    expect(listed.status).toBe(200);
    const byId = new Map(listed.body.items.map((c: { id: number }) => [c.id, c]));
    for (const userCoupon of Object.values(issued)) expect(byId.get(userCoupon.id)).toEqual(userCoupon);
  });

  it("a gate whose storage predates the cap's column adds it on waking and answers with the cap", async () => {
    const coupon = await makeCoupon({ ...percent, maxDiscountAmount: 700 });
    const [first, second] = await Promise.all([makeUser(), makeUser()]);
    await issueCoupon(coupon.id, first.id);
    // The layout an object written before capped coupons has: the terms without the column.
    await runInDurableObject(gateOf(coupon.id), (_instance, state) => {
      state.storage.sql.exec("ALTER TABLE coupon DROP COLUMN max_discount_amount");
    });
    await evictDurableObject(gateOf(coupon.id));

    const issued = await issueCoupon(coupon.id, second.id);
    expect(issued.maxDiscountAmount).toBe(700);
    const columns = await runInDurableObject(gateOf(coupon.id), (_instance, state) =>
      state.storage.sql.exec<{ max_discount_amount: number | null }>("SELECT max_discount_amount FROM coupon").toArray(),
    );
    expect(columns).toEqual([{ max_discount_amount: 700 }]);
    // It trusted its storage (no rebuild) and still knows the first holder.
    expect(await gateStorage(coupon.id)).toMatchObject({ issuedCount: 2, holderCount: 2, pending: [] });
    const again = await call("POST", `/api/coupons/${coupon.id}/issue`, { token: await tokenFor(first.id), body: {} });
    expectProblem(again, 400, "COUPON_ALREADY_ISSUED");
  });
});

describe("D1 backs the rule", () => {
  it("refuses a cap on a FIXED coupon or a cap below 1 written behind the API's back", async () => {
    const insert = (type: string, value: number, cap: number) =>
      env.DB.prepare(
        `INSERT INTO coupons (name, discount_type, discount_value, max_discount_amount, total_quantity, valid_days, created_at)
         VALUES ('x', ?, ?, ?, 1, 1, '2026-01-01T00:00:00.000Z')`,
      )
        .bind(type, value, cap)
        .run();
    await expect(insert("FIXED", 1000, 500)).rejects.toThrow(/coupons_max_discount_amount/);
    await expect(insert("PERCENT", 10, 0)).rejects.toThrow(/coupons_max_discount_amount/);
  });
});
