import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { createApp } from "../../src/app";
import { DAY_MS, fixedClock } from "../../src/lib/clock";
import { adminToken, call, expectProblem, tokenFor } from "../helpers/api";
import { makeShardedCoupon } from "../helpers/coupon-gate";
import { issueCoupon, makeCoupon, makeUser } from "../helpers/factories";

const ISO_MS = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/;

const issue = async (couponId: number, userId: number, body: object = {}) =>
  call("POST", `/api/coupons/${couponId}/issue`, { token: await tokenFor(userId), body });

describe("OpenAPI", () => {
  it("documents the coupon routes with bearer auth", async () => {
    const doc = (await call("GET", "/openapi.json")).body;
    expect(Object.keys(doc.paths)).toEqual(
      expect.arrayContaining(["/api/admin/coupons", "/api/admin/coupons/{couponId}", "/api/coupons/{couponId}/issue", "/api/users/coupons"]),
    );
    expect(doc.paths["/api/coupons/{couponId}/issue"].post.security).toEqual([{ bearerAuth: [] }]);
    expect(doc.paths["/api/users/coupons"].get.tags).toEqual(["Coupons"]);
  });
});

describe("admin coupons", () => {
  it("creates a coupon and reads it back with its issued count", async () => {
    const token = await adminToken();
    const res = await call("POST", "/api/admin/coupons", {
      token,
      body: {
        name: "Spring 10%",
        discountType: "PERCENT",
        discountValue: 10,
        totalQuantity: 50,
        minOrderAmount: 20000,
        issueStartsAt: "2026-03-01T09:00:00+09:00",
        issueEndsAt: "2026-03-31T23:59:59.999Z",
        validDays: 7,
      },
    });
    expect(res.status).toBe(201);
    expect(res.body).toEqual({
      id: expect.any(Number),
      name: "Spring 10%",
      discountType: "PERCENT",
      discountValue: 10,
      minOrderAmount: 20000,
      maxDiscountAmount: null,
      totalQuantity: 50,
      issuedCount: 0,
      issueStartsAt: "2026-03-01T00:00:00.000Z",
      issueEndsAt: "2026-03-31T23:59:59.999Z",
      validDays: 7,
      shards: 1,
      createdAt: expect.stringMatching(ISO_MS),
    });

    const read = await call("GET", `/api/admin/coupons/${res.body.id}`, { token });
    expect(read.status).toBe(200);
    expect(read.body).toEqual(res.body);
  });

  it("defaults minOrderAmount to 0 and leaves the window open", async () => {
    const coupon = await makeCoupon({ discountType: "FIXED", discountValue: 5000 });
    expect(coupon).toMatchObject({ minOrderAmount: 0, issueStartsAt: null, issueEndsAt: null });
  });

  it("takes shards 1..64, fixed at creation, and reports it", async () => {
    const token = await adminToken();
    const coupon = await makeShardedCoupon(64, 100);
    expect(coupon).toMatchObject({ shards: 64, totalQuantity: 100 });
    const read = await call("GET", `/api/admin/coupons/${coupon.id}`, { token });
    expect(read.body).toMatchObject({ shards: 64 });
  });

  it("counts issues in issuedCount", async () => {
    const coupon = await makeCoupon({ totalQuantity: 5 });
    for (const user of await Promise.all([makeUser(), makeUser()])) await issueCoupon(coupon.id, user.id);
    const read = await call("GET", `/api/admin/coupons/${coupon.id}`, { token: await adminToken() });
    expect(read.body).toMatchObject({ totalQuantity: 5, issuedCount: 2 });
  });

  it("rejects invalid coupons with the failing paths", async () => {
    const token = await adminToken();
    const valid = { name: "x", discountType: "FIXED", discountValue: 1000, totalQuantity: 1, validDays: 1 };
    const cases: [object, string][] = [
      [{ ...valid, discountType: "PERCENT", discountValue: 101 }, "discountValue"],
      [{ ...valid, discountValue: 0 }, "discountValue"],
      [{ ...valid, discountValue: 1.5 }, "discountValue"],
      [{ ...valid, discountType: "BOGO" }, "discountType"],
      [{ ...valid, totalQuantity: 0 }, "totalQuantity"],
      [{ ...valid, totalQuantity: 1_000_001 }, "totalQuantity"],
      [{ ...valid, minOrderAmount: -1 }, "minOrderAmount"],
      [{ ...valid, maxDiscountAmount: 500 }, "maxDiscountAmount"],
      [{ ...valid, discountType: "PERCENT", discountValue: 10, maxDiscountAmount: 0 }, "maxDiscountAmount"],
      [{ ...valid, discountType: "PERCENT", discountValue: 10, maxDiscountAmount: 1.5 }, "maxDiscountAmount"],
      [{ ...valid, discountType: "PERCENT", discountValue: 10, maxDiscountAmount: 10_000_001 }, "maxDiscountAmount"],
      [{ ...valid, validDays: 0 }, "validDays"],
      [{ ...valid, shards: 0 }, "shards"],
      [{ ...valid, shards: 65 }, "shards"],
      [{ ...valid, shards: 2.5 }, "shards"],
      [{ ...valid, name: "  " }, "name"],
      [{ ...valid, name: "Spring\u0000sale" }, "name"],
      [{ ...valid, name: "Spring sale\n" }, "name"],
      [{ ...valid, name: "Spring\u007Fsale" }, "name"],
      [{ ...valid, issueStartsAt: "yesterday" }, "issueStartsAt"],
      [{ ...valid, issueStartsAt: "2026-01-02T00:00:00Z", issueEndsAt: "2026-01-01T00:00:00Z" }, "issueEndsAt"],
      [{ ...valid, issueStartsAt: "2026-01-01T00:00:00Z", issueEndsAt: "2026-01-01T00:00:00Z" }, "issueEndsAt"],
      [{ ...valid, issuedCount: 5 }, "(body)"],
    ];
    for (const [body, path] of cases) {
      const res = await call("POST", "/api/admin/coupons", { token, body });
      expectProblem(res, 400, "VALIDATION_FAILED");
      expect(res.body.errors.map((e: { path: string }) => e.path), JSON.stringify(body)).toContain(path);
    }
  });

  it("takes issue windows only in years 1970..9999 and returns them as UTC with milliseconds", async () => {
    const token = await adminToken();
    const valid = { name: "x", discountType: "FIXED", discountValue: 1000, totalQuantity: 1, validDays: 1 };
    for (const instant of [
      "0000-01-01T00:00:00Z",
      "0000-01-01T00:00:00+01:00",
      "-000001-12-31T23:00:00Z",
      "1969-12-31T23:59:59.999Z",
      "9999-12-31T23:00:00-05:00",
      "+010000-01-01T00:00:00Z",
    ]) {
      for (const field of ["issueStartsAt", "issueEndsAt"]) {
        const res = await call("POST", "/api/admin/coupons", { token, body: { ...valid, [field]: instant } });
        expectProblem(res, 400, "VALIDATION_FAILED");
        expect(res.body.errors.map((e: { path: string }) => e.path), instant).toContain(field);
      }
    }
    const res = await call("POST", "/api/admin/coupons", {
      token,
      body: { ...valid, issueStartsAt: "1970-01-01T09:00:00+09:00", issueEndsAt: "9999-12-31T23:59:59.999Z" },
    });
    expect(res.status).toBe(201);
    expect(res.body).toMatchObject({ issueStartsAt: "1970-01-01T00:00:00.000Z", issueEndsAt: "9999-12-31T23:59:59.999Z" });
  });

  it("404 for an unknown coupon, 400 for a non-numeric id", async () => {
    const token = await adminToken();
    expectProblem(await call("GET", "/api/admin/coupons/999999999", { token }), 404, "COUPON_NOT_FOUND");
    expectProblem(await call("GET", "/api/admin/coupons/abc", { token }), 400, "VALIDATION_FAILED");
  });

  it("is for admins only", async () => {
    const body = { name: "x", discountType: "FIXED", discountValue: 1, totalQuantity: 1, validDays: 1 };
    expectProblem(await call("POST", "/api/admin/coupons", { token: await tokenFor(1), body }), 403, "FORBIDDEN");
    expectProblem(await call("POST", "/api/admin/coupons", { body }), 401, "UNAUTHENTICATED");
    expectProblem(await call("GET", "/api/admin/coupons/1", { token: await tokenFor(1) }), 403, "FORBIDDEN");
  });
});

