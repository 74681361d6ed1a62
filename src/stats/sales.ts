import type { OrderCompletedEvent } from "./event";

// Each sale line is added only while the order is absent from stats_counted_orders, and the order is
// recorded there by the LAST statement of the same batch (one transaction): a redelivered or retried
// message finds the order already counted and adds nothing, and a failed batch leaves no trace.
const ADD_SALE = `
  INSERT INTO product_sales_daily (stat_date, product_id, quantity)
  SELECT ?1, ?2, ?3 WHERE NOT EXISTS (SELECT 1 FROM stats_counted_orders WHERE order_id = ?4)
  ON CONFLICT (stat_date, product_id) DO UPDATE SET quantity = quantity + excluded.quantity`;

// Closes the order's outbox row, so the relay never re-sends a message that was counted.
const COMPLETE_OUTBOX = `UPDATE outbox SET completed_at = coalesce(completed_at, ?2) WHERE order_id = ?1 AND topic = 'stats'`;

const MARK_COUNTED = `INSERT INTO stats_counted_orders (order_id, counted_at) VALUES (?1, ?2) ON CONFLICT DO NOTHING`;

/** Adds one order's quantities to the daily sales, at most once per order. True when it was counted now. */
export async function countOrderSales(d1: D1Database, event: OrderCompletedEvent, now: Date): Promise<boolean> {
  const statements = event.items.map((item) =>
    d1.prepare(ADD_SALE).bind(event.date, item.productId, item.quantity, event.orderId),
  );
  statements.push(d1.prepare(COMPLETE_OUTBOX).bind(event.orderId, now.toISOString()));
  statements.push(d1.prepare(MARK_COUNTED).bind(event.orderId, now.toISOString()));
  const results = await d1.batch(statements);
  return results.at(-1)!.meta.changes === 1;
}

/** Closes the order's outbox row without counting it: for a message that can never be counted. */
export async function closeStatsOutbox(d1: D1Database, orderId: number, now: Date): Promise<void> {
  await d1.prepare(COMPLETE_OUTBOX).bind(orderId, now.toISOString()).run();
}
