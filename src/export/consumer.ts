import { describeError, log } from "../lib/log";
import { exponentialBackoff } from "../lib/backoff";
import { systemClock, type Clock } from "../lib/clock";
import { OrderExportEvent } from "./event";

// Delivers completed orders to the data platform, at least once from the queue's side and effectively
// once on the platform's, thanks to `Idempotency-Key: order-<id>`. A row is marked SENT only on a 2xx.
// A failure retries the message with exponential backoff; after the queue's max_retries it goes to the
// dead-letter queue, whose consumer marks the export FAILED for admins to see and retry.

export const DELIVERY_TIMEOUT_MS = 10_000;

export interface ExportDeps {
  db: D1Database;
  url: string;
  send: typeof fetch;
  clock: Clock;
}

/** 10 s, 20 s, 40 s ... capped at 10 minutes. */
export const backoffSeconds = (attempts: number) => exponentialBackoff(attempts, 10, 600);

export async function deliverExports(batch: MessageBatch, deps: ExportDeps): Promise<void> {
  for (const message of batch.messages) {
    const parsed = OrderExportEvent.safeParse(message.body);
    if (!parsed.success) {
      log("error", "malformed export message dropped", { messageId: message.id, issues: parsed.error.issues.length });
      message.ack();
      continue;
    }
    const event = parsed.data;
    const current = await deps.db
      .prepare("SELECT status FROM order_exports WHERE order_id = ?")
      .bind(event.orderId)
      .first<{ status: string }>();
    if (current?.status === "SENT") {
      await completeOutbox(deps.db, event.orderId, deps.clock.now().toISOString());
      message.ack();
      continue;
    }
    const error = await post(deps, event);
    const now = deps.clock.now().toISOString();
    if (error === null) {
      await deps.db.batch([
        deps.db
          .prepare(
            `UPDATE order_exports SET status = 'SENT', attempts = attempts + 1, last_error = NULL, sent_at = ?, updated_at = ?
             WHERE order_id = ?`,
          )
          .bind(now, now, event.orderId),
        completeOutboxStatement(deps.db, event.orderId, now),
      ]);
      message.ack();
    } else {
      await deps.db
        .prepare("UPDATE order_exports SET attempts = attempts + 1, last_error = ?, updated_at = ? WHERE order_id = ?")
        .bind(error, now, event.orderId)
        .run();
      log("warn", "export delivery failed; retrying", { orderId: event.orderId, attempt: message.attempts, error });
      message.retry({ delaySeconds: backoffSeconds(message.attempts) });
    }
  }
}

const completeOutboxStatement = (db: D1Database, orderId: number, now: string) =>
  db
    .prepare("UPDATE outbox SET completed_at = coalesce(completed_at, ?) WHERE order_id = ? AND topic = 'export'")
    .bind(now, orderId);

async function completeOutbox(db: D1Database, orderId: number, now: string): Promise<void> {
  await completeOutboxStatement(db, orderId, now).run();
}

/** Returns null on a 2xx, otherwise a short description of the failure. */
async function post(deps: ExportDeps, event: OrderExportEvent): Promise<string | null> {
  try {
    const response = await deps.send(deps.url, {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": `order-${event.orderId}` },
      body: JSON.stringify(event),
      signal: AbortSignal.timeout(DELIVERY_TIMEOUT_MS),
    });
    if (response.ok) return null;
    const text = (await response.text().catch(() => "")).slice(0, 200);
    return `HTTP ${response.status}${text ? `: ${text}` : ""}`;
  } catch (error) {
    return String(describeError(error).message ?? error).slice(0, 300);
  }
}

export async function consumeExports(batch: MessageBatch, env: Env, _ctx: ExecutionContext): Promise<void> {
  // A wrapper, not the bare `fetch`: workerd refuses fetch called with another `this`.
  const send: typeof fetch = (input, init) => fetch(input, init);
  await deliverExports(batch, { db: env.DB, url: env.DATA_PLATFORM_URL, send, clock: systemClock });
}
