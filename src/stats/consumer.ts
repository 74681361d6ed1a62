import { isConstraintViolation } from "../db/errors";
import { exponentialBackoff } from "../lib/backoff";
import { systemClock, type Clock } from "../lib/clock";
import { describeError, log } from "../lib/log";
import { orderIdOf } from "../orders/outbox";
import { OrderCompletedEventSchema } from "./event";
import { closeStatsOutbox, countOrderSales } from "./sales";

// Counts each completed order's units into the daily sales, once per order (see sales.ts).
//
// Invariant: every message ends acked or retried on its own, never by throwing the batch: one failing
// order never holds back, re-counts or burns the retries of the others.
// - D1 fails: the message is retried with exponential backoff (`retryDelaySeconds`); after max_retries
//   the dead-letter consumer returns its outbox row to the relay, so a long outage loses nothing.
// - A malformed body, or one naming a product that does not exist, fails the same way on every attempt:
//   it is logged and acked, and the order's stats outbox row is closed so the relay stops re-sending it.
//   Closing the row is a D1 write, and backs off like any other when D1 fails.

/** 5 s, 10 s, 20 s ... capped at 5 minutes. */
export const retryDelaySeconds = (attempts: number) => exponentialBackoff(attempts, 5, 300);

export async function consumeStats(batch: MessageBatch, env: Env, _ctx: ExecutionContext): Promise<void> {
  await countBatch(batch, env.DB, systemClock);
}

/** D1 runs the batches one at a time, so even two copies of one order in the same queue batch count once. */
export async function countBatch(batch: MessageBatch, d1: D1Database, clock: Clock): Promise<void> {
  await Promise.all(batch.messages.map((message) => settleMessage(message, d1, clock)));
}

async function settleMessage(message: Message, d1: D1Database, clock: Clock): Promise<void> {
  try {
    await countMessage(message, d1, clock);
    message.ack();
  } catch (error) {
    const delaySeconds = retryDelaySeconds(message.attempts);
    log("warn", "stats: D1 failed; will retry", {
      messageId: message.id,
      orderId: orderIdOf(message),
      attempts: message.attempts,
      delaySeconds,
      ...describeError(error),
    });
    message.retry({ delaySeconds });
  }
}

async function countMessage(message: Message, d1: D1Database, clock: Clock): Promise<void> {
  const parsed = OrderCompletedEventSchema.safeParse(message.body);
  if (!parsed.success) {
    const orderId = orderIdOf(message);
    log("error", "stats: malformed order-completed message; not counted", {
      messageId: message.id,
      orderId,
      issues: parsed.error.issues.map((issue) => ({ path: issue.path.join("."), message: issue.message })),
    });
    if (orderId !== null) await closeStatsOutbox(d1, orderId, clock.now());
    return;
  }
  const event = parsed.data;
  try {
    const counted = await countOrderSales(d1, event, clock.now());
    if (!counted) log("info", "stats: order already counted", { messageId: message.id, orderId: event.orderId });
  } catch (error) {
    if (!isConstraintViolation(error, "FOREIGN KEY constraint failed")) throw error;
    log("error", "stats: order names an unknown product; not counted", {
      messageId: message.id,
      orderId: event.orderId,
      ...describeError(error),
    });
    await closeStatsOutbox(d1, event.orderId, clock.now());
  }
}
