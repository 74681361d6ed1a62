import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { backoffSeconds } from "../../src/export/consumer";
import { discountFor } from "../../src/lib/money";

describe("discountFor", () => {
  it("FIXED takes min(value, total)", () => {
    expect(discountFor({ discountType: "FIXED", discountValue: 5_000 }, 20_000)).toBe(5_000);
    expect(discountFor({ discountType: "FIXED", discountValue: 5_000 }, 3_000)).toBe(3_000);
    expect(discountFor({ discountType: "FIXED", discountValue: 5_000 }, 0)).toBe(0);
  });

  it("PERCENT floors total * value / 100", () => {
    expect(discountFor({ discountType: "PERCENT", discountValue: 15 }, 9_999)).toBe(1_499);
    expect(discountFor({ discountType: "PERCENT", discountValue: 100 }, 12_345)).toBe(12_345);
    expect(discountFor({ discountType: "PERCENT", discountValue: 1 }, 99)).toBe(0);
  });

  it("is always an integer between 0 and the total", () => {
    fc.assert(
      fc.property(
        fc.constantFrom<"FIXED" | "PERCENT">("FIXED", "PERCENT"),
        fc.integer({ min: 1, max: 10_000_000 }),
        fc.integer({ min: 0, max: 500_000_000 }),
        (discountType, value, total) => {
          const discountValue = discountType === "PERCENT" ? (value % 100) + 1 : value;
          const discount = discountFor({ discountType, discountValue }, total);
          return Number.isInteger(discount) && discount >= 0 && discount <= total;
        },
      ),
    );
  });

  it("refuses a non-integer total", () => {
    expect(() => discountFor({ discountType: "FIXED", discountValue: 1 }, 1.5)).toThrow(RangeError);
  });
});

describe("export backoff", () => {
  it("doubles from 10 s and caps at 10 minutes", () => {
    expect([1, 2, 3, 4, 5, 6, 7, 8].map(backoffSeconds)).toEqual([10, 20, 40, 80, 160, 320, 600, 600]);
  });
});
