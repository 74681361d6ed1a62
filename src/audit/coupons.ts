import type { CouponGate, ShardState } from "../coupons/coupon-gate";
import { gateName } from "../coupons/shards";
import {
  Check,
  limiter,
  MAX_SHARDED_FIGURES,
  reportNotReached,
  walkPages,
  type AuditLimits,
  type CheckResult,
  type ShardedCouponFigures,
} from "./check";
import { compareObjects, readValues, withTimeout, type ObjectAudit, type ObjectOutcome } from "./objects";

// Each coupon's issued_count equals its user_coupons rows and never passes total_quantity, nobody holds it
// twice (UNIQUE makes that impossible in D1; counted all the same), and its gate objects, when live and
// settled, count what D1 counts. A coupon of N shards has N gates (src/coupons/shards.ts): each is asked,
// and their counts summed and compared with the coupon's count, which its shards' own counts in D1
// (coupon_shard_counts) must sum to. For the first sharded coupons the check also lists each shard's
// figures (docs/sharded-coupons.md): reported, not judged.
const COUPONS_PAGE = `
  SELECT c.id, c.issued_count AS issuedCount, c.total_quantity AS totalQuantity, c.shards,
    (SELECT count(*) FROM user_coupons u WHERE u.coupon_id = c.id) AS rowCount,
    (SELECT count(*) FROM (SELECT 1 FROM user_coupons u WHERE u.coupon_id = c.id
                           GROUP BY u.user_id HAVING count(*) > 1)) AS heldTwice,
    (SELECT coalesce(sum(s.issued_count), 0) FROM coupon_shard_counts s WHERE s.coupon_id = c.id) AS shardCounted
  FROM coupons c WHERE c.id > ?1 ORDER BY c.id LIMIT ?2`;

const ISSUED_COUNTS = "SELECT id, issued_count AS value FROM coupons WHERE id IN (SELECT value FROM json_each(?))";

interface CouponRow {
  id: number;
  issuedCount: number;
  totalQuantity: number;
  shards: number;
  rowCount: number;
  heldTwice: number;
  /** The sum of its shards' own counts in D1 (coupon_shard_counts), for a coupon of several shards. */
  shardCounted: number;
}

/** The coupon's gates together: the sum of their counts; settled only if every one is live and settled. */
type GateView = { issuedCount: number; settled: boolean };
type ShardView = GateView | null;

