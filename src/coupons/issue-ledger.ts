import { shardOfSql } from "./shards";

// What the coupon gate reads from and writes to D1, the record of truth. Raw statements rather than
// drizzle: this is the hot path, and each group commit is built statement by statement.

/** A coupon row as the gate keeps it (snake_case, as D1 and the object's SQLite return it). */
export type CouponTerms = {
  id: number;
  name: string;
  discount_type: "FIXED" | "PERCENT";
  discount_value: number;
  min_order_amount: number;
  max_discount_amount: number | null;
  total_quantity: number;
  issued_count: number;
  issue_starts_at: string | null;
  issue_ends_at: string | null;
  valid_days: number;
  /** How many gate objects serve the coupon. */
  shards: number;
};

export interface GateSnapshot {
  coupon: CouponTerms;
  /** Of the shard asked for. */
  holders: number[];
}

export interface PendingIssue {
  userId: number;
  issuedAt: string;
  expiresAt: string;
}

const COUPON_TERMS = `SELECT id, name, discount_type, discount_value, min_order_amount, max_discount_amount, total_quantity,
                             issued_count, issue_starts_at, issue_ends_at, valid_days, shards
                      FROM coupons WHERE id = ?`;

/** User ids per lookup statement: about 80 KB of JSON, far inside D1's limit on one bound value. */
const IDS_PER_LOOKUP = 10_000;

/**
 * The coupon and the holders of gate `shard` (every holder for a coupon of one shard), or null when there
 * is no such coupon. O(holders): the rebuild. For a sharded coupon, the shard's count in D1 is also set from
 * its users' rows in the same transaction: a count that drifted (batches of code from before migration 0008,
 * say) heals with the rebuild its disagreement caused.
 */
export async function readGateSnapshot(db: D1Database, couponId: number, shard: number): Promise<GateSnapshot | null> {
  const ofShard = shardOfSql("u.user_id", "c.shards");
  // One batch is one transaction: the count and the holders come from the same moment.
  const [coupon, holders] = await db.batch<Record<string, unknown>>([
    db.prepare(COUPON_TERMS).bind(couponId),
    db
      .prepare(
        `SELECT u.user_id FROM user_coupons u JOIN coupons c ON c.id = u.coupon_id
         WHERE u.coupon_id = ?1 AND (c.shards = 1 OR ${ofShard} = ?2)`,
      )
      .bind(couponId, shard),
    db
      .prepare(
        `INSERT INTO coupon_shard_counts (coupon_id, shard, issued_count)
         SELECT c.id, ?2, (SELECT count(*) FROM user_coupons u WHERE u.coupon_id = c.id AND ${ofShard} = ?2)
         FROM coupons c WHERE c.id = ?1 AND c.shards > 1
         ON CONFLICT (coupon_id, shard) DO UPDATE SET issued_count = excluded.issued_count`,
      )
      .bind(couponId, shard),
  ]);
  const row = coupon?.results[0] as CouponTerms | undefined;
  if (!row) return null;
  return { coupon: row, holders: (holders?.results ?? []).map((r) => r.user_id as number) };
}

export interface PendingOutcome {
  coupon: CouponTerms;
  /** Those of the asked users who hold the coupon in D1. */
  committed: Set<number>;
  /** When a shard was named: D1's count of that shard's issues (coupon_shard_counts; 0 before its first). */
  shardIssuedCount: number | null;
}

/**
 * The coupon and which of `userIds` hold it, or null when there is no such coupon: O(userIds) rows read,
 * each user found through the UNIQUE (coupon_id, user_id) index. With `shard`, also that shard's count.
 */
