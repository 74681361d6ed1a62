import { createExecutionContext, createMessageBatch, getQueueResult } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it, vi } from "vitest";
import worker from "../../src/index";
import { fixedClock } from "../../src/lib/clock";
import { relayOutbox, returnDeadStatsToOutbox } from "../../src/orders/outbox";
import { countBatch } from "../../src/stats/consumer";
import type { StatsEvent } from "../../src/stats/event";
import { outboxRow, recordingQueues, seededOrder } from "../helpers/exports";
import { makeProduct } from "../helpers/factories";
import { unreliableD1 } from "../helpers/unreliable-d1";

// Order ids here need no orders row (stats_counted_orders has no foreign key); each test takes fresh ones.
let nextOrderId = 9_000_000 + Math.floor(Math.random() * 1_000_000);
const orderId = () => ++nextOrderId;

let nextMessage = 0;
function message(body: unknown, attempts = 1) {
  return { id: `msg-${++nextMessage}`, timestamp: new Date(), attempts, body };
}

async function deliver(...bodies: unknown[]) {
  const batch = createMessageBatch("order-stats", bodies.map((body) => message(body)));
  const ctx = createExecutionContext();
  await worker.queue(batch, env, ctx);
  return getQueueResult(batch, ctx);
}

async function sold(date: string, productId: number): Promise<number | null> {
  const row = await env.DB.prepare("SELECT quantity FROM product_sales_daily WHERE stat_date = ? AND product_id = ?")
    .bind(date, productId)
    .first<{ quantity: number }>();
  return row?.quantity ?? null;
}

async function isCounted(id: number): Promise<boolean> {
  return (await env.DB.prepare("SELECT 1 FROM stats_counted_orders WHERE order_id = ?").bind(id).first()) !== null;
}