describe("issuing a coupon", () => {
  it("issues to the caller and records the row in D1", async () => {
    const clock = fixedClock("2026-11-23T08:00:00.000Z");
    const app = createApp({ clock });
    const coupon = await makeCoupon({ discountType: "PERCENT", discountValue: 15, minOrderAmount: 30000, validDays: 7 });
    const user = await makeUser();

    const res = await call("POST", `/api/coupons/${coupon.id}/issue`, { app, token: await tokenFor(user.id), body: {} });
    expect(res.status).toBe(200);
    expect(res.body).toEqual({
      id: expect.any(Number),
      couponId: coupon.id,
      userId: user.id,
      name: coupon.name,
      discountType: "PERCENT",
      discountValue: 15,
      minOrderAmount: 30000,
      maxDiscountAmount: null,
      status: "AVAILABLE",
      issuedAt: "2026-11-23T08:00:00.000Z",
      expiresAt: "2026-11-30T08:00:00.000Z",
      usedAt: null,
    });
    const row = await env.DB.prepare("SELECT * FROM user_coupons WHERE id = ?").bind(res.body.id).first();
    expect(row).toMatchObject({ coupon_id: coupon.id, user_id: user.id, status: "AVAILABLE", expires_at: res.body.expiresAt });
  });

  it("a user may name themselves; naming another user is 403", async () => {
    const coupon = await makeCoupon();
    const [me, other] = await Promise.all([makeUser(), makeUser()]);
    expect((await issue(coupon.id, me.id, { userId: me.id })).status).toBe(200);
    expectProblem(await issue(coupon.id, me.id, { userId: other.id }), 403, "FORBIDDEN");
  });

  it("an admin issues for a named user; must name one; 404 for a missing user", async () => {
    const coupon = await makeCoupon({ totalQuantity: 2 });
    const user = await makeUser();
    const token = await adminToken();
    const path = `/api/coupons/${coupon.id}/issue`;

    const res = await call("POST", path, { token, body: { userId: user.id } });
    expect(res.status).toBe(200);
    expect(res.body.userId).toBe(user.id);
    expectProblem(await call("POST", path, { token, body: {} }), 400, "VALIDATION_FAILED");
    expectProblem(await call("POST", path, { token, body: { userId: 999_999_999 } }), 404, "USER_NOT_FOUND");

    // The missing user took no piece: the last one is still there.
    const last = await makeUser();
    expect((await call("POST", path, { token, body: { userId: last.id } })).status).toBe(200);
    const count = await env.DB.prepare("SELECT issued_count FROM coupons WHERE id = ?").bind(coupon.id).first();
    expect(count).toEqual({ issued_count: 2 });
  });

  it("refuses a second issue to the same user", async () => {
    const coupon = await makeCoupon();
    const user = await makeUser();
    expect((await issue(coupon.id, user.id)).status).toBe(200);
    expectProblem(await issue(coupon.id, user.id), 400, "COUPON_ALREADY_ISSUED");
  });

  it("refuses once sold out", async () => {
    const coupon = await makeCoupon({ totalQuantity: 1 });
    const [first, second] = await Promise.all([makeUser(), makeUser()]);
    expect((await issue(coupon.id, first.id)).status).toBe(200);
    expectProblem(await issue(coupon.id, second.id), 400, "COUPON_SOLD_OUT");
  });

  it("404 for an unknown coupon; a coupon created later is then found", async () => {
    const user = await makeUser();
    const probe = await makeCoupon();
    const nextId = probe.id + 1;
    expectProblem(await issue(nextId, user.id), 404, "COUPON_NOT_FOUND");
    const created = await makeCoupon();
    expect(created.id).toBe(nextId);
    expect((await issue(nextId, user.id)).status).toBe(200);
  });

  it("validates the path and the body", async () => {
    const user = await makeUser();
    const coupon = await makeCoupon();
    expectProblem(await issue(0, user.id), 400, "VALIDATION_FAILED");
    expectProblem(await call("POST", "/api/coupons/abc/issue", { token: await tokenFor(user.id), body: {} }), 400, "VALIDATION_FAILED");
    expectProblem(await issue(coupon.id, user.id, { userId: "1" }), 400, "VALIDATION_FAILED");
    expectProblem(await issue(coupon.id, user.id, { extra: true }), 400, "VALIDATION_FAILED");
  });

  it("415 for a request with no body and no Content-Type, as for any JSON body; nothing is issued", async () => {
    const [user, coupon] = await Promise.all([makeUser(), makeCoupon()]);
    const res = await call("POST", `/api/coupons/${coupon.id}/issue`, { token: await tokenFor(user.id) });
    expectProblem(res, 415, "UNSUPPORTED_MEDIA_TYPE");
    const row = await env.DB.prepare("SELECT count(*) AS n FROM user_coupons WHERE coupon_id = ?").bind(coupon.id).first();
    expect(row).toEqual({ n: 0 });
  });

  it("401 without a token", async () => {
    const coupon = await makeCoupon();
    expectProblem(await call("POST", `/api/coupons/${coupon.id}/issue`, { body: {} }), 401, "UNAUTHENTICATED");
    expectProblem(await call("GET", "/api/users/coupons"), 401, "UNAUTHENTICATED");
  });
});

