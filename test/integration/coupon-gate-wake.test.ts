// A coupon gate wakes in O(pending): it trusts its own storage and asks D1 only about the admissions whose
// batch had no known outcome when its last life ended. Faults are injected by wrapping env.DB.batch, which
// the gate object shares with this test.
import { abortAllDurableObjects, evictDurableObject, runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it, vi } from "vitest";
import { STORAGE_VERSION } from "../../src/coupons/coupon-gate";
import {
  bulkUsers,
  codes,
  countRowsRead,
  gateHolds,
  gateOf,
  gateStorage,
  issueAll,
  landBehindTheObjectsBack,
  ledger,
  seedGate,
} from "../helpers/coupon-gate";
import { makeCoupon, makeUser } from "../helpers/factories";
import { d1Down, gate, inject } from "../helpers/faults";

const makeUsers = async (n: number) => (await Promise.all(Array.from({ length: n }, () => makeUser()))).map((u) => u.id);

/** Far below the holders: what reading `pending` and the coupon row costs, not what reading every holder does. */
const WAKE_ROWS_BOUND = 1_000;

/**
 * `n` users holding the coupon, written straight into D1 (users, user_coupons, issued_count) and into the
 * gate's storage as it persists them. Returns the holders' id range.
 */
async function seedHolders(couponId: number, n: number): Promise<[number, number]> {
  const now = new Date().toISOString();
  const ids = await bulkUsers(n);
  const [lo, hi] = [ids[0]!, ids.at(-1)!];
  expect([ids.length, hi - lo + 1]).toEqual([n, n]);
  await env.DB.batch([
    env.DB.prepare(
      `INSERT INTO user_coupons (coupon_id, user_id, status, issued_at, expires_at)
       SELECT ?, id, 'AVAILABLE', ?, ? FROM users WHERE id BETWEEN ? AND ?`,
    ).bind(couponId, now, "2099-01-01T00:00:00.000Z", lo, hi),
    env.DB.prepare("UPDATE coupons SET issued_count = ? WHERE id = ?").bind(n, couponId),
  ]);
  await seedGate(couponId, { issuedCount: n, range: [lo, hi] });
  return [lo, hi];
}

/** D1 and the gate's storage agree: the same count, one holder per row, nothing pending. */
async function expectAgreement(couponId: number, issued: number) {
  const d1 = await env.DB.prepare(
    `SELECT issued_count AS count,
            (SELECT count(*) FROM user_coupons WHERE coupon_id = ?1) AS rows,
            (SELECT count(DISTINCT user_id) FROM user_coupons WHERE coupon_id = ?1) AS users
     FROM coupons WHERE id = ?1`,
  )
    .bind(couponId)
    .first<{ count: number; rows: number; users: number }>();
  expect(d1).toEqual({ count: issued, rows: issued, users: issued });
  expect(await gateStorage(couponId)).toEqual({
    issuedCount: issued,
    holderCount: issued,
    pending: [],
    version: STORAGE_VERSION,
  });
}

