import { systemClock, type Clock } from "../lib/clock";
import { describeError, log } from "../lib/log";
import { eventOf, orderIdOf } from "../orders/outbox";
import { backoffSeconds } from "./consumer";

// Messages that exhausted their retries land here.
//
// Invariant: a dead-lettered export ends FAILED (keeping the last error the consumer recorded) so admins
// see it and can retry it; nothing is dropped silently.
// - D1 fails: the message is retried with the consumer's backoff, on its own; the queue's generous
//   max_retries (wrangler.toml) outlasts a long outage. Should even those run out, the export is still
//   PENDING with its outbox row open, so the cron relay sends it again.
// - The message's order and event name the export: a dead cancellation fails the (order, CANCELLED) row
//   and leaves the order's PLACED export as it is.
// - A body without a usable orderId or with an unknown event names no export: it is logged and acked.

export async function recordDeadExports(batch: MessageBatch, db: D1Database, clock: Clock): Promise<void> {
  for (const message of batch.messages) {
    const orderId = orderIdOf(message);
    const event = eventOf(message);
    if (orderId === null || event === null) {
      log("error", "dead-lettered export without an order id or a known event", { messageId: message.id, orderId });
      message.ack();
      continue;
    }
    try {
      await db
        .prepare(
          `UPDATE order_exports SET status = 'FAILED', updated_at = ?,
             last_error = coalesce(last_error, 'retries exhausted')
           WHERE order_id = ? AND event = ? AND status = 'PENDING'`,
        )
        .bind(clock.now().toISOString(), orderId, event)
        .run();
      log("error", "export failed permanently", { orderId, event });
      message.ack();
    } catch (error) {
      const delaySeconds = backoffSeconds(message.attempts);
      log("warn", "export dead letter: D1 failed; will retry", {
        orderId,
        event,
        attempts: message.attempts,
        delaySeconds,
        ...describeError(error),
      });
      message.retry({ delaySeconds });
    }
  }
}

export async function consumeExportDeadLetters(batch: MessageBatch, env: Env, _ctx: ExecutionContext): Promise<void> {
  await recordDeadExports(batch, env.DB, systemClock);
}
