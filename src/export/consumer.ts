import { describeError, log } from "../lib/log";
import { exponentialBackoff } from "../lib/backoff";
import { systemClock, type Clock } from "../lib/clock";
import { orderIdOf } from "../orders/outbox";
import { OrderExportEvent } from "./event";

// Delivers completed orders to the data platform, at least once from the queue's side and effectively
// once on the platform's, thanks to `Idempotency-Key: order-<id>`.
//
// Invariant: an export is SENT only after a 2xx, and every message ends acked or retried on its own:
// nothing this consumer meets throws the batch away, so one message's trouble never burns the others'
// retries and no retry comes back sooner than its backoff.
// - The platform refuses, times out or is unreachable: the attempt and its error are recorded on the
//   export, and the message is retried with exponential backoff (`backoffSeconds`).
// - DATA_PLATFORM_URL is missing or not an http(s) URL: nothing is POSTed; the attempt is recorded with
//   that reason as last_error (the admin export list shows it) and the message backs off like a refusal.
// - D1 fails (reading the status, recording SENT or the failed attempt): the message backs off the same
//   way. A 2xx whose SENT write failed is POSTed again on the retry; the platform deduplicates it.
// - Retries exhausted (max_retries in wrangler.toml): the dead-letter consumer marks the export FAILED,
//   keeping the last error, for an admin to see and retry.
// - A malformed body can never succeed: with a usable orderId the export is FAILED with the reason and its
//   outbox row closed, so the relay stops re-sending it; without one it is logged and acked.

export const DELIVERY_TIMEOUT_MS = 10_000;

export interface ExportDeps {
  db: D1Database;
  /** Unchecked: a deployment may lack it, and the consumer says so rather than POSTing anywhere. */
  url: string | undefined;
  send: typeof fetch;
  clock: Clock;
}

/** 10 s, 20 s, 40 s ... capped at 10 minutes. */
export const backoffSeconds = (attempts: number) => exponentialBackoff(attempts, 10, 600);

/** Why `url` cannot receive exports, or null when it is an http(s) URL. */
export function platformUrlProblem(url: unknown): string | null {
  if (typeof url !== "string" || url.trim() === "") return "DATA_PLATFORM_URL is not set";
  const parsed = URL.parse(url);
  if (parsed === null || (parsed.protocol !== "http:" && parsed.protocol !== "https:")) {
    return "DATA_PLATFORM_URL is not an http(s) URL";
  }
  return null;
}

export async function deliverExports(batch: MessageBatch, deps: ExportDeps): Promise<void> {
  const misconfigured = platformUrlProblem(deps.url);
  if (misconfigured) log("error", "export: not delivering", { reason: misconfigured, messages: batch.messages.length });
  for (const message of batch.messages) {
    try {
      await deliverMessage(message, deps, misconfigured);
    } catch (error) {
      const delaySeconds = backoffSeconds(message.attempts);
      log("warn", "export: D1 failed; will retry", {
        messageId: message.id,
        orderId: orderIdOf(message),
        attempts: message.attempts,
        delaySeconds,
        ...describeError(error),
      });
      message.retry({ delaySeconds });
    }
  }
}

async function deliverMessage(message: Message, deps: ExportDeps, misconfigured: string | null): Promise<void> {
  const parsed = OrderExportEvent.safeParse(message.body);
  if (!parsed.success) {
    const reason = `malformed export message: ${parsed.error.issues
      .map((issue) => `${issue.path.join(".") || "body"}: ${issue.message}`)
      .join("; ")}`.slice(0, 300);
    await failMalformed(message, deps, reason);
    message.ack();
    return;
  }
  const event = parsed.data;
  const current = await deps.db
    .prepare("SELECT status FROM order_exports WHERE order_id = ?")
    .bind(event.orderId)
    .first<{ status: string }>();
  if (current?.status === "SENT") {
    await completeOutboxStatement(deps.db, event.orderId, deps.clock.now().toISOString()).run();
    message.ack();
    return;
  }
  const error = misconfigured ?? (await post(deps.url!, deps, event));
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
    return;
  }
  await deps.db
    .prepare("UPDATE order_exports SET attempts = attempts + 1, last_error = ?, updated_at = ? WHERE order_id = ?")
    .bind(error, now, event.orderId)
    .run();
  const delaySeconds = backoffSeconds(message.attempts);
  log("warn", "export delivery failed; retrying", { orderId: event.orderId, attempt: message.attempts, delaySeconds, error });
  message.retry({ delaySeconds });
}

/**
 * Retrying cannot fix a body, so the export ends FAILED with the reason (an admin sees it; a SENT one is
 * left alone) and its outbox row is closed, which stops the relay from re-sending it every half hour.
 */
async function failMalformed(message: Message, deps: ExportDeps, reason: string): Promise<void> {
  const orderId = orderIdOf(message);
  log("error", "export: malformed message", { messageId: message.id, orderId, reason });
  if (orderId === null) return;
  const now = deps.clock.now().toISOString();
  await deps.db.batch([
    deps.db
      .prepare(
        `UPDATE order_exports SET status = 'FAILED', attempts = attempts + 1, last_error = ?, updated_at = ?
         WHERE order_id = ? AND status <> 'SENT'`,
      )
      .bind(reason, now, orderId),
    completeOutboxStatement(deps.db, orderId, now),
  ]);
}

const completeOutboxStatement = (db: D1Database, orderId: number, now: string) =>
  db
    .prepare("UPDATE outbox SET completed_at = coalesce(completed_at, ?) WHERE order_id = ? AND topic = 'export'")
    .bind(now, orderId);

/** Returns null on a 2xx, otherwise a short description of the failure. */
async function post(url: string, deps: ExportDeps, event: OrderExportEvent): Promise<string | null> {
  try {
    const response = await deps.send(url, {
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