describe("waking with many holders", () => {
  it("a gate with 100,000 holders answers its first issue after a restart reading a bounded number of D1 rows", async () => {
    const HOLDERS = 100_000;
    const coupon = await makeCoupon({ totalQuantity: HOLDERS + 10 });
    const [lo] = await seedHolders(coupon.id, HOLDERS);
    const newcomer = await makeUser();
    await evictDurableObject(gateOf(coupon.id));

    const counter = countRowsRead();
    let first;
    try {
      [first] = await issueAll(coupon.id, [newcomer.id]);
    } finally {
      counter.stop();
    }

    expect(first!.status).toBe(200);
    expect(counter.rowsRead()).toBeGreaterThan(0);
    expect(counter.rowsRead()).toBeLessThan(WAKE_ROWS_BOUND);
    // It trusted its storage: an existing holder is refused without D1.
    expect((await issueAll(coupon.id, [lo]))[0]!.body.code).toBe("COUPON_ALREADY_ISSUED");
    await expectAgreement(coupon.id, HOLDERS + 1);
  });

  it("storage from before the version marker is rebuilt from D1 once, then trusted", async () => {
    const coupon = await makeCoupon({ totalQuantity: 5 });
    const [holder, phantom, late, other] = await makeUsers(4);
    expect((await issueAll(coupon.id, [holder!]))[0]!.status).toBe(200);
    await emptyGate(coupon.id);
    // The old layout: holders and a count, no `pending`, no marker; it names a phantom D1 never had and
    // misses a row that landed later.
    await seedGate(coupon.id, { issuedCount: 2, holders: [holder!, phantom!], version: null });
    await landBehindTheObjectsBack(coupon.id, late!);
    await evictDurableObject(gateOf(coupon.id));

    expect((await issueAll(coupon.id, [phantom!]))[0]!.status).toBe(200);
    expect((await issueAll(coupon.id, [late!]))[0]!.body.code).toBe("COUPON_ALREADY_ISSUED");
    await expectAgreement(coupon.id, 3);
    // Only a rebuild from D1 can have learnt of `late`.
    const holders = [holder!, phantom!, late!].sort((a, b) => a - b);
    expect(await gateHolds(coupon.id, [...holders, other!])).toEqual(holders);
  });

  it("a count that disagrees with D1 on waking means a write behind its back: rebuilt from D1", async () => {
    const coupon = await makeCoupon({ totalQuantity: 3 });
    const [holder, fresh, late] = await makeUsers(3);
    expect((await issueAll(coupon.id, [holder!]))[0]!.status).toBe(200);
    // A late batch landed for `late` after the last reconciliation; the storage knows nothing of it.
    await landBehindTheObjectsBack(coupon.id, late!);
    await evictDurableObject(gateOf(coupon.id));

    expect((await issueAll(coupon.id, [late!]))[0]!.body.code).toBe("COUPON_ALREADY_ISSUED");
    expect((await issueAll(coupon.id, [fresh!]))[0]!.status).toBe(200);
    await expectAgreement(coupon.id, 3);
  });
});

describe("a group commit cut short by the object's death", () => {
  const HOLDERS = 10_000;

  /** A warm gate over `HOLDERS` seeded holders, with room for `room` more, and fresh users. */
  async function warmGate(room: number, users: number) {
    const coupon = await makeCoupon({ totalQuantity: HOLDERS + room });
    await seedHolders(coupon.id, HOLDERS);
    const ids = await makeUsers(users);
    expect((await issueAll(coupon.id, [ids[0]!]))[0]!.status).toBe(200);
    return { couponId: coupon.id, users: ids };
  }

  /**
   * Sends `stalled` while D1's batch is held by `batch`, waits until all of them are admitted (pending in
   * storage), then aborts every object: the callers get 503.
   */
  async function dieMidCommit(
    couponId: number,
    stalled: number[],
    batch: (original: D1Database["batch"], statements: D1PreparedStatement[]) => Promise<D1Result[]>,
  ) {
    const restore = inject(env.DB, "batch", (original) =>
      ((statements: D1PreparedStatement[]) => batch(original, statements)) as typeof original,
    );
    try {
      const answers = issueAll(couponId, stalled);
      const admitted = [...stalled].sort((a, b) => a - b);
      await vi.waitFor(async () => expect((await gateStorage(couponId)).pending).toEqual(admitted), { timeout: 5_000 });
      await abortAllDurableObjects();
      expect(codes(await answers)).toEqual({ SERVICE_UNAVAILABLE: stalled.length });
    } finally {
      restore();
    }
  }

  it("a batch that never landed: on the next life the stalled users are not holders, and can issue again", async () => {
    const { couponId, users } = await warmGate(4, 5);
    const [, a, b, c, d] = users;
    const release = gate();
    await dieMidCommit(couponId, [a!, b!], async () => {
      await release.opened;
      throw d1Down();
    });

    // D1 is down when the new life wakes: it answers 503 and admits no one, and the admissions stay pending.
    const restoreDown = inject(env.DB, "batch", (original) =>
      (async () => {
        throw d1Down();
      }) as unknown as typeof original,
    );
    try {
      expect((await issueAll(couponId, [c!]))[0]!.body.code).toBe("SERVICE_UNAVAILABLE");
    } finally {
      restoreDown();
    }
    expect((await gateStorage(couponId)).pending).toEqual([a!, b!].sort((x, y) => x - y));

    const counter = countRowsRead();
    try {
      expect((await issueAll(couponId, [c!]))[0]!.status).toBe(200);
    } finally {
      counter.stop();
    }
    expect(counter.rowsRead()).toBeLessThan(WAKE_ROWS_BOUND);
    expect(await gateHolds(couponId, [a!, b!])).toEqual([]);
    await expectAgreement(couponId, HOLDERS + 2);

    // The dead life's batch finally fails: nothing of it reaches the new life.
    release.open();
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(codes(await issueAll(couponId, [a!, b!]))).toEqual({ OK: 2 });
    expect((await issueAll(couponId, [d!]))[0]!.body.code).toBe("COUPON_SOLD_OUT");
    await expectAgreement(couponId, HOLDERS + 4);
    const d1 = await ledger(couponId);
    expect(d1.holders.filter((id) => [a, b, d].includes(id))).toHaveLength(2);
  });

  it("a batch that landed before the death: its users are holders, counted once, never issued twice", async () => {
    const { couponId, users } = await warmGate(4, 5);
    const [, a, b, c, d] = users;
    const reply = gate();
    // The first group (a) reaches D1 and commits; its reply never comes back. b waits for the next group.
    await dieMidCommit(couponId, [a!, b!], async (original, statements) => {
      const results = await original(statements);
      await reply.opened;
      return results;
    });

    const counter = countRowsRead();
    try {
      expect(codes(await issueAll(couponId, [a!, b!]))).toEqual({ COUPON_ALREADY_ISSUED: 1, OK: 1 });
    } finally {
      counter.stop();
    }
    expect(counter.rowsRead()).toBeLessThan(WAKE_ROWS_BOUND);
    await expectAgreement(couponId, HOLDERS + 3);

    reply.open();
    await new Promise((resolve) => setTimeout(resolve, 50));
    const last = codes(await issueAll(couponId, [a!, b!, c!, d!]));
    expect(last).toEqual({ COUPON_ALREADY_ISSUED: 2, OK: 1, COUPON_SOLD_OUT: 1 });
    await expectAgreement(couponId, HOLDERS + 4);
    const d1 = await ledger(couponId);
    expect(d1.holders.filter((id) => id === a)).toHaveLength(1);
  });
});

