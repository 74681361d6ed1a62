// A coupon spread over several gate objects: storms with skewed routing, exact totals in D1 and in the
// objects, quota transfers interrupted at each step, and restarts mid-storm.
import {
  abortAllDurableObjects,
  createExecutionContext,
  createScheduledController,
  evictDurableObject,
  runDurableObjectAlarm,
} from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it, vi } from "vitest";
import type { GiveRequest, IssueRequest } from "../../src/coupons/coupon-gate";
import { issueStatements, recountDriftedShards } from "../../src/coupons/issue-ledger";
import { shardOf, shardOfSql } from "../../src/coupons/shards";
import { handleScheduled } from "../../src/scheduled";
import { adminToken, call } from "../helpers/api";
import {
  bulkUsers,
  codes,
  countRowsRead,
  gateHolds,
  issueAll,
  ledger,
  mixedIssueStorm,
  makeShardedCoupon,
  shardGateOf,
  shardsOverview,
  skewedUsers,
} from "../helpers/coupon-gate";
import { d1Down, gate, inject } from "../helpers/faults";
import { captureLogLines, linesWith } from "../helpers/logs";

/** D1's count of each shard's issues (coupon_shard_counts), shard by shard; 0 for a shard without a row. */
async function shardCountsInD1(couponId: number, shards: number): Promise<number[]> {
  const { results } = await env.DB.prepare("SELECT shard, issued_count FROM coupon_shard_counts WHERE coupon_id = ?")
    .bind(couponId)
    .all<{ shard: number; issued_count: number }>();
  return Array.from({ length: shards }, (_, shard) => results.find((r) => r.shard === shard)?.issued_count ?? 0);
}

/**
 * D1 holds exactly `issued` pieces, one per holder, counted per shard as its users' rows; the objects agree,
 * each shard with its own count in D1: nothing pending, in transit or created.
 */
async function expectExact(couponId: number, shards: number, total: number, issued: number) {
  const d1 = await ledger(couponId);
  expect(d1).toMatchObject({ issuedCount: issued, distinct: issued });
  expect(d1.rows).toHaveLength(issued);
  const perShard = await shardCountsInD1(couponId, shards);
  expect(perShard).toEqual(Array.from({ length: shards }, (_, shard) => d1.holders.filter((id) => shardOf(id, shards) === shard).length));
  const objects = await shardsOverview(couponId, shards);
  expect(objects).toMatchObject({ quota: total, inTransit: 0, openIntents: 0, issued, holders: issued, pending: 0 });
  expect(objects.each.map((s) => s.issuedCount)).toEqual(perShard);
  for (const s of objects.each) expect(s.issuedCount).toBeLessThanOrEqual(s.quota ?? 0);
  return { d1, objects };
}

/** The winners are exactly D1's holders, each answered with their own row. */
function expectWinnersAreHolders(responses: Awaited<ReturnType<typeof issueAll>>, d1: Awaited<ReturnType<typeof ledger>>) {
  const winners = responses.filter((r) => r.status === 200);
  expect(new Set(winners.map((r) => r.body.userId))).toEqual(new Set(d1.holders));
  expect(new Set(winners.map((r) => r.body.id))).toEqual(new Set(d1.rows.map((r) => r.id)));
}

