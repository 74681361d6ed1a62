import { createExecutionContext, createMessageBatch, getQueueResult } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it, vi } from "vitest";
import { createApp } from "../../src/app";
import { fixedClock } from "../../src/lib/clock";
import { returnDeadStatsToOutbox } from "../../src/orders/outbox";
import { countBatch } from "../../src/stats/consumer";
import { call } from "../helpers/api";
import { cancelInD1, placeHeldOrder } from "../helpers/cancellations";
import { one } from "../helpers/db";
import { outboxRow } from "../helpers/exports";
import { makeProduct } from "../helpers/factories";
import { unreliableD1 } from "../helpers/unreliable-d1";

// The stats consumer on cancellations: the order's units leave the sales of its stat date once, and the
// net is right whichever of the two events is consumed first.

const clock = fixedClock("2026-11-20T10:00:00.000Z");
let nextMessage = 0;

/** Runs the stats consumer on one batch of the given bodies (all at `attempts`); reports acks, retries and delays. */
async function count(bodies: unknown[], db: D1Database = env.DB, attempts = 1) {
  const batch = createMessageBatch(
    "order-stats",
    bodies.map((body) => ({ id: `s-${++nextMessage}`, timestamp: new Date(), attempts, body })),
  );
  const retries = batch.messages.map((m) => vi.spyOn(m, "retry"));
  await countBatch(batch, db, clock);
  const result = await getQueueResult(batch, createExecutionContext());
  return { ...result, delays: retries.map((r) => r.mock.calls[0]?.[0]?.delaySeconds) };
}

const sold = async (date: string, productId: number) =>
  (
    await env.DB.prepare("SELECT quantity FROM product_sales_daily WHERE stat_date = ? AND product_id = ?")
      .bind(date, productId)
      .first<{ quantity: number }>()
  )?.quantity ?? null;

const cancellationCounted = async (orderId: number) =>
  (await env.DB.prepare("SELECT 1 FROM stats_counted_cancellations WHERE order_id = ?").bind(orderId).first()) !== null;