describe("a batch whose outcome is unknown while the object lives", () => {
  it("its callers get 503 but stay holders until D1 is asked: committed rows are kept, the count never trails D1", async () => {
    const coupon = await makeCoupon({ totalQuantity: 3 });
    const [first, lost, next, last] = await makeUsers(4);
    expect((await issueAll(coupon.id, [first!]))[0]!.status).toBe(200);

    // The batch commits in D1, then its reply is lost.
    const restore = inject(env.DB, "batch", (original) =>
      (async (statements: D1PreparedStatement[]) => {
        await original(statements);
        throw d1Down();
      }) as typeof original,
    );
    try {
      expect((await issueAll(coupon.id, [lost!]))[0]!.body.code).toBe("SERVICE_UNAVAILABLE");
    } finally {
      restore();
    }
    // The object did not undo what D1 may have: it still counts `lost`, as D1 does.
    expect(await gateStorage(coupon.id)).toMatchObject({ issuedCount: 2, holderCount: 2, pending: [lost] });
    expect((await ledger(coupon.id)).issuedCount).toBe(2);

    // The next request asks D1 first: `lost` has the coupon, so a retry is refused and one piece is left.
    expect((await issueAll(coupon.id, [lost!]))[0]!.body.code).toBe("COUPON_ALREADY_ISSUED");
    expect(codes(await issueAll(coupon.id, [next!]))).toEqual({ OK: 1 });
    expect((await issueAll(coupon.id, [last!]))[0]!.body.code).toBe("COUPON_SOLD_OUT");
    await expectAgreement(coupon.id, 3);
  });
});

/** Empties the gate's storage, as an object that never ran this layout would have it. */
async function emptyGate(couponId: number): Promise<void> {
  await runInDurableObject(gateOf(couponId), (_instance, state) => {
    for (const table of ["coupon", "holders", "pending", "meta"]) state.storage.sql.exec(`DELETE FROM ${table}`);
  });
}
