import { isConstraintViolation } from "../db/errors";
import { exponentialBackoff } from "../lib/backoff";
import { systemClock, type Clock } from "../lib/clock";
import { describeError, log } from "../lib/log";
import { requestIdOf, withRequestId } from "../lib/request-context";
import { eventOf, orderIdOf, retryLater } from "../orders/outbox";
import { StatsEventSchema } from "./event";
import { closeStatsOutbox, countOrderEvent } from "./sales";

// Counts each order's units into the daily sales when it is placed and out again when it is cancelled,
// once per order and event, in whichever order the two messages arrive (see sales.ts).
//
// Invariant: every message ends acked or retried on its own, never by throwing the batch: one failing
// order never holds back, re-counts or burns the retries of the others.
// - D1 fails: the message is retried with exponential backoff (`retryDelaySeconds`); after max_retries
//   the dead-letter consumer returns its outbox row to the relay, so a long outage loses nothing.
// - A malformed body, or one naming a product that does not exist, fails the same way on every attempt:
//   it is logged and acked, and the stats outbox row of its order and event is closed so the relay stops
//   re-sending it. Closing the row is a D1 write, and backs off like any other when D1 fails. A body
//   without a usable orderId or with an unknown event names no row: it is only logged and acked.

/** 5 s, 10 s, 20 s ... capped at 5 minutes. */
export const retryDelaySeconds = (attempts: number) => exponentialBackoff(attempts, 5, 300);

export async function consumeStats(batch: MessageBatch, env: Env, _ctx: ExecutionContext): Promise<void> {
  await countBatch(batch, env.DB, systemClock);
}

/** D1 runs the batches one at a time, so even two copies of one event in the same queue batch count once. */
export async function countBatch(batch: MessageBatch, d1: D1Database, clock: Clock): Promise<void> {
  // Each message's log lines name the request that placed or cancelled its order (the body's requestId).
  await Promise.all(batch.messages.map((message) => withRequestId(requestIdOf(message.body), () => settleMessage(message, d1, clock))));
}

async function settleMessage(message: Message, d1: D1Database, clock: Clock): Promise<void> {
  try {
    await countMessage(message, d1, clock);
    message.ack();
  } catch (error) {
    retryLater(message, "stats", retryDelaySeconds(message.attempts), error);
  }
}

async function countMessage(message: Message, d1: D1Database, clock: Clock): Promise<void> {
  const parsed = StatsEventSchema.safeParse(message.body);
  if (!parsed.success) {
    const orderId = orderIdOf(message);
    const event = eventOf(message);
    log("error", "stats: malformed order event message; not counted", {
      messageId: message.id,
      orderId,
      event,
      issues: parsed.error.issues.map((issue) => ({ path: issue.path.join("."), message: issue.message })),
    });
    if (orderId !== null && event !== null) await closeStatsOutbox(d1, orderId, event, clock.now());
    return;
  }
  const event = parsed.data;
  try {
    const counted = await countOrderEvent(d1, event, clock.now());
    if (!counted) log("info", "stats: order event already counted", { messageId: message.id, orderId: event.orderId, event: event.event });
  } catch (error) {
    // Only a PLACED line inserts rows; a cancellation's UPDATE never meets the foreign key.
    if (!isConstraintViolation(error, "FOREIGN KEY constraint failed")) throw error;
    log("error", "stats: order names an unknown product; not counted", {
      messageId: message.id,
      orderId: event.orderId,
      event: event.event,
      ...describeError(error),
    });
    await closeStatsOutbox(d1, event.orderId, event.event, clock.now());
  }
}