describe("stats consumer: cancellations", () => {
  it("takes the order's units off its stat date once, however often the cancellation is delivered", async () => {
    const kept = await placeHeldOrder(3);
    const cancelled = await placeHeldOrder(2, kept.productId);
    const date = cancelled.order.createdAt.slice(0, 10);
    await count([kept.placed.stats, cancelled.placed.stats]);
    expect(await sold(date, kept.productId)).toBe(5);

    const cancellation = await cancelInD1(cancelled);
    const twice = await count([cancellation.stats, cancellation.stats]);
    expect(twice.explicitAcks).toHaveLength(2);
    expect(twice.retryMessages).toEqual([]);
    expect(await sold(date, kept.productId)).toBe(3);
    await count([cancellation.stats]);
    expect(await sold(date, kept.productId)).toBe(3);

    expect(await cancellationCounted(cancelled.order.id)).toBe(true);
    expect((await outboxRow(cancelled.order.id, "stats", "CANCELLED")).completed_at).toBe(clock.now().toISOString());
  });

  it("a cancellation consumed before its order was counted: the late PLACED adds nothing, the net is right", async () => {
    const kept = await placeHeldOrder(3);
    const cancelled = await placeHeldOrder(2, kept.productId);
    const date = cancelled.order.createdAt.slice(0, 10);
    await count([kept.placed.stats]);
    const cancellation = await cancelInD1(cancelled);

    // Nothing of the cancelled order is in the table yet: subtracting now would take the kept order's units.
    await count([cancellation.stats]);
    expect(await sold(date, kept.productId)).toBe(3);
    expect(await cancellationCounted(cancelled.order.id)).toBe(true);

    const late = await count([cancelled.placed.stats]);
    expect(late.explicitAcks).toHaveLength(1);
    expect(await sold(date, kept.productId)).toBe(3);
    expect((await outboxRow(cancelled.order.id, "stats", "PLACED")).completed_at).not.toBeNull();
    expect((await outboxRow(cancelled.order.id, "stats", "CANCELLED")).completed_at).not.toBeNull();
  });

  it("both events delivered many times, mixed in parallel batches, in any order: net 0, never below 0", async () => {
    const cancelled = await placeHeldOrder(4);
    const date = cancelled.order.createdAt.slice(0, 10);
    const cancellation = await cancelInD1(cancelled);
    const { stats: placed } = cancelled.placed;
    await Promise.all([
      count([cancellation.stats, placed]),
      count([placed, cancellation.stats, placed]),
      count([cancellation.stats]),
      count([placed]),
    ]);
    expect(await sold(date, cancelled.productId) ?? 0).toBe(0);
  });

  it("a D1 failure backs the cancellation off and changes nothing; redelivered, it is counted once", async () => {
    const cancelled = await placeHeldOrder(2);
    const date = cancelled.order.createdAt.slice(0, 10);
    await count([cancelled.placed.stats]);
    const cancellation = await cancelInD1(cancelled);
    const d1 = unreliableD1(env.DB);
    d1.failNext(1, /stats_counted_cancellations/);

    const failed = await count([cancellation.stats], d1.db, 3);
    expect(failed.retryMessages).toHaveLength(1);
    expect(failed.delays).toEqual([20]);
    expect(await sold(date, cancelled.productId)).toBe(2);
    expect(await cancellationCounted(cancelled.order.id)).toBe(false);
    expect((await outboxRow(cancelled.order.id, "stats", "CANCELLED")).completed_at).toBeNull();

    await count([cancellation.stats], d1.db, 4);
    await count([cancellation.stats], d1.db, 5);
    expect(await sold(date, cancelled.productId)).toBe(0);
  });

  it("a malformed cancellation closes its own outbox row, not the order's PLACED one", async () => {
    const cancelled = await placeHeldOrder(1);
    const cancellation = await cancelInD1(cancelled);
    const result = await count([{ ...cancellation.stats, date: "yesterday" }]);
    expect(result.explicitAcks).toHaveLength(1);
    expect((await outboxRow(cancelled.order.id, "stats", "CANCELLED")).completed_at).not.toBeNull();
    expect((await outboxRow(cancelled.order.id, "stats", "PLACED")).completed_at).toBeNull();
    expect(await cancellationCounted(cancelled.order.id)).toBe(false);
  });

  it("the popular ranking leaves out a product whose sold units were all cancelled", async () => {
    const [gone, left] = [await makeProduct(), await makeProduct()];
    const day = "2035-04-10";
    const event = (orderId: number, productId: number, quantity: number, e = "PLACED") => ({
      event: e,
      orderId,
      date: day,
      items: [{ productId, quantity }],
    });
    const base = 8_000_000 + Math.floor(Math.random() * 1_000_000);
    await count([event(base, gone.id, 5), event(base + 1, left.id, 1), event(base + 2, left.id, 2)]);
    await count([event(base, gone.id, 5, "CANCELLED"), event(base + 2, left.id, 2, "CANCELLED")]);
    expect(await sold(day, gone.id)).toBe(0);

    const res = await call("GET", "/api/products/popular", { app: createApp({ clock: fixedClock(`${day}T12:00:00.000Z`) }) });
    expect(res.status).toBe(200);
    expect(res.body.items.map((i: { product: { id: number }; quantitySold: number }) => [i.product.id, i.quantitySold])).toEqual([
      [left.id, 1],
    ]);
  });
});

describe("stats dead letters: cancellations", () => {
  it("a dead cancellation returns its own outbox row to the relay, never the order's PLACED one", async () => {
    const cancelled = await placeHeldOrder(1);
    const longAgo = "2026-11-20T09:00:00.000Z";
    const cancellation = await cancelInD1(cancelled, longAgo, longAgo);
    const placedDispatch = (await outboxRow(cancelled.order.id, "stats", "PLACED")).dispatched_at;
    const batch = createMessageBatch("order-stats-dlq", [{ id: "dead-cancel", timestamp: new Date(), attempts: 1, body: cancellation.stats }]);
    await returnDeadStatsToOutbox(batch, env.DB, new Date("2026-11-21T10:00:00.000Z"));
    expect((await getQueueResult(batch, createExecutionContext())).explicitAcks).toEqual(["dead-cancel"]);
    expect(await one("SELECT dispatched_at, created_at FROM outbox WHERE order_id = ? AND topic = 'stats' AND event = 'CANCELLED'", cancelled.order.id)).toEqual({
      dispatched_at: null,
      created_at: "2026-11-21T10:00:00.000Z",
    });
    expect((await outboxRow(cancelled.order.id, "stats", "PLACED")).dispatched_at).toBe(placedDispatch);
  });
});
