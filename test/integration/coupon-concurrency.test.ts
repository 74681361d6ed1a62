import { abortAllDurableObjects, evictDurableObject, runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import {
  codes,
  gateHolds,
  gateOf as gate,
  gateStorage,
  issueAll,
  landBehindTheObjectsBack,
  ledger,
  mixedIssueStorm,
} from "../helpers/coupon-gate";
import { makeCoupon, makeUser } from "../helpers/factories";
import { d1Down, inject } from "../helpers/faults";

const makeUsers = (n: number) => Promise.all(Array.from({ length: n }, () => makeUser()));

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
    const d1 = await mixedIssueStorm(coupon.id, users, 20, missing);
    expect(d1.holders.every((id) => users.includes(id))).toBe(true);

    // A missing user holds a piece only until its batch comes back, so a second wave takes exactly the rest.
    await issueAll(coupon.id, users);
    const final = await ledger(coupon.id);
    expect(final).toMatchObject({ issuedCount: 40, distinct: 40 });
    expect(final.rows).toHaveLength(40);
  });
});

describe("a D1 failure during a group commit", () => {
  it("a batch D1 refuses after its inserts ran fails its callers, undoes their admissions, and the object agrees with D1", async () => {
    const coupon = await makeCoupon({ totalQuantity: 3 });
    const [victim, ...others] = await makeUsers(4);
    // Warm the object (a missing user takes no piece), so the poisoned batch is a group commit, not its first read.
    expect((await issueAll(coupon.id, [900_000_009]))[0]!.body.code).toBe("USER_NOT_FOUND");

    // A statement D1 rejects (a CHECK) after the group's inserts, so D1 rolls them back.
    const restore = inject(env.DB, "batch", (batch) =>
      ((statements: D1PreparedStatement[]) =>
        batch([...statements, env.DB.prepare("UPDATE coupons SET valid_days = 0 WHERE id = ?").bind(coupon.id)])) as typeof batch,
    );
    let failed;
    try {
      [failed] = await issueAll(coupon.id, [victim!.id]);
    } finally {
      restore();
    }
    expect(failed!.status).toBe(503);
    expect(failed!.body.code).toBe("SERVICE_UNAVAILABLE");
    expect(await ledger(coupon.id)).toMatchObject({ issuedCount: 0, rows: [] });
    // A refusal is a known outcome: undone at once, nothing left pending.
    expect(await gateStorage(coupon.id)).toMatchObject({ issuedCount: 0, holderCount: 0, pending: [] });

    // The failed user was not left holding it, and the piece went back: all 3 can still go, and no more.
    const again = await issueAll(coupon.id, [victim!.id]);
    expect(again[0]!.status).toBe(200);
    expect(codes(await issueAll(coupon.id, others.map((u) => u.id)))).toEqual({ OK: 2, COUPON_SOLD_OUT: 1 });
    const d1 = await ledger(coupon.id);
    expect(d1).toMatchObject({ issuedCount: 3, distinct: 3 });
    expect(d1.rows).toHaveLength(3);
    expect(await gateStorage(coupon.id)).toMatchObject({ issuedCount: 3, holderCount: 3, pending: [] });
  });

  it("under load, D1 down for one batch: every caller who got an error is absent from D1, every winner present, and the rest still issue", async () => {
    const coupon = await makeCoupon({ totalQuantity: 30 });
    const users = (await makeUsers(40)).map((u) => u.id);
    // Warm the object so the storm meets group commits rather than the first load.
    expect((await issueAll(coupon.id, [users[0]!]))[0]!.status).toBe(200);

    let calls = 0;
    const restore = inject(env.DB, "batch", (batch) =>
      (async (statements: D1PreparedStatement[]) => {
        if (++calls === 1) throw d1Down();
        return batch(statements);
      }) as typeof batch,
    );
    let responses;
    try {
      responses = await issueAll(coupon.id, users.slice(1, 21));
    } finally {
      restore();
    }
    const failed = users.slice(1, 21).filter((_, i) => responses[i]!.status === 503);
    expect(failed.length).toBeGreaterThan(0);

    const d1 = await ledger(coupon.id);
    responses.forEach((r, i) => {
      const userId = users[i + 1]!;
      if (r.status === 200) expect(d1.holders).toContain(userId);
      else expect(d1.holders).not.toContain(userId);
    });
    expect(d1.issuedCount).toBe(d1.rows.length);
    // The outcome was unknown to the object: those callers stay pending (counted) until a later request
    // asks D1, which may already have happened within the storm.
    const object = await gateStorage(coupon.id);
    expect(object.pending.every((id) => failed.includes(id))).toBe(true);
    expect(object.issuedCount).toBe(d1.issuedCount + object.pending.length);

    // Everyone else, including those who failed, races for what is left: exactly 30 in the end.
    const rest = await issueAll(coupon.id, users.slice(1));
    expect(rest.every((r) => r.status === 200 || ["COUPON_ALREADY_ISSUED", "COUPON_SOLD_OUT"].includes(r.body.code))).toBe(true);
    const final = await ledger(coupon.id);
    expect(final).toMatchObject({ issuedCount: 30, distinct: 30 });
    expect(final.rows).toHaveLength(30);
    expect(await gateStorage(coupon.id)).toMatchObject({ issuedCount: 30, holderCount: 30, pending: [] });
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
    expect(await gateStorage(coupon.id)).toMatchObject({ issuedCount: 10, holderCount: 10, pending: [] });
  });
});