describe("stats consumer", () => {
  it("adds an order's quantities to the day's sales and acks", async () => {
    const [a, b] = [await makeProduct(), await makeProduct()];
    const event: StatsEvent = {
      event: "PLACED",
      orderId: orderId(),
      date: "2030-01-10",
      items: [
        { productId: a.id, quantity: 2 },
        { productId: b.id, quantity: 5 },
      ],
    };
    const result = await deliver(event);
    expect(result.explicitAcks).toHaveLength(1);
    expect(result.retryMessages).toEqual([]);
    expect(await sold("2030-01-10", a.id)).toBe(2);
    expect(await sold("2030-01-10", b.id)).toBe(5);
    expect(await isCounted(event.orderId)).toBe(true);
  });

  it("sums different orders of the same product and day, and keeps days apart", async () => {
    const p = await makeProduct();
    const result = await deliver(
      { orderId: orderId(), date: "2030-02-01", items: [{ productId: p.id, quantity: 3 }] },
      { orderId: orderId(), date: "2030-02-01", items: [{ productId: p.id, quantity: 4 }] },
      { orderId: orderId(), date: "2030-02-02", items: [{ productId: p.id, quantity: 1 }] },
    );
    expect(result.explicitAcks).toHaveLength(3);
    expect(await sold("2030-02-01", p.id)).toBe(7);
    expect(await sold("2030-02-02", p.id)).toBe(1);
  });

  it("counts an order once when it is delivered twice in one batch", async () => {
    const p = await makeProduct();
    const event = { orderId: orderId(), date: "2030-03-01", items: [{ productId: p.id, quantity: 6 }] };
    const result = await deliver(event, event, { ...event });
    expect(result.explicitAcks).toHaveLength(3);
    expect(result.retryMessages).toEqual([]);
    expect(await sold("2030-03-01", p.id)).toBe(6);
  });

  it("counts an order once when it is delivered again in a later batch", async () => {
    const [p, q] = [await makeProduct(), await makeProduct()];
    const event = {
      orderId: orderId(),
      date: "2030-03-05",
      items: [
        { productId: p.id, quantity: 2 },
        { productId: q.id, quantity: 1 },
      ],
    };
    await deliver(event);
    const again = await deliver(event);
    expect(again.explicitAcks).toHaveLength(1);
    expect(await sold("2030-03-05", p.id)).toBe(2);
    expect(await sold("2030-03-05", q.id)).toBe(1);
  });

  it("many copies of one order delivered in parallel batches still count once", async () => {
    const p = await makeProduct();
    const event = { orderId: orderId(), date: "2030-03-09", items: [{ productId: p.id, quantity: 3 }] };
    await Promise.all(Array.from({ length: 10 }, () => deliver(event, event)));
    expect(await sold("2030-03-09", p.id)).toBe(3);
  });

  it("retries a message whose D1 batch failed, with backoff, and counts it once when redelivered", async () => {
    const p = await makeProduct();
    const event = { orderId: orderId(), date: "2030-04-01", items: [{ productId: p.id, quantity: 4 }] };
    const failing = {
      prepare: (query: string) => env.DB.prepare(query),
      batch: async () => {
        throw new Error("D1_ERROR: simulated outage");
      },
    } as unknown as D1Database;

    const batch = createMessageBatch("order-stats", [message(event, 3)]);
    const retry = vi.spyOn(batch.messages[0]!, "retry");
    const ctx = createExecutionContext();
    await countBatch(batch, failing, fixedClock("2030-04-01T10:00:00.000Z"));
    const result = await getQueueResult(batch, ctx);
    expect(result.explicitAcks).toEqual([]);
    expect(result.retryMessages).toEqual([{ msgId: batch.messages[0]!.id }]);
    // Third attempt: 5 s doubled twice.
    expect(retry).toHaveBeenCalledWith({ delaySeconds: 20 });
    expect(await sold("2030-04-01", p.id)).toBeNull();
    expect(await isCounted(event.orderId)).toBe(false);

    await deliver(event);
    await deliver(event);
    expect(await sold("2030-04-01", p.id)).toBe(4);
  });

  it("a failing batch changes nothing: the sale lines and the counted mark commit together", async () => {
    const p = await makeProduct();
    const id = orderId();
    // The second line names a product that does not exist: its foreign key fails the whole batch.
    const result = await deliver({
      orderId: id,
      date: "2030-04-10",
      items: [
        { productId: p.id, quantity: 2 },
        { productId: 999_999_999, quantity: 1 },
      ],
    });
    expect(result.retryMessages).toEqual([]);
    expect(result.explicitAcks).toHaveLength(1);
    expect(await sold("2030-04-10", p.id)).toBeNull();
    expect(await isCounted(id)).toBe(false);
  });

  it("acks (never retries) a malformed message, and still counts the good ones beside it", async () => {
    const p = await makeProduct();
    const good = { orderId: orderId(), date: "2030-05-01", items: [{ productId: p.id, quantity: 1 }] };
    const malformed = [
      "not an object",
      null,
      { orderId: "1", date: "2030-05-01", items: [{ productId: p.id, quantity: 1 }] },
      { orderId: orderId(), date: "2030-13-01", items: [{ productId: p.id, quantity: 1 }] },
      { orderId: orderId(), date: "2030-05-01", items: [] },
      { orderId: orderId(), date: "2030-05-01", items: [{ productId: p.id, quantity: 0 }] },
      { orderId: orderId(), date: "2030-05-01T00:00:00Z", items: [{ productId: p.id, quantity: 1 }] },
    ];
    const result = await deliver(...malformed, good);
    expect(result.retryMessages).toEqual([]);
    expect(result.explicitAcks).toHaveLength(malformed.length + 1);
    expect(await sold("2030-05-01", p.id)).toBe(1);
  });
});

