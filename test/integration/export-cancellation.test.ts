import { createExecutionContext, createMessageBatch, getQueueResult } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it, vi } from "vitest";
import { recordDeadExports } from "../../src/export/dead-letter";
import { dispatchOutbox, relayOutbox, type OutboxRow } from "../../src/orders/outbox";
import { countBatch } from "../../src/stats/consumer";
import { adminToken, call, tokenFor } from "../helpers/api";
import { cancelInD1, exportIdOf, holdQueues, placeHeldOrder } from "../helpers/cancellations";
import { all, one } from "../helpers/db";
import { clock, deliver, exportRow, outboxRow, platform, recordingQueues } from "../helpers/exports";

// A cancellation goes to the data platform through the same outbox, queue, backoff and dead letter as its
// order, as its own export row (order_id, 'CANCELLED'): nothing done to one event touches the other's.

async function deadLetter(body: unknown) {
  const batch = createMessageBatch("order-export-dlq", [{ id: `dead-${crypto.randomUUID()}`, timestamp: new Date(), attempts: 1, body }]);
  await recordDeadExports(batch, env.DB, clock);
  return getQueueResult(batch, createExecutionContext());
}

const listed = async (status: string) =>
  (await call("GET", `/api/admin/exports?status=${status}&limit=100`, { token: await adminToken() })).body.items as {
    id: number;
    orderId: number;
    event: string;
    status: string;
  }[];

describe("export consumer: cancellations", () => {
  it("POSTs the contract's cancellation body with Idempotency-Key order-<id>-cancel and marks only that export SENT", async () => {
    const placed = await placeHeldOrder(2);
    const cancellation = await cancelInD1(placed, "2026-12-01T10:00:00.000Z");
    const { posted, deps } = platform(200);

    const result = await deliver(cancellation.export, deps);
    expect(result.explicitAcks).toHaveLength(1);
    expect(posted).toEqual([
      {
        url: "https://platform.test/orders",
        key: `order-${placed.order.id}-cancel`,
        body: {
          orderId: placed.order.id,
          userId: placed.order.userId,
          status: "CANCELLED",
          refundedAmount: 9000,
          cancelledAt: "2026-12-01T10:00:00.000Z",
        },
      },
    ]);
    expect(await exportRow(placed.order.id, "CANCELLED")).toEqual({ status: "SENT", attempts: 1, last_error: null, sent_at: clock.now().toISOString() });
    expect((await outboxRow(placed.order.id, "export", "CANCELLED")).completed_at).toBe(clock.now().toISOString());
    expect(await exportRow(placed.order.id, "PLACED")).toEqual({ status: "PENDING", attempts: 0, last_error: null, sent_at: null });
    expect((await outboxRow(placed.order.id, "export", "PLACED")).completed_at).toBeNull();

    // Redelivered after SENT: acked without a second POST.
    await deliver(cancellation.export, deps);
    expect(posted).toHaveLength(1);

    const pending = await listed("pending");
    expect(pending).toContainEqual(expect.objectContaining({ orderId: placed.order.id, event: "PLACED", status: "PENDING" }));
    const sent = await listed("sent");
    expect(sent).toContainEqual(expect.objectContaining({ id: cancellation.exportId, orderId: placed.order.id, event: "CANCELLED", status: "SENT" }));
  });

  it("a platform refusal is retried with backoff, then SENT; the order's own export is delivered and kept apart", async () => {
    const placed = await placeHeldOrder(1);
    const cancellation = await cancelInD1(placed);
    const { posted, deps } = platform(200, 503, "network-error", 200);
    const id = placed.order.id;

    expect((await deliver(placed.placed.export, deps, 1)).explicitAcks).toHaveLength(1);
    const placedSent = await exportRow(id, "PLACED");
    expect(placedSent).toMatchObject({ status: "SENT", attempts: 1 });

    const refused = await deliver(cancellation.export, deps, 1);
    expect(refused.delays).toEqual([10]);
    expect(await exportRow(id, "CANCELLED")).toMatchObject({ status: "PENDING", attempts: 1, last_error: "HTTP 503: platform says no" });
    const lost = await deliver(cancellation.export, deps, 2);
    expect(lost.delays).toEqual([20]);
    expect(await exportRow(id, "CANCELLED")).toMatchObject({ status: "PENDING", attempts: 2, last_error: "Network connection lost." });
    const delivered = await deliver(cancellation.export, deps, 3);
    expect(delivered.explicitAcks).toHaveLength(1);
    expect(await exportRow(id, "CANCELLED")).toMatchObject({ status: "SENT", attempts: 3, last_error: null });

    expect(posted.map((p) => p.key)).toEqual([`order-${id}`, `order-${id}-cancel`, `order-${id}-cancel`, `order-${id}-cancel`]);
    expect(await exportRow(id, "PLACED")).toEqual(placedSent);
  });

  it("a malformed cancellation fails its own export and closes its own outbox row only", async () => {
    const placed = await placeHeldOrder(1);
    const cancellation = await cancelInD1(placed);
    const { posted, deps } = platform(200);
    const result = await deliver({ ...cancellation.export, refundedAmount: -1 }, deps);
    expect(result.explicitAcks).toHaveLength(1);
    expect(posted).toEqual([]);
    const row = await exportRow(placed.order.id, "CANCELLED");
    expect(row.status).toBe("FAILED");
    expect(row.last_error).toMatch(/^malformed export message: refundedAmount: /);
    expect((await outboxRow(placed.order.id, "export", "CANCELLED")).completed_at).not.toBeNull();
    expect(await exportRow(placed.order.id, "PLACED")).toMatchObject({ status: "PENDING", attempts: 0 });
    expect((await outboxRow(placed.order.id, "export", "PLACED")).completed_at).toBeNull();
  });
});

