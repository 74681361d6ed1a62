import { describe, expect, it } from "vitest";
import { expiryOf, isWithinIssueWindow } from "../../src/coupons/rules";
import { CreateCouponBody } from "../../src/coupons/schemas";

describe("isWithinIssueWindow", () => {
  const window = { issueStartsAt: "2026-12-01T00:00:00.000Z", issueEndsAt: "2026-12-02T00:00:00.000Z" };
  const at = (iso: string) => new Date(iso);

  it("is closed at both ends", () => {
    expect(isWithinIssueWindow(window, at("2026-11-30T23:59:59.999Z"))).toBe(false);
    expect(isWithinIssueWindow(window, at("2026-12-01T00:00:00.000Z"))).toBe(true);
    expect(isWithinIssueWindow(window, at("2026-12-02T00:00:00.000Z"))).toBe(true);
    expect(isWithinIssueWindow(window, at("2026-12-02T00:00:00.001Z"))).toBe(false);
  });

  it("treats a missing bound as open", () => {
    const always = { issueStartsAt: null, issueEndsAt: null };
    expect(isWithinIssueWindow(always, at("1970-01-01T00:00:00.000Z"))).toBe(true);
    expect(isWithinIssueWindow({ ...window, issueEndsAt: null }, at("2099-01-01T00:00:00.000Z"))).toBe(true);
    expect(isWithinIssueWindow({ ...window, issueStartsAt: null }, at("2000-01-01T00:00:00.000Z"))).toBe(true);
  });
});

describe("expiryOf", () => {
  it("adds whole days of 24 h", () => {
    expect(expiryOf(new Date("2026-11-23T08:15:30.123Z"), 7).toISOString()).toBe("2026-11-30T08:15:30.123Z");
  });
});

describe("CreateCouponBody", () => {
  const valid = { name: "x", discountType: "PERCENT", discountValue: 100, totalQuantity: 1, validDays: 1 };

  it("accepts PERCENT up to 100 and any FIXED amount in range", () => {
    expect(CreateCouponBody.safeParse(valid).success).toBe(true);
    expect(CreateCouponBody.safeParse({ ...valid, discountType: "FIXED", discountValue: 50_000 }).success).toBe(true);
    expect(CreateCouponBody.parse(valid).minOrderAmount).toBe(0);
  });

  it("refuses PERCENT over 100 and a window that ends before it starts, on the right path", () => {
    const percent = CreateCouponBody.safeParse({ ...valid, discountValue: 101 });
    expect(percent.error?.issues.map((i) => i.path.join("."))).toEqual(["discountValue"]);
    const window = CreateCouponBody.safeParse({
      ...valid,
      issueStartsAt: "2026-12-01T09:00:00+09:00",
      issueEndsAt: "2026-12-01T00:00:00Z",
    });
    expect(window.error?.issues.map((i) => i.path.join("."))).toEqual(["issueEndsAt"]);
  });
});