describe("stats consumer: messages that can never be counted", () => {
  const longAgo = "2026-11-20T09:00:00.000Z";

  /** An order whose stats outbox row was dispatched long ago and never completed. */
  async function dispatchedOrder() {
    const order = await seededOrder();
    await env.DB.prepare("UPDATE outbox SET dispatched_at = ? WHERE order_id = ?").bind(longAgo, order.orderId).run();
    return order.orderId;
  }

  async function relayedStats(): Promise<number[]> {
    const q = recordingQueues();
    await relayOutbox(env.DB, q.queues, new Date("2026-11-21T10:00:00.000Z"), 30, 1800);
    return q.sent.stats.map((m) => (m as { orderId: number }).orderId);
  }

  it("a malformed message with a usable orderId closes the order's outbox row, so the relay stops re-sending it", async () => {
    const id = await dispatchedOrder();
    const result = await deliver({ orderId: id, date: "yesterday", items: [] });
    expect(result.explicitAcks).toHaveLength(1);
    expect(result.retryMessages).toEqual([]);
    expect((await outboxRow(id, "stats")).completed_at).not.toBeNull();
    expect(await isCounted(id)).toBe(false);
    expect(await relayedStats()).not.toContain(id);
  });

  it("an order naming a product that does not exist is not counted, and its outbox row is closed", async () => {
    const id = await dispatchedOrder();
    const result = await deliver({ orderId: id, date: "2030-06-01", items: [{ productId: 999_999_999, quantity: 1 }] });
    expect(result.explicitAcks).toHaveLength(1);
    expect(await isCounted(id)).toBe(false);
    expect((await outboxRow(id, "stats")).completed_at).not.toBeNull();
    expect(await relayedStats()).not.toContain(id);
  });

  it("closing the row backs off when D1 fails, and succeeds once it recovers", async () => {
    const id = await dispatchedOrder();
    const d1 = unreliableD1(env.DB);
    d1.failNext(1);
    const batch = createMessageBatch("order-stats", [message({ orderId: id, date: "2030-06-02", items: "none" }, 2)]);
    const retry = vi.spyOn(batch.messages[0]!, "retry");
    const ctx = createExecutionContext();
    await countBatch(batch, d1.db, fixedClock("2030-06-02T10:00:00.000Z"));
    expect((await getQueueResult(batch, ctx)).retryMessages).toEqual([{ msgId: batch.messages[0]!.id }]);
    expect(retry).toHaveBeenCalledWith({ delaySeconds: 10 });
    expect((await outboxRow(id, "stats")).completed_at).toBeNull();

    await deliver({ orderId: id, date: "2030-06-02", items: "none" });
    expect((await outboxRow(id, "stats")).completed_at).not.toBeNull();
  });
});

describe("stats dead letters", () => {
  async function returnToOutbox(body: unknown, db: D1Database, attempts: number) {
    const batch = createMessageBatch("order-stats-dlq", [message(body, attempts)]);
    const retry = vi.spyOn(batch.messages[0]!, "retry");
    const ctx = createExecutionContext();
    await returnDeadStatsToOutbox(batch, db, new Date("2026-11-21T10:00:00.000Z"));
    const result = await getQueueResult(batch, ctx);
    return { ...result, delay: retry.mock.calls[0]?.[0]?.delaySeconds };
  }

  it("while D1 fails the message backs off, growing with each attempt; once it recovers the row goes back to the relay", async () => {
    const { orderId: id } = await seededOrder();
    await env.DB.prepare("UPDATE outbox SET dispatched_at = ? WHERE order_id = ?").bind("2026-11-20T09:00:00.000Z", id).run();
    const body = { orderId: id, date: "2026-11-20", items: [{ productId: 1, quantity: 1 }] };
    const d1 = unreliableD1(env.DB);
    d1.down();
    const delays = [];
    for (const attempts of [1, 2, 5, 50]) {
      const result = await returnToOutbox(body, d1.db, attempts);
      expect(result.retryMessages).toHaveLength(1);
      delays.push(result.delay);
    }
    expect(delays).toEqual([10, 20, 160, 600]);
    expect((await outboxRow(id, "stats")).dispatched_at).not.toBeNull();

    d1.up();
    const recovered = await returnToOutbox(body, d1.db, 51);
    expect(recovered.explicitAcks).toHaveLength(1);
    expect((await outboxRow(id, "stats")).dispatched_at).toBeNull();
  });

  it("leaves a row some consumer already completed alone", async () => {
    const { orderId: id } = await seededOrder();
    await env.DB.prepare("UPDATE outbox SET dispatched_at = ?, completed_at = ? WHERE order_id = ?")
      .bind("2026-11-20T09:00:00.000Z", "2026-11-20T09:00:01.000Z", id)
      .run();
    const result = await returnToOutbox({ orderId: id }, env.DB, 1);
    expect(result.explicitAcks).toHaveLength(1);
    expect((await outboxRow(id, "stats")).dispatched_at).toBe("2026-11-20T09:00:00.000Z");
  });
});