describe("issue window, with a fixed clock", () => {
  const startsAt = "2026-12-01T00:00:00.000Z";
  const endsAt = "2026-12-24T23:59:59.999Z";
  const ms = (iso: string, delta: number) => new Date(Date.parse(iso) + delta).toISOString();

  it.each([
    ["1 ms before it opens", ms(startsAt, -1), 400],
    ["the instant it opens", startsAt, 200],
    ["the last instant", endsAt, 200],
    ["1 ms after it closes", ms(endsAt, 1), 400],
  ])("%s", async (_label, now, status) => {
    const app = createApp({ clock: fixedClock(now) });
    const coupon = await makeCoupon({ issueStartsAt: startsAt, issueEndsAt: endsAt, validDays: 3 });
    const user = await makeUser();
    const res = await call("POST", `/api/coupons/${coupon.id}/issue`, { app, token: await tokenFor(user.id), body: {} });
    if (status === 200) {
      expect(res.status).toBe(200);
      expect(res.body.issuedAt).toBe(now);
      expect(res.body.expiresAt).toBe(new Date(Date.parse(now) + 3 * DAY_MS).toISOString());
    } else {
      expectProblem(res, 400, "COUPON_NOT_ISSUABLE");
    }
  });

  it("a coupon with only a start opens then and never closes", async () => {
    const clock = fixedClock(ms(startsAt, -1));
    const app = createApp({ clock });
    const coupon = await makeCoupon({ issueStartsAt: startsAt });
    const [early, late] = await Promise.all([makeUser(), makeUser()]);
    const path = `/api/coupons/${coupon.id}/issue`;
    expectProblem(await call("POST", path, { app, token: await tokenFor(early.id), body: {} }), 400, "COUPON_NOT_ISSUABLE");
    clock.set("2036-01-01T00:00:00.000Z");
    expect((await call("POST", path, { app, token: await tokenFor(late.id), body: {} })).status).toBe(200);
  });
});

