import { Check, reportNotReached, walkPages, type AuditLimits, type CheckResult, type Sample } from "./check";

// Every user's balance equals the sum of their ledger and the newest row's balance_after (a user without
// rows has balance 0). One aggregate query per page of users, read in one snapshot, so a charge landing
// meanwhile is seen whole or not at all; only the users that break it come back.
const WALLET_PAGE = `
  WITH page AS (SELECT id, balance FROM users WHERE id > ?1 ORDER BY id LIMIT ?2),
  audited AS (
    SELECT p.id, p.balance,
      (SELECT coalesce(sum(t.amount), 0) FROM wallet_transactions t WHERE t.user_id = p.id) AS ledger,
      (SELECT t.balance_after FROM wallet_transactions t WHERE t.user_id = p.id
        ORDER BY t.created_at DESC, t.id DESC LIMIT 1) AS newest
    FROM page p)
  SELECT count(*) AS size, max(id) AS lastId,
    json_group_array(json_object('userId', id, 'balance', balance, 'ledger', ledger, 'newest', newest))
      FILTER (WHERE balance <> ledger OR balance <> coalesce(newest, 0)) AS broken
  FROM audited`;

interface AuditedPage {
  size: number;
  lastId: number | null;
  /** JSON array of samples. */
  broken: string;
}

export async function auditWallets(db: D1Database, limits: AuditLimits): Promise<CheckResult> {
  const check = new Check("wallet");
  const stoppedAfter = await walkPages(limits, async (afterId, limit) => {
    const page = (await db.prepare(WALLET_PAGE).bind(afterId, limit).first<AuditedPage>())!;
    check.checked += page.size;
    for (const sample of JSON.parse(page.broken) as Sample[]) check.violation(sample);
    return page;
  });
  await reportNotReached(check, db, "users", stoppedAfter);
  return check.result();
}
