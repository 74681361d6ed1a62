import type { OrderEvent } from "../orders/outbox";
import type { StatsEvent } from "./event";

// Each order moves the daily sales at most twice: once when placed (+ its units) and once when cancelled
// (- the same units, on the same stat date). Each event is recorded as counted (stats_counted_orders,
// stats_counted_cancellations) by the LAST of the statements that apply it, in the same batch (one
// transaction): a redelivered or retried message finds its event already counted and changes nothing, and
// a failed batch leaves no trace.
//
// Ordering. The two events travel as separate messages and may be consumed in either order (a PLACED
// message retried after a D1 failure, a relay re-send). Both are counted idempotently and each looks at
// the other's mark, so the net is right in any order without waiting for anything:
// - PLACED adds its units only if the order's cancellation has not been counted;
// - CANCELLED subtracts them only if the PLACED event was counted (its units are in the table).
// Placed then cancelled: +q - q. Cancelled first: the cancellation subtracts nothing and is marked; the
// late PLACED sees the mark and adds nothing. Either way the net is 0 and nothing goes negative or is
// lost. (Holding the cancellation back until the PLACED event is counted would also work, but a PLACED
// message that can never be counted, e.g. a malformed one, would then keep its cancellation retrying
// forever.) D1 runs batches one at a time, so the two checks can never both miss each other.
const ADD_SALE = `
  INSERT INTO product_sales_daily (stat_date, product_id, quantity)
  SELECT ?1, ?2, ?3
  WHERE NOT EXISTS (SELECT 1 FROM stats_counted_orders WHERE order_id = ?4)
    AND NOT EXISTS (SELECT 1 FROM stats_counted_cancellations WHERE order_id = ?4)
  ON CONFLICT (stat_date, product_id) DO UPDATE SET quantity = quantity + excluded.quantity`;

// The row exists whenever the order was counted (its PLACED batch created or grew it). max(..., 0) is the
// last guard of CHECK (quantity >= 0): a cancellation whose lines disagreed with the placed ones must not
// wedge its message on the constraint forever.
const SUBTRACT_SALE = `
  UPDATE product_sales_daily SET quantity = max(quantity - ?3, 0)
  WHERE stat_date = ?1 AND product_id = ?2
    AND EXISTS (SELECT 1 FROM stats_counted_orders WHERE order_id = ?4)
    AND NOT EXISTS (SELECT 1 FROM stats_counted_cancellations WHERE order_id = ?4)`;

// Closes the event's outbox row, so the relay never re-sends a message that was counted.
const COMPLETE_OUTBOX = `
  UPDATE outbox SET completed_at = coalesce(completed_at, ?3) WHERE order_id = ?1 AND topic = 'stats' AND event = ?2`;

const MARK_COUNTED: Record<OrderEvent, string> = {
  PLACED: `INSERT INTO stats_counted_orders (order_id, counted_at) VALUES (?1, ?2) ON CONFLICT DO NOTHING`,
  CANCELLED: `INSERT INTO stats_counted_cancellations (order_id, counted_at) VALUES (?1, ?2) ON CONFLICT DO NOTHING`,
};

/**
 * The statements that apply one order event, in the order they must run: its sale lines, the outbox
 * completion, and LAST the counted mark. Several events' statements may share one batch (the consumer
 * batches a whole queue batch) as long as each event's stay contiguous and in this order: a second copy
 * of an event then finds the first's mark inside the same transaction and changes nothing.
 */
export function countStatements(d1: D1Database, event: StatsEvent, now: Date): D1PreparedStatement[] {
  const at = now.toISOString();
  const line = event.event === "PLACED" ? ADD_SALE : SUBTRACT_SALE;
  const statements = event.items.map((item) => d1.prepare(line).bind(event.date, item.productId, item.quantity, event.orderId));
  statements.push(d1.prepare(COMPLETE_OUTBOX).bind(event.orderId, event.event, at));
  statements.push(d1.prepare(MARK_COUNTED[event.event]).bind(event.orderId, at));
  return statements;
}

/** True when the result of an event's LAST statement (its counted mark) says it was counted now. */
export const countedNow = (mark: D1Result) => mark.meta.changes === 1;

/** Applies one order event to the daily sales, at most once per order and event. True when it was counted now. */
export async function countOrderEvent(d1: D1Database, event: StatsEvent, now: Date): Promise<boolean> {
  const results = await d1.batch(countStatements(d1, event, now));
  return countedNow(results.at(-1)!);
}

/** Closes the event's outbox row without counting it: for a message that can never be counted. */
export async function closeStatsOutbox(d1: D1Database, orderId: number, event: OrderEvent, now: Date): Promise<void> {
  await d1.prepare(COMPLETE_OUTBOX).bind(orderId, event, now.toISOString()).run();
}