describe("GET /api/users/coupons", () => {
  it("lists the caller's AVAILABLE, unexpired coupons, newest issue first", async () => {
    const clock = fixedClock("2026-11-01T00:00:00.000Z");
    const app = createApp({ clock });
    const user = await makeUser();
    const token = await tokenFor(user.id);
    const [shortLived, longLived, used] = await Promise.all([
      makeCoupon({ validDays: 1 }),
      makeCoupon({ validDays: 30 }),
      makeCoupon({ validDays: 30 }),
    ]);
    const issued: Record<string, number> = {};
    for (const [key, coupon] of Object.entries({ shortLived, longLived, used })) {
      const res = await call("POST", `/api/coupons/${coupon.id}/issue`, { app, token, body: {} });
      issued[key] = res.body.id;
      clock.advance(1000);
    }
    await env.DB.prepare("UPDATE user_coupons SET status = 'USED', used_at = ? WHERE id = ?")
      .bind(clock.now().toISOString(), issued.used)
      .run();

    const now = await call("GET", "/api/users/coupons", { app, token });
    expect(now.status).toBe(200);
    expect(now.body.items.map((c: { id: number }) => c.id)).toEqual([issued.longLived, issued.shortLived]);
    expect(now.body.items[0]).toMatchObject({ couponId: longLived.id, userId: user.id, status: "AVAILABLE", usedAt: null });

    clock.advance(DAY_MS);
    const dayLater = await call("GET", "/api/users/coupons", { app, token });
    expect(dayLater.body.items.map((c: { id: number }) => c.id)).toEqual([issued.longLived]);
  });

  it("a user sees only their own; an admin names the user", async () => {
    const coupon = await makeCoupon();
    const [me, other] = await Promise.all([makeUser(), makeUser()]);
    const mine = await issueCoupon(coupon.id, me.id);
    await issueCoupon(coupon.id, other.id);

    const own = await call("GET", "/api/users/coupons", { token: await tokenFor(me.id) });
    expect(own.body.items.map((c: { id: number }) => c.id)).toEqual([mine.id]);
    expectProblem(await call("GET", `/api/users/coupons?userId=${other.id}`, { token: await tokenFor(me.id) }), 403, "FORBIDDEN");

    const admin = await adminToken();
    const named = await call("GET", `/api/users/coupons?userId=${me.id}`, { token: admin });
    expect(named.body.items.map((c: { id: number }) => c.id)).toEqual([mine.id]);
    expectProblem(await call("GET", "/api/users/coupons", { token: admin }), 400, "VALIDATION_FAILED");
  });
});
