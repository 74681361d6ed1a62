import { abortAllDurableObjects, evictDurableObject, runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import type { CouponGate } from "../../src/coupons/coupon-gate";
import { call, tokenFor, type ApiResponse } from "../helpers/api";
import { makeCoupon, makeUser } from "../helpers/factories";

const makeUsers = (n: number) => Promise.all(Array.from({ length: n }, () => makeUser()));

async function issueAll(couponId: number, userIds: number[]): Promise<ApiResponse[]> {
  const tokens = await Promise.all(userIds.map((id) => tokenFor(id)));
  return Promise.all(tokens.map((token) => call("POST", `/api/coupons/${couponId}/issue`, { token, body: {} })));
}

const codes = (responses: ApiResponse[]) =>
  responses.reduce<Record<string, number>>((tally, r) => {
    const key = r.status === 200 ? "OK" : r.body.code;
    tally[key] = (tally[key] ?? 0) + 1;
    return tally;
  }, {});

/** D1's view of a coupon: its count, its rows, and how many distinct users those rows name. */
async function ledger(couponId: number) {
  const coupon = await env.DB.prepare("SELECT issued_count, total_quantity FROM coupons WHERE id = ?").bind(couponId).first<{
    issued_count: number;
    total_quantity: number;
  }>();
  const rows = await env.DB.prepare("SELECT id, user_id FROM user_coupons WHERE coupon_id = ?")
    .bind(couponId)
    .all<{ id: number; user_id: number }>();
  const holders = rows.results.map((r) => r.user_id);
  return { issuedCount: coupon!.issued_count, total: coupon!.total_quantity, rows: rows.results, holders, distinct: new Set(holders).size };
}

const gate = (couponId: number) => env.COUPON_GATE.getByName(String(couponId));

/** A row as a batch from the object's previous life would write it, landing after this life loaded. */
async function landBehindTheObjectsBack(couponId: number, userId: number): Promise<void> {
  await env.DB.batch([
    env.DB.prepare(
      "INSERT INTO user_coupons (coupon_id, user_id, status, issued_at, expires_at) VALUES (?, ?, 'AVAILABLE', ?, ?)",
    ).bind(couponId, userId, "2026-01-01T00:00:00.000Z", "2026-02-01T00:00:00.000Z"),
    env.DB.prepare("UPDATE coupons SET issued_count = issued_count + 1 WHERE id = ?").bind(couponId),
  ]);
}

describe("first come, first served under a stampede", () => {
  it("300 users racing for 100 pieces: exactly 100 issued, 200 sold out", async () => {
    const coupon = await makeCoupon({ totalQuantity: 100 });
    const users = await makeUsers(300);

    const responses = await issueAll(coupon.id, users.map((u) => u.id));

    expect(codes(responses)).toEqual({ OK: 100, COUPON_SOLD_OUT: 200 });
    const d1 = await ledger(coupon.id);
    expect(d1.issuedCount).toBe(100);
    expect(d1.rows).toHaveLength(100);
    expect(d1.distinct).toBe(100);
    const winners = responses.filter((r) => r.status === 200);
    expect(new Set(winners.map((r) => r.body.userId))).toEqual(new Set(d1.holders));
    expect(new Set(winners.map((r) => r.body.id))).toEqual(new Set(d1.rows.map((r) => r.id)));
  });

  it("one user firing 30 parallel requests gets it exactly once", async () => {
    const coupon = await makeCoupon({ totalQuantity: 50 });
    const user = await makeUser();

    const responses = await issueAll(coupon.id, Array(30).fill(user.id));

    expect(codes(responses)).toEqual({ OK: 1, COUPON_ALREADY_ISSUED: 29 });
    const d1 = await ledger(coupon.id);
    expect(d1.issuedCount).toBe(1);
    expect(d1.holders).toEqual([user.id]);
  });

  it("a mixed storm (repeat users, missing users) keeps issued_count == rows <= total", async () => {
    const coupon = await makeCoupon({ totalQuantity: 40 });
    const users = (await makeUsers(60)).map((u) => u.id);
    const missing = [900_000_001, 900_000_002, 900_000_003];
    const requests = [...users, ...users.slice(0, 20), ...missing].sort(() => Math.random() - 0.5);

    const responses = await issueAll(coupon.id, requests);

    responses.forEach((r, i) => {
      // The object learns that a user is missing only from D1, so after the last piece it says sold out.
      if (missing.includes(requests[i]!)) expect(["USER_NOT_FOUND", "COUPON_SOLD_OUT"]).toContain(r.body.code);
      else expect([200, 400]).toContain(r.status);
    });
    const d1 = await ledger(coupon.id);
    expect(d1.issuedCount).toBe(d1.rows.length);
    expect(d1.rows.length).toBe(codes(responses).OK);
    expect(d1.distinct).toBe(d1.rows.length);
    expect(d1.holders.every((id) => users.includes(id))).toBe(true);

    // A missing user holds a piece only until its batch comes back, so a second wave takes exactly the rest.
    await issueAll(coupon.id, users);
    const final = await ledger(coupon.id);
    expect(final).toMatchObject({ issuedCount: 40, distinct: 40 });
    expect(final.rows).toHaveLength(40);
  });
});

describe("a D1 failure during a group commit", () => {
  it("fails that group's callers, undoes their admissions, and leaves the object agreeing with D1", async () => {
    const coupon = await makeCoupon({ totalQuantity: 3 });
    const [victim, ...others] = await makeUsers(4);
    const stub = gate(coupon.id);

    await runInDurableObject(stub, (instance: CouponGate) => instance.failNextFlush());
    const [failed] = await issueAll(coupon.id, [victim!.id]);
    expect(failed!.status).toBe(503);
    expect(failed!.body.code).toBe("SERVICE_UNAVAILABLE");
    expect(await ledger(coupon.id)).toMatchObject({ issuedCount: 0, rows: [] });

    // The failed user was not left holding it, and the piece went back: all 3 can still go, and no more.
    const again = await issueAll(coupon.id, [victim!.id]);
    expect(again[0]!.status).toBe(200);
    expect(codes(await issueAll(coupon.id, others.map((u) => u.id)))).toEqual({ OK: 2, COUPON_SOLD_OUT: 1 });
    const d1 = await ledger(coupon.id);
    expect(d1).toMatchObject({ issuedCount: 3, distinct: 3 });
    expect(d1.rows).toHaveLength(3);
  });

  it("under load: every caller who got an error is absent from D1, every winner present, and the rest still issue", async () => {
    const coupon = await makeCoupon({ totalQuantity: 30 });
    const users = (await makeUsers(40)).map((u) => u.id);
    const stub = gate(coupon.id);
    // Warm the object so the storm meets group commits rather than the first load.
    expect((await issueAll(coupon.id, [users[0]!]))[0]!.status).toBe(200);

    await runInDurableObject(stub, (instance: CouponGate) => instance.failNextFlush());
    const responses = await issueAll(coupon.id, users.slice(1, 21));
    expect(responses.filter((r) => r.status === 503).length).toBeGreaterThan(0);

    const d1 = await ledger(coupon.id);
    responses.forEach((r, i) => {
      const userId = users[i + 1]!;
      if (r.status === 200) expect(d1.holders).toContain(userId);
      else expect(d1.holders).not.toContain(userId);
    });
    expect(d1.issuedCount).toBe(d1.rows.length);

    // Everyone else, including those who failed, races for what is left: exactly 30 in the end.
    const rest = await issueAll(coupon.id, users.slice(1));
    expect(rest.every((r) => r.status === 200 || ["COUPON_ALREADY_ISSUED", "COUPON_SOLD_OUT"].includes(r.body.code))).toBe(true);
    const final = await ledger(coupon.id);
    expect(final).toMatchObject({ issuedCount: 30, distinct: 30 });
    expect(final.rows).toHaveLength(30);
  });
  it("one bad row in a group fails alone: its neighbours are still issued", async () => {
    const coupon = await makeCoupon({ totalQuantity: 20 });
    const users = (await makeUsers(10)).map((u) => u.id);
    expect((await issueAll(coupon.id, [users[0]!]))[0]!.status).toBe(200);
    const late = users[9]!;
    await landBehindTheObjectsBack(coupon.id, late);

    // The first request goes alone; the rest, late's included, share the next batch, which UNIQUE fails.
    const responses = await issueAll(coupon.id, users.slice(1));

    expect(responses.at(-1)!.body.code).toBe("COUPON_ALREADY_ISSUED");
    expect(codes(responses.slice(0, -1))).toEqual({ OK: 8 });
    expect(await ledger(coupon.id)).toMatchObject({ issuedCount: 10, distinct: 10 });
  });
});

describe("a fresh object after a restart", () => {
  it("re-derives from D1 after eviction and never exceeds the total", async () => {
    const coupon = await makeCoupon({ totalQuantity: 50 });
    const users = (await makeUsers(80)).map((u) => u.id);
    expect(codes(await issueAll(coupon.id, users.slice(0, 30)))).toEqual({ OK: 30 });

    await evictDurableObject(gate(coupon.id));

    const responses = await issueAll(coupon.id, users);
    expect(codes(responses)).toEqual({ OK: 20, COUPON_ALREADY_ISSUED: 30, COUPON_SOLD_OUT: 30 });
    const d1 = await ledger(coupon.id);
    expect(d1).toMatchObject({ issuedCount: 50, distinct: 50 });
    expect(d1.rows).toHaveLength(50);
  });

  it("ignores stale local state after an abort: D1 alone says who holds the coupon", async () => {
    const coupon = await makeCoupon({ totalQuantity: 5 });
    const users = (await makeUsers(8)).map((u) => u.id);
    const [phantom, landed] = [users[2]!, users[3]!];
    expect(codes(await issueAll(coupon.id, users.slice(0, 2)))).toEqual({ OK: 2 });
    // The previous life admitted `phantom`, but its batch never landed; another batch of it, for `landed`,
    // landed after its storage last heard of it. So its storage says one thing and D1 another.
    await runInDurableObject(gate(coupon.id), (_instance, state) => {
      state.storage.sql.exec("INSERT INTO holders (user_id) VALUES (?)", phantom);
      state.storage.sql.exec("UPDATE coupon SET issued_count = issued_count + 1");
    });
    await landBehindTheObjectsBack(coupon.id, landed);

    await abortAllDurableObjects();

    expect((await issueAll(coupon.id, [phantom]))[0]!.status).toBe(200);
    const rest = await issueAll(coupon.id, users.filter((id) => id !== phantom));
    expect(codes(rest)).toEqual({ OK: 1, COUPON_ALREADY_ISSUED: 3, COUPON_SOLD_OUT: 3 });
    expect(rest[2]!.body.code).toBe("COUPON_ALREADY_ISSUED");
    const d1 = await ledger(coupon.id);
    expect(d1).toMatchObject({ issuedCount: 5, distinct: 5 });
    expect(d1.holders).toContain(phantom);
  });

  it("a row that lands after the object loaded is caught by D1 and the object adjusts", async () => {
    const coupon = await makeCoupon({ totalQuantity: 3 });
    const users = (await makeUsers(5)).map((u) => u.id);
    expect((await issueAll(coupon.id, [users[0]!]))[0]!.status).toBe(200);
    // Behind the loaded object's back: a late batch from a previous life gives users[1] a piece.
    await landBehindTheObjectsBack(coupon.id, users[1]!);

    // D1's UNIQUE refuses the duplicate; the object keeps users[1] as a holder.
    expect((await issueAll(coupon.id, [users[1]!]))[0]!.body.code).toBe("COUPON_ALREADY_ISSUED");
    expect((await issueAll(coupon.id, [users[1]!]))[0]!.body.code).toBe("COUPON_ALREADY_ISSUED");
    // One piece is left in D1, and the object's count agrees (it counted users[1] above).
    expect((await issueAll(coupon.id, [users[2]!]))[0]!.status).toBe(200);
    expect((await issueAll(coupon.id, [users[3]!]))[0]!.body.code).toBe("COUPON_SOLD_OUT");
    expect(await ledger(coupon.id)).toMatchObject({ issuedCount: 3, distinct: 3 });
  });
});