export async function readPendingOutcome(
  db: D1Database,
  couponId: number,
  userIds: number[],
  shard?: number,
): Promise<PendingOutcome | null> {
  const lookup = db.prepare(
    "SELECT user_id FROM user_coupons WHERE coupon_id = ? AND user_id IN (SELECT value FROM json_each(?))",
  );
  const lookups: D1PreparedStatement[] = [];
  for (let i = 0; i < userIds.length; i += IDS_PER_LOOKUP) {
    lookups.push(lookup.bind(couponId, JSON.stringify(userIds.slice(i, i + IDS_PER_LOOKUP))));
  }
  const shardCount =
    shard === undefined
      ? []
      : [db.prepare("SELECT issued_count FROM coupon_shard_counts WHERE coupon_id = ? AND shard = ?").bind(couponId, shard)];
  // One transaction again: the counts and the pending users' rows come from the same moment.
  const [coupon, ...rest] = await db.batch<Record<string, unknown>>([db.prepare(COUPON_TERMS).bind(couponId), ...lookups, ...shardCount]);
  const row = coupon?.results[0] as CouponTerms | undefined;
  if (!row) return null;
  const found = rest.slice(0, lookups.length);
  const shardRow = shard === undefined ? undefined : rest.at(-1)?.results[0];
  return {
    coupon: row,
    committed: new Set(found.flatMap((r) => r.results.map((u) => u.user_id as number))),
    shardIssuedCount: shard === undefined ? null : ((shardRow?.issued_count as number | undefined) ?? 0),
  };
}

/**
 * One group commit: a user_coupons row per issue and one bump of issued_count, as one transaction; a shard
 * of a sharded coupon also bumps its own count. A row for a user that does not exist is skipped rather than
 * failing the batch for its neighbours, and the counts add only the users that exist, so they always equal
 * the rows written.
 */
export function issueStatements(db: D1Database, couponId: number, issues: PendingIssue[], shard?: number): D1PreparedStatement[] {
  const insert = db.prepare(
    `INSERT INTO user_coupons (coupon_id, user_id, status, issued_at, expires_at)
     SELECT ?, id, 'AVAILABLE', ?, ? FROM users WHERE id = ?
     RETURNING id`,
  );
  const userIds = JSON.stringify(issues.map((i) => i.userId));
  const existing = "(SELECT count(*) FROM users WHERE id IN (SELECT value FROM json_each(?)))";
  const bump = db.prepare(`UPDATE coupons SET issued_count = issued_count + ${existing} WHERE id = ?`).bind(userIds, couponId);
  const bumpShard =
    shard === undefined
      ? []
      : [
          db
            .prepare(
              `INSERT INTO coupon_shard_counts (coupon_id, shard, issued_count) VALUES (?, ?, ${existing})
               ON CONFLICT (coupon_id, shard) DO UPDATE SET issued_count = issued_count + excluded.issued_count`,
            )
            .bind(couponId, shard, userIds),
        ];
  return [...issues.map((i) => insert.bind(couponId, i.issuedAt, i.expiresAt, i.userId)), bump, ...bumpShard];
}

/**
 * The minute cron: recounts, from their users' rows, the shard counts of every sharded coupon whose shards'
 * counts in D1 no longer sum to its issued_count. Batches bump both in one transaction, so they differ
 * only after a write that bumped one and not the other: a batch of a Worker from before migration 0008,
 * landing during a deploy. A shard heals its own row when it rebuilds (readGateSnapshot), but an idle or
 * sold-out coupon's shards may never get the request that makes them reconcile. One statement, so it is
 * atomic with every batch; it reads every sharded coupon's counts (O(coupons × shards)) and the rows of
 * only the drifted ones. Returns how many shard counts it set.
 */
export async function recountDriftedShards(db: D1Database): Promise<number> {
  const { meta } = await db
    .prepare(
      `INSERT INTO coupon_shard_counts (coupon_id, shard, issued_count)
       SELECT u.coupon_id, ${shardOfSql("u.user_id", "c.shards")}, count(*)
       FROM user_coupons u JOIN coupons c ON c.id = u.coupon_id
       WHERE c.id IN (SELECT d.id FROM coupons d
                      WHERE d.shards > 1
                        AND d.issued_count != (SELECT coalesce(sum(s.issued_count), 0) FROM coupon_shard_counts s WHERE s.coupon_id = d.id))
       GROUP BY 1, 2
       ON CONFLICT (coupon_id, shard) DO UPDATE SET issued_count = excluded.issued_count`,
    )
    .run();
  return meta.changes;
}

/** The new user_coupons id of each issue, in order; null where the user does not exist. */
export function issuedIds(results: D1Result[], count: number): (number | null)[] {
  return results.slice(0, count).map((r) => {
    const row = r.results[0] as { id: number } | undefined;
    return row ? row.id : null;
  });
}
