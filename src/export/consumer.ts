import { describeError, log } from "../lib/log";
import { exponentialBackoff } from "../lib/backoff";
import { systemClock, type Clock } from "../lib/clock";
import { requestIdOf, withRequestId } from "../lib/request-context";
import { eventOf, orderIdOf, retryLater, type OrderEvent } from "../orders/outbox";
import { exportSchemaOf, idempotencyKeyOf, type OrderCancellationExport, type OrderExportEvent } from "./event";
import { deliverySigner, type DeliverySigner } from "./signature";

// Delivers order events to the data platform, at least once from the queue's side and effectively once on
// the platform's, thanks to the Idempotency-Key: `order-<id>` for a completed order, `order-<id>-cancel` for
// its cancellation. Every POST is signed as Standard Webhooks says (./signature.ts): `webhook-id` is the
// Idempotency-Key, `webhook-timestamp` the attempt's time from the injected clock. Each event is its own
// export row (order_exports is UNIQUE (order_id, event)): its status, attempts, last error, backoff, dead
// letter and admin retry never touch the other event's row.
// The two are not ordered: a cancellation may reach the platform before its order (say, the order's
// export is still backing off); each is delivered on its own and the platform deduplicates each by key.
//
// Batching: a queue batch costs two D1 calls, not two or three per message (an order storm would otherwise
// spend D1's single writer on the exports). One read gets the status of every well-formed message's export;
// those already SENT are only closed in the outbox; the others are POSTed concurrently (each is
// independent); then ONE d1.batch records every outcome: SENT and the outbox closed for a 2xx, the attempt
// and its error otherwise. Only once it has committed is each message acked or retried with its backoff.
// Two copies of one event in a batch share one POST and one write. Malformed messages are settled one by
// one, before the others.
//
// Invariant: an export is SENT only after a 2xx, and every message ends acked or retried on its own:
// nothing this consumer meets throws the batch away, so one message's trouble (a refusal, a malformed
// body) never burns the others' retries and no retry comes back sooner than its backoff. Only D1 failing,
// which is no message's doing, retries every message of the batch together.
// - The platform refuses, times out or is unreachable: the attempt and its error are recorded on the
//   export, and the message is retried with exponential backoff (`backoffSeconds`).
// - DATA_PLATFORM_URL is missing or not an http(s) URL: nothing is POSTed; the attempt is recorded with
//   that reason as last_error (the admin export list shows it) and the message backs off like a refusal.
// - EXPORT_SIGNING_SECRET is missing or malformed: the same; an unsigned delivery is never POSTed.
// - D1 fails reading the statuses: nothing is POSTed and every well-formed message of the batch backs off
//   the same way. D1 fails recording the outcomes: nothing of the batch is recorded (one transaction) and
//   every one of its messages backs off; a 2xx among them is POSTed again on the retry, and the platform
//   deduplicates it. (The outcome writes are UPDATEs no constraint can refuse: only D1 itself fails them.)
// - Retries exhausted (max_retries in wrangler.toml): the dead-letter consumer marks the export FAILED,
//   keeping the last error, for an admin to see and retry.
// - A malformed body can never succeed: with a usable orderId the export of its event (a body with
//   `status` is a cancellation) is FAILED with the reason and its outbox row closed, so the relay stops
//   re-sending it; without one, or with an unknown event, it is logged and acked.

export const DELIVERY_TIMEOUT_MS = 10_000;

export interface ExportDeps {
  db: D1Database;
  /** Unchecked: a deployment may lack it, and the consumer says so rather than POSTing anywhere. */
  url: string | undefined;
  /** EXPORT_SIGNING_SECRET, unchecked for the same reason: one `whsec_<base64>` or several, space-separated. */
  signingSecret: string | undefined;
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
  const delivery = await deliveryOf(deps);
  if (typeof delivery === "string") {
    log("error", "export: not delivering", { reason: delivery, messages: batch.messages.length });
  }
  const valid: Export[] = [];
  for (const message of batch.messages) {
    const parsed = parseMessage(message);
    if ("body" in parsed) {
      valid.push(parsed);
      continue;
    }
    try {
      await withRequestId(requestIdOf(message.body), () => failMalformed(message, deps, parsed.malformed));
    } catch (error) {
      retryLater(message, "export", backoffSeconds(message.attempts), error);
    }
  }
  if (valid.length > 0) await deliverAll(valid, deps, delivery);
}

