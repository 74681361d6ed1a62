import { describe, expect, it } from "vitest";
import { retryDelaySeconds } from "../../src/stats/consumer";
import { StatsEventSchema } from "../../src/stats/event";

describe("retryDelaySeconds", () => {
  it("doubles from 5 s and caps at 5 minutes", () => {
    expect([1, 2, 3, 4, 5, 6, 7, 20].map(retryDelaySeconds)).toEqual([5, 10, 20, 40, 80, 160, 300, 300]);
  });
});

describe("StatsEventSchema", () => {
  const valid = { orderId: 1, date: "2026-11-23", items: [{ productId: 2, quantity: 3 }] };

  it("accepts the event order creation produces, ignoring extra fields; without `event` it is PLACED", () => {
    expect(StatsEventSchema.parse({ ...valid, userId: 7 })).toEqual({ event: "PLACED", ...valid });
    expect(StatsEventSchema.parse({ ...valid, event: "PLACED" })).toEqual({ event: "PLACED", ...valid });
  });

  it("accepts a cancellation, with the order's stat date and its lines", () => {
    expect(StatsEventSchema.parse({ ...valid, event: "CANCELLED" })).toEqual({ event: "CANCELLED", ...valid });
  });

  it("rejects impossible dates and non-positive numbers", () => {
    for (const bad of [
      { ...valid, date: "2026-02-30" },
      { ...valid, date: "23/11/2026" },
      { ...valid, orderId: 0 },
      { ...valid, items: [{ productId: 2, quantity: -1 }] },
      { ...valid, items: [{ productId: 2.5, quantity: 1 }] },
      { ...valid, event: "REFUNDED" },
      { ...valid, event: "cancelled" },
      { ...valid, event: null },
    ]) {
      expect(StatsEventSchema.safeParse(bad).success).toBe(false);
    }
  });
});
