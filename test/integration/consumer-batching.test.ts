import { createExecutionContext, createMessageBatch, getQueueResult } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { afterEach, describe, expect, it, vi } from "vitest";
import { backoffSeconds, POSTS_IN_FLIGHT } from "../../src/export/consumer";
import { fixedClock } from "../../src/lib/clock";
import { relayOutbox } from "../../src/orders/outbox";
import { countBatch, MAX_BATCH_STATEMENTS } from "../../src/stats/consumer";
import { all, one } from "../helpers/db";
import { deliver, deliverMany, exportRow, outboxRow, platform, recordingQueues, seededOrder } from "../helpers/exports";
import { makeProduct } from "../helpers/factories";
import { gate } from "../helpers/faults";
import { interceptedD1, unreliableD1, type D1Call } from "../helpers/unreliable-d1";
import { captureLogLines, linesWith } from "../helpers/logs";

// The queue consumers cost a constant number of D1 calls per queue batch, not a few per message: the stats
// consumer one d1.batch per chunk of messages, the export consumer one read and one batch.

/** A D1 that records every call made through it (a batch is one call, whatever it holds). */
function countingDb(real: D1Database) {
  const calls: D1Call[] = [];
  return { db: interceptedD1(real, (call) => void calls.push(call)), calls };
}

// ---------------------------------------------------------------------------------------------- stats

const statsClock = fixedClock("2031-01-01T10:00:00.000Z");
// Order ids here need no orders row (stats_counted_orders has no foreign key); each test takes fresh ones.
let nextOrderId = 20_000_000 + Math.floor(Math.random() * 1_000_000);
const orderId = () => ++nextOrderId;

/** Runs the stats consumer on one batch of the given bodies; reports acks, retries and delays. */
async function count(bodies: unknown[], db: D1Database, attempts = 1) {
  const batch = createMessageBatch(
    "order-stats",
    bodies.map((body, i) => ({ id: `b-${i}-${crypto.randomUUID()}`, timestamp: new Date(), attempts, body })),
  );
  const retries = batch.messages.map((m) => vi.spyOn(m, "retry"));
  await countBatch(batch, db, statsClock);
  const result = await getQueueResult(batch, createExecutionContext());
  return { ...result, ids: batch.messages.map((m) => m.id), delays: retries.map((r) => r.mock.calls[0]?.[0]?.delaySeconds) };
}

type Line = { event?: string; orderId: number; date: string; items: { productId: number; quantity: number }[] };

/** What the daily sales of `date` should be after counting `events` once each (in order, as the consumer does). */
function expectedSales(events: Line[], date: string): Map<number, number> {
  const counted = new Set<string>();
  const placed = new Set<number>();
  const cancelled = new Set<number>();
  const sales = new Map<number, number>();
  for (const e of events) {
    const kind = e.event ?? "PLACED";
    if (counted.has(`${e.orderId}:${kind}`)) continue;
    counted.add(`${e.orderId}:${kind}`);
    if (kind === "PLACED" && !cancelled.has(e.orderId)) {
      for (const item of e.items) sales.set(item.productId, (sales.get(item.productId) ?? 0) + item.quantity);
    }
    if (kind === "CANCELLED" && placed.has(e.orderId)) {
      for (const item of e.items) sales.set(item.productId, Math.max((sales.get(item.productId) ?? 0) - item.quantity, 0));
    }
    (kind === "PLACED" ? placed : cancelled).add(e.orderId);
  }
  expect(events.every((e) => e.date === date)).toBe(true);
  return new Map([...sales].filter(([, quantity]) => quantity > 0));
}

async function salesOf(date: string, productIds: number[]): Promise<Map<number, number>> {
  const rows = await all<{ product_id: number; quantity: number }>(
    "SELECT product_id, quantity FROM product_sales_daily WHERE stat_date = ? AND product_id IN (SELECT value FROM json_each(?))",
    date,
    JSON.stringify(productIds),
  );
  return new Map(rows.filter((r) => r.quantity > 0).map((r) => [r.product_id, r.quantity]));
}

async function countedOrders(ids: number[], table = "stats_counted_orders"): Promise<number[]> {
  const rows = await all<{ order_id: number }>(
    `SELECT order_id FROM ${table} WHERE order_id IN (SELECT value FROM json_each(?)) ORDER BY order_id`,
    JSON.stringify(ids),
  );
  return rows.map((r) => r.order_id);
}

afterEach(() => vi.restoreAllMocks());