describe("routing and exactness across shards", () => {
  it("30 users for 30 pieces over 8 shards all get one, however they are routed", async () => {
    const coupon = await makeShardedCoupon(8, 30);
    const users = await skewedUsers(8, 3, 20, 10);

    const responses = await issueAll(coupon.id, users);

    expect(codes(responses)).toEqual({ OK: 30 });
    const { d1, objects } = await expectExact(coupon.id, 8, 30, 30);
    expectWinnersAreHolders(responses, d1);
    // Shard 3 started with 4 pieces and served 20 users: the rest came from its siblings.
    expect(objects.each[3]!.holderCount).toBe(20);
    expect(objects.transfers).toBeGreaterThan(0);
  });

  it("a skewed storm over 8 shards: exactly the total issued, nobody twice, the rest sold out", async () => {
    const coupon = await makeShardedCoupon(8, 100);
    const users = await skewedUsers(8, 0, 200, 100);

    const responses = await issueAll(coupon.id, users);

    expect(codes(responses)).toEqual({ OK: 100, COUPON_SOLD_OUT: 200 });
    const { d1 } = await expectExact(coupon.id, 8, 100, 100);
    expectWinnersAreHolders(responses, d1);
    const read = await call("GET", `/api/admin/coupons/${coupon.id}`, { token: await adminToken() });
    expect(read.body).toMatchObject({ issuedCount: 100, totalQuantity: 100, shards: 8 });
  });

  it("64 shards, demand equal to supply, half of it on one shard: no undersell", async () => {
    const coupon = await makeShardedCoupon(64, 200);
    const users = await skewedUsers(64, 17, 100, 100);

    const responses = await issueAll(coupon.id, users);

    expect(codes(responses)).toEqual({ OK: 200 });
    const { d1 } = await expectExact(coupon.id, 64, 200, 200);
    expectWinnersAreHolders(responses, d1);
    const late = await bulkUsers(20);
    expect(codes(await issueAll(coupon.id, late))).toEqual({ COUPON_SOLD_OUT: 20 });
    await expectExact(coupon.id, 64, 200, 200);
  }, 90_000);

  it("one user firing 20 parallel requests at a dry shard gets it exactly once", async () => {
    const coupon = await makeShardedCoupon(8, 8);
    const [first, ...rest] = await skewedUsers(8, 5, 2, 0);
    // Shard 5 spends its one piece, so the repeats of the next user are parked for quota.
    expect(codes(await issueAll(coupon.id, [first!]))).toEqual({ OK: 1 });

    const responses = await issueAll(coupon.id, Array(20).fill(rest[0]));

    expect(codes(responses)).toEqual({ OK: 1, COUPON_ALREADY_ISSUED: 19 });
    await expectExact(coupon.id, 8, 8, 2);
  });

  it("a mixed storm (repeats, missing users) over 16 shards keeps issued_count == rows <= total, and the rest is issued later", async () => {
    const coupon = await makeShardedCoupon(16, 40);
    const users = await skewedUsers(16, 9, 30, 30);
    const missing = [900_000_101, 900_000_102, 900_000_103, 900_000_104];
    await mixedIssueStorm(coupon.id, users, 20, missing);
    // Pieces held by missing users came back when their batches did: a later wave takes exactly the rest.
    await new Promise((resolve) => setTimeout(resolve, 1_100));
    await issueAll(coupon.id, users);
    await expectExact(coupon.id, 16, 40, 40);

    // Every shard's next life finds its count equal to its own in D1: none rebuilds (O(holders)).
    for (let shard = 0; shard < 16; shard++) await evictDurableObject(shardGateOf(coupon.id, shard));
    const lines = captureLogLines();
    try {
      await new Promise((resolve) => setTimeout(resolve, 1_100));
      const again = await issueAll(coupon.id, users);
      expect(new Set(again.map((r) => r.body.code))).toEqual(new Set(["COUPON_ALREADY_ISSUED", "COUPON_SOLD_OUT"]));
      expect(linesWith(lines, "coupon gate disagrees with D1; rebuilding from it")).toEqual([]);
    } finally {
      vi.restoreAllMocks();
    }
    await expectExact(coupon.id, 16, 40, 40);
  });
});

describe("the sold-out mark", () => {
  it("once every shard is dry, refusals are answered without a gate call, for about a second", async () => {
    const coupon = await makeShardedCoupon(4, 4);
    const users = await bulkUsers(12);
    expect(codes(await issueAll(coupon.id, users.slice(0, 8)))).toEqual({ OK: 4, COUPON_SOLD_OUT: 4 });

    let gateCalls = 0;
    const restore = inject(env.COUPON_GATE, "getByName", (getByName) =>
      ((name: string) => {
        gateCalls++;
        return getByName(name);
      }) as typeof getByName,
    );
    try {
      expect(codes(await issueAll(coupon.id, users.slice(8)))).toEqual({ COUPON_SOLD_OUT: 4 });
      expect(gateCalls).toBe(0);
      await new Promise((resolve) => setTimeout(resolve, 1_100));
      expect(codes(await issueAll(coupon.id, [users[8]!]))).toEqual({ COUPON_SOLD_OUT: 1 });
      expect(gateCalls).toBeGreaterThan(0);
    } finally {
      restore();
    }
  });
});

