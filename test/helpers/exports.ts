import { createExecutionContext, createMessageBatch, getQueueResult } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { expect, vi } from "vitest";
import { deliverExports, type ExportDeps } from "../../src/export/consumer";
import type { OrderExportEvent } from "../../src/export/event";
import { fixedClock } from "../../src/lib/clock";
import type { OrderEvent, OrderQueues } from "../../src/orders/outbox";
import { one } from "./db";
import { makeUser } from "./factories";

// Arrangements shared by the export and outbox tests.

export const clock = fixedClock("2026-11-20T10:00:00.000Z");

/**
 * A completed order with its export row and undispatched outbox rows, written straight to D1 so that no
 * real queue message exists for it (the Worker's own consumer cannot race these tests).
 */
export async function seededOrder(createdAt = "2026-11-20T09:00:00.000Z"): Promise<OrderExportEvent & { exportId: number }> {
  const user = await makeUser();
  const order = await one<{ id: number }>(
    `INSERT INTO orders (order_key, user_id, status, total_amount, discount_amount, paid_amount, created_at)
     VALUES (?, ?, 'COMPLETED', 5000, 0, 5000, ?) RETURNING id`,
    crypto.randomUUID(),
    user.id,
    createdAt,
  );
  const event: OrderExportEvent = {
    orderId: order.id,
    userId: user.id,
    items: [{ productId: 1, name: "Mug", unitPrice: 5000, quantity: 1, amount: 5000 }],
    totalAmount: 5000,
    discountAmount: 0,
    paidAmount: 5000,
    completedAt: createdAt,
  };
  const stats = { orderId: order.id, date: createdAt.slice(0, 10), items: [{ productId: 1, quantity: 1 }] };
  await env.DB.batch([
    env.DB.prepare("INSERT INTO outbox (order_id, topic, payload, created_at) VALUES (?, 'export', ?, ?)").bind(order.id, JSON.stringify(event), createdAt),
    env.DB.prepare("INSERT INTO outbox (order_id, topic, payload, created_at) VALUES (?, 'stats', ?, ?)").bind(order.id, JSON.stringify(stats), createdAt),
  ]);
  const exp = await one<{ id: number }>(
    "INSERT INTO order_exports (order_id, status, attempts, created_at, updated_at) VALUES (?, 'PENDING', 0, ?, ?) RETURNING id",
    order.id,
    createdAt,
    createdAt,
  );
  return { ...event, exportId: exp.id };
}

export interface Posted {
  url: string;
  key: string | null;
  body: unknown;
}

/** A data platform that answers with the given statuses in turn (the last one repeats). */
export function platform(...statuses: (number | "network-error")[]) {
  const posted: Posted[] = [];
  const send = (async (input: RequestInfo | URL, init?: RequestInit) => {
    const headers = new Headers(init?.headers);
    posted.push({ url: String(input), key: headers.get("Idempotency-Key"), body: JSON.parse(String(init?.body)) });
    const status = statuses[Math.min(posted.length - 1, statuses.length - 1)]!;
    if (status === "network-error") throw new TypeError("Network connection lost.");
    return new Response(status < 300 ? "{}" : "platform says no", { status });
  }) as typeof fetch;
  const deps: ExportDeps = {
    db: env.DB,
    url: "https://platform.test/orders",
    signingSecret: env.EXPORT_SIGNING_SECRET,
    send,
    clock,
  };
  return { posted, deps };
}

/** Runs the export consumer on a batch of the given bodies; also reports each message's retry delay. */
export async function deliverMany(bodies: unknown[], deps: ExportDeps, attempts = 1) {
  const batch = createMessageBatch(
    "order-export",
    bodies.map((body) => ({ id: `m-${crypto.randomUUID()}`, timestamp: new Date(), attempts, body })),
  );
  const retries = batch.messages.map((m) => vi.spyOn(m, "retry"));
  const ctx = createExecutionContext();
  await deliverExports(batch, deps);
  const result = await getQueueResult(batch, ctx);
  return { ...result, ids: batch.messages.map((m) => m.id), delays: retries.map((r) => r.mock.calls[0]?.[0]?.delaySeconds) };
}

export const deliver = (body: unknown, deps: ExportDeps, attempts = 1) => deliverMany([body], deps, attempts);

export const exportRow = (orderId: number, event: OrderEvent = "PLACED") =>
  one<{ status: string; attempts: number; last_error: string | null; sent_at: string | null }>(
    "SELECT status, attempts, last_error, sent_at FROM order_exports WHERE order_id = ? AND event = ?",
    orderId,
    event,
  );

export const outboxRow = (orderId: number, topic: "stats" | "export", event: OrderEvent = "PLACED") =>
  one<{ dispatched_at: string | null; completed_at: string | null }>(
    "SELECT dispatched_at, completed_at FROM outbox WHERE order_id = ? AND topic = ? AND event = ?",
    orderId,
    topic,
    event,
  );

/** Queues that record what they were given, or refuse for the listed topics. */
export function recordingQueues(failing: ("stats" | "export")[] = []) {
  const sent: Record<"stats" | "export", unknown[]> = { stats: [], export: [] };
  const queue = (topic: "stats" | "export") =>
    ({
      sendBatch: async (messages: { body: unknown }[]) => {
        if (failing.includes(topic)) throw new Error(`${topic} queue unavailable`);
        sent[topic].push(...messages.map((m) => m.body));
      },
    }) as unknown as Queue;
  return { sent, queues: { stats: queue("stats"), export: queue("export") } satisfies OrderQueues };
}

/**
 * A consumer missing a setting it needs (the platform's URL, the signing secret): the message backs off,
 * nothing is POSTed, and the export's last_error and an error line say why.
 */
export async function expectNoDelivery(misconfigured: Partial<ExportDeps>, reason: string): Promise<void> {
  const { exportId: _, ...event } = await seededOrder();
  const errors = vi.spyOn(console, "error");
  try {
    const { posted, deps } = platform(200);
    const result = await deliver(event, { ...deps, ...misconfigured }, 2);
    expect(result.retryMessages).toHaveLength(1);
    expect(result.delays).toEqual([20]);
    expect(posted).toEqual([]);
    expect(await exportRow(event.orderId)).toMatchObject({ status: "PENDING", attempts: 1, last_error: reason });
    expect(errors.mock.calls.some(([line]) => String(line).includes(reason))).toBe(true);
  } finally {
    errors.mockRestore();
  }
}
