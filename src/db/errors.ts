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

/**
 * True when a D1 call failed because D1 could not be reached or was overloaded (the binding's `D1_ERROR`
 * family, possibly wrapped by drizzle), as opposed to a constraint or SQL error, which is ours to handle.
 */
export function isD1Unavailable(error: unknown): boolean {
  for (let e: unknown = error; e instanceof Error; e = e.cause) {
    if (e.message.includes("constraint failed")) return false;
    if (/D1_(ERROR|RESET|EXEC)|Network connection lost|overloaded|storage operation exceeded timeout/i.test(e.message)) return true;
  }
  return false;
}
