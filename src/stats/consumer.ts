import { isConstraintViolation } from "../db/errors";
import { exponentialBackoff } from "../lib/backoff";
import { systemClock, type Clock } from "../lib/clock";
import { describeError, log } from "../lib/log";
import { requestIdOf, withRequestId } from "../lib/request-context";
import { eventOf, orderIdOf, retryLater } from "../orders/outbox";
import { StatsEventSchema, type StatsEvent } from "./event";
import { closeStatsOutbox, countedNow, countOrderEvent, countStatements } from "./sales";

// Counts each order's units into the daily sales when it is placed and out again when it is cancelled,
// once per order and event, in whichever order the two messages arrive (see sales.ts).
//
// Batching: a queue batch costs one D1 call, not one per message (an order storm would otherwise spend
// D1's single writer on the stats). The statements of every well-formed message go into one d1.batch, one
// transaction, each message's contiguous and in sales.ts's order, in chunks of at most
// MAX_BATCH_STATEMENTS; a message's own counted mark (its last statement) says whether it counted now.
// Two copies of one event in the same batch count once: the second's checks see the first's mark inside
// the transaction. A chunk whose batch fails (D1 down, one message naming an unknown product, anything)
// committed nothing, and its messages fall back to one batch each, so the one at fault fails alone.
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

/** The most statements one d1.batch holds (a message has 3 to 52: up to 50 sale lines, outbox, mark). */
export const MAX_BATCH_STATEMENTS = 200;

export async function consumeStats(batch: MessageBatch, env: Env, _ctx: ExecutionContext): Promise<void> {
  await countBatch(batch, env.DB, systemClock);
}

interface Counting {
  message: Message;
  event: StatsEvent;
}

/** One D1 batch per chunk of well-formed messages; malformed ones are settled one by one. */
export async function countBatch(batch: MessageBatch, d1: D1Database, clock: Clock): Promise<void> {
  const valid: Counting[] = [];
  const malformed: Promise<void>[] = [];
  for (const message of batch.messages) {
    const parsed = StatsEventSchema.safeParse(message.body);
    if (parsed.success) valid.push({ message, event: parsed.data });
    else malformed.push(settle(message, () => dropMalformed(message, parsed.error, d1, clock)));
  }
  const counted = (async () => {
    for (const chunk of chunksOf(valid)) await countChunk(chunk, d1, clock);
  })();
  await Promise.all([...malformed, counted]);
}

/** Consecutive messages, at most MAX_BATCH_STATEMENTS statements a chunk (a lone bigger message alone). */
function chunksOf(messages: Counting[]): Counting[][] {
  const chunks: Counting[][] = [];
  let current: Counting[] = [];
  let statements = 0;
  for (const counting of messages) {
    const size = counting.event.items.length + 2;
    if (current.length > 0 && statements + size > MAX_BATCH_STATEMENTS) {
      chunks.push(current);
      current = [];
      statements = 0;
    }
    current.push(counting);
    statements += size;
  }
  if (current.length > 0) chunks.push(current);
  return chunks;
}

async function countChunk(chunk: Counting[], d1: D1Database, clock: Clock): Promise<void> {
  // A chunk of one IS the per-message path: a failure is not worth a second attempt right away.
  if (chunk.length === 1) return settle(chunk[0]!.message, () => countOne(chunk[0]!, d1, clock));
  const now = clock.now();
  const statements = chunk.map(({ event }) => countStatements(d1, event, now));
  let results: D1Result[];
  try {
    results = await d1.batch(statements.flat());
  } catch (error) {
    log("warn", "stats: a batch of messages failed as a whole; counting them one by one", {
      messages: chunk.length,
      ...describeError(error),
    });
    await Promise.all(chunk.map((counting) => settle(counting.message, () => countOne(counting, d1, clock))));
    return;
  }
  let end = 0;
  chunk.forEach(({ message, event }, i) => {
    end += statements[i]!.length;
    const counted = countedNow(results[end - 1]!); // its own mark, the last of its statements
    withRequestId(requestIdOf(message.body), () => {
      if (!counted) alreadyCounted(message, event);
      message.ack();
    });
  });
}

/** Acks the message once `work` is done, or retries it with backoff when `work` fails (D1). */
function settle(message: Message, work: () => Promise<void>): Promise<void> {
  // Each message's log lines name the request that placed or cancelled its order (the body's requestId).
  return withRequestId(requestIdOf(message.body), async () => {
    try {
      await work();
      message.ack();
    } catch (error) {
      retryLater(message, "stats", retryDelaySeconds(message.attempts), error);
    }
  });
}

/** One message in its own batch: an unknown product fails only it, and closes its outbox row. */
async function countOne({ message, event }: Counting, d1: D1Database, clock: Clock): Promise<void> {
  try {
    const counted = await countOrderEvent(d1, event, clock.now());
    if (!counted) alreadyCounted(message, event);
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

function alreadyCounted(message: Message, event: StatsEvent): void {
  log("info", "stats: order event already counted", { messageId: message.id, orderId: event.orderId, event: event.event });
}

async function dropMalformed(
  message: Message,
  error: { issues: { path: PropertyKey[]; message: string }[] },
  d1: D1Database,
  clock: Clock,
): Promise<void> {
  const orderId = orderIdOf(message);
  const event = eventOf(message);
  log("error", "stats: malformed order event message; not counted", {
    messageId: message.id,
    orderId,
    event,
    issues: error.issues.map((issue) => ({ path: issue.path.join("."), message: issue.message })),
  });
  if (orderId !== null && event !== null) await closeStatsOutbox(d1, orderId, event, clock.now());
}