describe("stats consumer: one D1 batch per queue batch", () => {
  it("counts 24 messages (several orders and products, a duplicate, a cancellation) in ONE d1.batch, each once", async () => {
    const products = await Promise.all(Array.from({ length: 4 }, () => makeProduct()));
    const date = "2031-01-05";
    const events: Line[] = Array.from({ length: 21 }, (_, i) => ({
      orderId: orderId(),
      date,
      items: products.slice(0, 1 + (i % 3)).map((p, j) => ({ productId: products[(i + j) % 4]!.id, quantity: 1 + ((i + j) % 5) })),
    }));
    // A second copy of an event (a relay re-send) and the cancellation of an order placed earlier in the batch.
    const copy = { ...events[3]! };
    const cancellation = { ...events[7]!, event: "CANCELLED" };
    const bodies = [...events.slice(0, 10), copy, ...events.slice(10, 15), cancellation, ...events.slice(15)];
    expect(bodies.length).toBeGreaterThanOrEqual(20);

    const d1 = countingDb(env.DB);
    const logs = captureLogLines();
    const result = await count(bodies, d1.db);
    expect(d1.calls.map((c) => c.kind)).toEqual(["batch"]);
    expect(result.explicitAcks.sort()).toEqual([...result.ids].sort());
    expect(result.retryMessages).toEqual([]);

    const productIds = products.map((p) => p.id);
    expect(await salesOf(date, productIds)).toEqual(expectedSales(bodies, date));
    const ids = events.map((e) => e.orderId);
    expect(await countedOrders(ids)).toEqual([...ids].sort((x, y) => x - y));
    expect(await countedOrders(ids, "stats_counted_cancellations")).toEqual([events[7]!.orderId]);
    // Each message's own mark says whether it counted: only the copy was already counted.
    const already = linesWith(logs, "stats: order event already counted");
    expect(already.map((line) => [line.messageId, line.orderId])).toEqual([[result.ids[10], copy.orderId]]);

    // Delivered again, nothing changes, still in one call.
    const again = countingDb(env.DB);
    const redelivered = await count(bodies, again.db);
    expect(again.calls.map((c) => c.kind)).toEqual(["batch"]);
    expect(redelivered.explicitAcks).toHaveLength(bodies.length);
    expect(await salesOf(date, productIds)).toEqual(expectedSales(bodies, date));
  });

  it(`splits a batch bigger than ${MAX_BATCH_STATEMENTS} statements into chunks, keeping each message's statements together`, async () => {
    const products = await Promise.all(Array.from({ length: 5 }, () => makeProduct()));
    const date = "2031-01-06";
    // 50 messages of 5 lines: 7 statements each, 350 in all.
    const bodies: Line[] = Array.from({ length: 50 }, () => ({
      orderId: orderId(),
      date,
      items: products.map((p) => ({ productId: p.id, quantity: 2 })),
    }));
    bodies[40] = { ...bodies[2]! }; // a copy in another chunk than its first
    const d1 = countingDb(env.DB);
    const result = await count(bodies, d1.db);
    expect(d1.calls.map((c) => [c.kind, c.statements])).toEqual([
      ["batch", 28 * 7],
      ["batch", 22 * 7],
    ]);
    expect(result.explicitAcks).toHaveLength(50);
    expect(await salesOf(date, products.map((p) => p.id))).toEqual(new Map(products.map((p) => [p.id, 49 * 2])));
  });

  it("one message naming an unknown product fails alone: the others are counted once and acked, its outbox row is closed", async () => {
    const products = [await makeProduct(), await makeProduct()];
    const date = "2031-01-07";
    const { orderId: badId } = await seededOrder();
    await env.DB.prepare("UPDATE outbox SET dispatched_at = ? WHERE order_id = ?").bind("2026-11-20T09:00:00.000Z", badId).run();
    const good: Line[] = Array.from({ length: 6 }, (_, i) => ({
      orderId: orderId(),
      date,
      items: [{ productId: products[i % 2]!.id, quantity: i + 1 }],
    }));
    const bad = {
      orderId: badId,
      date,
      items: [
        { productId: products[0]!.id, quantity: 100 },
        { productId: 999_999_999, quantity: 1 },
      ],
    };
    const bodies = [good[0]!, good[1]!, bad, good[2]!, { ...good[0]! }, good[3]!, good[4]!, good[5]!];

    const d1 = countingDb(env.DB);
    const logs = captureLogLines();
    const result = await count(bodies, d1.db);
    expect(result.retryMessages).toEqual([]);
    expect(result.explicitAcks.sort()).toEqual([...result.ids].sort());
    // The combined batch failed on the foreign key; then each message alone, and the bad one's outbox row.
    expect(d1.calls.filter((c) => c.kind === "batch")).toHaveLength(1 + bodies.length);
    expect(d1.calls.filter((c) => c.kind === "run").map((c) => c.sql)).toEqual([expect.stringContaining("UPDATE outbox SET completed_at")]);
    expect(linesWith(logs, "stats: order names an unknown product; not counted").map((l) => l.orderId)).toEqual([badId]);

    expect(await salesOf(date, products.map((p) => p.id))).toEqual(expectedSales(good, date));
    expect(await countedOrders(good.map((e) => e.orderId))).toHaveLength(good.length);
    expect(await countedOrders([badId])).toEqual([]);
    expect((await outboxRow(badId, "stats")).completed_at).toBe(statsClock.now().toISOString());
    for (const e of good) expect((await one<{ n: number }>("SELECT count(*) AS n FROM stats_counted_orders WHERE order_id = ?", e.orderId)).n).toBe(1);
    const q = recordingQueues();
    await relayOutbox(env.DB, q.queues, new Date("2026-11-21T10:00:00.000Z"), 30, 1800);
    expect(q.sent.stats).not.toContainEqual(expect.objectContaining({ orderId: badId }));
  });

  it("a D1 failure of the combined batch falls back to one batch per message, which counts them once", async () => {
    const p = await makeProduct();
    const date = "2031-01-08";
    const bodies: Line[] = Array.from({ length: 5 }, (_, i) => ({ orderId: orderId(), date, items: [{ productId: p.id, quantity: i + 1 }] }));
    const d1 = unreliableD1(env.DB);
    d1.failNext(1);
    const result = await count(bodies, d1.db);
    expect(d1.failures).toBe(1);
    expect(result.explicitAcks).toHaveLength(5);
    expect(result.retryMessages).toEqual([]);
    expect(await salesOf(date, [p.id])).toEqual(new Map([[p.id, 15]]));
  });

  it("D1 down: every message is retried with its backoff and nothing is counted", async () => {
    const p = await makeProduct();
    const date = "2031-01-09";
    const bodies: Line[] = Array.from({ length: 4 }, () => ({ orderId: orderId(), date, items: [{ productId: p.id, quantity: 1 }] }));
    const d1 = unreliableD1(env.DB);
    d1.down();
    const result = await count(bodies, d1.db, 3);
    expect(result.explicitAcks).toEqual([]);
    expect(result.retryMessages).toHaveLength(4);
    expect(result.delays).toEqual([20, 20, 20, 20]);
    expect(await salesOf(date, [p.id])).toEqual(new Map());
    expect(await countedOrders(bodies.map((e) => e.orderId))).toEqual([]);
  });
});

