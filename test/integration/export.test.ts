import { createExecutionContext, createMessageBatch, createScheduledController } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { recordDeadExports } from "../../src/export/dead-letter";
import { chunkForQueue, dispatchOutbox, queuesOf, relayOutbox, type OutboxRow } from "../../src/orders/outbox";
import { handleScheduled } from "../../src/scheduled";
import { adminToken, call, expectProblem } from "../helpers/api";
import { all, one } from "../helpers/db";
import { clock, deliver, exportRow, platform, recordingQueues, seededOrder } from "../helpers/exports";

describe("export consumer", () => {
  it("POSTs the order with Idempotency-Key order-<id> and marks it SENT on a 2xx", async () => {
    const { exportId: _, ...event } = await seededOrder();
    const { posted, deps } = platform(200);
    const result = await deliver(event, deps);
    expect(result.explicitAcks).toHaveLength(1);
    expect(result.retryMessages).toEqual([]);
    expect(posted).toEqual([{ url: "https://platform.test/orders", key: `order-${event.orderId}`, body: event }]);
    expect(await exportRow(event.orderId)).toEqual({ status: "SENT", attempts: 1, last_error: null, sent_at: clock.now().toISOString() });
  });

  it("retries with exponential backoff while the platform fails, then delivers", async () => {
    const { exportId: _, ...event } = await seededOrder();
    const { posted, deps } = platform(503, "network-error", 200);

    const first = await deliver(event, deps, 1);
    expect(first.retryMessages).toHaveLength(1);
    expect(await exportRow(event.orderId)).toMatchObject({ status: "PENDING", attempts: 1, last_error: "HTTP 503: platform says no" });

    const second = await deliver(event, deps, 2);
    expect(second.retryMessages).toHaveLength(1);
    expect(await exportRow(event.orderId)).toMatchObject({ status: "PENDING", attempts: 2, last_error: "Network connection lost." });

    const third = await deliver(event, deps, 3);
    expect(third.explicitAcks).toHaveLength(1);
    expect(await exportRow(event.orderId)).toMatchObject({ status: "SENT", attempts: 3, last_error: null });
    expect(posted.map((p) => p.key)).toEqual(Array(3).fill(`order-${event.orderId}`));
  });

  it("a redirect is a failed attempt, never followed: a followed POST would arrive as a GET without its body", async () => {
    const { exportId: _, ...event } = await seededOrder();
    const { deps } = platform(200);
    const methods: string[] = [];
    // A platform that moved: 301 to its new address, whose landing page answers any GET with 200. Emulates
    // fetch's default (follow: the POST becomes a bodiless GET) unless the caller asks for the redirect itself.
    deps.send = (async (_input: RequestInfo | URL, init?: RequestInit) => {
      methods.push(init?.method ?? "GET");
      if (init?.redirect === "manual") return new Response(null, { status: 301, headers: { Location: "https://platform.test/v2/orders" } });
      methods.push("GET");
      return new Response("<html>welcome</html>", { status: 200 });
    }) as typeof fetch;

    const result = await deliver(event, deps);
    // Before: the landing page's 200 marked the export SENT, and the platform never had the order.
    expect(methods).toEqual(["POST"]);
    expect(result.retryMessages).toHaveLength(1);
    expect(await exportRow(event.orderId)).toMatchObject({
      status: "PENDING",
      attempts: 1,
      last_error: "HTTP 301 redirect to https://platform.test/v2/orders: not followed; set DATA_PLATFORM_URL to the final address",
    });
  });

  it("does not POST again an order already SENT (redelivery)", async () => {
    const { exportId: _, ...event } = await seededOrder();
    const { posted, deps } = platform(200);
    await deliver(event, deps);
    const again = await deliver(event, deps);
    expect(again.explicitAcks).toHaveLength(1);
    expect(posted).toHaveLength(1);
  });

  it("acknowledges a malformed message instead of retrying it forever", async () => {
    const { posted, deps } = platform(200);
    const result = await deliver({ orderId: "not-a-number" }, deps);
    expect(result.explicitAcks).toHaveLength(1);
    expect(result.retryMessages).toEqual([]);
    expect(posted).toHaveLength(0);
  });
});

