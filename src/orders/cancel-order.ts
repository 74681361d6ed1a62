import { isConstraintViolation } from "../db/errors";
import { announceRestock, commitStock, settleStockSoon, type StockLine } from "../inventory/stock";
import { restockKey } from "../inventory/stock-ledger";
import type { Caller } from "../lib/auth";
import type { Clock } from "../lib/clock";
import { AppError, OutcomeUnknownError } from "../lib/errors";
import { completeClaim, type Claim } from "../lib/idempotency";
import { describeError, log } from "../lib/log";
import { currentRequestId } from "../lib/request-context";
import { dispatchOutbox, type OrderQueues, type OutboxRow } from "./outbox";
import { orderJsonSql } from "./queries";

export interface CancelOrderDeps {
  env: Env;
  clock: Clock;
  queues: OrderQueues;
  /** Work that may finish after the response (ctx.waitUntil). */
  defer: (work: Promise<unknown>) => void;
  claim: Claim | null;
  /** How long after its creation a user may cancel their own order. */
  windowSeconds: number;
}

interface OrderToCancel {
  id: number;
  user_id: number;
  status: "COMPLETED" | "CANCELLED";
  created_at: string;
  paid_amount: number;
  user_coupon_id: number | null;
  items: string;
}

/**
 * Cancels an order, all or nothing and exactly once however many cancels race: the order runs backwards
 * through the same parts.
 * 1. Each product's object is told the units will come back (announced, not yet sellable).
 * 2. One D1 batch writes the status, the REFUND, the coupon's return, the stock, the buyer's purchased
 *    counts and the outbox rows; the outbox's UNIQUE (order, topic, event) and the one-REFUND index
 *    make a second cancellation's batch fail whole.
 * 3. After commit the objects add the units back, and the outbox goes to the queues (stats take the
 *    units off the order's stat date; the data platform gets the cancellation).
 * A batch that fails because another cancel committed confirms the restock too (the objects count each
 * key once); any other failure leaves it to the objects, which settle it against D1 within seconds.
 */
export async function cancelOrder(deps: CancelOrderDeps, caller: Caller, orderId: number, reason: string | null): Promise<string> {
  const { env } = deps;
  const now = deps.clock.now();
  const order = await readOrder(env.DB, orderId);
  if (!order || (caller.role !== "admin" && order.user_id !== caller.userId)) {
    throw new AppError("ORDER_NOT_FOUND", `Order ${orderId} does not exist`);
  }
  if (order.status === "CANCELLED") throw alreadyCancelled(orderId);
  if (caller.role !== "admin" && now.getTime() - Date.parse(order.created_at) > deps.windowSeconds * 1000) {
    throw new AppError("ORDER_NOT_CANCELLABLE", `Order ${orderId} is past its ${deps.windowSeconds} s cancellation window`);
  }

  const lines = JSON.parse(order.items) as StockLine[];
  const key = restockKey(orderId);
  await announceRestock(env, key, lines, order.user_id);
  let written: { body: string; outbox: OutboxRow[] };
  try {
    written = await writeCancellation(env.DB, order, lines, reason, now, deps.claim);
  } catch (error) {
    if (isConstraintViolation(error, "outbox.order_id") || isConstraintViolation(error, "wallet_transactions.order_id")) {
      // Another cancel committed first: the units are due back, and the objects add them once.
      await commitStock(env, key, lines);
      throw alreadyCancelled(orderId);
    }
    await settleStockSoon(env, key, lines);
    throw new OutcomeUnknownError("The cancellation may or may not have been recorded; retry with the same Idempotency-Key", {
      cause: error,
    });
  }
  if (deps.claim) deps.claim.storedWithEffect = true;
  deps.defer(Promise.all([commitStock(env, key, lines), dispatchOutbox(env.DB, deps.queues, written.outbox, now.toISOString())]));
  return written.body;
}

const alreadyCancelled = (orderId: number) => new AppError("ORDER_NOT_CANCELLABLE", `Order ${orderId} is already cancelled`);

async function readOrder(db: D1Database, orderId: number): Promise<OrderToCancel | null> {
  try {
    return await db
      .prepare(
        `SELECT o.id, o.user_id, o.status, o.created_at, o.paid_amount, o.user_coupon_id,
           (SELECT json_group_array(json_object('productId', product_id, 'quantity', quantity))
            FROM (SELECT product_id, quantity FROM order_items WHERE order_id = o.id ORDER BY product_id)) AS items
         FROM orders o WHERE o.id = ?`,
      )
      .bind(orderId)
      .first<OrderToCancel>();
  } catch (error) {
    log("error", "cancel: D1 read failed", describeError(error));
    throw new AppError("SERVICE_UNAVAILABLE", "The order could not be read right now; retry shortly");
  }
}

