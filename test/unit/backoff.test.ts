import { describe, expect, it } from "vitest";
import { exponentialBackoff } from "../../src/lib/backoff";

describe("exponentialBackoff", () => {
  it("starts at the base on the first attempt and doubles up to the cap", () => {
    expect([1, 2, 3, 4, 5].map((attempts) => exponentialBackoff(attempts, 3, 40))).toEqual([3, 6, 12, 24, 40]);
  });

  it("treats a missing or zero attempt count as the first", () => {
    expect(exponentialBackoff(0, 10, 600)).toBe(10);
  });

  it("stays at the cap however many attempts (no overflow to Infinity)", () => {
    expect(exponentialBackoff(5000, 5, 300)).toBe(300);
  });
});