describe("dead letters and admin retry", () => {
  it("a permanently failing export becomes FAILED, is listed, and an admin retry re-queues it", async () => {
    const { exportId, ...event } = await seededOrder();
    const { deps } = platform(500);
    await deliver(event, deps, 5);
    const dead = createMessageBatch("order-export-dlq", [{ id: "dead-1", timestamp: new Date(), attempts: 1, body: event }]);
    await recordDeadExports(dead, env.DB, clock);
    expect(await exportRow(event.orderId)).toMatchObject({ status: "FAILED", last_error: "HTTP 500: platform says no" });

    const token = await adminToken();
    const failed = await call("GET", "/api/admin/exports?status=FAILED&limit=100", { token });
    expect(failed.status).toBe(200);
    const listed = failed.body.items.find((e: { id: number }) => e.id === exportId);
    expect(listed).toMatchObject({ id: exportId, orderId: event.orderId, event: "PLACED", status: "FAILED", lastError: "HTTP 500: platform says no", sentAt: null });
    expect(failed.body.items.every((e: { status: string }) => e.status === "FAILED")).toBe(true);
    const pending = await call("GET", "/api/admin/exports?status=pending&limit=100", { token });
    expect(pending.body.items.some((e: { id: number }) => e.id === exportId)).toBe(false);

    const retried = await call("POST", `/api/admin/exports/${exportId}/retry`, { token });
    expect(retried.status).toBe(200);
    expect(retried.body).toMatchObject({ id: exportId, status: "PENDING" });
    const outbox = await one<{ dispatched_at: string | null }>("SELECT dispatched_at FROM outbox WHERE order_id = ? AND topic = 'export'", event.orderId);
    expect(outbox.dispatched_at).not.toBeNull();

    expectProblem(await call("POST", `/api/admin/exports/${exportId}/retry`, { token }), 409, "EXPORT_NOT_FAILED");
    expectProblem(await call("POST", "/api/admin/exports/99999999/retry", { token }), 404, "EXPORT_NOT_FOUND");
    expectProblem(await call("GET", "/api/admin/exports?status=lost", { token }), 400, "VALIDATION_FAILED");
  });

  it("the exports admin routes are admin-only", async () => {
    const { tokenFor } = await import("../helpers/api");
    expectProblem(await call("GET", "/api/admin/exports"), 401, "UNAUTHENTICATED");
    expectProblem(await call("GET", "/api/admin/exports", { token: await tokenFor(1) }), 403, "FORBIDDEN");
  });
});

