import { describe, expect, it } from "vitest";
import { idempotencyKeyOf, OrderCancellationExport } from "../../src/export/event";
import { eventOf } from "../../src/orders/outbox";

const message = (body: unknown) => ({ body }) as Message;

describe("eventOf", () => {
  it("reads `event` on stats bodies and `status` on export bodies; neither is PLACED, as messages from before events", () => {
    expect(eventOf(message({ orderId: 1, date: "2026-11-30", items: [] }))).toBe("PLACED");
    expect(eventOf(message({ event: "PLACED", orderId: 1 }))).toBe("PLACED");
    expect(eventOf(message({ event: "CANCELLED", orderId: 1 }))).toBe("CANCELLED");
    expect(eventOf(message({ orderId: 1, userId: 2, items: [], completedAt: "x" }))).toBe("PLACED");
    expect(eventOf(message({ orderId: 1, status: "CANCELLED", refundedAmount: 0 }))).toBe("CANCELLED");
  });

  it("names no event for one it does not know, or a body that is not an object", () => {
    for (const body of [{ event: "REFUNDED" }, { event: "cancelled" }, { event: null }, { status: "LOST" }, "text", null, 7]) {
      expect(eventOf(message(body))).toBeNull();
    }
  });
});

describe("the cancellation export", () => {
  const valid = { orderId: 12, userId: 5, status: "CANCELLED", refundedAmount: 9000, cancelledAt: "2026-12-01T10:00:00.000Z" };

  it("is keyed order-<id>-cancel, beside order-<id> for the order itself", () => {
    expect(idempotencyKeyOf(12, "CANCELLED")).toBe("order-12-cancel");
    expect(idempotencyKeyOf(12, "PLACED")).toBe("order-12");
  });

  it("accepts the contract's body, and a refund of 0 (an order paid entirely by coupon)", () => {
    expect(OrderCancellationExport.parse(valid)).toEqual(valid);
    expect(OrderCancellationExport.parse({ ...valid, refundedAmount: 0, reason: "not sent" })).toEqual({ ...valid, refundedAmount: 0 });
  });

  it("refuses anything else", () => {
    for (const bad of [
      { ...valid, status: "COMPLETED" },
      { ...valid, refundedAmount: -1 },
      { ...valid, refundedAmount: 1.5 },
      { ...valid, cancelledAt: "yesterday" },
      { ...valid, orderId: 0 },
      { orderId: 12, userId: 5, status: "CANCELLED", cancelledAt: valid.cancelledAt },
    ]) {
      expect(OrderCancellationExport.safeParse(bad).success).toBe(false);
    }
  });
});
