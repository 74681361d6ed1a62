import { Check, reportNotReached, walkPages, type AuditLimits, type CheckResult, type Sample } from "./check";

// Nothing stays PENDING past its retries: a pending export is touched at least every
// OUTBOX_REDELIVER_AFTER_SECONDS (an attempt, the dead letter marking it FAILED, or the relay sending a
// lost message again), so one whose updated_at is older than that plus STUCK_MARGIN_SECONDS is stuck.
// FAILED is not a violation (admins see and retry those): it is counted in the details, with PENDING and SENT.
const EXPORTS_PAGE = `
  WITH page AS (SELECT id, order_id, event, status, attempts, updated_at FROM order_exports
                WHERE id > ?1 ORDER BY id LIMIT ?2)
  SELECT count(*) AS size, max(id) AS lastId,
    count(*) FILTER (WHERE status = 'PENDING') AS pending,
    count(*) FILTER (WHERE status = 'FAILED') AS failed,
    count(*) FILTER (WHERE status = 'SENT') AS sent,
    json_group_array(json_object('exportId', id, 'orderId', order_id, 'event', event, 'attempts', attempts,
        'updatedAt', updated_at))
      FILTER (WHERE status = 'PENDING' AND updated_at < ?3) AS stuck
  FROM page`;

/** The relay's minute plus the longest backoff between two attempts (10 minutes, the cap). */
export const STUCK_MARGIN_SECONDS = 660;

interface AuditedPage {
  size: number;
  lastId: number | null;
  pending: number;
  failed: number;
  sent: number;
  stuck: string;
}

export async function auditExports(db: D1Database, now: Date, redeliverAfterSeconds: number, limits: AuditLimits): Promise<CheckResult> {
  const check = new Check("exports");
  const stuckBefore = new Date(now.getTime() - (redeliverAfterSeconds + STUCK_MARGIN_SECONDS) * 1000).toISOString();
  for (const status of ["pending", "failed", "sent"] as const) check.count(status, 0);
  const stoppedAfter = await walkPages(limits, async (afterId, limit) => {
    const page = (await db.prepare(EXPORTS_PAGE).bind(afterId, limit, stuckBefore).first<AuditedPage>())!;
    check.checked += page.size;
    check.count("pending", page.pending);
    check.count("failed", page.failed);
    check.count("sent", page.sent);
    for (const sample of JSON.parse(page.stuck) as Sample[]) check.violation(sample);
    return page;
  });
  await reportNotReached(check, db, "order_exports", stoppedAfter);
  return check.result();
}