/** Replaces the siblings' `give` as the taker sees it, for the transfers of one coupon. */
function faultyGive(couponId: number, give: (original: (r: GiveRequest) => Promise<number>, request: GiveRequest) => Promise<number>) {
  return inject(env.COUPON_GATE, "getByName", (getByName) =>
    ((name: string) => {
      const stub = getByName(name);
      if (!name.startsWith(`${couponId}`)) return stub;
      // The calls the Worker and the shards make, with `give` replaced.
      return {
        issue: (request: IssueRequest) => stub.issue(request),
        give: (request: GiveRequest) => give((r) => stub.give(r), request),
        shardState: (couponId: number, shard: number) => stub.shardState(couponId, shard),
      } as unknown as typeof stub;
    }) as typeof getByName,
  );
}

describe("a quota transfer interrupted at each step loses no piece and creates none", () => {
  /** 4 shards of 2 pieces each; `hot` users of shard 0, so shard 0 must take from its siblings. */
  async function dryShard(hot: number) {
    const coupon = await makeShardedCoupon(4, 8);
    const users = await skewedUsers(4, 0, hot, 0);
    expect(codes(await issueAll(coupon.id, users.slice(0, 2)))).toEqual({ OK: 2 });
    return { couponId: coupon.id, users };
  }

  /** Settles what the taker left open (its alarm), then checks every piece is somewhere exactly once. */
  async function settleAndCheck(couponId: number, issued: number) {
    await runDurableObjectAlarm(shardGateOf(couponId, 0));
    return expectExact(couponId, 4, 8, issued);
  }

  it("the ask never reaches the giver: the taker's callers get 503, and the transfer settles as nothing", async () => {
    const { couponId, users } = await dryShard(10);
    const restore = faultyGive(couponId, async (_give, request) => {
      if (request.need > 0) throw new Error("Network connection lost (injected)");
      return _give(request);
    });
    try {
      expect(codes(await issueAll(couponId, [users[2]!]))).toEqual({ SERVICE_UNAVAILABLE: 1 });
    } finally {
      restore();
    }
    expect((await shardsOverview(couponId, 4)).openIntents).toBeGreaterThan(0);
    const { objects } = await settleAndCheck(couponId, 2);
    expect(objects.transfers).toBe(0);
    expect(codes(await issueAll(couponId, users.slice(2)))).toEqual({ OK: 6, COUPON_SOLD_OUT: 2 });
    await expectExact(couponId, 4, 8, 8);
  });

  it("the giver commits and its answer is lost: the pieces are in transit, then credited once", async () => {
    const { couponId, users } = await dryShard(10);
    const restore = faultyGive(couponId, async (give, request) => {
      const pieces = await give(request);
      if (request.need > 0) throw new Error("Network connection lost (injected)");
      return pieces;
    });
    try {
      expect(codes(await issueAll(couponId, [users[2]!]))).toEqual({ SERVICE_UNAVAILABLE: 1 });
    } finally {
      restore();
    }
    const midway = await shardsOverview(couponId, 4);
    expect(midway.inTransit).toBeGreaterThan(0);
    expect(midway.quota + midway.inTransit).toBe(8);
    await settleAndCheck(couponId, 2);
    expect(codes(await issueAll(couponId, users.slice(2)))).toEqual({ OK: 6, COUPON_SOLD_OUT: 2 });
    await expectExact(couponId, 4, 8, 8);
  });

  it("the same ask delivered twice gives once", async () => {
    const { couponId, users } = await dryShard(3);
    const restore = faultyGive(couponId, async (give, request) => {
      await give(request);
      return give(request);
    });
    try {
      expect(codes(await issueAll(couponId, [users[2]!]))).toEqual({ OK: 1 });
    } finally {
      restore();
    }
    const { objects } = await settleAndCheck(couponId, 3);
    expect(objects.transfers).toBe(1);
  });

  it("the taker dies with the giver's answer on its way: its next life credits the pieces once", async () => {
    const { couponId, users } = await dryShard(10);
    const reply = gate();
    let asked = 0;
    const restore = faultyGive(couponId, async (give, request) => {
      const pieces = await give(request);
      if (request.need > 0 && ++asked === 1) await reply.opened;
      return pieces;
    });
    try {
      const answers = issueAll(couponId, [users[2]!]);
      await expect.poll(() => asked, { timeout: 5_000 }).toBe(1);
      await abortAllDurableObjects();
      reply.open();
      expect(codes(await answers)).toEqual({ SERVICE_UNAVAILABLE: 1 });
    } finally {
      restore();
    }
    const midway = await shardsOverview(couponId, 4);
    expect(midway.quota + midway.inTransit).toBe(8);
    await settleAndCheck(couponId, 2);
    expect(codes(await issueAll(couponId, users.slice(2)))).toEqual({ OK: 6, COUPON_SOLD_OUT: 2 });
    await expectExact(couponId, 4, 8, 8);
  });

  it("a giver whose storage cannot reach D1 refuses to give, and nothing moves", async () => {
    const { couponId, users } = await dryShard(4);
    // Siblings 1..3 have never run: they must read D1 to give, and D1 is down.
    const restore = inject(env.DB, "batch", (original) =>
      (async () => {
        throw d1Down();
      }) as unknown as typeof original,
    );
    try {
      expect(codes(await issueAll(couponId, [users[2]!]))).toEqual({ SERVICE_UNAVAILABLE: 1 });
    } finally {
      restore();
    }
    await settleAndCheck(couponId, 2);
    expect(codes(await issueAll(couponId, users.slice(2)))).toEqual({ OK: 2 });
    await expectExact(couponId, 4, 8, 4);
  });
});