export async function auditCoupons(db: D1Database, gates: DurableObjectNamespace<CouponGate>, limits: AuditLimits): Promise<CheckResult> {
  const check = new Check("coupons");
  // Every gate call of the check goes through this: at most `concurrency` in flight, however many shards.
  const call = limiter(limits.concurrency);
  const shardsOf = new Map<number, number>();
  /** Per coupon, which of its shards answered live at the latest look. */
  const live = new Map<number, boolean[]>();
  const gateAudit: ObjectAudit<GateView> = {
    ask: async (id) => {
      const shards = shardsOf.get(id) ?? 1;
      // Each gate by its name, as the coupon service addresses it.
      const views: ShardView[] = await Promise.all(
        Array.from({ length: shards }, (_, shard) => call(() => gates.getByName(gateName(id, shard)).auditView(id))),
      );
      live.set(id, views.map((v) => v !== null));
      // Idle only if every shard is: a shard that is not live has no count to add.
      if (views.every((v) => v === null)) return null;
      return {
        issuedCount: views.reduce((n, v) => n + (v?.issuedCount ?? 0), 0),
        settled: views.every((v) => v !== null && v.settled),
      };
    },
    judge: (view, d1) => (!view.settled ? "busy" : view.issuedCount === d1 ? "agrees" : "disagrees"),
    reread: (ids) => readValues(db, ISSUED_COUNTS, ids),
  };
  let asked = 0;
  let budgetSpent = false;
  let figured = 0;
  const stoppedAfter = await walkPages(limits, async (afterId, limit) => {
    const { results } = await db.prepare(COUPONS_PAGE).bind(afterId, limit).all<CouponRow>();
    check.checked += results.length;
    for (const c of results) judgeCoupon(check, c);
    // The budget counts gate objects: a coupon of N shards costs N. The first that does not fit stops it.
    const askable: CouponRow[] = [];
    for (const c of results) {
      if (budgetSpent || asked + c.shards > limits.maxObjects) {
        budgetSpent = true;
        break;
      }
      askable.push(c);
      asked += c.shards;
    }
    const notAsked = results.slice(askable.length).reduce((n, c) => n + c.shards, 0);
    if (notAsked > 0) check.count("objectsNotAsked", notAsked);
    for (const c of askable) shardsOf.set(c.id, c.shards);
    const rows = askable.map((c) => ({ id: c.id, d1: c.issuedCount }));
    const outcomes = new Map<number, ObjectOutcome>();
    for (const { id, d1, view } of await compareObjects(rows, gateAudit, limits, check, outcomes)) {
      check.violation({ couponId: id, kind: "GATE_DISAGREES", issuedCount: d1, gateIssuedCount: view.issuedCount });
    }
    const sharded = askable.filter((c) => c.shards > 1);
    const shown = sharded.slice(0, Math.max(0, MAX_SHARDED_FIGURES - figured));
    figured += shown.length;
    if (shown.length < sharded.length) check.count("shardedCouponsNotListed", sharded.length - shown.length);
    const figures = await Promise.all(
      shown.map((c) => shardFigures(c, outcomes.get(c.id) ?? "idle", live.get(c.id) ?? [], gates, call, limits)),
    );
    for (const f of figures) check.listShardedCoupon(f);
    for (const c of askable) {
      shardsOf.delete(c.id);
      live.delete(c.id);
    }
    return { size: results.length, lastId: results.at(-1)?.id ?? null };
  });
  await reportNotReached(check, db, "coupons", stoppedAfter);
  return check.result();
}

/**
 * One sharded coupon's figures, one array entry per shard, from each shard the audit found live (the others,
 * `null`: asking them would make them load). `gate`: what the audit made of its shards together.
 */
async function shardFigures(
  c: CouponRow,
  gate: ObjectOutcome,
  live: boolean[],
  gates: DurableObjectNamespace<CouponGate>,
  call: ReturnType<typeof limiter>,
  limits: AuditLimits,
): Promise<ShardedCouponFigures> {
  const states = await Promise.all(
    Array.from({ length: c.shards }, async (_, shard): Promise<ShardState | null> => {
      if (!live[shard]) return null;
      try {
        return await withTimeout(
          call(() => gates.getByName(gateName(c.id, shard)).shardState(c.id, shard)),
          limits.objectTimeoutMs,
        );
      } catch {
        return null;
      }
    }),
  );
  const perShard = (figure: Exclude<keyof ShardState, "shard">) => states.map((s) => (s ? s[figure] : null));
  return {
    couponId: c.id,
    shards: c.shards,
    issuedCount: c.issuedCount,
    gate,
    issued: perShard("issued"),
    quota: perShard("quota"),
    pending: perShard("pending"),
    requests: perShard("requests"),
    transfersGiven: perShard("transfersGiven"),
    piecesGiven: perShard("piecesGiven"),
    openIntents: perShard("openIntents"),
  };
}

function judgeCoupon(check: Check, c: CouponRow): void {
  const numbers = { couponId: c.id, issuedCount: c.issuedCount, rows: c.rowCount, totalQuantity: c.totalQuantity };
  if (c.issuedCount !== c.rowCount) check.violation({ ...numbers, kind: "COUNT_NOT_ROWS" });
  if (c.issuedCount > c.totalQuantity || c.rowCount > c.totalQuantity) check.violation({ ...numbers, kind: "OVER_TOTAL" });
  if (c.heldTwice > 0) check.violation({ couponId: c.id, kind: "HELD_TWICE", users: c.heldTwice });
  if (c.shards > 1 && c.shardCounted !== c.issuedCount) {
    check.violation({ couponId: c.id, kind: "SHARD_COUNTS_NOT_COUNT", issuedCount: c.issuedCount, shardCounts: c.shardCounted });
  }
}
