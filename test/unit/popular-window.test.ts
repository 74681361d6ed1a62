import { describe, expect, it } from "vitest";
import { salesWindow } from "../../src/catalog/popular";

describe("salesWindow", () => {
  it("covers today and the three UTC days before it", () => {
    expect(salesWindow(new Date("2026-11-23T08:15:30.123Z"))).toEqual({ from: "2026-11-20", to: "2026-11-23" });
  });

  it("uses UTC dates at the day's edges and across months and leap days", () => {
    expect(salesWindow(new Date("2026-11-23T00:00:00.000Z"))).toEqual({ from: "2026-11-20", to: "2026-11-23" });
    expect(salesWindow(new Date("2026-11-23T23:59:59.999Z"))).toEqual({ from: "2026-11-20", to: "2026-11-23" });
    expect(salesWindow(new Date("2028-03-02T12:00:00.000Z"))).toEqual({ from: "2028-02-28", to: "2028-03-02" });
    expect(salesWindow(new Date("2027-01-01T01:00:00.000Z"))).toEqual({ from: "2026-12-29", to: "2027-01-01" });
  });
});
