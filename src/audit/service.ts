import type { CouponGate } from "../coupons/coupon-gate";
import type { ProductStock } from "../inventory/product-stock";
import type { Clock } from "../lib/clock";
import { DEFAULT_LIMITS, type AuditLimits, type CheckResult } from "./check";
import { auditCoupons } from "./coupons";
import { auditExports } from "./exports";
import { auditOrders } from "./orders";
import { auditStock } from "./stock";
import { auditWallets } from "./wallet";

// The service checks its own invariants on the live data and says where they break. It is O(rows): every
// check walks its table in keyset pages (one D1 query each) and asks each coupon's and product's object
// once, a bounded number at a time. Meant for operators, not for a hot path; on a shop too large for one
// call's budget (AuditLimits) it says how much it did not reach rather than pretend.

export interface AuditDeps {
  db: D1Database;
  gates: DurableObjectNamespace<CouponGate>;
  stocks: DurableObjectNamespace<ProductStock>;
  clock: Clock;
  /** OUTBOX_REDELIVER_AFTER_SECONDS: how long a pending export may legitimately wait for the relay. */
  redeliverAfterSeconds: number;
}

export interface AuditReport {
  ok: boolean;
  checkedAt: string;
  checks: CheckResult[];
}

export async function runAudit(deps: AuditDeps, limits: AuditLimits = DEFAULT_LIMITS): Promise<AuditReport> {
  const now = deps.clock.now();
  // One after another: the checks share D1 and the call's query budget.
  const checks = [
    await auditWallets(deps.db, limits),
    await auditCoupons(deps.db, deps.gates, limits),
    await auditStock(deps.db, deps.stocks, limits),
    await auditOrders(deps.db, limits),
    await auditExports(deps.db, now, deps.redeliverAfterSeconds, limits),
  ];
  return { ok: checks.every((c) => c.ok), checkedAt: now.toISOString(), checks };
}
