import type { CouponGate } from "../coupons/coupon-gate";
import { Check, reportNotReached, walkPages, type AuditLimits, type CheckResult } from "./check";
import { compareObjects, readValues, type ObjectAudit } from "./objects";

// Each coupon's issued_count equals its user_coupons rows and never passes total_quantity, nobody holds it
// twice (UNIQUE makes that impossible in D1; counted all the same), and its gate object, when live and
// settled, counts what D1 counts.
const COUPONS_PAGE = `
  SELECT c.id, c.issued_count AS issuedCount, c.total_quantity AS totalQuantity,
    (SELECT count(*) FROM user_coupons u WHERE u.coupon_id = c.id) AS rowCount,
    (SELECT count(*) FROM (SELECT 1 FROM user_coupons u WHERE u.coupon_id = c.id
                           GROUP BY u.user_id HAVING count(*) > 1)) AS heldTwice
  FROM coupons c WHERE c.id > ?1 ORDER BY c.id LIMIT ?2`;

const ISSUED_COUNTS = "SELECT id, issued_count AS value FROM coupons WHERE id IN (SELECT value FROM json_each(?))";

interface CouponRow {
  id: number;
  issuedCount: number;
  totalQuantity: number;
  rowCount: number;
  heldTwice: number;
}

type GateView = { issuedCount: number; settled: boolean };

export async function auditCoupons(db: D1Database, gates: DurableObjectNamespace<CouponGate>, limits: AuditLimits): Promise<CheckResult> {
  const check = new Check("coupons");
  const gateAudit: ObjectAudit<GateView> = {
    // The gate's name, as the coupon service addresses it.
    ask: (id) => gates.getByName(String(id)).auditView(id),
    judge: (view, d1) => (!view.settled ? "busy" : view.issuedCount === d1 ? "agrees" : "disagrees"),
    reread: (ids) => readValues(db, ISSUED_COUNTS, ids),
  };
  let asked = 0;
  const stoppedAfter = await walkPages(limits, async (afterId, limit) => {
    const { results } = await db.prepare(COUPONS_PAGE).bind(afterId, limit).all<CouponRow>();
    check.checked += results.length;
    for (const c of results) judgeCoupon(check, c);
    const askable = results.slice(0, Math.max(0, limits.maxObjects - asked));
    asked += askable.length;
    if (askable.length < results.length) check.count("objectsNotAsked", results.length - askable.length);
    const rows = askable.map((c) => ({ id: c.id, d1: c.issuedCount }));
    for (const { id, d1, view } of await compareObjects(rows, gateAudit, limits, check)) {
      check.violation({ couponId: id, kind: "GATE_DISAGREES", issuedCount: d1, gateIssuedCount: view.issuedCount });
    }
    return { size: results.length, lastId: results.at(-1)?.id ?? null };
  });
  await reportNotReached(check, db, "coupons", stoppedAfter);
  return check.result();
}

function judgeCoupon(check: Check, c: CouponRow): void {
  const numbers = { couponId: c.id, issuedCount: c.issuedCount, rows: c.rowCount, totalQuantity: c.totalQuantity };
  if (c.issuedCount !== c.rowCount) check.violation({ ...numbers, kind: "COUNT_NOT_ROWS" });
  if (c.issuedCount > c.totalQuantity || c.rowCount > c.totalQuantity) check.violation({ ...numbers, kind: "OVER_TOTAL" });
  if (c.heldTwice > 0) check.violation({ couponId: c.id, kind: "HELD_TWICE", users: c.heldTwice });
}
