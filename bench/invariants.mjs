// Invariant checks: what the API answers right after a scenario, and what D1 holds. D1 checks are
// declared per scenario as SQL plus a verdict and run together in one `wrangler d1 execute` at the end
// (each wrangler start costs seconds); every check is written so later scenarios cannot change its answer.

export const invariant = (name, pass, detail) => ({ name, pass: Boolean(pass), detail });

const idList = (ids) => (ids.length ? ids.join(",") : "NULL");

/** A D1 check: statements to run and a function from their rows to invariants. */
export const d1Check = (statements, verdict) => ({ statements, verdict });

export function ledgerCheck(userIds) {
  const ids = idList(userIds);
  return d1Check(
    [
      `SELECT count(*) AS users, coalesce(sum(CASE WHEN u.balance <> coalesce((SELECT sum(w.amount) FROM wallet_transactions w WHERE w.user_id = u.id), 0) THEN 1 ELSE 0 END), 0) AS mismatched FROM users u WHERE u.id IN (${ids})`,
      `SELECT count(*) AS mismatched FROM users u WHERE u.id IN (${ids}) AND EXISTS (SELECT 1 FROM wallet_transactions w WHERE w.user_id = u.id) AND u.balance <> (SELECT w.balance_after FROM wallet_transactions w WHERE w.user_id = u.id ORDER BY w.id DESC LIMIT 1)`,
    ],
    ([[sum], [newest]]) => [
      invariant(
        "balance == sum of ledger (every user touched, D1)",
        sum.users === userIds.length && sum.mismatched === 0,
        `${sum.users} users checked, ${sum.mismatched} differ`,
      ),
      invariant(
        "balance == newest ledger balanceAfter (D1)",
        newest.mismatched === 0,
        `${newest.mismatched} differ`,
      ),
    ],
  );
}

/** Each user's balance in D1 against what the scenario's answers say it must be. */
export function balancesCheck(expectedByUser, label) {
  const ids = [...expectedByUser.keys()];
  return d1Check([`SELECT id, balance FROM users WHERE id IN (${idList(ids)})`], ([rows]) => {
    const wrong = rows.filter((row) => row.balance !== expectedByUser.get(row.id));
    const sample = wrong.slice(0, 3).map((r) => `user ${r.id}: ${r.balance} != ${expectedByUser.get(r.id)}`);
    return [
      invariant(
        `${label} (D1)`,
        rows.length === ids.length && wrong.length === 0,
        `${rows.length} users, ${wrong.length} wrong${sample.length ? `: ${sample.join("; ")}` : ""}`,
      ),
    ];
  });
}

/** Exactly `issued` coupons issued, to the users who were told so, none twice, counter == rows. */
export function couponCheck(couponId, { issued, winners }) {
  return d1Check(
    [
      `SELECT c.issued_count AS issuedCount, c.total_quantity AS total, (SELECT count(*) FROM user_coupons uc WHERE uc.coupon_id = c.id) AS holdings, (SELECT count(DISTINCT uc.user_id) FROM user_coupons uc WHERE uc.coupon_id = c.id) AS users FROM coupons c WHERE c.id = ${couponId}`,
      `SELECT user_id AS userId FROM user_coupons WHERE coupon_id = ${couponId}`,
    ],
    ([[coupon], holders]) => {
      const held = new Set(holders.map((h) => h.userId));
      const toldButMissing = winners.filter((id) => !held.has(id)).length;
      const heldButNotTold = held.size - (winners.length - toldButMissing);
      return [
        invariant(
          `exactly ${issued} issued (D1 user_coupons, issued_count)`,
          coupon.holdings === issued && coupon.issuedCount === issued && coupon.issuedCount <= coupon.total,
          `rows ${coupon.holdings}, issued_count ${coupon.issuedCount}, total ${coupon.total}`,
        ),
        invariant("no user holds it twice (D1)", coupon.users === coupon.holdings, `${coupon.users} users, ${coupon.holdings} rows`),
        invariant(
          "holders == users answered 200 (D1)",
          toldButMissing === 0 && heldButNotTold === 0,
          `${toldButMissing} answered 200 but hold none, ${heldButNotTold} hold one without a 200`,
        ),
      ];
    },
  );
}

/** Stock never below zero and stock == initial - sold, with one D1 order per successful answer. */
export function stockCheck(product, { initialStock, soldQuantity, orderIds }) {
  return d1Check(
    [
      `SELECT p.stock, (SELECT count(DISTINCT oi.order_id) FROM order_items oi WHERE oi.product_id = p.id) AS orders, (SELECT coalesce(sum(oi.quantity), 0) FROM order_items oi WHERE oi.product_id = p.id) AS sold FROM products p WHERE p.id = ${product.id}`,
      `SELECT oi.order_id AS orderId FROM order_items oi WHERE oi.product_id = ${product.id}`,
    ],
    ([[row], items]) => {
      const inD1 = new Set(items.map((i) => i.orderId));
      const missing = orderIds.filter((id) => !inD1.has(id)).length;
      return [
        invariant(
          `product ${product.id}: stock >= 0 and stock == ${initialStock} - sold (D1)`,
          row.stock >= 0 && row.stock === initialStock - row.sold && row.sold === soldQuantity,
          `stock ${row.stock}, sold ${row.sold} in D1, ${soldQuantity} per answers`,
        ),
        invariant(
          `product ${product.id}: orders in D1 == successful answers`,
          row.orders === orderIds.length && missing === 0,
          `${row.orders} in D1, ${orderIds.length} answered 200, ${missing} answered but missing`,
        ),
      ];
    },
  );
}

/** Every order of the product has exactly one PAYMENT ledger row for its paid amount. */
export function paymentsCheck(productId) {
  return d1Check(
    [
      `SELECT count(*) AS orders, coalesce(sum(CASE WHEN (SELECT count(*) FROM wallet_transactions w WHERE w.order_id = o.id AND w.type = 'PAYMENT' AND w.amount = -o.paid_amount AND w.user_id = o.user_id) = 1 THEN 1 ELSE 0 END), 0) AS paidOnce FROM orders o WHERE o.id IN (SELECT order_id FROM order_items WHERE product_id = ${productId})`,
    ],
    ([[row]]) => [
      invariant(
        "each order paid by exactly one PAYMENT ledger row (D1)",
        row.orders === row.paidOnce,
        `${row.paidOnce} of ${row.orders} orders`,
      ),
    ],
  );
}

/** Runs every pending D1 check in one wrangler call and returns the invariants per check. */
export function runD1Checks(queryD1, checks) {
  const statements = checks.flatMap((c) => c.statements);
  if (statements.length === 0) return [];
  const results = queryD1(statements.join(";\n"));
  let at = 0;
  return checks.map((check) => {
    const rows = results.slice(at, (at += check.statements.length));
    try {
      return check.verdict(rows);
    } catch (error) {
      return [invariant("D1 check could be evaluated", false, error.message)];
    }
  });
}