describe("outbox relay", () => {
  it("a failed send leaves the rows undispatched and the relay re-sends them later", async () => {
    const { exportId: _, ...event } = await seededOrder();
    const broken = recordingQueues(["export"]);
    const pending = await all<OutboxRow>("SELECT id, topic, payload FROM outbox WHERE order_id = ?", event.orderId);
    await dispatchOutbox(env.DB, broken.queues, pending, clock.now().toISOString());
    expect(broken.sent.stats).toHaveLength(1);
    const rows = await all<{ topic: string; dispatched_at: string | null }>(
      "SELECT topic, dispatched_at FROM outbox WHERE order_id = ? ORDER BY topic",
      event.orderId,
    );
    expect(rows).toEqual([
      { topic: "export", dispatched_at: null },
      { topic: "stats", dispatched_at: clock.now().toISOString() },
    ]);

    const healthy = recordingQueues();
    await relayOutbox(env.DB, healthy.queues, new Date("2026-11-20T10:00:00.000Z"), 30, 1800);
    expect(healthy.sent.export).toContainEqual(event);
    expect(healthy.sent.stats).not.toContainEqual(expect.objectContaining({ orderId: event.orderId }));
    const after = await one<{ dispatched_at: string | null }>("SELECT dispatched_at FROM outbox WHERE order_id = ? AND topic = 'export'", event.orderId);
    expect(after.dispatched_at).not.toBeNull();
  });

  it("leaves rows younger than the grace period to the order's own dispatch", async () => {
    const { exportId: _, ...event } = await seededOrder("2026-11-20T09:59:50.000Z");
    const q = recordingQueues();
    await relayOutbox(env.DB, q.queues, new Date("2026-11-20T10:00:00.000Z"), 30, 1800);
    expect(q.sent.export).not.toContainEqual(expect.objectContaining({ orderId: event.orderId }));
    await relayOutbox(env.DB, q.queues, new Date("2026-11-20T10:00:30.000Z"), 30, 1800);
    expect(q.sent.export).toContainEqual(expect.objectContaining({ orderId: event.orderId }));
  });

  it("re-sends messages lost after dispatch, but not completed ones or FAILED exports", async () => {
    const lost = await seededOrder();
    const done = await seededOrder();
    const failed = await seededOrder();
    const dispatchedAt = "2026-11-20T09:00:00.000Z";
    await env.DB.prepare("UPDATE outbox SET dispatched_at = ? WHERE order_id IN (?, ?, ?)").bind(dispatchedAt, lost.orderId, done.orderId, failed.orderId).run();
    // `done` was consumed: the platform got it and the stats were counted.
    const { deps } = platform(200);
    await deliver({ ...done, exportId: undefined }, deps);
    await env.DB.prepare("UPDATE outbox SET completed_at = ? WHERE order_id = ? AND topic = 'stats'").bind(dispatchedAt, done.orderId).run();
    await env.DB.prepare("UPDATE order_exports SET status = 'FAILED' WHERE order_id = ?").bind(failed.orderId).run();

    const q = recordingQueues();
    await relayOutbox(env.DB, q.queues, new Date("2026-11-20T09:20:00.000Z"), 30, 30 * 60);
    const ids = (topic: "stats" | "export") => q.sent[topic].map((m) => (m as { orderId: number }).orderId);
    expect(ids("export")).not.toContain(lost.orderId);

    await relayOutbox(env.DB, q.queues, new Date("2026-11-20T09:31:00.000Z"), 30, 30 * 60);
    expect(ids("export")).toContain(lost.orderId);
    expect(ids("stats")).toContain(lost.orderId);
    expect(ids("stats")).toContain(failed.orderId);
    expect(ids("export")).not.toContain(done.orderId);
    expect(ids("stats")).not.toContain(done.orderId);
    expect(ids("export")).not.toContain(failed.orderId);
  });

  it("drains a backlog larger than one sendBatch, with the real queues", async () => {
    const backlog = await Promise.all(Array.from({ length: 130 }, () => seededOrder("2026-06-01T00:00:00.000Z")));
    const ids = JSON.stringify(backlog.map((o) => o.orderId));
    const undispatched = () =>
      one<{ n: number }>("SELECT count(*) AS n FROM outbox WHERE dispatched_at IS NULL AND order_id IN (SELECT value FROM json_each(?))", ids);
    expect((await undispatched()).n).toBe(260);
    await relayOutbox(env.DB, queuesOf(env), new Date("2026-06-01T01:00:00.000Z"), 30, 1800);
    expect((await undispatched()).n).toBe(0);
  });

  it("runs from the cron trigger", async () => {
    const { exportId: _, ...event } = await seededOrder("2026-11-20T08:00:00.000Z");
    const controller = createScheduledController({ scheduledTime: new Date("2026-11-20T10:00:00.000Z"), cron: "* * * * *" });
    await handleScheduled(controller, env, createExecutionContext());
    const rows = await all<{ dispatched_at: string | null }>("SELECT dispatched_at FROM outbox WHERE order_id = ?", event.orderId);
    expect(rows).toHaveLength(2);
    expect(rows.every((r) => r.dispatched_at !== null)).toBe(true);
  });

  it("runs from the cron trigger with the default delays when the relay settings are missing or invalid", async () => {
    const { exportId: _, ...event } = await seededOrder("2026-11-20T08:00:00.000Z");
    const controller = createScheduledController({ scheduledTime: new Date("2026-11-20T10:00:00.000Z"), cron: "* * * * *" });
    const misconfigured = { ...env, OUTBOX_RELAY_AFTER_SECONDS: "soon", OUTBOX_REDELIVER_AFTER_SECONDS: undefined } as unknown as Env;
    await handleScheduled(controller, misconfigured, createExecutionContext());
    const rows = await all<{ dispatched_at: string | null }>("SELECT dispatched_at FROM outbox WHERE order_id = ?", event.orderId);
    expect(rows).toHaveLength(2);
    expect(rows.every((r) => r.dispatched_at !== null)).toBe(true);
  });
});

describe("chunkForQueue", () => {
  const row = (id: number, bytes = 10) => ({ id, topic: "export" as const, payload: "x".repeat(bytes) });
  it("keeps chunks within 100 messages and the byte budget, in order", () => {
    const small = chunkForQueue(Array.from({ length: 250 }, (_, i) => row(i)));
    expect(small.map((c) => c.length)).toEqual([100, 100, 50]);
    expect(small.flat().map((r) => r.id)).toEqual(Array.from({ length: 250 }, (_, i) => i));
    const large = chunkForQueue(Array.from({ length: 5 }, (_, i) => row(i, 100_000)));
    expect(large.map((c) => c.length)).toEqual([2, 2, 1]);
    expect(chunkForQueue([])).toEqual([]);
    // 50 items with 200-character Hangul names: ~30 KB of characters, ~90 KB of UTF-8 each.
    const hangul = (id: number) => ({ id, topic: "export" as const, payload: JSON.stringify({ names: "가".repeat(30_000) }) });
    const korean = chunkForQueue(Array.from({ length: 6 }, (_, i) => hangul(i)));
    for (const chunk of korean) {
      const bytes = chunk.reduce((sum, r) => sum + new TextEncoder().encode(r.payload).byteLength, 0);
      expect(bytes).toBeLessThanOrEqual(240_000);
    }
    expect(korean.flat()).toHaveLength(6);
  });
});
