import { env } from "cloudflare:workers";

// Direct D1 access for arranging state and checking invariants in tests.

export const db = () => env.DB;

export async function one<T = Record<string, unknown>>(sql: string, ...params: unknown[]): Promise<T> {
  const row = await env.DB.prepare(sql).bind(...params).first<T>();
  if (row === null) throw new Error(`no row for: ${sql}`);
  return row;
}

export async function all<T = Record<string, unknown>>(sql: string, ...params: unknown[]): Promise<T[]> {
  return (await env.DB.prepare(sql).bind(...params).all<T>()).results;
}

/** Credits a wallet the way a CHARGE does: balance and ledger row in one batch. */
export async function fund(userId: number, amount: number, at = new Date().toISOString()): Promise<void> {
  await env.DB.batch([
    env.DB.prepare("UPDATE users SET balance = balance + ?, updated_at = ? WHERE id = ?").bind(amount, at, userId),
    env.DB.prepare(
      `INSERT INTO wallet_transactions (user_id, type, amount, balance_after, order_id, created_at)
       SELECT id, 'CHARGE', ?, balance, NULL, ? FROM users WHERE id = ?`,
    ).bind(amount, at, userId),
  ]);
}

export interface CouponFields {
  discountType?: "FIXED" | "PERCENT";
  discountValue?: number;
  minOrderAmount?: number;
  expiresAt?: string;
}

/** A coupon and one AVAILABLE user coupon for `userId`, written straight to D1. Returns the user coupon id. */
export async function grantCoupon(userId: number, fields: CouponFields = {}): Promise<number> {
  const now = new Date().toISOString();
  const coupon = await one<{ id: number }>(
    `INSERT INTO coupons (name, discount_type, discount_value, min_order_amount, total_quantity, issued_count, valid_days, created_at)
     VALUES ('test coupon', ?, ?, ?, 1000, 1, 30, ?) RETURNING id`,
    fields.discountType ?? "FIXED",
    fields.discountValue ?? 1000,
    fields.minOrderAmount ?? 0,
    now,
  );
  const expiresAt = fields.expiresAt ?? new Date(Date.now() + 30 * 86_400_000).toISOString();
  const userCoupon = await one<{ id: number }>(
    `INSERT INTO user_coupons (coupon_id, user_id, status, issued_at, expires_at) VALUES (?, ?, 'AVAILABLE', ?, ?) RETURNING id`,
    coupon.id,
    userId,
    now,
    expiresAt,
  );
  return userCoupon.id;
}

/** balance == sum(ledger) == newest balance_after, for one user. */
export async function walletInvariant(userId: number) {
  return one<{ balance: number; ledger: number; newest: number | null }>(
    `SELECT u.balance,
       (SELECT coalesce(sum(amount), 0) FROM wallet_transactions WHERE user_id = u.id) AS ledger,
       (SELECT balance_after FROM wallet_transactions WHERE user_id = u.id ORDER BY created_at DESC, id DESC LIMIT 1) AS newest
     FROM users u WHERE u.id = ?`,
    userId,
  );
}