// --------------------------------------------------------------------------------------------- export

type Order = Awaited<ReturnType<typeof seededOrder>>;
const bodyOf = ({ exportId: _, ...event }: Order) => event;

/**
 * A platform answering 500 to the given order ids and 200 to the rest, that records how many POSTs were in
 * flight at once: each answer waits until `together` POSTs have arrived (or 100 ms, for a consumer that
 * POSTs one at a time).
 */
function refusing(refused: Set<number>, together = 1) {
  const { posted, deps } = platform(200);
  let inFlight = 0;
  let maxInFlight = 0;
  const arrived = gate();
  const send = (async (input: RequestInfo | URL, init?: RequestInit) => {
    inFlight++;
    maxInFlight = Math.max(maxInFlight, inFlight);
    if (maxInFlight >= together) arrived.open();
    try {
      await Promise.race([arrived.opened, new Promise((resolve) => setTimeout(resolve, 100))]);
      const response = await deps.send(input, init);
      const { orderId } = JSON.parse(String(init?.body)) as { orderId: number };
      return refused.has(orderId) ? new Response("platform says no", { status: 500 }) : response;
    } finally {
      inFlight--;
    }
  }) as typeof fetch;
  return { posted, deps: { ...deps, send }, maxInFlight: () => maxInFlight };
}

