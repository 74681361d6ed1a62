import { createExecutionContext, createMessageBatch, getQueueResult } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it, vi } from "vitest";
import worker from "../../src/index";
import type { ExportDeps } from "../../src/export/consumer";
import { recordDeadExports } from "../../src/export/dead-letter";
import { relayOutbox } from "../../src/orders/outbox";
import { adminToken, call } from "../helpers/api";
import {
  clock,
  deliver,
  deliverMany,
  expectNoDelivery,
  exportRow,
  outboxRow,
  platform,
  recordingQueues,
  seededOrder,
} from "../helpers/exports";
import { unreliableD1 } from "../helpers/unreliable-d1";

// The export consumer and its dead letter under failure: D1 refusing, bodies that can never be delivered,
// and a Worker deployed without a data platform to deliver to.

/** The export dead-letter consumer on one message; reports its retry delay, if it was retried. */
async function deadLetter(body: unknown, db: D1Database, attempts = 1) {
  const batch = createMessageBatch("order-export-dlq", [{ id: `dead-${crypto.randomUUID()}`, timestamp: new Date(), attempts, body }]);
  const retry = vi.spyOn(batch.messages[0]!, "retry");
  const ctx = createExecutionContext();
  await recordDeadExports(batch, db, clock);
  const result = await getQueueResult(batch, ctx);
  return { ...result, delay: retry.mock.calls[0]?.[0]?.delaySeconds };
}

function flaky() {
  const d1 = unreliableD1(env.DB);
  const { posted, deps } = platform(200);
  return { d1, posted, deps: { ...deps, db: d1.db } satisfies ExportDeps };
}

describe("export consumer: D1 failures back off per message", () => {
  it("a failed status read POSTs nothing and retries every message of the batch with its backoff; redelivered, all are SENT", async () => {
    const [{ exportId: _a, ...a }, { exportId: _b, ...b }] = [await seededOrder(), await seededOrder()];
    const { d1, posted, deps } = flaky();
    // One read serves the whole batch (src/export/consumer.ts): failing it is D1 failing, not one message.
    d1.failNext(1, /SELECT order_id, event, status FROM order_exports/);

    const result = await deliverMany([a, b], deps, 2);
    expect(result.explicitAcks).toEqual([]);
    expect(result.retryMessages).toEqual(result.ids.map((msgId) => ({ msgId })));
    expect(result.delays).toEqual([20, 20]);
    expect(d1.failures).toBe(1);
    expect(posted).toEqual([]);
    for (const { orderId } of [a, b]) {
      expect(await exportRow(orderId)).toMatchObject({ status: "PENDING", attempts: 0, last_error: null });
    }

    const again = await deliverMany([a, b], deps, 3);
    expect(again.explicitAcks).toHaveLength(2);
    expect(posted.map((p) => p.key).sort()).toEqual([`order-${a.orderId}`, `order-${b.orderId}`].sort());
    for (const { orderId } of [a, b]) {
      expect(await exportRow(orderId)).toMatchObject({ status: "SENT", attempts: 1, last_error: null });
      expect((await outboxRow(orderId, "export")).completed_at).not.toBeNull();
    }
  });

  it("a 2xx whose SENT write fails is retried with backoff, POSTed again under the same key, and SENT once", async () => {
    const { exportId: _, ...event } = await seededOrder();
    const { d1, posted, deps } = flaky();
    d1.failNext(1, /SET status = 'SENT'/);

    const first = await deliver(event, deps, 1);
    expect(first.retryMessages).toHaveLength(1);
    expect(first.delays).toEqual([10]);
    expect(await exportRow(event.orderId)).toMatchObject({ status: "PENDING", attempts: 0, sent_at: null });
    expect((await outboxRow(event.orderId, "export")).completed_at).toBeNull();

    const second = await deliver(event, deps, 2);
    expect(second.explicitAcks).toHaveLength(1);
    expect(posted.map((p) => p.key)).toEqual([`order-${event.orderId}`, `order-${event.orderId}`]);
    expect(await exportRow(event.orderId)).toMatchObject({ status: "SENT", attempts: 1, last_error: null });
  });

  it("a platform failure that D1 cannot record backs off the same way as one it can", async () => {
    const { exportId: _, ...event } = await seededOrder();
    const d1 = unreliableD1(env.DB);
    const { deps } = platform(503, 200);
    d1.failNext(1, /SET attempts = attempts \+ 1, last_error = \?/);

    const first = await deliver(event, { ...deps, db: d1.db }, 4);
    expect(first.retryMessages).toHaveLength(1);
    expect(first.delays).toEqual([80]);
    expect(await exportRow(event.orderId)).toMatchObject({ status: "PENDING", attempts: 0, last_error: null });

    await deliver(event, { ...deps, db: d1.db }, 5);
    expect(await exportRow(event.orderId)).toMatchObject({ status: "SENT", attempts: 1 });
  });

  it("an outage longer than the queue's retries ends FAILED through the dead letter, which waits out D1 too", async () => {
    const { exportId, ...event } = await seededOrder();
    const { d1, posted, deps } = flaky();
    d1.down();

    const delays: (number | undefined)[] = [];
    for (let attempt = 1; attempt <= 5; attempt++) {
      const result = await deliver(event, deps, attempt);
      expect(result.retryMessages).toHaveLength(1);
      delays.push(...result.delays);
    }
    expect(delays).toEqual([10, 20, 40, 80, 160]);
    expect(posted).toEqual([]);
    expect(await exportRow(event.orderId)).toMatchObject({ status: "PENDING", attempts: 0 });

    const stillDown = await deadLetter(event, d1.db, 3);
    expect(stillDown.retryMessages).toHaveLength(1);
    expect(stillDown.delay).toBe(40);
    expect(await exportRow(event.orderId)).toMatchObject({ status: "PENDING" });

    d1.up();
    const recovered = await deadLetter(event, d1.db, 4);
    expect(recovered.explicitAcks).toHaveLength(1);
    expect(await exportRow(event.orderId)).toMatchObject({ status: "FAILED", last_error: "retries exhausted" });
    const retried = await call("POST", `/api/admin/exports/${exportId}/retry`, { token: await adminToken() });
    expect(retried.body).toMatchObject({ id: exportId, status: "PENDING" });
  });
});

