import { exponentialBackoff } from "../lib/backoff";
import { describeError, log } from "../lib/log";
import { currentRequestId, requestIdOf } from "../lib/request-context";

// The transactional outbox. Rows are written in the order's own batch; this moves them to the queues.
// A row is marked dispatched only after its queue accepted it, so a failed send() is simply retried by
// the cron relay. A crash between send and mark sends twice: consumers are idempotent per order and event.
//
// Each order has up to two events, PLACED and CANCELLED, and each event its own stats and export row
// (UNIQUE (order_id, topic, event)); every statement here that names an order's row names its event too.

/** What happened to an order; each event has its own outbox rows, export row and counted mark. */
export type OrderEvent = "PLACED" | "CANCELLED";

export interface OrderQueues {
  stats: Queue;
  export: Queue;
}

export const queuesOf = (env: Env): OrderQueues => ({ stats: env.STATS_QUEUE, export: env.EXPORT_QUEUE });

export interface OutboxRow {
  id: number;
  topic: "stats" | "export";
  payload: string;
}

// Cloudflare Queues take at most 100 messages and 256 KB per sendBatch; stay inside both.
const MAX_BATCH_MESSAGES = 100;
const MAX_BATCH_BYTES = 240_000;

const utf8 = new TextEncoder();

/** Splits rows into sendBatch-sized chunks, in order; sizes are UTF-8 bytes (a Hangul name is 3 per character). */
export function chunkForQueue(rows: OutboxRow[]): OutboxRow[][] {
  const chunks: OutboxRow[][] = [];
  let current: OutboxRow[] = [];
  let bytes = 0;
  for (const row of rows) {
    const size = utf8.encode(row.payload).byteLength + 64;
    if (current.length > 0 && (current.length === MAX_BATCH_MESSAGES || bytes + size > MAX_BATCH_BYTES)) {
      chunks.push(current);
      current = [];
      bytes = 0;
    }
    current.push(row);
    bytes += size;
  }
  if (current.length > 0) chunks.push(current);
  return chunks;
}

/**
 * A row whose payload also names the `requestId` of the request sending it (the order, the cancellation or
 * an admin's retry), unless the payload already names one, so the consumers' log lines lead back to that
 * request. The consumers parse with plain (non-strict) zod objects, which drop the extra key: the export
 * still POSTs exactly the contract's body. A relay send (the cron) has no request: the payload goes as stored.
 */
function withRequestIdField(row: OutboxRow, requestId: string | undefined): OutboxRow {
  if (requestId === undefined) return row;
  try {
    const body: unknown = JSON.parse(row.payload);
    if (typeof body !== "object" || body === null || Array.isArray(body) || "requestId" in body) return row;
    return { ...row, payload: JSON.stringify({ ...body, requestId }) };
  } catch {
    return row; // not JSON: the send below fails it like any other
  }
}

/**
 * Sends the rows chunk by chunk, then marks what the queues took as dispatched, in one statement. A chunk
 * whose send fails stays undispatched for the relay; so does everything if the marking itself fails
 * (a second send then, which the consumers absorb).
 */
export async function dispatchOutbox(db: D1Database, queues: OrderQueues, rows: OutboxRow[], nowIso: string): Promise<number> {
  const sent: number[] = [];
  const requestId = currentRequestId();
  for (const topic of ["stats", "export"] as const) {
    const bodies = rows.filter((r) => r.topic === topic).map((r) => withRequestIdField(r, requestId));
    for (const chunk of chunkForQueue(bodies)) {
      try {
        await queues[topic].sendBatch(chunk.map((r) => ({ body: JSON.parse(r.payload), contentType: "json" as const })));
        sent.push(...chunk.map((r) => r.id));
      } catch (error) {
        log("warn", "outbox send failed; the relay will retry", { topic, rows: chunk.length, error: String(error) });
      }
    }
  }
  if (sent.length > 0) {
    await db
      .prepare("UPDATE outbox SET dispatched_at = ? WHERE id IN (SELECT value FROM json_each(?))")
      .bind(nowIso, JSON.stringify(sent))
      .run();
  }
  return sent.length;
}

/**
 * The cron relay. Re-sends rows still undispatched `afterSeconds` after they were written (the send after
 * commit failed), and rows dispatched more than `redeliverAfterSeconds` ago whose consumer never finished
 * them (the message was lost after the queue took it). A FAILED export is left to an admin's retry.
 */