describe("export consumer: one read and one write batch per queue batch", () => {
  it("30 messages to a healthy platform: 1 read + 1 batch, POSTed POSTS_IN_FLIGHT at a time, every export SENT and its outbox row closed", async () => {
    const orders = await Promise.all(Array.from({ length: 30 }, () => seededOrder()));
    const { posted, deps, maxInFlight } = refusing(new Set(), POSTS_IN_FLIGHT);
    // One already SENT (a redelivery) and a second copy of another in the same batch.
    await deliver(bodyOf(orders[0]!), deps);
    posted.length = 0;
    const bodies = [...orders.map(bodyOf), bodyOf(orders[5]!)];

    const d1 = countingDb(env.DB);
    const result = await deliverMany(bodies, { ...deps, db: d1.db });
    expect(d1.calls.map((c) => c.kind)).toEqual(["all", "batch"]);
    expect(result.explicitAcks.sort()).toEqual([...result.ids].sort());
    expect(result.retryMessages).toEqual([]);
    expect(posted.map((p) => p.key).sort()).toEqual(orders.slice(1).map((o) => `order-${o.orderId}`).sort());
    // 29 to POST, never more than POSTS_IN_FLIGHT at once, and that many overlap.
    expect(maxInFlight()).toBe(POSTS_IN_FLIGHT);
    for (const { orderId } of orders) {
      expect(await exportRow(orderId)).toMatchObject({ status: "SENT", attempts: 1, last_error: null });
      expect((await outboxRow(orderId, "export")).completed_at).not.toBeNull();
    }
  });

  it("the platform refusing some: those are retried with their backoff and the attempt recorded, the others SENT", async () => {
    const orders = await Promise.all(Array.from({ length: 12 }, () => seededOrder()));
    const refused = new Set([orders[1]!.orderId, orders[6]!.orderId, orders[11]!.orderId]);
    const { deps } = refusing(refused);
    const d1 = countingDb(env.DB);
    const logs = captureLogLines();
    // Each body names the request that placed its order: its log lines say so.
    const result = await deliverMany(orders.map((o) => ({ ...bodyOf(o), requestId: `req-${o.orderId}` })), { ...deps, db: d1.db }, 3);
    expect(d1.calls.map((c) => c.kind)).toEqual(["all", "batch"]);
    const isRefused = orders.map((o) => refused.has(o.orderId));
    expect(result.retryMessages).toEqual(result.ids.filter((_, i) => isRefused[i]).map((msgId) => ({ msgId })));
    expect(result.explicitAcks.sort()).toEqual(result.ids.filter((_, i) => !isRefused[i]).sort());
    expect(result.delays).toEqual(isRefused.map((r) => (r ? backoffSeconds(3) : undefined)));
    expect(backoffSeconds(3)).toBe(40);
    const retrying = linesWith(logs, "export delivery failed; retrying");
    expect(retrying).toHaveLength(refused.size);
    for (const line of retrying) expect(line).toMatchObject({ orderId: expect.toSatisfy((id: number) => refused.has(id)), requestId: `req-${line.orderId}` });
    expect(new Set(retrying.map((l) => l.orderId))).toEqual(refused);
    for (const { orderId } of orders) {
      if (refused.has(orderId)) {
        expect(await exportRow(orderId)).toEqual({ status: "PENDING", attempts: 1, last_error: "HTTP 500: platform says no", sent_at: null });
        expect((await outboxRow(orderId, "export")).completed_at).toBeNull();
      } else {
        expect(await exportRow(orderId)).toMatchObject({ status: "SENT", attempts: 1, last_error: null });
        expect((await outboxRow(orderId, "export")).completed_at).not.toBeNull();
      }
    }
  });

  it("the write batch failing retries every message with its backoff and leaves no export SENT; redelivered, all end SENT", async () => {
    const orders = await Promise.all(Array.from({ length: 6 }, () => seededOrder()));
    const refused = new Set([orders[2]!.orderId]);
    const { posted, deps } = refusing(refused);
    const d1 = unreliableD1(env.DB);
    d1.failNext(1, /SET status = 'SENT'/);

    const result = await deliverMany(orders.map(bodyOf), { ...deps, db: d1.db }, 2);
    expect(d1.failures).toBe(1);
    expect(result.explicitAcks).toEqual([]);
    expect(result.retryMessages).toEqual(result.ids.map((msgId) => ({ msgId })));
    expect(result.delays).toEqual(orders.map(() => backoffSeconds(2)));
    expect(posted).toHaveLength(6);
    for (const { orderId } of orders) {
      expect(await exportRow(orderId)).toEqual({ status: "PENDING", attempts: 0, last_error: null, sent_at: null });
      expect((await outboxRow(orderId, "export")).completed_at).toBeNull();
    }

    refused.clear();
    const again = await deliverMany(orders.map(bodyOf), { ...deps, db: d1.db }, 3);
    expect(again.explicitAcks).toHaveLength(6);
    // The 2xx whose SENT was lost are POSTed again under the same key; the platform deduplicates them.
    expect(posted.slice(6).map((p) => p.key).sort()).toEqual(posted.slice(0, 6).map((p) => p.key).sort());
    for (const { orderId } of orders) expect(await exportRow(orderId)).toMatchObject({ status: "SENT", attempts: 1, last_error: null });
  });
});