describe("D1's count of each shard", () => {
  it("a batch that lands after its shard reconciled it away: the shard's next life sees D1 count more and rebuilds", async () => {
    const coupon = await makeShardedCoupon(4, 8);
    const pool = await bulkUsers(120);
    const on = (shard: number) => pool.filter((id) => shardOf(id, 4) === shard);
    const late = on(1)[0]!;
    expect(codes(await issueAll(coupon.id, [0, 1, 2, 3].map((shard) => on(shard)[1]!)))).toEqual({ OK: 4 });
    // An earlier life's batch for `late` lands now: D1 has the row and both counts, shard 1's storage has
    // nothing (its reconciliation found no row and undid the admission).
    const issuedAt = new Date().toISOString();
    await env.DB.batch(issueStatements(env.DB, coupon.id, [{ userId: late, issuedAt, expiresAt: "2099-01-01T00:00:00.000Z" }], 1));
    await evictDurableObject(shardGateOf(coupon.id, 1));

    // Shard 1's next life: 2 holders of its quota of 2 (no phantom free piece), so its newcomer is served
    // from a sibling's; the coupon then holds exactly the total, and the objects count what D1 counts.
    const rest = [on(1)[2]!, on(2)[2]!, on(3)[2]!];
    expect(codes(await issueAll(coupon.id, rest))).toEqual({ OK: 3 });
    await expectExact(coupon.id, 4, 8, 8);
    expect(await gateHolds(coupon.id, [late], 1)).toEqual([late]);
    expect((await issueAll(coupon.id, [late]))[0]!.body.code).toBe("COUPON_ALREADY_ISSUED");
  });

  it("a shard's count in D1 that drifted (code from before 0008 still running) is set from its rows by the rebuild", async () => {
    const coupon = await makeShardedCoupon(4, 40);
    const pool = await bulkUsers(120);
    const on = (shard: number) => pool.filter((id) => shardOf(id, 4) === shard);
    expect(codes(await issueAll(coupon.id, [...on(2).slice(0, 5), on(0)[0]!]))).toEqual({ OK: 6 });
    // An old Worker's batch wrote a row and bumped the coupon, not the shard's count.
    await env.DB.prepare("UPDATE coupon_shard_counts SET issued_count = issued_count - 1 WHERE coupon_id = ? AND shard = 2")
      .bind(coupon.id)
      .run();
    await evictDurableObject(shardGateOf(coupon.id, 2));

    expect(codes(await issueAll(coupon.id, [on(2)[5]!]))).toEqual({ OK: 1 });
    await expectExact(coupon.id, 4, 40, 7);
  });

  it("the minute cron recounts the drifted shard counts of a coupon no request reaches, and nothing else", async () => {
    const coupon = await makeShardedCoupon(4, 40);
    const pool = await bulkUsers(120);
    expect(codes(await issueAll(coupon.id, pool.slice(0, 10)))).toEqual({ OK: 10 });
    const shard = shardOf(pool[0]!, 4);
    await env.DB.prepare("UPDATE coupon_shard_counts SET issued_count = issued_count - 1 WHERE coupon_id = ? AND shard = ?")
      .bind(coupon.id, shard)
      .run();

    const controller = createScheduledController({ scheduledTime: new Date(), cron: "* * * * *" });
    await handleScheduled(controller, env, createExecutionContext());

    await expectExact(coupon.id, 4, 40, 10);
    expect(await recountDriftedShards(env.DB)).toBe(0);
  });

  it("shardOfSql computes shardOf in D1, at the edges of 32-bit and safe integers", async () => {
    const ids = [1, 2, 3, 65_535, 65_536, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 7, 2 ** 53 - 1];
    for (let i = 0; i < 200; i++) ids.push(1 + Math.floor(Math.random() * (2 ** 53 - 2)));
    for (const shards of [2, 3, 16, 64]) {
      const { results } = await env.DB.prepare(`SELECT value AS id, ${shardOfSql("value", "?")} AS shard FROM json_each(?)`)
        .bind(shards, JSON.stringify(ids))
        .all<{ id: number; shard: number }>();
      expect(results.map((r) => r.shard)).toEqual(results.map((r) => shardOf(r.id, shards)));
      expect(results.map((r) => r.id)).toEqual(ids);
    }
  });

  it("migration 0008's backfill gives every shard the count its own batches keep", async () => {
    const coupon = await makeShardedCoupon(16, 300);
    const users = await bulkUsers(400);
    expect(codes(await issueAll(coupon.id, users.slice(0, 250)))).toEqual({ OK: 250 });
    const migration = env.TEST_MIGRATIONS.find((m) => m.name.startsWith("0008_"))!;
    const backfill = migration.queries.find((q) => q.includes("INSERT INTO `coupon_shard_counts`"))!;
    const select = /SELECT[\s\S]*GROUP BY 1, 2/.exec(backfill)![0];
    const { results } = await env.DB.prepare(
      `WITH backfill (coupon_id, shard, issued_count) AS (${select})
       SELECT shard, issued_count FROM backfill WHERE coupon_id = ? ORDER BY shard`,
    )
      .bind(coupon.id)
      .all<{ shard: number; issued_count: number }>();
    const kept = await shardCountsInD1(coupon.id, 16);
    expect(kept.reduce((n, c) => n + c, 0)).toBe(250);
    expect(Array.from({ length: 16 }, (_, shard) => results.find((r) => r.shard === shard)?.issued_count ?? 0)).toEqual(kept);
  });
});

