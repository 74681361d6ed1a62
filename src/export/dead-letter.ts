import { systemClock, type Clock } from "../lib/clock";
import { log } from "../lib/log";
import { orderIdOf } from "../orders/outbox";

// Messages that exhausted their retries land here: the export is marked FAILED (keeping the last
// error the consumer recorded) so admins see it and can retry it. Nothing is dropped silently.

export async function recordDeadExports(batch: MessageBatch, db: D1Database, clock: Clock): Promise<void> {
  const now = clock.now().toISOString();
  for (const message of batch.messages) {
    const orderId = orderIdOf(message);
    if (orderId === null) {
      log("error", "dead-lettered export without an order id", { messageId: message.id });
      message.ack();
      continue;
    }
    await db
      .prepare(
        `UPDATE order_exports SET status = 'FAILED', updated_at = ?,
           last_error = coalesce(last_error, 'retries exhausted') WHERE order_id = ? AND status = 'PENDING'`,
      )
      .bind(now, orderId)
      .run();
    log("error", "export failed permanently", { orderId });
    message.ack();
  }
}

export async function consumeExportDeadLetters(batch: MessageBatch, env: Env, _ctx: ExecutionContext): Promise<void> {
  await recordDeadExports(batch, env.DB, systemClock);
}
