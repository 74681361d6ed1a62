/**
 * True when a D1 error (possibly wrapped by drizzle) names the given constraint: a CHECK's name
 * ("CHECK constraint failed: users_balance_non_negative") or a UNIQUE's columns
 * ("UNIQUE constraint failed: user_coupons.coupon_id, user_coupons.user_id").
 */
export function isConstraintViolation(error: unknown, fragment: string): boolean {
  for (let e: unknown = error; e instanceof Error; e = e.cause) {
    if (e.message.includes(fragment)) return true;
  }
  return false;
}