export async function relayOutbox(
  db: D1Database,
  queues: OrderQueues,
  now: Date,
  afterSeconds: number,
  redeliverAfterSeconds: number,
): Promise<number> {
  const before = (seconds: number) => new Date(now.getTime() - seconds * 1000).toISOString();
  const [unsent, lost] = await db.batch<OutboxRow>([
    db
      .prepare(
        `SELECT id, topic, payload FROM outbox WHERE dispatched_at IS NULL AND created_at <= ?
         ORDER BY created_at, id LIMIT 500`,
      )
      .bind(before(afterSeconds)),
    db
      .prepare(
        `SELECT o.id, o.topic, o.payload FROM outbox o
         WHERE o.completed_at IS NULL AND o.dispatched_at IS NOT NULL AND o.dispatched_at <= ?
           AND (o.topic = 'stats' OR EXISTS (
             SELECT 1 FROM order_exports e WHERE e.order_id = o.order_id AND e.event = o.event AND e.status = 'PENDING'))
         ORDER BY o.dispatched_at, o.id LIMIT 500`,
      )
      .bind(before(redeliverAfterSeconds)),
  ]);
  const rows = [...unsent!.results, ...lost!.results];
  if (rows.length > 0) log("info", "outbox relay re-sending", { unsent: unsent!.results.length, lost: lost!.results.length });
  return dispatchOutbox(db, queues, rows, now.toISOString());
}

/**
 * Stats messages that exhausted their retries (a long D1 outage, say) are not dropped: their outbox rows
 * are marked undispatched again, so the relay re-sends them once things recover. The consumer counts each
 * order event once, so a re-send can never double-count. If D1 still fails here, the message backs off on its own
 * (the queue's max_retries is generous); should even those run out, the row is still open and the relay
 * re-sends it after OUTBOX_REDELIVER_AFTER_SECONDS. A row already completed is left alone. The message's
 * event picks the row: a dead cancellation returns the CANCELLED row, never the order's PLACED one.
 */
export async function returnDeadStatsToOutbox(batch: MessageBatch, db: D1Database, now: Date): Promise<void> {
  for (const message of batch.messages) {
    const orderId = orderIdOf(message);
    const event = eventOf(message);
    if (orderId === null || event === null) {
      log("error", "dead-lettered stats message without an order id or a known event", { messageId: message.id, orderId });
      message.ack();
      continue;
    }
    try {
      await db
        .prepare(
          `UPDATE outbox SET dispatched_at = NULL, created_at = ?
           WHERE order_id = ? AND topic = 'stats' AND event = ? AND completed_at IS NULL`,
        )
        .bind(now.toISOString(), orderId, event)
        .run();
      message.ack();
    } catch (error) {
      const delaySeconds = exponentialBackoff(message.attempts, 10, 600);
      log("warn", "could not return a dead stats message to the outbox; will retry", {
        orderId,
        event,
        attempts: message.attempts,
        delaySeconds,
        error: String(error),
      });
      message.retry({ delaySeconds });
    }
  }
}

/** The order a queue message is about, or null for a body without a usable order id. */
export function orderIdOf(message: Message): number | null {
  const orderId = (message.body as { orderId?: unknown } | null)?.orderId;
  return typeof orderId === "number" && Number.isSafeInteger(orderId) && orderId > 0 ? orderId : null;
}

/**
 * The order event a queue message is about, or null when it names one this code does not know. Stats
 * bodies say it in `event`; export bodies carry the contract's body, where only a cancellation has a
 * `status` ("CANCELLED"). Neither present: PLACED, as every message written before events existed.
 */
export function eventOf(message: Message): OrderEvent | null {
  const body = message.body as { event?: unknown; status?: unknown } | null;
  if (typeof body !== "object" || body === null) return null;
  if (body.event !== undefined) return body.event === "PLACED" || body.event === "CANCELLED" ? body.event : null;
  if (body.status === undefined || body.status === "COMPLETED") return "PLACED";
  return body.status === "CANCELLED" ? "CANCELLED" : null;
}

/**
 * A message whose handling failed on our side (D1): retried after `delaySeconds` (the consumer's own
 * backoff, never the queue's few immediate retries), with a line saying which order and why.
 */
export function retryLater(message: Message, consumer: string, delaySeconds: number, error: unknown): void {
  log("warn", `${consumer}: D1 failed; will retry`, {
    requestId: requestIdOf(message.body),
    messageId: message.id,
    orderId: orderIdOf(message),
    event: eventOf(message),
    attempts: message.attempts,
    delaySeconds,
    ...describeError(error),
  });
  message.retry({ delaySeconds });
}
