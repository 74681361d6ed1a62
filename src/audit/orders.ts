import { Check, reportNotReached, walkPages, type AuditLimits, type CheckResult, type Sample } from "./check";

// Every order is paid exactly once (one PAYMENT of -paid_amount, none when paid_amount is 0), a cancelled
// one is refunded exactly once (one REFUND of +paid_amount, none when it was free), and a completed one is
// never refunded. Paged by user: each page reads its users' orders and ledger rows through the per-user
// indexes, so a page costs what those users hold; the ledger rows must be on the order's own user.
const ORDERS_PAGE = `
  WITH page AS (SELECT id FROM users WHERE id > ?1 ORDER BY id LIMIT ?2),
  moves AS (
    SELECT t.order_id,
      count(*) FILTER (WHERE t.type = 'PAYMENT') AS payments,
      coalesce(sum(t.amount) FILTER (WHERE t.type = 'PAYMENT'), 0) AS paid,
      count(*) FILTER (WHERE t.type = 'REFUND') AS refunds,
      coalesce(sum(t.amount) FILTER (WHERE t.type = 'REFUND'), 0) AS refunded
    FROM page p JOIN wallet_transactions t ON t.user_id = p.id
    WHERE t.order_id IS NOT NULL
    GROUP BY t.order_id),
  audited AS (
    SELECT o.id, o.status, o.paid_amount,
      coalesce(m.payments, 0) AS payments, coalesce(m.paid, 0) AS paid,
      coalesce(m.refunds, 0) AS refunds, coalesce(m.refunded, 0) AS refunded
    FROM page p JOIN orders o ON o.user_id = p.id LEFT JOIN moves m ON m.order_id = o.id)
  SELECT (SELECT count(*) FROM page) AS size, (SELECT max(id) FROM page) AS lastId, count(*) AS orders,
    json_group_array(json_object('orderId', id, 'status', status, 'paidAmount', paid_amount,
        'payments', payments, 'paid', paid, 'refunds', refunds, 'refunded', refunded))
      FILTER (WHERE NOT (
        (CASE WHEN paid_amount > 0 THEN payments = 1 AND paid = -paid_amount ELSE payments = 0 END)
        AND (CASE WHEN status = 'CANCELLED' AND paid_amount > 0 THEN refunds = 1 AND refunded = paid_amount
                  ELSE refunds = 0 END))) AS broken
  FROM audited`;

interface AuditedPage {
  size: number;
  lastId: number | null;
  orders: number;
  broken: string;
}

export async function auditOrders(db: D1Database, limits: AuditLimits): Promise<CheckResult> {
  const check = new Check("orders");
  const stoppedAfter = await walkPages(limits, async (afterId, limit) => {
    const page = (await db.prepare(ORDERS_PAGE).bind(afterId, limit).first<AuditedPage>())!;
    check.checked += page.orders;
    for (const sample of JSON.parse(page.broken) as Sample[]) check.violation(sample);
    return page;
  });
  // Counted in users: the orders check walks the users table.
  await reportNotReached(check, db, "users", stoppedAfter);
  return check.result();
}