/** One batch: every row of the cancellation changes together or not at all, the idempotency claim included. */
async function writeCancellation(
  db: D1Database,
  order: OrderToCancel,
  lines: StockLine[],
  reason: string | null,
  now: Date,
  claim: Claim | null,
): Promise<{ body: string; outbox: OutboxRow[] }> {
  const at = now.toISOString();
  const refund = order.paid_amount;
  const statements = [
    db
      .prepare("UPDATE orders SET status = 'CANCELLED', cancelled_at = ?, cancel_reason = ? WHERE id = ? AND status = 'COMPLETED'")
      .bind(at, reason, order.id),
  ];
  if (refund > 0) {
    statements.push(
      // Never refused for the balance limit: it bounds charges only.
      db.prepare("UPDATE users SET balance = balance + ?, updated_at = ? WHERE id = ?").bind(refund, at, order.user_id),
      db
        .prepare(
          // Never older than the user's newest ledger row, so the newest row carries the current balance.
          `INSERT INTO wallet_transactions (user_id, type, amount, balance_after, order_id, created_at)
           SELECT id, 'REFUND', ?, balance, ?, max(?, coalesce((SELECT max(created_at) FROM wallet_transactions WHERE user_id = ?), ''))
           FROM users WHERE id = ?`,
        )
        .bind(refund, order.id, at, order.user_id, order.user_id),
    );
  }
  if (order.user_coupon_id !== null) {
    statements.push(
      db
        .prepare(
          `UPDATE user_coupons SET status = CASE WHEN expires_at > ? THEN 'AVAILABLE' ELSE 'EXPIRED' END, used_at = NULL, order_id = NULL
           WHERE id = ? AND order_id = ?`,
        )
        .bind(at, order.user_coupon_id, order.id),
    );
  }
  for (const line of lines) {
    statements.push(
      db.prepare("UPDATE products SET stock = stock + ?, updated_at = ? WHERE id = ?").bind(line.quantity, at, line.productId),
      // Orders from before purchase counts were kept have no row (or a smaller one): never below zero.
      db
        .prepare("UPDATE user_product_purchases SET quantity = max(0, quantity - ?) WHERE user_id = ? AND product_id = ?")
        .bind(line.quantity, order.user_id, line.productId),
    );
  }
  const traced = { requestId: currentRequestId() };
  const events = {
    // The units leave the statistics of the day they were counted on.
    stats: { event: "CANCELLED", orderId: order.id, date: order.created_at.slice(0, 10), items: lines, ...traced },
    export: { orderId: order.id, userId: order.user_id, status: "CANCELLED", refundedAmount: refund, cancelledAt: at, ...traced },
  };
  for (const [topic, payload] of Object.entries(events)) {
    statements.push(
      db
        .prepare(
          `INSERT INTO outbox (order_id, topic, event, payload, created_at) VALUES (?, ?, 'CANCELLED', ?, ?)
           RETURNING id, topic, payload`,
        )
        .bind(order.id, topic, JSON.stringify(payload), at),
    );
  }
  statements.push(
    db
      .prepare(
        `INSERT INTO order_exports (order_id, event, status, attempts, created_at, updated_at)
         SELECT ?, 'CANCELLED', 'PENDING', 0, t, t FROM (SELECT max(?, coalesce((SELECT max(created_at) FROM order_exports), '')) AS t)`,
      )
      .bind(order.id, at),
  );
  const orderJson = `SELECT ${orderJsonSql("o")} FROM orders o WHERE o.id = ? AND o.status = 'CANCELLED'`;
  if (claim) statements.push(completeClaim(db, claim, orderJson, order.id));
  statements.push(db.prepare(`SELECT ${orderJsonSql("o")} AS body FROM orders o WHERE o.id = ?`).bind(order.id));

  const results = await db.batch<Record<string, unknown>>(statements);
  const body = (results.at(-1)!.results[0] as { body: string }).body;
  const outbox = results.flatMap((r) => r.results).filter((r): r is OutboxRow & Record<string, unknown> => "topic" in r);
  return { body, outbox };
}