describe("export consumer: a malformed message reaches a final state", () => {
  it("with a usable orderId: FAILED with the reason, listed for admins, outbox row closed, never re-sent", async () => {
    const { exportId, ...event } = await seededOrder();
    await env.DB.prepare("UPDATE outbox SET dispatched_at = ? WHERE order_id = ?").bind("2026-11-20T09:00:00.000Z", event.orderId).run();
    const malformed = { ...event, items: "lost in transit" };
    const { d1, posted, deps } = flaky();

    // Recording the verdict is a D1 write like any other: when it fails the message backs off, it is not lost.
    d1.failNext(1);
    const blip = await deliver(malformed, deps, 1);
    expect(blip.retryMessages).toHaveLength(1);
    expect(blip.delays).toEqual([10]);
    expect(await exportRow(event.orderId)).toMatchObject({ status: "PENDING" });

    const result = await deliver(malformed, deps, 2);
    expect(result.explicitAcks).toHaveLength(1);
    expect(result.retryMessages).toEqual([]);
    expect(posted).toEqual([]);
    const row = await exportRow(event.orderId);
    expect(row.status).toBe("FAILED");
    expect(row.last_error).toMatch(/^malformed export message: items: /);
    expect((await outboxRow(event.orderId, "export")).completed_at).toBe(clock.now().toISOString());

    const failed = await call("GET", "/api/admin/exports?status=failed&limit=100", { token: await adminToken() });
    expect(failed.body.items).toContainEqual(expect.objectContaining({ id: exportId, status: "FAILED", lastError: row.last_error }));

    const q = recordingQueues();
    await relayOutbox(env.DB, q.queues, new Date("2026-11-21T10:00:00.000Z"), 30, 1800);
    expect(q.sent.export).not.toContainEqual(expect.objectContaining({ orderId: event.orderId }));
  });

  it("never turns a SENT export into FAILED", async () => {
    const { exportId: _, ...event } = await seededOrder();
    const { deps } = platform(200);
    await deliver(event, deps);
    await deliver({ orderId: event.orderId }, deps);
    expect(await exportRow(event.orderId)).toMatchObject({ status: "SENT", last_error: null });
  });

  it("without a usable orderId: logged and acked", async () => {
    const errors = vi.spyOn(console, "error");
    const { posted, deps } = platform(200);
    const result = await deliver({ orderId: 1.5 }, deps);
    expect(result.explicitAcks).toHaveLength(1);
    expect(posted).toEqual([]);
    expect(errors.mock.calls.some(([line]) => String(line).includes("malformed"))).toBe(true);
    errors.mockRestore();
  });
});

describe("export consumer without a usable DATA_PLATFORM_URL", () => {
  it.each([
    [undefined, "DATA_PLATFORM_URL is not set"],
    ["", "DATA_PLATFORM_URL is not set"],
    ["  ", "DATA_PLATFORM_URL is not set"],
    ["127.0.0.1:8788/orders", "DATA_PLATFORM_URL is not an http(s) URL"],
    ["ftp://platform.test/orders", "DATA_PLATFORM_URL is not an http(s) URL"],
  ])("url %j: POSTs nothing, backs off, and the export's last_error says why", async (url, reason) => {
    await expectNoDelivery({ url }, reason);
  });

  it("through the Worker's queue handler, and it ends FAILED with the reason via the dead letter", async () => {
    const { exportId, ...event } = await seededOrder();
    const unconfigured = { ...env, DATA_PLATFORM_URL: undefined } as unknown as Env;
    const batch = createMessageBatch("order-export", [{ id: `m-${crypto.randomUUID()}`, timestamp: new Date(), attempts: 1, body: event }]);
    const ctx = createExecutionContext();
    await worker.queue!(batch, unconfigured, ctx);
    expect((await getQueueResult(batch, ctx)).retryMessages).toHaveLength(1);
    expect(await exportRow(event.orderId)).toMatchObject({ status: "PENDING", last_error: "DATA_PLATFORM_URL is not set" });

    await deadLetter(event, env.DB);
    const failed = await call("GET", "/api/admin/exports?status=failed&limit=100", { token: await adminToken() });
    expect(failed.body.items).toContainEqual(
      expect.objectContaining({ id: exportId, status: "FAILED", lastError: "DATA_PLATFORM_URL is not set" }),
    );
  });
});
