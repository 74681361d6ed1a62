import { createExecutionContext, createMessageBatch, getQueueResult } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { afterEach, describe, expect, it, vi } from "vitest";
import { exportSchemaOf } from "../../src/export/event";
import { fixedClock } from "../../src/lib/clock";
import { log } from "../../src/lib/log";
import { currentRequestId, requestIdOf, withRequestId } from "../../src/lib/request-context";
import { dispatchOutbox, type OrderQueues, type OutboxRow } from "../../src/orders/outbox";
import { countBatch } from "../../src/stats/consumer";
import { call } from "../helpers/api";
import { inject } from "../helpers/faults";
import { captureLogLines } from "../helpers/logs";

/** Every data point the Worker writes to METRICS until `restore()`. */
function capturePoints() {
  const points: AnalyticsEngineDataPoint[] = [];
  const restore = inject(env.METRICS, "writeDataPoint", () => (point) => void points.push(point ?? {}));
  return { points, restore };
}

afterEach(() => vi.restoreAllMocks());

describe("metrics: one Analytics Engine data point per request", () => {
  it.each([
    ["GET", "/health", {}, 200, "/health", ""],
    ["POST", "/api/orders/123/cancel", {}, 401, "/api/orders/{orderId}/cancel", "UNAUTHENTICATED"],
    ["GET", "/api/products/not-a-number", {}, 400, "/api/products/{productId}", "VALIDATION_FAILED"],
    ["GET", "/no/such/route", {}, 404, "unmatched", "NOT_FOUND"],
    ["GET", "/docs", {}, 200, "/docs", ""],
  ] as const)("%s %s → route template, method, problem code, status, duration", async (method, path, options, status, route, code) => {
    const { points, restore } = capturePoints();
    try {
      const res = await call(method, path, options);
      expect(res.status).toBe(status);
      expect(points).toHaveLength(1);
      const [point] = points;
      expect(point).toMatchObject({ indexes: [route], blobs: [route, method, code] });
      expect(point!.doubles).toHaveLength(2);
      expect(point!.doubles![0]).toBe(status);
      expect(point!.doubles![1]).toBeGreaterThanOrEqual(0);
    } finally {
      restore();
    }
  });

  it("a failing write never fails the request, and is logged with the request id", async () => {
    const lines = captureLogLines();
    const restore = inject(env.METRICS, "writeDataPoint", () => () => {
      throw new Error("analytics engine down (injected)");
    });
    try {
      const res = await call("GET", "/health", { headers: { "X-Request-Id": "trace-metrics-down" } });
      expect(res.status).toBe(200);
      expect(lines).toContainEqual(
        expect.objectContaining({ level: "warn", msg: "metrics: data point not written", requestId: "trace-metrics-down" }),
      );
    } finally {
      restore();
    }
  });
});

describe("logs carry the request id", () => {
  it("log() adds the current request's id, and a given one wins", () => {
    const lines = captureLogLines();
    log("info", "outside");
    withRequestId("req-1", () => {
      log("info", "inside");
      log("warn", "named", { requestId: "req-2" });
    });
    expect(lines).toEqual([
      expect.not.objectContaining({ requestId: expect.anything() }),
      expect.objectContaining({ msg: "inside", requestId: "req-1" }),
      expect.objectContaining({ msg: "named", requestId: "req-2" }),
    ]);
  });

  it("the id follows the request's own async work", async () => {
    const seen = await withRequestId("req-async", async () => {
      await new Promise((r) => setTimeout(r, 5));
      return Promise.all([Promise.resolve().then(currentRequestId), (async () => currentRequestId())()]);
    });
    expect(seen).toEqual(["req-async", "req-async"]);
    expect(currentRequestId()).toBeUndefined();
  });

  it("a line logged deep inside a request, which names no request id, carries the X-Request-Id the client sent", async () => {
    const lines = captureLogLines();
    const restore = inject(env.CACHE, "getWithMetadata", () => async () => {
      throw new Error("KV unreachable (injected)");
    });
    try {
      const res = await call("GET", "/api/products", { headers: { "X-Request-Id": "trace-deep-1" } });
      expect(res.status).toBe(200); // served uncached
    } finally {
      restore();
    }
    const warnings = lines.filter((line) => line.level === "warn");
    expect(warnings.length).toBeGreaterThan(0);
    expect(warnings.map((line) => line.requestId)).toEqual(warnings.map(() => "trace-deep-1"));
  });
});

describe("queue messages carry the request id to their consumers", () => {
  const rows: OutboxRow[] = [
    { id: 1, topic: "stats", payload: JSON.stringify({ event: "PLACED", orderId: 7, date: "2026-11-20", items: [] }) },
    { id: 2, topic: "export", payload: JSON.stringify({ orderId: 7, status: "CANCELLED", requestId: "stored-id" }) },
  ];

  function fakeQueues() {
    const sent: Record<string, unknown[]> = { stats: [], export: [] };
    const queue = (topic: string) =>
      ({ sendBatch: async (messages: { body: unknown }[]) => void sent[topic]!.push(...messages.map((m) => m.body)) }) as unknown as Queue;
    return { sent, queues: { stats: queue("stats"), export: queue("export") } satisfies OrderQueues };
  }

  it("dispatchOutbox adds the sending request's id, keeps one the payload names, and adds none without a request", async () => {
    const inRequest = fakeQueues();
    await withRequestId("req-order-1", () => dispatchOutbox(env.DB, inRequest.queues, rows, "2026-11-20T00:00:00.000Z"));
    expect(inRequest.sent.stats).toEqual([expect.objectContaining({ orderId: 7, requestId: "req-order-1" })]);
    expect(inRequest.sent.export).toEqual([expect.objectContaining({ orderId: 7, requestId: "stored-id" })]);

    const fromRelay = fakeQueues();
    await dispatchOutbox(env.DB, fromRelay.queues, rows.slice(0, 1), "2026-11-20T00:00:00.000Z");
    expect(fromRelay.sent.stats).toEqual([expect.not.objectContaining({ requestId: expect.anything() })]);
  });

  it("the export's schema drops the extra key, so the platform gets exactly the contract's body", () => {
    const body = { orderId: 7, userId: 3, status: "CANCELLED", refundedAmount: 0, cancelledAt: "2026-11-20T00:00:00.000Z", requestId: "req-1" };
    const { requestId: _, ...contract } = body;
    expect(exportSchemaOf.CANCELLED.parse(body)).toStrictEqual(contract);
  });

  it("the stats consumer logs under the message's request id", async () => {
    const lines = captureLogLines();
    const batch = createMessageBatch("order-stats", [
      { id: "m1", timestamp: new Date(), attempts: 1, body: { orderId: 0, requestId: "req-from-order" } },
      { id: "m2", timestamp: new Date(), attempts: 1, body: { orderId: 0, requestId: "bad id with spaces" } },
    ]);
    await countBatch(batch, env.DB, fixedClock("2026-11-20T00:00:00.000Z"));
    expect((await getQueueResult(batch, createExecutionContext())).explicitAcks.sort()).toEqual(["m1", "m2"]);
    const malformed = lines.filter((line) => line.msg === "stats: malformed order event message; not counted");
    expect(malformed.map((line) => [line.messageId, line.requestId])).toEqual([
      ["m1", "req-from-order"],
      ["m2", undefined],
    ]);
    expect(requestIdOf({ requestId: "x".repeat(65) })).toBeUndefined();
  });
});
