import { env } from "cloudflare:workers";
import { expect, vi } from "vitest";
import { call, tokenFor } from "./api";
import { fund, one } from "./db";
import { makeProduct, makeUser } from "./factories";
import { inject } from "./faults";

// Orders with both events, arranged for the consumer, relay and export tests while the cancel endpoint
// does not exist yet: the order is placed through the API, its cancellation written straight to D1 as
// the cancel batch will write it (order CANCELLED, two CANCELLED outbox rows, a CANCELLED export row).

export interface PlacedOrder {
  order: { id: number; userId: number; paidAmount: number; createdAt: string; items: { productId: number; quantity: number }[] };
  productId: number;
  /** The PLACED messages as the order's dispatch handed them to the queues. */
  placed: { stats: Record<string, unknown>; export: Record<string, unknown> };
}

/** Replaces both queues' sendBatch with a recorder until the returned function is called. */
export function holdQueues() {
  const held = { stats: [] as unknown[], export: [] as unknown[] };
  const hold = (queue: Queue, into: unknown[]) =>
    inject(queue, "sendBatch", () => async (messages: Iterable<MessageSendRequest>) => {
      for (const m of messages) into.push(m.body);
      return { metadata: { metrics: { backlogCount: 0, backlogBytes: 0 } } };
    });
  const restores = [hold(env.STATS_QUEUE, held.stats), hold(env.EXPORT_QUEUE, held.export)];
  return { held, release: () => restores.forEach((restore) => restore()) };
}

/**
 * An order placed through the API whose PLACED messages the queues took but nobody consumes (they are
 * held by the test), so each test delivers each event itself, in the order it chooses, and the Worker's
 * own consumers cannot race it. `productId` lets several orders share one product.
 */
export async function placeHeldOrder(quantity: number, productId?: number): Promise<PlacedOrder> {
  const user = await makeUser();
  await fund(user.id, 1_000_000);
  const product = productId ?? (await makeProduct({ price: 4_500, stock: 500 })).id;
  const { held, release } = holdQueues();
  try {
    const res = await call("POST", "/api/orders", {
      token: await tokenFor(user.id),
      body: { items: [{ productId: product, quantity }] },
    });
    expect(res.status).toBe(200);
    const orderId = res.body.id as number;
    // The dispatch runs after the answer: wait until the queues took both rows.
    await vi.waitFor(
      async () =>
        expect(await one("SELECT count(*) AS n FROM outbox WHERE order_id = ? AND dispatched_at IS NOT NULL", orderId)).toEqual({ n: 2 }),
      { timeout: 5_000 },
    );
    const mine = (bodies: unknown[]) => bodies.find((b) => (b as { orderId: number }).orderId === orderId) as Record<string, unknown>;
    return { order: res.body, productId: product, placed: { stats: mine(held.stats), export: mine(held.export) } };
  } finally {
    release();
  }
}

export interface Cancellation {
  stats: { event: "CANCELLED"; orderId: number; date: string; items: { productId: number; quantity: number }[] };
  export: { orderId: number; userId: number; status: "CANCELLED"; refundedAmount: number; cancelledAt: string };
  exportId: number;
}

/**
 * Cancels the order in D1 as the cancel endpoint's batch will: the order CANCELLED, its CANCELLED stats and
 * export outbox rows (undispatched, written at `at` unless `dispatchedAt` is given) and its CANCELLED export.
 */
export async function cancelInD1(
  { order }: PlacedOrder,
  at = new Date().toISOString(),
  dispatchedAt: string | null = null,
): Promise<Cancellation> {
  const stats = {
    event: "CANCELLED" as const,
    orderId: order.id,
    date: order.createdAt.slice(0, 10),
    items: order.items.map((i) => ({ productId: i.productId, quantity: i.quantity })),
  };
  const body = { orderId: order.id, userId: order.userId, status: "CANCELLED" as const, refundedAmount: order.paidAmount, cancelledAt: at };
  const outbox = (topic: "stats" | "export", payload: unknown) =>
    env.DB.prepare(
      "INSERT INTO outbox (order_id, topic, event, payload, created_at, dispatched_at) VALUES (?, ?, 'CANCELLED', ?, ?, ?)",
    ).bind(order.id, topic, JSON.stringify(payload), at, dispatchedAt);
  const [, , , exported] = await env.DB.batch<{ id: number }>([
    env.DB.prepare("UPDATE orders SET status = 'CANCELLED', cancelled_at = ? WHERE id = ?").bind(at, order.id),
    outbox("stats", stats),
    outbox("export", body),
    env.DB.prepare(
      `INSERT INTO order_exports (order_id, event, status, attempts, created_at, updated_at)
       VALUES (?, 'CANCELLED', 'PENDING', 0, ?, ?) RETURNING id`,
    ).bind(order.id, at, at),
  ]);
  return { stats, export: body, exportId: exported!.results[0]!.id };
}

/** The id of an order's export row for one event. */
export const exportIdOf = async (orderId: number, event: "PLACED" | "CANCELLED") =>
  (await one<{ id: number }>("SELECT id FROM order_exports WHERE order_id = ? AND event = ?", orderId, event)).id;
