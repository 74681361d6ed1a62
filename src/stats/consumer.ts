import { isConstraintViolation } from "../db/errors";
import { exponentialBackoff } from "../lib/backoff";
import { systemClock, type Clock } from "../lib/clock";
import { describeError, log } from "../lib/log";
import { OrderCompletedEventSchema } from "./event";
import { countOrderSales } from "./sales";

/** 5 s, 10 s, 20 s ... capped at 5 minutes. */
export const retryDelaySeconds = (attempts: number) => exponentialBackoff(attempts, 5, 300);

export async function consumeStats(batch: MessageBatch, env: Env, _ctx: ExecutionContext): Promise<void> {
  await countBatch(batch, env.DB, systemClock);
}

/**
 * Every message gets its own D1 batch and its own ack or retry, so one failing order never holds back
 * (or re-counts) the others. D1 runs the batches one at a time, so even two copies of one order in the
 * same queue batch are counted once.
 */
export async function countBatch(batch: MessageBatch, d1: D1Database, clock: Clock): Promise<void> {
  await Promise.all(batch.messages.map((message) => countMessage(message, d1, clock)));
}

async function countMessage(message: Message, d1: D1Database, clock: Clock): Promise<void> {
  const parsed = OrderCompletedEventSchema.safeParse(message.body);
  if (!parsed.success) {
    // Retrying cannot fix a malformed body; keep it in the logs instead of cycling it to the dead letter queue.
    log("error", "stats: malformed order-completed message dropped", {
      messageId: message.id,
      issues: parsed.error.issues.map((issue) => ({ path: issue.path.join("."), message: issue.message })),
    });
    message.ack();
    return;
  }
  const event = parsed.data;
  try {
    const counted = await countOrderSales(d1, event, clock.now());
    if (!counted) log("info", "stats: order already counted", { messageId: message.id, orderId: event.orderId });
    message.ack();
  } catch (error) {
    // A product that does not exist fails the same way on every attempt.
    if (isConstraintViolation(error, "FOREIGN KEY constraint failed")) {
      log("error", "stats: order names an unknown product; dropped", {
        messageId: message.id,
        orderId: event.orderId,
        ...describeError(error),
      });
      message.ack();
      return;
    }
    const delaySeconds = retryDelaySeconds(message.attempts);
    log("warn", "stats: counting failed; will retry", {
      messageId: message.id,
      orderId: event.orderId,
      attempts: message.attempts,
      delaySeconds,
      ...describeError(error),
    });
    message.retry({ delaySeconds });
  }
}
