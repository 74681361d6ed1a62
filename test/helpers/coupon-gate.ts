// What the coupon tests look at: the answers of a storm, D1's ledger of a coupon, the gate object's own
// storage, and how many rows the gate's D1 batches read.
import { runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { expect } from "vitest";
import { STORAGE_VERSION } from "../../src/coupons/coupon-gate";
import type { CouponTerms } from "../../src/coupons/issue-ledger";
import { gateName, initialQuota, shardOf } from "../../src/coupons/shards";
import { adminToken, call, tokenFor, type ApiResponse } from "./api";
import { inject } from "./faults";

export const gateOf = (couponId: number) => env.COUPON_GATE.getByName(String(couponId));

/** One issue request per user id, all in parallel. */
export async function issueAll(couponId: number, userIds: number[]): Promise<ApiResponse[]> {
  const tokens = await Promise.all(userIds.map((id) => tokenFor(id)));
  return Promise.all(tokens.map((token) => call("POST", `/api/coupons/${couponId}/issue`, { token, body: {} })));
}

/** How many answers of each kind: "OK" for a 200, else the problem code. */
export const codes = (responses: ApiResponse[]) =>
  responses.reduce<Record<string, number>>((tally, r) => {
    const key = r.status === 200 ? "OK" : r.body.code;
    tally[key] = (tally[key] ?? 0) + 1;
    return tally;
  }, {});

/** D1's view of a coupon: its count, its rows, and how many distinct users those rows name. */
export async function ledger(couponId: number) {
  const coupon = await env.DB.prepare("SELECT issued_count, total_quantity FROM coupons WHERE id = ?")
    .bind(couponId)
    .first<{ issued_count: number; total_quantity: number }>();
  const rows = await env.DB.prepare("SELECT id, user_id FROM user_coupons WHERE coupon_id = ?")
    .bind(couponId)
    .all<{ id: number; user_id: number }>();
  const holders = rows.results.map((r) => r.user_id);
  return {
    issuedCount: coupon!.issued_count,
    total: coupon!.total_quantity,
    rows: rows.results,
    holders,
    distinct: new Set(holders).size,
  };
}

/**
 * A storm of every user once, the first `repeats` of them again and users that do not exist, in random order:
 * checks what holds whatever the interleaving (answers, issued_count == rows, nobody twice) and returns D1's
 * ledger after it.
 */
export async function mixedIssueStorm(couponId: number, users: number[], repeats: number, missing: number[]) {
  const requests = [...users, ...users.slice(0, repeats), ...missing].sort(() => Math.random() - 0.5);
  const responses = await issueAll(couponId, requests);
  responses.forEach((r, i) => {
    // The object learns that a user is missing only from D1, so after the last piece it says sold out.
    if (missing.includes(requests[i]!)) expect(["USER_NOT_FOUND", "COUPON_SOLD_OUT"]).toContain(r.body.code);
    else expect([200, 400]).toContain(r.status);
  });
  const d1 = await ledger(couponId);
  expect(d1.issuedCount).toBe(d1.rows.length);
  expect(d1.rows.length).toBe(codes(responses).OK);
  expect(d1.distinct).toBe(d1.rows.length);
  return d1;
}

/** The gate's own storage: its count, how many holders, and the admissions still pending. */
export async function gateStorage(couponId: number) {
  return runInDurableObject(gateOf(couponId), (_instance, state) => {
    const sql = state.storage.sql;
    const coupon = sql.exec<{ issued_count: number }>("SELECT issued_count FROM coupon").toArray()[0];
    return {
      issuedCount: coupon?.issued_count ?? null,
      holderCount: sql.exec<{ n: number }>("SELECT count(*) AS n FROM holders").one().n,
      pending: sql
        .exec<{ user_id: number }>("SELECT user_id FROM pending ORDER BY user_id")
        .toArray()
        .map((r) => r.user_id),
      version: sql.exec<{ value: number }>("SELECT value FROM meta WHERE key = 'version'").toArray()[0]?.value ?? null,
    };
  });
}

/** Which of `userIds` the gate's storage (of shard `shard`) names as holders. */
export async function gateHolds(couponId: number, userIds: number[], shard = 0): Promise<number[]> {
  return runInDurableObject(shardGateOf(couponId, shard), (_instance, state) =>
    state.storage.sql
      .exec<{ user_id: number }>(
        "SELECT user_id FROM holders WHERE user_id IN (SELECT value FROM json_each(?)) ORDER BY user_id",
        JSON.stringify(userIds),
      )
      .toArray()
      .map((r) => r.user_id),
  );
}

/**
 * Writes the gate's storage as this layout persists it: the coupon's terms (from D1, with `issuedCount`),
 * the holders `first..last` plus `extra`, the `pending` admissions and the version marker (unless `version`
 * is null: storage from before the marker existed).
 */
export async function seedGate(
  couponId: number,
  state: { issuedCount: number; range?: [number, number]; holders?: number[]; pending?: number[]; version?: number | null },
): Promise<void> {
  const terms = await env.DB.prepare(
    `SELECT id, name, discount_type, discount_value, min_order_amount, max_discount_amount, total_quantity, issued_count,
            issue_starts_at, issue_ends_at, valid_days FROM coupons WHERE id = ?`,
  )
    .bind(couponId)
    .first<CouponTerms>();
  const c = terms!;
  await runInDurableObject(gateOf(couponId), (_instance, durable) => {
    const sql = durable.storage.sql;
    sql.exec(
      `INSERT INTO coupon (id, name, discount_type, discount_value, min_order_amount, max_discount_amount, total_quantity,
         issued_count, issue_starts_at, issue_ends_at, valid_days) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      c.id, c.name, c.discount_type, c.discount_value, c.min_order_amount, c.max_discount_amount, c.total_quantity,
      state.issuedCount, c.issue_starts_at, c.issue_ends_at, c.valid_days,
    );
    if (state.range) {
      sql.exec(
        `WITH RECURSIVE ids(id) AS (SELECT ? UNION ALL SELECT id + 1 FROM ids WHERE id < ?)
         INSERT INTO holders (user_id) SELECT id FROM ids`,
        ...state.range,
      );
    }
    const json = (ids: number[] = []) => JSON.stringify(ids);
    sql.exec("INSERT INTO holders (user_id) SELECT value FROM json_each(?)", json(state.holders));
    sql.exec("INSERT INTO pending (user_id) SELECT value FROM json_each(?)", json(state.pending));
    const version = state.version === undefined ? STORAGE_VERSION : state.version;
    if (version !== null) sql.exec("INSERT INTO meta (key, value) VALUES ('version', ?)", version);
  });
}

/** Sums D1's `meta.rows_read` over every batch run until `stop()`. */
export function countRowsRead(): { rowsRead(): number; stop(): void } {
  let rowsRead = 0;
  const stop = inject(env.DB, "batch", (batch) =>
    (async (statements: D1PreparedStatement[]) => {
      const results = await batch(statements);
      for (const result of results) rowsRead += result.meta.rows_read ?? 0;
      return results;
    }) as typeof batch,
  );
  return { rowsRead: () => rowsRead, stop };
}

/** A row as a batch from the object's previous life would write it, landing behind this life's back. */
export async function landBehindTheObjectsBack(couponId: number, userId: number): Promise<void> {
  await env.DB.batch([
    env.DB.prepare(
      "INSERT INTO user_coupons (coupon_id, user_id, status, issued_at, expires_at) VALUES (?, ?, 'AVAILABLE', ?, ?)",
    ).bind(couponId, userId, "2026-01-01T00:00:00.000Z", "2026-02-01T00:00:00.000Z"),
    env.DB.prepare("UPDATE coupons SET issued_count = issued_count + 1 WHERE id = ?").bind(couponId),
  ]);
}

/** A coupon spread over `shards` gate objects, made through the admin API. */
export async function makeShardedCoupon(shards: number, totalQuantity: number, fields: Record<string, unknown> = {}) {
  const body = { name: `sharded-${crypto.randomUUID()}`, discountType: "FIXED", discountValue: 1000, validDays: 30, totalQuantity, shards, ...fields };
  const res = await call("POST", "/api/admin/coupons", { token: await adminToken(), body });
  if (res.status !== 201) throw new Error(`makeShardedCoupon failed: ${res.status} ${res.text}`);
  return res.body as { id: number; shards: number; totalQuantity: number };
}

export const shardGateOf = (couponId: number, shard: number) => env.COUPON_GATE.getByName(gateName(couponId, shard));

/** `n` new users written straight into D1 in one statement; their ids. */
export async function bulkUsers(n: number): Promise<number[]> {
  const prefix = `bulk-${crypto.randomUUID()}-`;
  const now = new Date().toISOString();
  await env.DB.prepare(
    `WITH RECURSIVE seq(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM seq WHERE x < ?)
     INSERT INTO users (name, balance, created_at, updated_at) SELECT ? || x, 0, ?, ? FROM seq`,
  )
    .bind(n, prefix, now, now)
    .run();
  const rows = await env.DB.prepare("SELECT id FROM users WHERE substr(name, 1, ?) = ? ORDER BY id")
    .bind(prefix.length, prefix)
    .all<{ id: number }>();
  return rows.results.map((r) => r.id);
}

/** Users of which `onHot` land on shard `hot` (the skew) and `elsewhere` anywhere else. */
export async function skewedUsers(shards: number, hot: number, onHot: number, elsewhere: number): Promise<number[]> {
  const pool = await bulkUsers(Math.max(onHot * shards * 2, onHot + elsewhere * 2));
  const hotOnes = pool.filter((id) => shardOf(id, shards) === hot).slice(0, onHot);
  const others = pool.filter((id) => shardOf(id, shards) !== hot).slice(0, elsewhere);
  if (hotOnes.length < onHot || others.length < elsewhere) throw new Error("skewedUsers: pool too small");
  return [...hotOnes, ...others];
}

/** One shard's storage: its count, quota, pending admissions, and its transfer records. */
export async function shardStorage(couponId: number, shard: number) {
  return runInDurableObject(shardGateOf(couponId, shard), (_instance, state) => {
    const sql = state.storage.sql;
    const count = (query: string) => sql.exec<{ n: number }>(query).one().n;
    return {
      issuedCount: sql.exec<{ issued_count: number }>("SELECT issued_count FROM coupon").toArray()[0]?.issued_count ?? 0,
      holderCount: count("SELECT count(*) AS n FROM holders"),
      pending: count("SELECT count(*) AS n FROM pending"),
      quota: sql.exec<{ pieces: number }>("SELECT pieces FROM quota").toArray()[0]?.pieces ?? null,
      openIntents: sql.exec<{ transfer_id: string; giver: number }>("SELECT transfer_id, giver FROM intents").toArray(),
      given: sql.exec<{ transfer_id: string; taker: number; pieces: number }>("SELECT transfer_id, taker, pieces FROM given").toArray(),
    };
  });
}

/**
 * Every shard's storage, with the sums that must hold: quota plus pieces in transit (given, not yet
 * credited) is the total, and each shard's count is its holders.
 */
export async function shardsOverview(couponId: number, shards: number) {
  const { total } = await ledger(couponId);
  const each = [];
  for (let shard = 0; shard < shards; shard++) {
    const storage = await shardStorage(couponId, shard);
    // A shard that never ran holds its first quota.
    each.push({ ...storage, quota: storage.quota ?? initialQuota(total, shards, shard) });
  }
  const open = new Set(each.flatMap((s) => s.openIntents.map((i) => i.transfer_id)));
  const inTransit = each.flatMap((s) => s.given).filter((g) => open.has(g.transfer_id)).reduce((n, g) => n + g.pieces, 0);
  return {
    each,
    quota: each.reduce((n, s) => n + (s.quota ?? 0), 0),
    inTransit,
    issued: each.reduce((n, s) => n + s.issuedCount, 0),
    holders: each.reduce((n, s) => n + s.holderCount, 0),
    pending: each.reduce((n, s) => n + s.pending, 0),
    openIntents: open.size,
    transfers: each.flatMap((s) => s.given).filter((g) => g.pieces > 0).length,
  };
}