describe("dead letters and admin retry: cancellations", () => {
  it("a dead cancellation marks the CANCELLED export FAILED; the admin retry re-queues the cancellation alone", async () => {
    const placed = await placeHeldOrder(1);
    const cancellation = await cancelInD1(placed);
    const id = placed.order.id;
    const { deps } = platform(500);
    await deliver(cancellation.export, deps, 5);
    // The order's own export is still backing off, PENDING: the dead cancellation must not fail it.
    await deliver(placed.placed.export, platform(503).deps, 2);

    expect((await deadLetter(cancellation.export)).explicitAcks).toHaveLength(1);
    expect(await exportRow(id, "CANCELLED")).toMatchObject({ status: "FAILED", last_error: "HTTP 500: platform says no" });
    expect(await exportRow(id, "PLACED")).toMatchObject({ status: "PENDING", last_error: "HTTP 503: platform says no" });
    expect(await listed("failed")).toContainEqual(
      expect.objectContaining({ id: cancellation.exportId, orderId: id, event: "CANCELLED", status: "FAILED" }),
    );

    const placedOutbox = await outboxRow(id, "export", "PLACED");
    const { held, release } = holdQueues();
    let retried;
    try {
      retried = await call("POST", `/api/admin/exports/${cancellation.exportId}/retry`, { token: await adminToken() });
    } finally {
      release();
    }
    expect(retried.status).toBe(200);
    expect(retried.body).toMatchObject({ id: cancellation.exportId, orderId: id, event: "CANCELLED", status: "PENDING" });
    // The admin's retry carries its own request id, so the message can be followed from that request.
    expect(held.export).toEqual([{ ...cancellation.export, requestId: expect.any(String) }]);
    expect((await outboxRow(id, "export", "CANCELLED")).dispatched_at).not.toBeNull();
    expect(await outboxRow(id, "export", "PLACED")).toEqual(placedOutbox);

    // And the other way round: the order's dead export leaves the re-queued cancellation PENDING.
    expect((await deadLetter(placed.placed.export)).explicitAcks).toHaveLength(1);
    expect(await exportRow(id, "PLACED")).toMatchObject({ status: "FAILED" });
    expect(await exportRow(id, "CANCELLED")).toMatchObject({ status: "PENDING" });
    expect(await exportIdOf(id, "PLACED")).not.toBe(cancellation.exportId);
  });
});

