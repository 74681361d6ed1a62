// What the coupon tests look at: the answers of a storm, D1's ledger of a coupon, the gate object's own
// storage, and how many rows the gate's D1 batches read.
import { runInDurableObject } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { STORAGE_VERSION } from "../../src/coupons/coupon-gate";
import type { CouponTerms } from "../../src/coupons/issue-ledger";
import { call, tokenFor, type ApiResponse } from "./api";
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

/** Which of `userIds` the gate's storage names as holders. */
export async function gateHolds(couponId: number, userIds: number[]): Promise<number[]> {
  return runInDurableObject(gateOf(couponId), (_instance, state) =>
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
