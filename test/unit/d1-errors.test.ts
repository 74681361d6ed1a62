import { describe, expect, it } from "vitest";
import { isD1Unavailable } from "../../src/db/errors";

// Which D1 failures answer 503 (D1 unreachable, overloaded, reset) and which stay ours (500, or a refusal).

const wrapped = (message: string, cause: Error) => Object.assign(new Error(message), { cause });

describe("isD1Unavailable", () => {
  it("is true for D1's transient failures, bare or wrapped", () => {
    for (const message of [
      "D1_ERROR: Network connection lost.",
      "D1_ERROR: D1 DB is overloaded. Requests queued for too long.",
      "D1_ERROR: D1 DB's isolate exceeded its memory limit and was reset.",
      "D1_ERROR: D1 DB storage operation exceeded timeout which caused object to be reset.",
      "D1_ERROR: Cannot resolve D1 DB due to transient issue on remote node.",
    ]) {
      expect(isD1Unavailable(new Error(message)), message).toBe(true);
      expect(isD1Unavailable(wrapped("Failed query: select 1", new Error(message))), message).toBe(true);
    }
  });

  it("is false for SQL mistakes and constraints, whatever the wrapper's message quotes", () => {
    for (const message of [
      "D1_ERROR: no such column: nope: SQLITE_ERROR",
      "D1_ERROR: too many SQL variables",
      "D1_ERROR: UNIQUE constraint failed: users.id: SQLITE_CONSTRAINT",
      "D1_ERROR: CHECK constraint failed: products_stock_non_negative: SQLITE_CONSTRAINT",
    ]) {
      expect(isD1Unavailable(new Error(message)), message).toBe(false);
      // drizzle's wrapper quotes the bound values, which a client chose.
      expect(isD1Unavailable(wrapped("Failed query: insert ... params: Network connection lost,overloaded", new Error(message))), message).toBe(false);
    }
    expect(isD1Unavailable(new Error("something else"))).toBe(false);
    expect(isD1Unavailable("D1_ERROR: Network connection lost")).toBe(false);
  });
});
