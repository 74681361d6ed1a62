import { createMessageBatch, getQueueResult, createExecutionContext } from "cloudflare:test";
import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { fixedClock } from "../../src/lib/clock";
import { returnDeadStatsToOutbox } from "../../src/orders/outbox";
import { countBatch } from "../../src/stats/consumer";
import { call, tokenFor } from "../helpers/api";
import { fund, one } from "../helpers/db";
import { makeProduct, makeUser } from "../helpers/factories";

async function placedOrder(quantity: number) {
  const user = await makeUser();
  await fund(user.id, 100_000);
  const product = await makeProduct({ price: 1_000, stock: 50 });
  const res = await call("POST", "/api/orders", {
    token: await tokenFor(user.id),
    body: { items: [{ productId: product.id, quantity }] },
  });
  expect(res.status).toBe(200);
  const { payload } = await one<{ payload: string }>("SELECT payload FROM outbox WHERE order_id = ? AND topic = 'stats'", res.body.id);
  return { order: res.body, product, statsEvent: JSON.parse(payload) };
}

const sold = (productId: number) =>
  one<{ quantity: number }>("SELECT coalesce(sum(quantity), 0) AS quantity FROM product_sales_daily WHERE product_id = ?", productId);

describe("order events", () => {
  it("an order's stats event is counted once however often it is delivered", async () => {
    const { order, product, statsEvent } = await placedOrder(3);
    expect(statsEvent).toEqual({ event: "PLACED", requestId: expect.any(String), orderId: order.id, date: order.createdAt.slice(0, 10), items: [{ productId: product.id, quantity: 3 }] });
    const clock = fixedClock("2026-11-20T00:00:00.000Z");
    for (let delivery = 0; delivery < 3; delivery++) {
      const batch = createMessageBatch("order-stats", [{ id: `d${delivery}`, timestamp: new Date(), attempts: delivery + 1, body: statsEvent }]);
      await countBatch(batch, env.DB, clock);
      expect((await getQueueResult(batch, createExecutionContext())).explicitAcks).toEqual([`d${delivery}`]);
    }
    // The Worker's own queue delivery may also have counted it by now; either way the total is 3.
    await expect.poll(() => sold(product.id)).toEqual({ quantity: 3 });
  });

  it("a dead-lettered stats message goes back to the outbox for the relay instead of being dropped", async () => {
    const { order, statsEvent } = await placedOrder(1);
    await expect
      .poll(() => one("SELECT dispatched_at IS NOT NULL AS dispatched FROM outbox WHERE order_id = ? AND topic = 'stats'", order.id))
      .toEqual({ dispatched: 1 });
    const dead = createMessageBatch("order-stats-dlq", [
      { id: "dead", timestamp: new Date(), attempts: 1, body: statsEvent },
      { id: "junk", timestamp: new Date(), attempts: 1, body: "not an event" },
    ]);
    await returnDeadStatsToOutbox(dead, env.DB, new Date("2026-11-20T10:00:00.000Z"));
    expect((await getQueueResult(dead, createExecutionContext())).explicitAcks.sort()).toEqual(["dead", "junk"]);
    expect(await one("SELECT dispatched_at, created_at FROM outbox WHERE order_id = ? AND topic = 'stats'", order.id)).toEqual({
      dispatched_at: null,
      created_at: "2026-11-20T10:00:00.000Z",
    });
  });
});