describe("outbox relay: cancellations", () => {
  it("a failed send after the cancellation's commit: the relay re-sends the undispatched CANCELLED rows, not the order's", async () => {
    const placed = await placeHeldOrder(1);
    const cancellation = await cancelInD1(placed, "2026-11-20T09:00:00.000Z");
    const rows = await all<OutboxRow>("SELECT id, topic, payload FROM outbox WHERE order_id = ? AND event = 'CANCELLED'", placed.order.id);
    const broken = recordingQueues(["export"]);
    await dispatchOutbox(env.DB, broken.queues, rows, "2026-11-20T09:00:00.000Z");
    expect(broken.sent.stats).toEqual([cancellation.stats]);
    expect((await outboxRow(placed.order.id, "export", "CANCELLED")).dispatched_at).toBeNull();

    const healthy = recordingQueues();
    await relayOutbox(env.DB, healthy.queues, new Date("2026-11-20T09:01:00.000Z"), 30, 1800);
    const mine = (topic: "stats" | "export") => healthy.sent[topic].filter((m) => (m as { orderId: number }).orderId === placed.order.id);
    expect(mine("export")).toEqual([cancellation.export]);
    expect(mine("stats")).toEqual([]);
    expect((await outboxRow(placed.order.id, "export", "CANCELLED")).dispatched_at).toBe("2026-11-20T09:01:00.000Z");
  });

  it("re-sends a lost message only while its own event's export is PENDING", async () => {
    const longAgo = "2026-11-20T09:00:00.000Z";
    const cancelPending = await placeHeldOrder(1);
    const placedPending = await placeHeldOrder(1);
    await cancelInD1(cancelPending, longAgo, longAgo);
    await cancelInD1(placedPending, longAgo, longAgo);
    const ids = [cancelPending.order.id, placedPending.order.id];
    await env.DB.prepare("UPDATE outbox SET dispatched_at = ? WHERE order_id IN (?, ?)").bind(longAgo, ...ids).run();
    await env.DB.prepare("UPDATE order_exports SET status = 'FAILED' WHERE order_id = ? AND event = 'PLACED'").bind(cancelPending.order.id).run();
    await env.DB.prepare("UPDATE order_exports SET status = 'FAILED' WHERE order_id = ? AND event = 'CANCELLED'").bind(placedPending.order.id).run();

    const q = recordingQueues();
    await relayOutbox(env.DB, q.queues, new Date("2026-11-20T09:31:00.000Z"), 30, 30 * 60);
    const exported = (orderId: number) =>
      q.sent.export.filter((m) => (m as { orderId: number }).orderId === orderId).map((m) => ("status" in (m as object) ? "CANCELLED" : "PLACED"));
    expect(exported(cancelPending.order.id)).toEqual(["CANCELLED"]);
    expect(exported(placedPending.order.id)).toEqual(["PLACED"]);
    // Stats rows of both events are re-sent (their consumer counts each event once).
    for (const id of ids) expect(q.sent.stats.filter((m) => (m as { orderId: number }).orderId === id)).toHaveLength(2);
  });
});

describe("the cancel endpoint's messages", () => {
  it("are counted and exported by the consumers: net 0 units, the cancellation POSTed under its own key", async () => {
    const placed = await placeHeldOrder(2);
    const id = placed.order.id;
    const { held, release } = holdQueues();
    let cancelled;
    try {
      cancelled = await call("POST", `/api/orders/${id}/cancel`, { token: await tokenFor(placed.order.userId), body: {} });
      await vi.waitFor(
        async () =>
          expect(await one("SELECT count(*) AS n FROM outbox WHERE order_id = ? AND event = 'CANCELLED' AND dispatched_at IS NOT NULL", id)).toEqual({ n: 2 }),
        { timeout: 5_000 },
      );
    } finally {
      release();
    }
    expect(cancelled.status).toBe(200);

    const stats = createMessageBatch("order-stats", [
      { id: "cancel", timestamp: new Date(), attempts: 1, body: held.stats[0] },
      { id: "place", timestamp: new Date(), attempts: 1, body: placed.placed.stats },
    ]);
    await countBatch(stats, env.DB, clock);
    expect((await getQueueResult(stats, createExecutionContext())).explicitAcks.sort()).toEqual(["cancel", "place"]);
    const date = placed.order.createdAt.slice(0, 10);
    const units = await env.DB.prepare("SELECT quantity FROM product_sales_daily WHERE stat_date = ? AND product_id = ?")
      .bind(date, placed.productId)
      .first<{ quantity: number }>();
    expect(units?.quantity ?? 0).toBe(0);

    const { posted, deps } = platform(200);
    await deliver(held.export[0], deps);
    expect(posted).toEqual([
      {
        url: "https://platform.test/orders",
        key: `order-${id}-cancel`,
        body: { orderId: id, userId: placed.order.userId, status: "CANCELLED", refundedAmount: 9000, cancelledAt: cancelled.body.cancelledAt },
      },
    ]);
    expect(await exportRow(id, "CANCELLED")).toMatchObject({ status: "SENT", attempts: 1 });
  });
});