interface Delivery {
  url: string;
  signer: DeliverySigner;
}

/** A well-formed message and the export row it is about. */
interface Export {
  message: Message;
  row: { orderId: number; event: OrderEvent };
  body: OrderExportEvent | OrderCancellationExport;
}

/** Where and how to deliver, or why nothing can be delivered. */
async function deliveryOf(deps: ExportDeps): Promise<Delivery | string> {
  const urlProblem = platformUrlProblem(deps.url);
  if (urlProblem) return urlProblem;
  const signer = await deliverySigner(deps.signingSecret);
  return "problem" in signer ? signer.problem : { url: deps.url!, signer };
}

function parseMessage(message: Message): Export | { malformed: string } {
  const event = eventOf(message);
  if (event === null) return { malformed: "malformed export message: unknown event" };
  const parsed = exportSchemaOf[event].safeParse(message.body);
  if (!parsed.success) {
    const issues = parsed.error.issues.map((issue) => `${issue.path.join(".") || "body"}: ${issue.message}`);
    return { malformed: `malformed export message: ${issues.join("; ")}`.slice(0, 300) };
  }
  return { message, row: { orderId: parsed.data.orderId, event }, body: parsed.data };
}

const keyOf = (row: { orderId: number; event: string }) => `${row.orderId}:${row.event}`;

/**
 * POSTs of one queue batch in flight at once: enough to overlap the platform's latency, few enough that a
 * batch of 50 neither opens 50 connections at once nor looks like a flood to the platform.
 */
export const POSTS_IN_FLIGHT = 8;