describe("restarts", () => {
  it("objects aborted mid-storm: D1 stays exact, and a second wave issues exactly the rest", async () => {
    const coupon = await makeShardedCoupon(8, 120);
    const users = await skewedUsers(8, 2, 150, 150);

    const storm = issueAll(coupon.id, users);
    await new Promise((resolve) => setTimeout(resolve, 150));
    await abortAllDurableObjects();
    const first = await storm;
    const answered = codes(first);
    expect(Object.keys(answered).every((k) => ["OK", "COUPON_SOLD_OUT", "SERVICE_UNAVAILABLE"].includes(k))).toBe(true);
    const mid = await ledger(coupon.id);
    expect(mid.issuedCount).toBe(mid.rows.length);
    expect(mid.distinct).toBe(mid.rows.length);
    for (const r of first) if (r.status === 200) expect(mid.holders).toContain(r.body.userId);

    // Settle what the dead lives left in transit, then everyone races again.
    for (let shard = 0; shard < 8; shard++) await runDurableObjectAlarm(shardGateOf(coupon.id, shard));
    await new Promise((resolve) => setTimeout(resolve, 1_100));
    const second = await issueAll(coupon.id, users);
    expect(second.every((r) => r.status === 200 || ["COUPON_ALREADY_ISSUED", "COUPON_SOLD_OUT"].includes(r.body.code))).toBe(true);
    await expectExact(coupon.id, 8, 120, 120);
  });

  it("a shard wakes in O(pending): after eviction its first issue reads a bounded number of D1 rows", async () => {
    const coupon = await makeShardedCoupon(4, 2_000);
    const users = await bulkUsers(1_500);
    const first = await issueAll(coupon.id, users.slice(0, 1_200));
    expect(codes(first)).toEqual({ OK: 1_200 });
    for (let shard = 0; shard < 4; shard++) await evictDurableObject(shardGateOf(coupon.id, shard));

    const newcomer = users[1_200]!;
    const counter = countRowsRead();
    try {
      expect(codes(await issueAll(coupon.id, [newcomer]))).toEqual({ OK: 1 });
    } finally {
      counter.stop();
    }
    expect(counter.rowsRead()).toBeLessThan(100);
    const holder = users.find((id) => shardOf(id, 4) === shardOf(newcomer, 4))!;
    expect((await issueAll(coupon.id, [holder]))[0]!.body.code).toBe("COUPON_ALREADY_ISSUED");
    await expectExact(coupon.id, 4, 2_000, 1_201);
  });
});
