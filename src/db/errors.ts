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
 * A second row for an order key breaks every UNIQUE index of `orders` the first row's values hit, and SQLite
 * names only the first index it checks (the newest: the coupon's, for an order with one). So a duplicate is
 * told by any UNIQUE failure on `orders`, and the order key is then looked up to tell it from a coupon used
 * by another order.
 */
export const DUPLICATE_ORDER = "UNIQUE constraint failed: orders.";

/**
 * The messages of D1's own transient failures: the database unreachable, overloaded or reset. Every D1
 * error starts with D1_ERROR, SQL mistakes of ours included, so the prefix alone says nothing.
 */
const UNAVAILABLE =
  /Network connection lost|overloaded|exceeded its memory limit|storage operation exceeded timeout|transient issue|caused object to be reset|reset because its code was updated|D1_RESET/i;

/**
 * True when a D1 call failed because D1 could not be reached or was overloaded, as opposed to a constraint
 * or SQL error, which is ours to handle (a 500 for a bug stays a 500). Only the innermost error is read:
 * that is the binding's own, while a wrapper's (drizzle's) message also quotes the bound values.
 */
export function isD1Unavailable(error: unknown): boolean {
  let innermost: unknown = error;
  while (innermost instanceof Error && innermost.cause instanceof Error) innermost = innermost.cause;
  if (!(innermost instanceof Error) || isConstraintViolation(innermost, "constraint failed")) return false;
  return UNAVAILABLE.test(innermost.message);
}