/** `fn` over `items` with at most `limit` running at once; results in the items' order. */
async function mapInFlight<T, R>(items: T[], limit: number, fn: (item: T, index: number) => Promise<R>): Promise<R[]> {
  const results = new Array<R>(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      results[i] = await fn(items[i]!, i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}

/**
 * The well-formed messages of a batch, in a constant number of D1 calls: one read of their statuses, the
 * POSTs of those not yet SENT (concurrently), then one batch with every message's outcome.
 */
async function deliverAll(exports: Export[], deps: ExportDeps, delivery: Delivery | string): Promise<void> {
  const retryAll = (error: unknown) => {
    for (const { message } of exports) retryLater(message, "export", backoffSeconds(message.attempts), error);
  };
  let sent: Set<string>;
  try {
    const { results } = await deps.db
      .prepare("SELECT order_id, event, status FROM order_exports WHERE order_id IN (SELECT value FROM json_each(?))")
      .bind(JSON.stringify([...new Set(exports.map((e) => e.row.orderId))]))
      .all<{ order_id: number; event: string; status: string }>();
    sent = new Set(results.filter((r) => r.status === "SENT").map((r) => keyOf({ orderId: r.order_id, event: r.event })));
  } catch (error) {
    return retryAll(error);
  }

  // A second copy of an event in the batch (a relay re-send) shares the first's POST and write.
  const firstOf = new Map<string, number>();
  const first = exports.map(({ row }, i) => {
    const key = keyOf(row);
    if (!firstOf.has(key)) firstOf.set(key, i);
    return firstOf.get(key)!;
  });

  // Each event's outcome: null when delivered now or before, else why not.
  const outcomes = await mapInFlight(exports, POSTS_IN_FLIGHT, async ({ message, row, body }, i) => {
    if (first[i] !== i || sent.has(keyOf(row))) return null;
    if (typeof delivery === "string") return delivery;
    return withRequestId(requestIdOf(message.body), () => post(delivery, deps, idempotencyKeyOf(row.orderId, row.event), body));
  });

  const now = deps.clock.now().toISOString();
  const errors = first.map((j) => outcomes[j] ?? null);
  const writes = exports.flatMap(({ row }, i) => {
    if (first[i] !== i) return [];
    if (sent.has(keyOf(row))) return [completeOutboxStatement(deps.db, row, now)];
    const error = errors[i];
    if (error === null) {
      return [
        deps.db
          .prepare(
            `UPDATE order_exports SET status = 'SENT', attempts = attempts + 1, last_error = NULL, sent_at = ?, updated_at = ?
             WHERE order_id = ? AND event = ?`,
          )
          .bind(now, now, row.orderId, row.event),
        completeOutboxStatement(deps.db, row, now),
      ];
    }
    return [
      deps.db
        .prepare("UPDATE order_exports SET attempts = attempts + 1, last_error = ?, updated_at = ? WHERE order_id = ? AND event = ?")
        .bind(error, now, row.orderId, row.event),
    ];
  });
  try {
    await deps.db.batch(writes);
  } catch (error) {
    // Nothing was recorded: a 2xx is POSTed again on the retry, and the platform deduplicates it.
    return retryAll(error);
  }

  exports.forEach(({ message, row }, i) => {
    const error = errors[i];
    if (error === null) {
      message.ack();
      return;
    }
    const delaySeconds = backoffSeconds(message.attempts);
    withRequestId(requestIdOf(message.body), () =>
      log("warn", "export delivery failed; retrying", { ...row, attempt: message.attempts, delaySeconds, error }),
    );
    message.retry({ delaySeconds });
  });
}

/**
 * Retrying cannot fix a body, so the export ends FAILED with the reason (an admin sees it; a SENT one is
 * left alone) and its outbox row is closed, which stops the relay from re-sending it every half hour.
 * Without a usable orderId, or with an event this code does not know, the message names no export row.
 */
async function failMalformed(message: Message, deps: ExportDeps, reason: string): Promise<void> {
  const orderId = orderIdOf(message);
  const event = eventOf(message);
  log("error", "export: malformed message", { messageId: message.id, orderId, event, reason });
  if (orderId !== null && event !== null) {
    const now = deps.clock.now().toISOString();
    await deps.db.batch([
      deps.db
        .prepare(
          `UPDATE order_exports SET status = 'FAILED', attempts = attempts + 1, last_error = ?, updated_at = ?
           WHERE order_id = ? AND event = ? AND status <> 'SENT'`,
        )
        .bind(reason, now, orderId, event),
      completeOutboxStatement(deps.db, { orderId, event }, now),
    ]);
  }
  message.ack();
}

const completeOutboxStatement = (db: D1Database, row: { orderId: number; event: OrderEvent }, now: string) =>
  db
    .prepare("UPDATE outbox SET completed_at = coalesce(completed_at, ?) WHERE order_id = ? AND topic = 'export' AND event = ?")
    .bind(now, row.orderId, row.event);

/** Returns null on a 2xx, otherwise a short description of the failure. */
async function post(delivery: Delivery, deps: ExportDeps, idempotencyKey: string, body: unknown): Promise<string | null> {
  try {
    // The signature covers these exact bytes, so the body is serialised once.
    const payload = JSON.stringify(body);
    const signature = await delivery.signer.sign(idempotencyKey, deps.clock.now(), payload);
    const response = await deps.send(delivery.url, {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": idempotencyKey, ...signature },
      body: payload,
      signal: AbortSignal.timeout(DELIVERY_TIMEOUT_MS),
      // Followed, a 301/302/303 turns the POST into a GET without its body, and the landing page's 2xx would
      // mark an export SENT that never arrived: a redirect is a failed attempt, its target named in the error.
      redirect: "manual",
    });
    if (response.ok) return null;
    if (response.status >= 300 && response.status < 400) {
      await response.body?.cancel();
      const target = (response.headers.get("Location") ?? "(no Location)").slice(0, 200);
      return `HTTP ${response.status} redirect to ${target}: not followed; set DATA_PLATFORM_URL to the final address`;
    }
    const text = (await response.text().catch(() => "")).slice(0, 200);
    return `HTTP ${response.status}${text ? `: ${text}` : ""}`;
  } catch (error) {
    return String(describeError(error).message ?? error).slice(0, 300);
  }
}

export async function consumeExports(batch: MessageBatch, env: Env, _ctx: ExecutionContext): Promise<void> {
  // A wrapper, not the bare `fetch`: workerd refuses fetch called with another `this`.
  const send: typeof fetch = (input, init) => fetch(input, init);
  await deliverExports(batch, {
    db: env.DB,
    url: env.DATA_PLATFORM_URL,
    signingSecret: env.EXPORT_SIGNING_SECRET,
    send,
    clock: systemClock,
  });
}