describe("a fresh object after a restart", () => {
  it("wakes from its own storage after eviction and never exceeds the total", async () => {
    const coupon = await makeCoupon({ totalQuantity: 50 });
    const users = (await makeUsers(80)).map((u) => u.id);
    expect(codes(await issueAll(coupon.id, users.slice(0, 30)))).toEqual({ OK: 30 });

    await evictDurableObject(gate(coupon.id));

    const responses = await issueAll(coupon.id, users);
    expect(codes(responses)).toEqual({ OK: 20, COUPON_ALREADY_ISSUED: 30, COUPON_SOLD_OUT: 30 });
    const d1 = await ledger(coupon.id);
    expect(d1).toMatchObject({ issuedCount: 50, distinct: 50 });
    expect(d1.rows).toHaveLength(50);
    expect(await gateStorage(coupon.id)).toMatchObject({ issuedCount: 50, holderCount: 50, pending: [] });
  });

  it("after an abort, asks D1 about the admissions left pending: committed stay, the rest are undone", async () => {
    const coupon = await makeCoupon({ totalQuantity: 5 });
    const users = (await makeUsers(8)).map((u) => u.id);
    const [phantom, landed] = [users[2]!, users[3]!];
    expect(codes(await issueAll(coupon.id, users.slice(0, 2)))).toEqual({ OK: 2 });
    // The previous life admitted `phantom` and `landed` and died before hearing from D1: the batch for
    // `landed` committed, the one for `phantom` never did.
    await runInDurableObject(gate(coupon.id), (_instance, state) => {
      for (const userId of [phantom, landed]) {
        state.storage.sql.exec("INSERT INTO holders (user_id) VALUES (?)", userId);
        state.storage.sql.exec("INSERT INTO pending (user_id) VALUES (?)", userId);
        state.storage.sql.exec("UPDATE coupon SET issued_count = issued_count + 1");
      }
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
    expect(await gateStorage(coupon.id)).toMatchObject({ issuedCount: 5, holderCount: 5, pending: [] });
    expect(await gateHolds(coupon.id, [phantom, landed])).toEqual([phantom, landed].sort((a, b) => a - b));
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
    expect(await gateStorage(coupon.id)).toMatchObject({ issuedCount: 3, pending: [] });
  });
});
